"""`depthlab run | list | report`: outputs, re-rendering, bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from depthlab.cli import main
from depthlab.experiments import list_experiments

REAL = [n for n in list_experiments() if not n.startswith("test-")]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "nope", "--preset", "smoke"], "unknown experiment 'nope'; choose one of: "),
        (["run", "path-varience", "--preset", "smoke"], "did you mean 'path-variance'"),
        (["run", "path-variance", "--preset", "huge"], "unknown preset of experiment"),
        (["run", "all", "--preset", "huge"], "choose one of: smoke, quick, deep, full"),
        (["run", "path-variance", "--preset", "smoke", "--set", "depthz=3"], "valid keys: depths"),
        (["run", "all", "--preset", "smoke", "--set", "bogus=1"], "no experiment has them"),
        (["run", "path-variance", "--preset", "smoke", "--set", "short=x"], "must be an integer"),
        (["run", "path-variance", "--preset", "smoke", "--set", "short"], "expects key=value"),
        (
            ["run", "path-variance", "--preset", "smoke", "--jobs", "0"],
            "--jobs must be an integer in 1..",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 2
    assert message in err
    assert (
        err.startswith("depthlab run: error: ") and err.count("\n") == 1
    )  # one line, no traceback
    assert not out.exists()


def test_unwritable_out_exits_2_and_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "runs"
    code, _, err = run_cli(capsys, "run", "path-variance", "--preset", "smoke", "--out", str(out))
    assert code == 2 and "is a file" in err
    assert blocker.read_text() == "not a folder"


def test_run_writes_every_output_and_report_rerenders_them(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys, "run", "path-variance", "--preset", "smoke", "--out", str(out),
        "--set", "depths=[10,1000]", "--set", "measured_depths=[10]", "--set", "nets=[fixed]",
        "--set", "seeds=[0,1]",
    )  # fmt: skip
    assert code == 0
    d = out / "path-variance"
    for name in ("config.yaml", "records.csv", "summary.json", "report.md", "path_variance.png"):
        assert (d / name).is_file(), name
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["depths"] == [10, 1000] and cfg["preset"] == "smoke"
    df = pd.read_csv(d / "records.csv")
    assert sorted(df["depth"].unique()) == [10, 1000]
    assert len(list((d / "cells").glob("*.json"))) == 8  # 2 depths × 3 variants + 2 measured
    summary = json.loads((d / "summary.json").read_text())
    assert summary["claims"][0]["verdict"] == "reproduced"
    # progress per cell, then the claim-vs-measured table last
    assert "[path-variance] cell 8/8" in stdout
    table = stdout.split("total wall time:")[1]
    assert "experiment" in table and "verdict" in table and "reproduced" in table
    report = (d / "report.md").read_text()
    assert (
        "| experiment | paper's claim |" in report
        and "![path_variance](path_variance.png)" in report
        and "![path_decomposition](path_decomposition.png)" in report
    )

    (d / "report.md").unlink()
    (d / "path_variance.png").unlink()
    code, stdout, _ = run_cli(capsys, "report", str(d))
    assert code == 0
    assert (d / "report.md").read_text() == report
    assert (d / "path_variance.png").stat().st_size > 1000
    code, stdout, _ = run_cli(capsys, "report", str(out))  # a run folder: combined report
    assert code == 0 and (out / "report.html").is_file() and (out / "report.md").is_file()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "deep"
    code, stdout, _ = run_cli(
        capsys, "run", "all", "--preset", "deep", "--jobs", "2", "--dry-run", "--out", str(out),
        "--set", "device=cpu",  # the CPU-rate estimate, on a host with a GPU too
    )  # fmt: skip
    assert code == 0 and not out.exists()
    assert "[deep-fc] 10 cells, 10 to run; about " in stdout
    assert "cells to run on 2 workers: about " in stdout
    code, _, err = run_cli(capsys, "run", "deep-fc", "--preset", "deep", "--dry-run",
                           "--set", "depthz=3", "--out", str(out))  # fmt: skip
    assert code == 2 and "valid keys" in err and not out.exists()


def test_dry_run_measure_times_steps_and_measure_alone_exits_2(tmp_path, capsys):
    out = tmp_path / "smoke"
    code, stdout, _ = run_cli(
        capsys, "run", "deep-fc", "--preset", "smoke", "--dry-run", "--measure", "--out",
        str(out), "--set", "device=cpu",
    )  # fmt: skip
    assert code == 0 and not out.exists()
    assert "  timed mlp " in stdout and "s/step" in stdout
    assert "of training steps timed on cpu" in stdout
    code, _, err = run_cli(capsys, "run", "deep-fc", "--preset", "smoke", "--measure",
                           "--out", str(out))  # fmt: skip
    assert code == 2 and "--measure goes with --dry-run" in err and not out.exists()


def test_report_of_an_empty_folder_exits_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert code == 2 and "no experiment results" in err


def test_list_shows_models_schemes_and_every_experiment(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for section in ("models:", "schemes:", "experiments"):
        assert section in out
    for name in [*REAL, "mlp", "resnet", "rezero", "fixup"]:
        assert f"  {name} " in out
    assert len(REAL) == 14


def test_version_and_list_json(capsys):
    import json

    import depthlab

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert (
        exc.value.code == 0
        and capsys.readouterr().out.strip() == f"depthlab {depthlab.__version__}"
    )
    code, out, _ = run_cli(capsys, "list", "--json")
    listed = json.loads(out)
    assert code == 0 and set(listed) == {"models", "schemes", "datasets", "experiments"}
    assert {e["name"] for e in listed["experiments"]} >= set(REAL)
    assert all(e["summary"] and "``" not in e["summary"] for k in listed for e in listed[k])
    code, out, _ = run_cli(capsys, "list", "schemes", "--json")
    assert list(json.loads(out)) == ["schemes"]


def test_list_summaries_are_whole_sentences_without_markup():
    from depthlab.cli.list_cmd import summary

    class Doc:
        """A block of :class:`~depthlab.nn.Residual` with ``alpha`` (e.g. ReZero) that
        spans two lines. Second sentence."""

    assert summary(Doc) == "A block of Residual with alpha (e.g. ReZero) that spans two lines."
