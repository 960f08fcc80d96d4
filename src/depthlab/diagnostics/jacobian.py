"""Singular values of the per-example input-output Jacobian (dynamical isometry).

For one example x ∈ R^n and a network output y = F(x) ∈ R^m (inputs and outputs of any shape are
flattened per example), ``J = ∂y/∂x ∈ R^{m×n}`` and its singular values s_1 ≥ … ≥ s_r,
r = min(m, n). A network is dynamically isometric when all s_i ≈ 1 (Saxe et al. 2013,
arXiv 1312.6120; Pennington, Schoenholz & Ganguli 2017, arXiv 1711.04735). Bachlechner et al.
2020, "ReZero is All You Need: Fast Convergence at Large Depth" (arXiv 2003.04887, Fig. 5) show
ReZero keeps them at 1 (its Jacobian is the identity at initialisation) while deep Post-LN
Transformers collapse.

To study the residual stack alone (without a model's stem and classifier), pass ``model.blocks``
and the stack's input (e.g. ``model.stem(x)``): any callable/module mapping a batch to a batch.

Methods:

* ``dense``: the full J per example through ``torch.func.jacrev`` (reverse mode, chunked), then
  ``torch.linalg.svdvals``. O(min(m, n)) backward passes plus an O(m n r) SVD.
* ``lanczos``: matrix-free. Jacobian-vector products and vector-Jacobian products
  (``torch.func.vjp``; J t as the VJP of u ↦ Jᵀu) define the Gram operator G = J Jᵀ (m ≤ n) or
  Jᵀ J (m > n) of size r, whose top/bottom k eigenvalues are the squared top/bottom k singular
  values. Each G-product costs one JVP and one VJP. Default solver: block Lanczos with products
  batched through ``torch.func.vmap``; ``solver="arpack"`` uses ``scipy.sparse.linalg.eigsh``.
* ``hutchinson``: the mean squared singular value ``‖J‖_F²/r`` from ``E‖Jᵀu‖² = ‖J‖_F²`` with
  Rademacher u (Hutchinson 1989); reported as the RMS singular value (``kind="rms"``).

BatchNorm in train mode normalises with batch statistics, which couples the examples, so a
per-example Jacobian is not defined there: the Jacobian is taken in eval mode (running
statistics) by default, and asking for ``train_mode=True`` on a model with BatchNorm is an error.
A freshly built BN model has running variance 1 (BN is then the identity in eval mode); call
:func:`calibrate_batchnorm` first to study it as it computes on data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import scipy.linalg
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import nn

from depthlab.registry import DepthlabError

METHODS = ("auto", "dense", "lanczos", "hutchinson")
JACOBIAN_COLUMNS = ["example", "index", "singular_value", "kind", "method"]
DENSE_LIMIT = 2**22  # auto: dense when m·n ≤ this (a 2048 × 2048 Jacobian)


def _batchnorms(model: object) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        return []
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact average over ``batches`` (train-mode
    forward passes with cumulative averaging, ``momentum=None``); restores train/eval flags."""
    bns = _batchnorms(model)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        with torch.no_grad():
            for xb in batches:
                model(xb)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, flag in flags:
            m.training = flag
    return model


def _per_example(model: Callable, shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """g(v) = flatten(model(v reshaped to (1, *shape))): R^n -> R^m for one example."""

    def g(v: torch.Tensor) -> torch.Tensor:
        return model(v.reshape(1, *shape)).reshape(-1)

    return g


def _check_k(k: int | None, r: int, method: str) -> None:
    if k is None:
        return
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise DepthlabError(f"k must be a positive integer, got {k!r}")
    if method == "lanczos" and k >= r:
        raise DepthlabError(
            f"k={k} is not smaller than the Jacobian's dimension min(m, n)={r}; the matrix-free "
            f"method needs k < {r} — use a smaller k or method='dense' for all singular values"
        )
    if k > r:
        raise DepthlabError(
            f"k={k} exceeds the Jacobian's dimension min(m, n)={r}; use k ≤ {r} (or k=None for all)"
        )


def _check_rtol(rtol: float | None) -> None:
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise DepthlabError(
            f"rtol must be a number in (0, 1) (e.g. 1e-3) or None to use the residual test only, "
            f"got {rtol!r}"
        )


def dense_singular_values(g: Callable, v: torch.Tensor, chunk_size: int | None = None):
    """All singular values (descending) of the Jacobian of ``g`` at the flat point ``v``."""
    jac = torch.func.jacrev(g, chunk_size=chunk_size)(v)  # (m, n)
    return torch.linalg.svdvals(jac.detach()).cpu().numpy().astype(np.float64)


class _GramOperator:
    """G = J Jᵀ (m ≤ n) or Jᵀ J (m > n) at one example, from JVPs and VJPs."""

    def __init__(self, g: Callable, v: torch.Tensor) -> None:
        self.g, self.v = g, v
        out, self.vjp_fn = torch.func.vjp(g, v)
        self.m, self.n = out.numel(), v.numel()
        self.dtype, self.device = v.dtype, v.device
        self.size = min(self.m, self.n)
        self.products = 0
        # J t as the VJP of the linear map u ↦ Jᵀu (the "double-VJP" trick): it reuses the saved
        # forward graph, so it costs about one backward pass, unlike a fresh forward-mode JVP.
        try:
            _, self._jvp_fn = torch.func.vjp(lambda u: self.vjp_fn(u)[0], torch.zeros_like(out))
        except RuntimeError:  # an op without double backward: forward mode instead
            self._jvp_fn = None

    def jvp(self, t: torch.Tensor) -> torch.Tensor:
        if self._jvp_fn is not None:
            return self._jvp_fn(t)[0]
        return torch.func.jvp(self.g, (self.v,), (t,))[1]

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        return self.vjp_fn(u)[0]

    def matvec(self, a: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(a).reshape(-1), dtype=self.dtype)
        t = t.to(self.device)
        out = self.jvp(self.vjp(t)) if self.m <= self.n else self.vjp(self.jvp(t))
        self.products += 1
        return out.detach().double().cpu().numpy()

    def apply_rows(self, t: torch.Tensor) -> torch.Tensor:
        """G applied to each row of ``t`` (b × size), the b products batched through
        ``torch.func.vmap``; rows in, rows out, in ``t``'s dtype and device."""
        u = t.to(dtype=self.dtype, device=self.device)
        vjp = torch.func.vmap(self.vjp)
        jvp = torch.func.vmap(self.jvp)
        out = jvp(vjp(u)) if self.m <= self.n else vjp(jvp(u))
        self.products += t.shape[0]
        return out.detach().to(t.dtype)

    def linear_operator(self) -> LinearOperator:
        return LinearOperator((self.size, self.size), matvec=self.matvec, dtype=np.float64)


def lanczos_singular_values(
    g: Callable,
    v: torch.Tensor,
    k: int,
    which: str = "both",
    tol: float = 1e-6,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Top and/or bottom ``k`` singular values of the Jacobian of ``g`` at ``v``, matrix-free.

    ARPACK's implicitly restarted Lanczos on the Gram operator G (module docstring);
    ``s = √λ(G)``. Returns ``{"top": descending, "bottom": descending, "products": count}``.
    """
    op = _GramOperator(g, v)
    _check_k(k, op.size, "lanczos")
    lin = op.linear_operator()
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(op.size)
    ncv = min(op.size, max(2 * k + 1, 32))
    out: dict[str, np.ndarray] = {}
    wanted = ("top", "bottom") if which == "both" else (which,)
    for part in wanted:
        kind = "LA" if part == "top" else "SA"
        try:
            lam = eigsh(lin, k=k, which=kind, v0=v0, ncv=ncv, tol=tol, return_eigenvectors=False)
        except ArpackNoConvergence as e:
            raise DepthlabError(
                f"Lanczos did not converge for the {part} {k} singular values; loosen tol "
                f"(now {tol}) or use method='dense'"
            ) from e
        out[part] = np.sqrt(np.clip(np.sort(lam)[::-1], 0.0, None))
    out["products"] = np.array(op.products)
    return out


def _banded_ritz_residuals(band: np.ndarray, theta: np.ndarray, b_last: np.ndarray) -> np.ndarray:
    """Residual bounds ``‖G x − θ x‖`` for Ritz values θ of a block Lanczos T (lower band storage,
    ``band[i - j, j] = T[i, j]``) with next coupling block ``b_last``: x = V y with y from two
    steps of inverse iteration on ``T − θ I`` (banded LU, O(dim·b²) each), and
    ``‖G x − θ x‖ ≤ ‖(T − θ I) y‖ + ‖B y_last‖`` for any unit y — a valid bound even inside a
    cluster of Ritz values, where inverse iteration returns a mix of their vectors."""
    w, n = band.shape[0] - 1, band.shape[1]
    full = np.zeros((2 * w + 1, n))  # general band storage: full[w + i - j, j] = T[i, j]
    full[w:] = band
    for o in range(1, w + 1):  # upper part: T[j - o, j] = T[j, j - o] = band[o, j - o]
        full[w - o, o:] = band[o, : n - o]
    rng = np.random.default_rng(0)
    out = np.empty(len(theta))
    for i, th in enumerate(theta):
        shifted = full.copy()
        shifted[w] -= th
        y = rng.standard_normal(n)
        for _ in range(2):
            try:
                y = scipy.linalg.solve_banded((w, w), shifted, y, check_finite=False)
            except np.linalg.LinAlgError:  # θ exactly an eigenvalue of T: nudge the shift
                shifted[w] -= max(abs(th), 1.0) * 1e-12
                y = scipy.linalg.solve_banded((w, w), shifted, y, check_finite=False)
            y /= np.linalg.norm(y)
        ty = np.zeros(n)  # (T − θ I) y from the general band
        for o in range(-w, w + 1):  # full[w + o, j] = T[j + o, j]
            lo, hi = max(0, -o), min(n, n - o)
            ty[lo + o : hi + o] += full[w + o, lo:hi] * y[lo:hi]
        ty -= th * y
        out[i] = np.linalg.norm(ty) + np.linalg.norm(b_last @ y[n - b_last.shape[1] :])
    return out


def block_lanczos_singular_values(
    g: Callable,
    v: torch.Tensor,
    k: int,
    which: str = "both",
    tol: float = 1e-6,
    seed: int = 0,
    block: int | None = None,
    max_dim: int | None = None,
    rtol: float | None = None,
    reorth: str = "partial",
) -> dict[str, np.ndarray]:
    """Top and/or bottom ``k`` singular values of the Jacobian of ``g`` at ``v``, matrix-free,
    with a block Krylov method whose products run ``block`` at a time (``torch.func.vmap``).

    Block Lanczos (Golub & Underwood 1977) on the Gram operator G: the three-term recurrence
    ``G Q_j = Q_{j-1} B_{j-1}ᵀ + Q_j A_j + Q_{j+1} B_j`` builds an orthonormal basis of the block
    Krylov space ``span{Q, G Q, G² Q, …}`` and the block-tridiagonal ``T = Vᵀ G V`` (bandwidth
    ``block``), whose eigenvalues — the Ritz values θ, ``s = √θ`` — approach the extreme
    eigenvalues of G from inside. T is kept in banded storage and its wanted eigenvalues come
    from LAPACK's banded solver, O(dim·block²) per check instead of O(dim³) for a dense T.

    Orthogonality is kept by *partial reorthogonalisation* (Simon 1984, "The Lanczos algorithm
    with partial reorthogonalization", Math. Comp. 42; block form: Grimes, Lewis & Simon 1994,
    SIAM J. Matrix Anal. Appl. 15): the recurrence ``Ω_{k,j+1} B_j = B_kᵀ Ω_{k+1,j} + A_k Ω_{k,j}
    + B_{k-1} Ω_{k-1,j} − Ω_{k,j} A_j − Ω_{k,j-1} B_{j-1}ᵀ`` (plus a rounding term) estimates
    the inner products ``Ω_{k,j} = Q_kᵀ Q_j`` at O(dim·block²) a step, and a new block is
    reorthogonalised against the whole basis (together with the next one) only when an estimate
    passes √ε — semi-orthogonality, which keeps T's eigenvalues accurate to rounding. The full
    reorthogonalisation reads the whole basis twice; on a 2-core CPU it dominated the run
    before (``reorth="full"`` does it every step, for comparison and tests). The basis and the
    reorthogonalisation stay in torch, on the model's device and thread pool.

    Every so often (each time the basis has grown by an eighth) it checks two stopping rules:

    * **residual** (rigorous): every wanted Ritz value has ``‖G x − θ x‖ ≤ tol·θ`` for a unit
      x = V y, bounded by ``‖(T − θ I) y‖ + ‖B_j y_last‖`` with y from inverse iteration on the
      banded T (:func:`_banded_ritz_residuals`, O(dim·b²)) — then an eigenvalue lies within
      tol·θ of θ (s within about tol/2);
    * **stagnation** (``rtol``, off by default): every wanted Ritz value moved by less than
      ``rtol`` (relative) since the previous check. Ritz values converge roughly like the square
      of the residual, so on clustered ends — the bottom of a Jacobian's spectrum, typically —
      they are accurate long before the residual rule passes; the change over one check
      interval then estimates the remaining error (in ``bench_jacobian.py``, an ``rtol`` of
      1e-3 gave errors ≤ 1e-3 against dense SVD).

    ``block`` (default ``max(k, 8)``) trades batching for polynomial degree: each step adds one
    Krylov power per block vector, so for a slowly converging end a block near k reaches the
    needed degree with far fewer products than a wide block. ``max_dim`` caps the basis (default
    ``max(600, 20·k)``); reaching it raises a DepthlabError. A basis that would span the whole
    space (small problems) is replaced by the dense Gram matrix (``size`` products), exact.
    Both ends come from one basis. Returns ``{"top": descending, "bottom": descending,
    "products": count, "dim": basis size, "reorths": full reorthogonalisations}``.
    """
    _check_rtol(rtol)
    if reorth not in ("partial", "full"):
        raise DepthlabError(f"unknown reorth '{reorth}'; choose one of: partial, full")
    op = _GramOperator(g, v)
    _check_k(k, op.size, "lanczos")
    size = op.size
    b = max(1, min(block or max(k, 8), size))
    max_dim = min(size, max_dim or max(600, 20 * k))
    wanted = ("top", "bottom") if which == "both" else (which,)
    low = op.dtype in (torch.float32, torch.float16, torch.bfloat16)
    # the basis is kept in the model's precision (float32 products carry no more digits), which
    # halves the memory traffic of the reorthogonalisation
    bdt = torch.float32 if low else torch.float64
    eps = float(torch.finfo(bdt).eps)
    dev = op.device

    def small(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=bdt, device=dev)

    rng = np.random.default_rng(seed)
    basis = torch.empty(max_dim + b, size, dtype=bdt, device=dev)  # rows: Q_0ᵀ, Q_1ᵀ, …
    basis[:b] = small(np.linalg.qr(rng.standard_normal((size, b)))[0].T)
    band = np.zeros((b + 1, max_dim + b))  # T in LAPACK's lower band storage
    a_s: list[np.ndarray] = []  # A_0, A_1, …
    b_s: list[np.ndarray] = []  # B_0, B_1, …
    om_cur = np.eye(b)[None]  # Ω_{k,j}, k = 0..j (the estimated Q_kᵀ Q_j)
    om_prev = np.zeros((0, b, b))  # Ω_{k,j-1}, k = 0..j-1
    gnorm, reorths, full_next = 0.0, 0, False
    j, next_check, last, result, change = 0, 0, None, None, None
    while result is None:
        dim = (j + 1) * b
        q = basis[dim - b : dim]
        w = op.apply_rows(q).to(bdt)
        a = (q @ w.T).double().cpu().numpy()
        a = (a + a.T) / 2
        w -= small(a) @ q
        if j > 0:
            w -= small(b_s[-1]) @ basis[dim - 2 * b : dim - b]
        near = basis[max(0, dim - 2 * b) : dim]  # local reorthogonalisation (cheap)
        w -= (w @ near.T) @ near
        full, full_next = reorth == "full" or full_next, False
        if full:
            w -= (w @ basis[:dim].T) @ basis[:dim]
            reorths += 1
        while True:
            qn, r = torch.linalg.qr(w.T.double())
            r = r.cpu().numpy()
            gnorm = max(gnorm, float(np.abs(a).sum(1).max() + np.abs(r).sum(0).max()))
            broke = np.abs(np.diag(r)) <= 100 * eps * max(gnorm, 1e-300)
            # partial reorthogonalisation: estimate Ω_{k,j+1} for k < j (Ω_{j,j+1} is local)
            om_next = np.full((j + 2, b, b), eps)
            om_next[j + 1] = np.eye(b)
            if full or broke.any() or j == 0:
                break
            est = _omega_estimate(a_s, b_s, om_cur, om_prev, a, r, eps)
            if np.abs(est).max() <= math.sqrt(eps):
                om_next[:j] = est
                break
            # semi-orthogonality is about to be lost: reorthogonalise this block against the
            # whole basis now, and the next one at the next step
            w -= (w @ basis[:dim].T) @ basis[:dim]
            reorths += 1
            full = full_next = True
        qn = qn.to(bdt)
        if broke.any():  # an invariant subspace: go on with fresh random directions
            fresh = small(rng.standard_normal((size, int(broke.sum()))))
            _refill(qn, broke, fresh, basis[:dim])
            r[broke] = 0.0
        _store_band(band, a, r, dim - b)
        a_s.append(a)
        b_s.append(r)
        om_prev, om_cur = om_cur, om_next
        basis[dim : dim + b] = qn.T
        j += 1
        if (dim >= next_check or dim + b > max_dim) and dim >= min(2 * k, max_dim):
            theta = _band_ends(band[:, :dim], wanted, k)
            now = np.concatenate([theta[p] for p in wanted])
            # eigenvalues below ε·‖G‖ are zero to the products' precision: measured against it
            floor = max(eps * gnorm, 1e-300)
            change = None if last is None else np.abs(now - last) / np.maximum(np.abs(now), floor)
            if _converged(band[:, :dim], theta, r, change, tol, rtol, floor):
                result = theta
                break
            last = now
            next_check = dim + max(b, dim // 8)  # each check costs O(dim·b²): every eighth
        if dim + b > size:  # the basis would span the space: the dense Gram matrix instead
            lam = _dense_gram_eigenvalues(op, b, bdt)
            result = {p: (lam[-k:] if p == "top" else lam[:k]) for p in wanted}
            dim = size
        elif dim + b > max_dim:
            raise _not_converged(dim, last, change, tol)
    out: dict[str, np.ndarray] = {}
    for part, theta in result.items():
        out[part] = np.sqrt(np.clip(np.sort(theta)[::-1], 0.0, None))
    out["products"] = np.array(op.products)
    out["dim"] = np.array(dim)
    out["reorths"] = np.array(reorths)
    return out


def _band_ends(band: np.ndarray, wanted: tuple[str, ...], k: int) -> dict[str, np.ndarray]:
    """The k largest (``top``) and/or smallest (``bottom``) eigenvalues of the banded T."""
    t_dim = band.shape[1]
    out = {}
    for part in wanted:
        lo = t_dim - k if part == "top" else 0
        out[part] = scipy.linalg.eig_banded(
            band, lower=True, eigvals_only=True, select="i", select_range=(lo, lo + k - 1)
        )
    return out


def _converged(band, theta: dict, r, change, tol: float, rtol, floor: float) -> bool:
    """The stopping rules: every wanted Ritz value moved by ≤ ``rtol`` since the last check
    (stagnation), or has a residual ≤ ``tol·θ`` (rigorous)."""
    if change is not None and rtol is not None and np.all(change <= rtol):
        return True
    return all(
        bool(np.all(_banded_ritz_residuals(band, th, r) <= tol * np.maximum(np.abs(th), floor)))
        for th in theta.values()
    )


def _omega_estimate(a_s, b_s, om_cur, om_prev, a, r, eps: float) -> np.ndarray:
    """Simon's recurrence for the next block's inner products with the basis, ``Ω_{k,j+1}``
    for k < j (see :func:`block_lanczos_singular_values`), plus its rounding term."""
    j = len(a_s)
    bs, as_ = np.stack(b_s), np.stack(a_s)  # B_0..B_{j-1}, A_0..A_{j-1}
    t = bs.transpose(0, 2, 1) @ om_cur[1 : j + 1] + as_ @ om_cur[:j]
    t[1:] += bs[:-1] @ om_cur[: j - 1]
    t -= om_cur[:j] @ a
    t -= om_prev[:j] @ b_s[-1].T
    rinv = np.linalg.inv(r)
    est = t @ rinv
    est += np.sign(est) * eps * np.abs(a).sum(1).max() * np.linalg.norm(rinv, 2)
    return est


def _refill(qn: torch.Tensor, broke: np.ndarray, fresh: torch.Tensor, basis: torch.Tensor) -> None:
    """Replace the broken columns of ``qn`` by ``fresh`` random directions made orthogonal to
    the basis and to the kept columns (twice, for rounding)."""
    dev = qn.device
    kept = qn[:, torch.as_tensor(~broke, device=dev)]
    for _ in range(2):
        fresh -= basis.T @ (basis @ fresh)
        fresh -= kept @ (kept.T @ fresh)
        fresh = torch.linalg.qr(fresh)[0]
    qn[:, torch.as_tensor(broke, device=dev)] = fresh


def _store_band(band: np.ndarray, a: np.ndarray, r: np.ndarray, col: int) -> None:
    """A_j on the diagonal and B_j below it, in LAPACK's lower band storage from column ``col``."""
    b = a.shape[0]
    for i in range(b):
        for c in range(i + 1):
            band[i - c, col + c] = a[i, c]
        for c in range(i, b):
            band[b + i - c, col + c] = r[i, c]


def _dense_gram_eigenvalues(op, b: int, bdt: torch.dtype) -> np.ndarray:
    """All eigenvalues of the Gram operator, from its dense matrix (``size`` products)."""
    eye = torch.eye(op.size, dtype=bdt, device=op.device)
    gram = torch.cat([op.apply_rows(eye[i : i + b]) for i in range(0, op.size, b)])
    gram = gram.double().cpu().numpy()
    return np.linalg.eigvalsh((gram + gram.T) / 2)


def _not_converged(dim: int, last, change, tol: float) -> DepthlabError:
    where = ""
    if last is not None:  # what the user would get, and how fast it still moves
        sv = np.sqrt(np.clip(last, 0.0, None))
        where = f" (singular values now {np.array2string(sv, precision=4)}"
        if change is not None:
            where += f", still moving by up to {float(change.max()):.1e} per check"
        where += ")"
    return DepthlabError(
        f"block Lanczos did not converge within {dim} basis vectors{where}; loosen tol "
        f"(now {tol}) or set rtol, raise max_dim, or use method='dense'"
    )


def hutchinson_mean_sq(g: Callable, v: torch.Tensor, samples: int = 64, seed: int = 0) -> float:
    """Unbiased estimate of ``‖J‖_F² / min(m, n)`` (the mean squared singular value) from
    ``samples`` Rademacher probes on the smaller side of J."""
    op = _GramOperator(g, v)
    gen = torch.Generator().manual_seed(seed)
    side = op.m if op.m <= op.n else op.n
    total = 0.0
    for _ in range(samples):
        z = (torch.randint(0, 2, (side,), generator=gen) * 2 - 1).to(op.dtype).to(op.device)
        w = op.vjp(z) if op.m <= op.n else op.jvp(z)
        total += float((w.detach().double() ** 2).sum())
    return total / samples / op.size


def jacobian_spectrum(
    model: Callable,
    x: torch.Tensor,
    method: str = "auto",
    k: int | None = None,
    *,
    train_mode: bool = False,
    num_examples: int | None = None,
    dense_limit: int = DENSE_LIMIT,
    chunk_size: int | None = 256,
    tol: float = 1e-4,
    samples: int = 64,
    seed: int = 0,
    solver: str = "block",
    which: str = "both",
    rtol: float | None = None,
    max_dim: int | None = None,
) -> pd.DataFrame:
    """Singular values of the input-output Jacobian of ``model`` at each example of ``x``.

    ``x`` is a batch (N, ...) of real inputs; ``num_examples`` limits how many are analysed.
    Returns columns ``example``, ``index`` (position in the descending order, 0 = largest),
    ``singular_value``, ``kind`` (``all``; ``top``/``bottom`` when ``k`` is given; ``rms`` for
    Hutchinson) and ``method``. ``method="auto"`` is ``dense`` when m·n ≤ ``dense_limit``, else
    ``lanczos`` (default k = 6 there). With ``dense`` and a ``k``, the top and bottom k of the
    full spectrum are returned (for comparison with ``lanczos``). ``solver`` picks the Lanczos
    variant: ``"block"`` (:func:`block_lanczos_singular_values`, batched products, default) or
    ``"arpack"`` (:func:`lanczos_singular_values`); ``which`` = ``"both"``, ``"top"`` or
    ``"bottom"`` picks the ends it computes (the bottom of a rank-deficient J converges slowly).
    ``tol`` is the Lanczos residual tolerance; ``rtol`` (block solver) adds the stagnation stop
    of :func:`block_lanczos_singular_values`, the practical choice for the bottom end;
    ``max_dim`` caps its Krylov basis (default ``max(600, 20·k)``).
    """
    _check_spectrum_args(solver, which, rtol, max_dim, method)
    if not torch.is_tensor(x) or x.dim() < 1 or not x.is_floating_point():
        raise DepthlabError(
            "jacobian_spectrum needs a floating-point batch (N, ...); for token models pass the "
            "embedded sequence and the module that maps it (e.g. model.blocks)"
        )
    bns = _batchnorms(model)
    if train_mode and bns:
        raise DepthlabError(
            f"the model has {len(bns)} BatchNorm layer(s): in train mode they normalise with batch "
            "statistics, which couples the examples, so a per-example Jacobian is not defined; use "
            "train_mode=False (eval mode, running statistics; see calibrate_batchnorm)"
        )
    is_module = isinstance(model, nn.Module)
    flags = [(m, m.training) for m in model.modules()] if is_module else []
    grads = [(p, p.requires_grad) for p in model.parameters()] if is_module else []
    if is_module:
        model.train(train_mode)
        model.requires_grad_(False)  # differentiate w.r.t. the input only
        p = next(model.parameters(), None)
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
    try:
        shape = tuple(x.shape[1:])
        g = _per_example(model, shape)
        n_ex = x.shape[0] if num_examples is None else min(int(num_examples), x.shape[0])
        n = math.prod(shape)
        with torch.no_grad():
            m = g(x[0].reshape(-1)).numel()
        r = min(m, n)
        if method == "auto":
            method = "dense" if m * n <= dense_limit else "lanczos"
        if method == "lanczos" and k is None:
            k = min(6, r - 1)
        if method != "hutchinson":
            _check_k(k, r, method)
        rows: list[dict] = []
        opts = {"chunk_size": chunk_size, "solver": solver, "which": which, "tol": tol,
                "rtol": rtol, "max_dim": max_dim, "samples": samples}  # fmt: skip
        for e in range(n_ex):
            v = x[e].reshape(-1).detach()
            parts = _example_spectrum(g, v, method, k, r, seed + e, opts)
            for kind, (vals, start) in parts.items():
                for j, val in enumerate(vals):
                    rows.append(
                        {
                            "example": e,
                            "index": start + j,
                            "singular_value": float(val),
                            "kind": kind,
                            "method": method,
                        }
                    )
        return pd.DataFrame(rows, columns=JACOBIAN_COLUMNS)
    finally:
        for m, flag in flags:
            m.training = flag
        for p, req in grads:
            p.requires_grad_(req)


def _check_spectrum_args(solver: str, which: str, rtol, max_dim, method: str) -> None:
    if solver not in ("block", "arpack"):
        raise DepthlabError(f"unknown solver '{solver}'; choose one of: block, arpack")
    if which not in ("both", "top", "bottom"):
        raise DepthlabError(f"unknown which '{which}'; choose one of: both, top, bottom")
    _check_rtol(rtol)
    if max_dim is not None and (
        not isinstance(max_dim, (int, np.integer)) or isinstance(max_dim, bool) or max_dim < 1
    ):
        raise DepthlabError(f"max_dim must be a positive integer or None, got {max_dim!r}")
    if method not in METHODS:
        raise DepthlabError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")


def _example_spectrum(g, v, method: str, k, r: int, seed: int, opts: dict) -> dict:
    """``{kind: (values, index of the first)}`` of one example's Jacobian ``g`` at ``v``."""
    if method == "dense":
        s = dense_singular_values(g, v, opts["chunk_size"])
        return {"all": (s, 0)} if k is None else {"top": (s[:k], 0), "bottom": (s[r - k :], r - k)}
    if method == "lanczos":
        if opts["solver"] == "block":
            res = block_lanczos_singular_values(
                g, v, k, which=opts["which"], tol=opts["tol"], seed=seed, rtol=opts["rtol"],
                max_dim=opts["max_dim"],
            )  # fmt: skip
        else:
            res = lanczos_singular_values(g, v, k, which=opts["which"], tol=opts["tol"], seed=seed)
        parts = {"top": (res.get("top"), 0), "bottom": (res.get("bottom"), r - k)}
        return {kind: part for kind, part in parts.items() if part[0] is not None}
    rms = math.sqrt(hutchinson_mean_sq(g, v, opts["samples"], seed))
    return {"rms": (np.array([rms]), 0)}


def spectrum_summary(df: pd.DataFrame) -> dict[str, float]:
    """``mean_log_sv`` and ``std_log_sv`` (natural log) and ``share_within_2`` (share of singular
    values in [1/2, 2]) over the singular values of a :func:`jacobian_spectrum` frame (Hutchinson
    RMS rows excluded; zeros are clipped to 1e-300 before the log)."""
    s = df.loc[df["kind"] != "rms", "singular_value"].to_numpy(dtype=np.float64)
    if s.size == 0:
        raise DepthlabError("spectrum_summary needs singular values (method dense or lanczos)")
    logs = np.log(np.clip(s, 1e-300, None))
    return {
        "mean_log_sv": float(logs.mean()),
        "std_log_sv": float(logs.std()),
        "share_within_2": float(((s >= 0.5) & (s <= 2.0)).mean()),
    }
