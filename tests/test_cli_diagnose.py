"""``depthlab diagnose``: tables, CSVs and figures; validation before any output."""

import pandas as pd
import pytest

from depthlab.cli import main


def test_unknown_what_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "diag"
    rc = main(["diagnose", "--what", "paths,entropy", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "entropy" in err and "paths, signal, jacobian, gradients, degeneracy" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--set", "width=8"], "SECTION.KEY"),
        (["--model", "mlpp"], "unknown model"),
        (["--set", "model.colour=1"], "unknown option"),
        (["--batch", "1"], "--batch must be an integer ≥ 2"),
        (["--what", "jacobian", "--method", "lanczos", "--k", "2", "--rtol", "0"], "rtol"),
        (
            ["--what", "jacobian", "--method", "lanczos", "--k", "2", "--max-dim", "0"],
            "--max-dim must be",
        ),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, argv, match):
    out = tmp_path / "diag"
    assert main(["diagnose", "--out", str(out), *argv]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_full_run_writes_tables_and_figures(tmp_path, capsys):
    out = tmp_path / "diag"
    rc = main(
        [
            "diagnose",
            "--model",
            "mlp",
            "--depth",
            "20",
            "--scheme",
            "batchnorm",
            "--what",
            "paths,signal,jacobian,gradients,degeneracy",
            "--out",
            str(out),
            "--batch",
            "32",
            "--set",
            "model.width=16",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "signal propagation" in printed and "mean_log_sv" in printed
    for name in ("paths", "signal", "jacobian", "gradients", "degeneracy"):
        assert (out / f"{name}.csv").stat().st_size > 0
    for fig in ("signal.png", "jacobian_hist.png", "paths_cdf.png", "gradients.png"):
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"
    signal = pd.read_csv(out / "signal.csv")
    assert len(signal) == 20 and signal["skip_var"].iloc[-1] > signal["skip_var"].iloc[0]
    paths = pd.read_csv(out / "paths.csv")
    assert paths["share"].sum() == pytest.approx(1.0, abs=1e-9)
    jac = pd.read_csv(out / "jacobian.csv")
    assert len(jac) == 2 * 16  # 2 examples × the 16×16 Jacobian of the residual stack


def test_dataset_batch_is_used(tmp_path):
    out = tmp_path / "d"
    rc = main(
        [
            "diagnose",
            "--model",
            "resnet",
            "--depth",
            "8",
            "--data",
            "digits",
            "--what",
            "signal",
            "--batch",
            "16",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    signal = pd.read_csv(out / "signal.csv")
    assert len(signal) == 3 and signal["bn_batch_var"].notna().all()
