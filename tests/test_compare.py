"""defectlab runs: every run under a folder, filtered, the settings that differ and the results."""
import json

import pytest

from defectlab.base import paths, runs
from defectlab.reports import compare
from defectlab.app import demo
from defectlab.app.cli import main as cli_main


def _fake_run(root, name, val_loss, **settings):
    folder = root / name
    (folder / runs.CHECKPOINTS).mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": {"model": "mini", "method": "difffit", "product": "hazelnut",
                                                               "lr": 3e-3, "runs_dir": str(root), **settings}}))
    (folder / "log.jsonl").write_text(json.dumps({"step": 7, "loss": 0.5, "time": 1.23456}) + "\n")
    (folder / runs.CHECKPOINTS / "best.json").write_text(json.dumps({"step": 7, "val_loss": val_loss}))
    return folder


def test_runs_lists_every_run_below_the_root_with_the_settings_that_differ(tmp_path, capsys):
    _fake_run(tmp_path / "runs", "000-a", 0.123456789)
    _fake_run(tmp_path / "demo" / "runs", "000-b", 0.05, lr=1e-3)
    _fake_run(tmp_path / "sweeps" / "s" / "p1" / "runs", "003-c", 0.2, method="lora", product="screw")
    (tmp_path / "runs" / "001-notes").mkdir()  # no config.json: not a run
    table, settings = compare.rows(compare.RunsConfig(root=str(tmp_path), sort="best_val_loss"))
    assert [r["run"] for r in table] == ["demo/runs/000-b", "runs/000-a", "sweeps/s/p1/runs/003-c"]
    assert settings == ["lr", "method", "model", "product"]  # differing + always shown; not runs_dir
    text = compare.format_table(table, settings)
    assert "| runs/000-a | 0.003 | difffit | mini | hazelnut | 7 | 0.1235 |" in text
    only = compare.rows(compare.RunsConfig(root=str(tmp_path), filter="method=lora,product=screw"))[0]
    assert [r["run"] for r in only] == ["sweeps/s/p1/runs/003-c"]
    out = tmp_path / "report"
    assert cli_main(["runs", "--root", str(tmp_path), "--format", "csv", "--out", str(out)]) == 0
    lines = (out / "runs.csv").read_text().splitlines()
    assert lines[0].startswith("run,lr,method,model,product,steps,best_val_loss") and len(lines) == 4
    assert (out / "runs.png").stat().st_size > 3000
    capsys.readouterr()
    for bad, says in ((["--filter", "method"], "key=value"), (["--filter", "method=full"], "no run folder"),
                      (["--format", "xml"], "--format"), (["--sort", "size"], "--sort")):
        assert cli_main(["runs", "--root", str(tmp_path), *bad]) == 2
        assert says in capsys.readouterr().err


def test_the_demo_puts_its_run_with_the_clis_runs(tmp_path):
    assert demo.runs_dir(demo.DemoConfig(), paths.OUTPUTS / "demo") == paths.RUNS
    assert demo.runs_dir(demo.DemoConfig(out=str(tmp_path)), tmp_path) == tmp_path / "runs"


@pytest.mark.parametrize("root", ["missing"])
def test_runs_refuses_a_root_that_is_not_a_folder(tmp_path, capsys, root):
    assert cli_main(["runs", "--root", str(tmp_path / root)]) == 2
    assert "--root" in capsys.readouterr().err
