"""Freed memory kept for reuse (glibc): the page faults it saves, the memory it gives back, and
the processes that set it (sweep workers, the CLI). Each probe runs in a fresh process, since
``mallopt`` cannot be undone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import depthlab.heap as heap
import heap_probe  # tests/: the sweep worker imports it through the parent's sys.path
from depthlab.experiments.runner import make_pool

TESTS = Path(__file__).parent
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
#: page faults of heap_probe.refault_pages where the memory was given back: 128 MiB / 4 KiB
GIVEN_BACK = heap_probe.BLOCKS * heap_probe.BLOCK // 4096


def _probe(code: str, env: dict[str, str] | None = None) -> list[str]:
    """Run ``code`` in a fresh interpreter with tests/ importable and the sweep's modules
    imported, as in a sweep worker; the words it printed."""
    full = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        f"import depthlab.experiments.runner, heap_probe\n{code}"
    )
    out = subprocess.run(
        [sys.executable, "-c", full], check=True, capture_output=True, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    return out.stdout.split()


@needs_glibc
def test_kept_memory_is_reused_where_glibc_gives_it_back():
    default, kept, reused = _probe(
        "from depthlab.heap import keep_freed_memory\nheap_probe.glibc_defaults()\n"
        "print(heap_probe.refault_pages(), keep_freed_memory(), heap_probe.refault_pages())"
    )
    assert int(default) > GIVEN_BACK // 2  # the freed 128 MiB were given back: every page again
    assert kept == "True"
    assert int(reused) < GIVEN_BACK // 100


@needs_glibc
def test_environment_variable_turns_it_off():
    kept, faults = _probe(
        "from depthlab.heap import keep_freed_memory\nheap_probe.glibc_defaults()\n"
        "print(keep_freed_memory(), heap_probe.refault_pages())",
        {heap.ENV_VAR: "0"},
    )
    assert kept == "False"
    assert int(faults) > GIVEN_BACK // 2  # glibc left as it was


@needs_glibc
def test_release_gives_the_kept_memory_back():
    mib = 1 << 20
    got = _probe(
        "from depthlab.heap import keep_freed_memory\nkeep_freed_memory()\n"
        "print(*heap_probe.resident_after(64 << 20, False), "
        "*heap_probe.resident_after(64 << 20, True))"
    )
    held, kept, held2, released = map(int, got)
    assert held - kept < 8 * mib  # freed but kept: still resident
    assert held2 - released > 48 * mib  # malloc_trim handed the 64 MiB back


@needs_glibc
def test_sweep_workers_keep_freed_memory():
    pool = make_pool(1, 1)
    try:
        faults, pid = pool.submit(heap_probe.worker_refaults).result(timeout=120)
    finally:
        pool.shutdown()
    assert pid != os.getpid()
    assert faults < GIVEN_BACK // 100


@needs_glibc
def test_the_cli_process_keeps_freed_memory():
    got = _probe(
        "import contextlib, io\nfrom depthlab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    main(['list'])\n"
        "print(heap_probe.refault_pages())"
    )
    assert int(got[0]) < GIVEN_BACK // 100


def test_without_glibc_both_do_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.keep_freed_memory() is False
    assert heap.release_freed_memory() is False


@needs_glibc
@pytest.mark.parametrize("bad", [0, -1, 2**31])
def test_bad_threshold_is_refused(bad):
    with pytest.raises(ValueError, match="mmap_threshold"):
        heap.keep_freed_memory(bad)


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_off_values_turn_it_off(monkeypatch, value):
    monkeypatch.setenv(heap.ENV_VAR, value)
    assert heap.enabled() is False
    assert heap.keep_freed_memory() is False


@pytest.mark.parametrize("value", ["1", "on", "TRUE", ""])
def test_on_values_and_unset_leave_it_on(monkeypatch, value):
    monkeypatch.setenv(heap.ENV_VAR, value)
    assert heap.enabled() is True
    monkeypatch.delenv(heap.ENV_VAR)
    assert heap.enabled() is True


def test_a_bad_value_is_refused_before_anything_runs(monkeypatch, tmp_path, capsys):
    from depthlab.cli import main
    from depthlab.registry import DepthlabError

    monkeypatch.setenv(heap.ENV_VAR, "fasle")
    out = tmp_path / "runs"
    assert main(["run", "deep-fc", "--preset", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and heap.ENV_VAR in err[0] and "set it to 0" in err[0]
    assert not out.exists()
    with pytest.raises(DepthlabError, match=heap.ENV_VAR):
        make_pool(1, 2)  # refused in the parent, not as a broken worker


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``; "" unknown)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


@pytest.mark.parametrize(
    "given, expected",
    [
        (None, "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's own setting kept
        ("glibc.malloc.hugetlb = 2:glibc.pthread.rseq=0", None),  # kept as it is
    ],
)
def test_worker_environment_adds_the_huge_page_tunable(monkeypatch, given, expected):
    monkeypatch.setattr(heap, "_glibc", lambda: object())
    env = {"PATH": "/bin"} if given is None else {"PATH": "/bin", heap.TUNABLES_VAR: given}
    got = heap.worker_environment(env)
    assert got[heap.TUNABLES_VAR] == (given if expected is None else expected)
    assert got["PATH"] == "/bin" and env.get(heap.TUNABLES_VAR) == given  # a copy


@pytest.mark.parametrize("var", [heap.HUGE_PAGES_VAR, heap.ENV_VAR])
def test_worker_environment_off_or_without_glibc(monkeypatch, var):
    monkeypatch.setattr(heap, "_glibc", lambda: object())
    monkeypatch.setenv(var, "0")
    assert heap.TUNABLES_VAR not in heap.worker_environment({"PATH": "/bin"})
    monkeypatch.delenv(var)
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.worker_environment({"PATH": "/bin"}) == {"PATH": "/bin"}


def test_a_bad_huge_pages_value_is_refused(monkeypatch, tmp_path, capsys):
    from depthlab.cli import main
    from depthlab.registry import DepthlabError

    monkeypatch.setenv(heap.HUGE_PAGES_VAR, "maybe")
    out = tmp_path / "runs"
    assert main(["run", "deep-fc", "--preset", "smoke", "--out", str(out)]) == 2  # --jobs 1 too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and heap.HUGE_PAGES_VAR in err[0] and "set it to 0" in err[0]
    assert not out.exists()
    with pytest.raises(DepthlabError, match=f"{heap.HUGE_PAGES_VAR}=.*set it to 0"):
        heap.worker_environment()
    with pytest.raises(DepthlabError, match=heap.HUGE_PAGES_VAR):
        make_pool(1, 2)


@needs_glibc
def test_sweep_workers_start_with_huge_pages_and_the_parent_is_restored(monkeypatch):
    monkeypatch.delenv(heap.TUNABLES_VAR, raising=False)
    pool = make_pool(2, 2)
    try:
        assert len(pool._processes) == 2  # both started in make_pool, with its environment
        got = [pool.submit(heap_probe.huge_pages_after_touching).result(timeout=120)
               for _ in range(2)]  # fmt: skip
    finally:
        pool.shutdown()
    assert heap.TUNABLES_VAR not in os.environ
    glibc = tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2])
    asks = _thp_mode() in ("always", "madvise") and glibc >= (2, 35)  # glibc madvises its heap
    for kb, tunables in got:
        assert tunables == "glibc.malloc.hugetlb=1"
        if asks:
            assert kb > 0  # some of the 64 MiB held in 2 MiB pages
    if _thp_mode() == "madvise":  # without the tunable nothing asks for huge pages
        assert _probe("print(heap_probe.huge_pages_after_touching()[0])") == ["0"]
