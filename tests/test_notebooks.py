"""Notebooks 01-04 executed through papermill with tiny parameters (one shared batch), their
parameters and pairing, the explorer against the exported samples, batch errors, sweeps."""
import ast
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest
import torch
from PIL import Image

from defectlab.base import images, paths, runs
from defectlab.core import restore
from defectlab.stages import sample
from defectlab.reports import page, report
from defectlab.app import batch, cli, demo, params
from defectlab.base.errors import DefectlabError
from defectlab.reports.explorer import Explorer

# tiny model, 32 px, one epoch, 2 images per class, 4 sampling steps, 2 classifier steps
TRAIN = dict(model="tiny", image_size=32, epochs=1, batch_size=4, grad_accum=1, val_per_class=1, val_timesteps=2,
             val_every=1)  # progress on: saved notebooks must show complete bars
LATER = dict(guidance=1.5, per_class=2, scheduler="ddim", steps=4, explorer_images=2, metrics="downstream", seeds=1,
             classifier_steps=2, classifier_size=32, compare_rows=2)
BATCH = [n for n in params.RUN_ORDER if n != "05_distill"]  # what a batch runs without `distill`
TINY = dict(show_per_class=2, show_size=32, **TRAIN, **LATER)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """One executed batch for every assertion below; under pytest-xdist the first worker that
    needs it runs it and the other waits and reuses it (xdist's documented shared-fixture way)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return batch.run(batch.NotebooksConfig(out=str(tmp_path_factory.mktemp("batch"))), params=TINY)
    from filelock import FileLock

    out = tmp_path_factory.getbasetemp().parent / "notebook-batch"
    with FileLock(f"{out}.lock"):
        if not (out / "batch.json").is_file() or runs.read_json(out / "batch.json").get("failed"):
            shutil.rmtree(out, ignore_errors=True)
            batch.run(batch.NotebooksConfig(out=str(out)), params=TINY)
    return out


@pytest.fixture(scope="module")
def record(executed):
    return runs.read_json(executed / "batch.json")


# ----------------------------------------------------------------------------- the executed batch
@pytest.mark.slow
def test_batch_leaves_notebooks_metrics_and_figures(executed, record):
    run = executed / "runs" / next(p.name for p in (executed / "runs").iterdir())
    assert record["run"] == str(run) and list(record["notebooks"]) == list(BATCH)
    for name in BATCH:
        nb = nbformat.read(executed / f"{name}.ipynb", as_version=4)
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"], name
    # 03 and 04 got the run 02 made, and only the parameters they declare
    assert record["notebooks"]["03_sample"]["parameters"]["run"] == str(run)
    assert "epochs" not in record["notebooks"]["03_sample"]["parameters"]
    assert record["notebooks"]["02_finetune"]["parameters"]["epochs"] == 1

    metrics = runs.read_json(run / "metrics.json")
    acc = metrics["downstream"]["conditions"]
    assert set(acc) == {"real", "real+gen"}
    assert all(math.isfinite(acc[c]["accuracy"]["mean"]) for c in acc)
    summary = report.run_summary(run)
    assert summary["train_steps"] > 0 and math.isfinite(summary["best_val_loss"])
    assert len(repr(summary["best_val_loss"])) <= 12 and len(repr(summary["final_train_loss"])) <= 12  # rounded

    figures = {p.name: p for p in (executed / "figures").iterdir()}
    for name in ("hazelnut-examples-per-class.png", "hazelnut-images-per-class.png", "loss_curve.png",
                 "eval-downstream.png", "real-vs-generated.png"):
        assert name in figures and figures[name].stat().st_size > 5000, name
    grid = [n for n in figures if n.startswith("samples-")]
    assert grid and all((run / "figures" / n).is_file() for n in grid)
    with Image.open(figures["real-vs-generated.png"]) as im:
        assert round(im.info["dpi"][0]) >= 200
    assert sorted(record["figures"]) == sorted(figures)


def test_executed_notebooks_show_figures_and_the_widget(executed):
    nb = nbformat.read(executed / "03_sample.ipynb", as_version=4)
    mimes = [set(o.get("data", {})) for c in nb.cells for o in c.get("outputs", [])]
    assert sum("image/png" in m for m in mimes) >= 2  # saved grid + explorer preview
    widget = [m for m in mimes if "application/vnd.jupyter.widget-view+json" in m]
    assert widget and all("image/png" in m for m in widget)  # the explorer's static twin beside the widget
    cell = next(c for c in nb.cells if any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                                           for o in c.get("outputs", [])))
    first = set(cell.outputs[0].get("data", {}))  # nbconvert renders a widget bundle as the (dead) widget:
    assert "image/png" in first and "application/vnd.jupyter.widget-view+json" not in first  # a plain image first
    nb4 = nbformat.read(executed / "04_evaluate.ipynb", as_version=4)
    text = json.dumps([o.get("data", {}).get("text/markdown", "") for c in nb4.cells for o in c.get("outputs", [])])
    assert "Offline proxy numbers" in text and "Downstream defect-type classifier" in text


def test_report_page_of_a_batch_is_one_self_contained_file(executed, tmp_path):
    """``defectlab report BATCH``: the notebooks, figures, the run's tables and settings in one HTML
    file with every figure embedded; rendered in headless Chromium where there is one (screenshot)."""
    out = page.run(page.PageConfig(target=str(executed), out=str(tmp_path / "report.html")))
    text = out.read_text()
    figures = sorted(p.name for p in (executed / "figures").glob("*.png"))
    assert figures and text.count("data:image/png;base64,") >= len(figures)
    assert all(name in text for name in BATCH) and "<h2>Run " in text and "config.json" in text
    assert "Offline proxy numbers" in text and "src='http" not in text  # nothing fetched when opened
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no Chromium on this machine for the screenshot (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                     "--disable-background-networking"])
        view = browser.new_page(viewport={"width": 1200, "height": 900})
        view.goto(out.as_uri())
        widths = view.evaluate("[...document.images].map(i => i.naturalWidth)")
        view.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(widths) >= len(figures) and min(widths) > 100  # every embedded figure decodes
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.size[1] > 2000 and len(shot.convert("L").getcolors(1 << 16) or []) > 50  # a page, not blank


def _shown_lines(text: str) -> list[str]:
    """What a notebook viewer shows of a stream: each line after its last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


@pytest.mark.parametrize("name", BATCH)
def test_saved_progress_ends_at_100_percent_and_no_warnings(executed, name):
    """papermill runs get plain-text bars (progress.PLAIN, set by batch.py): every bar the saved
    notebook shows is complete, none is a widget, and nothing warns."""
    nb = nbformat.read(executed / f"{name}.ipynb", as_version=4)
    streams = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "stream")
    bars = [line for line in _shown_lines(streams) if re.search(r"\d+%\|", line)]
    assert all(re.search(r"\b100%\|", line) for line in bars), bars
    outs = [c.get("outputs", []) for c in nb.cells]  # settled: one stream per name in a row, no \r left
    assert not any("\r" in o.get("text", "") for cell in outs for o in cell), "unsettled progress output"
    assert not any(a["output_type"] == b["output_type"] == "stream" and a["name"] == b["name"]
                   for cell in outs for a, b in zip(cell, cell[1:]))
    assert "Warning" not in streams and "Clipping input data" not in streams, streams[-2000:]
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "stream" and o["name"] == "stderr"
              and re.search(r"\d+%\|", o.get("text", ""))]
    assert not errors, errors[:1]  # progress on stdout: a notebook renders stderr as an error
    views = [o for c in nb.cells for o in c.get("outputs", []) if "application/vnd.jupyter.widget-view+json"
             in o.get("data", {}) and "image/png" not in o.get("data", {})]
    assert not views  # a widget bar (tqdm.notebook) would be saved as a dead widget


def test_explorer_reproduces_the_exported_samples(executed, record):
    run = record["run"]
    p = record["notebooks"]["03_sample"]["parameters"]
    exported = sample.run(sample.SampleConfig(run=run, per_class=2, scheduler="ddim", steps=4, guidance=p["guidance"]))
    explorer = Explorer(restore.restore(run), steps=4, scheduler="ddim", n=2)
    fig = explorer.render("crack", p["steps"], 0, p["guidance"])
    assert len(fig.axes) == 2
    for i in range(2):
        saved = images.load_png(exported / "hazelnut" / "test" / "crack" / f"{i:04d}.png")
        assert torch.allclose(explorer.last_images[i], saved, atol=1 / 127.5 + 1e-6)


# ----------------------------------------------------------------------------- the notebooks as files
@pytest.mark.parametrize("name", params.NOTEBOOKS)
def test_parameters_are_typed_and_documented(name):
    path = params.notebook_path(name)
    spec = papermill.inspect_notebook(path)
    assert spec
    for p in spec.values():
        assert p["inferred_type_name"] in ("str", "int", "float", "bool"), p
        assert p["help"], p
    # the parameters cell is the first code cell and holds typed literals only
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    tree = ast.parse(code[0].source)
    assert all(isinstance(s, ast.AnnAssign) and isinstance(s.value, ast.Constant) for s in tree.body)
    assert {s.target.id for s in tree.body} == set(spec)
    # what `papermill --help-notebook` prints
    from click.testing import CliRunner
    from papermill.cli import papermill as papermill_cli

    shown = CliRunner().invoke(papermill_cli, ["--help-notebook", str(path)]).output
    for p in spec.values():
        assert f"{p['name']}: {p['inferred_type_name']} (default {p['default']})" in shown
        assert p["help"] in shown


@pytest.mark.parametrize("name", params.NOTEBOOKS)
def test_py_and_ipynb_are_in_sync_and_ipynb_has_no_outputs(name):
    py = jupytext.read(paths.NOTEBOOKS / f"{name}.py")
    ipynb = nbformat.read(paths.NOTEBOOKS / f"{name}.ipynb", as_version=4)

    def cells(nb):
        return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]

    assert cells(py) == cells(ipynb), f"run: jupytext --sync notebooks/{name}.py"
    for c in ipynb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None
    assert ipynb.metadata["kernelspec"]["name"] == "python3"


def test_notebooks_hold_no_path_strings_or_loops():
    for name in params.NOTEBOOKS:
        nb = nbformat.read(paths.NOTEBOOKS / f"{name}.ipynb", as_version=4)
        for c in nb.cells[1:]:
            if c.cell_type != "code" or "parameters" in c.metadata.get("tags", []):
                continue
            tree = ast.parse(c.source)
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))], name
            strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            assert not [s for s in strings if "/" in s and "**" not in s], (name, strings)


# ----------------------------------------------------------------------------- batch errors and wiring
def test_unknown_parameter_is_one_line(tmp_path):
    with pytest.raises(DefectlabError, match="unknown notebook parameter 'epochz'") as err:
        batch.run(batch.NotebooksConfig(out=str(tmp_path / "x")), params={"epochz": 3})
    assert "\n" not in str(err.value)
    bad = tmp_path / "p.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 1.0e-3\n")
    with pytest.raises(DefectlabError, match=f"'learning_rate' in {bad}"):
        batch.run(batch.NotebooksConfig(params=str(bad), out=str(tmp_path / "y")))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_failing_cell_is_one_line_naming_notebook_and_error(tmp_path):
    """Notebook 02 executed with ``crop`` larger than the images: one line naming the notebook, the
    cell and the error; the batch record keeps it. The data check inside ``train.run`` names the
    value, so ``crop`` (a TrainConfig field that is no notebook parameter) reached the TrainConfig
    the notebook built, through its ``settings``."""
    out = tmp_path / "failed"
    with pytest.raises(DefectlabError, match=r"notebook 02_finetune failed in cell \d+: DefectlabError: "
                                             r"crop 100000 px is larger than image.*"
                                             r"\(traceback in .*02_finetune.ipynb\)") as err:
        batch.run(batch.NotebooksConfig(out=str(out), only="02"),
                  params={"model": "tiny", "epochs": 1, "progress": False, "crop": 100000})
    assert "\n" not in str(err.value)
    record = runs.read_json(out / "batch.json")
    assert record["failed"] == "02_finetune" and "crop 100000" in record["notebooks"]["02_finetune"]["error"]
    assert json.loads(record["notebooks"]["02_finetune"]["parameters"][params.SETTINGS]) == {"crop": 100000}


@pytest.mark.parametrize("text, line", [("epochs: 2\nlr: [1, 2\nmodel: tiny\n", 3), ("a: 1\n  b: 2\n", 2),
                                        ("model: 'tiny\n", 2)])
def test_malformed_yaml_names_file_and_line(tmp_path, text, line):
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    with pytest.raises(DefectlabError, match=rf"malformed YAML in {bad} line {line}:") as err:
        params.load_yaml(bad)
    assert "\n" not in str(err.value)
    bad.write_text("- a\n- b\n")
    with pytest.raises(DefectlabError, match="must be a mapping"):
        params.load_yaml(bad)
    bad.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(DefectlabError, match="malformed YAML"):  # safe_load: YAML is data
        params.load_yaml(bad)


def test_values_are_converted_to_the_declared_type():
    assert params.coerce("lr", "1e-5", "float", "f") == 1e-5  # YAML 1.1 reads 1e-5 as text
    assert params.coerce("epochs", 3.0, "int", "f") == 3
    assert params.coerce("classes", ["crack", "hole"], "str", "f") == "crack,hole"
    assert params.coerce("run", 7, "str", "f") == "7"
    for name, value, kind in (("epochs", "many", "int"), ("epochs", 2.5, "int"), ("with_masks", "yes", "bool"),
                              ("lr", True, "float"), ("lr", None, "float")):
        with pytest.raises(DefectlabError, match=f"parameter '{name}' from f must be {kind}"):
            params.coerce(name, value, kind, "f")


def test_only_picks_notebooks():
    assert batch._select("") == list(BATCH) == ["01_explore_data", "02_finetune", "03_sample", "04_evaluate"]
    assert batch._select("3, 02") == ["02_finetune", "03_sample"]
    # a batch asked for a distillation runs 05 after 02: 03 and 04 take the student
    assert batch._select("", {"distill": "steps"}) == ["01_explore_data", "02_finetune", "05_distill", "03_sample",
                                                       "04_evaluate"]
    assert batch._select("", {"distill": ""}) == list(BATCH)
    assert batch._select("5,3") == ["05_distill", "03_sample"]
    with pytest.raises(DefectlabError, match="unknown notebook '06'"):
        batch._select("06")


def test_kernel_runs_this_python_and_is_registered_when_shadowed(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    name = batch.kernel_name()
    assert batch._runs_this_python(KernelSpecManager().get_kernel_spec(name).argv)
    # a user-level "python3" that starts another interpreter: register our own kernel instead
    shadow = tmp_path / "jupyter" / "kernels" / "python3"
    shadow.mkdir(parents=True)
    (shadow / "kernel.json").write_text(json.dumps({"argv": ["/opt/other/bin/python", "-m", "ipykernel_launcher",
                                                             "-f", "{connection_file}"], "display_name": "other",
                                                    "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", f"{tmp_path / 'jupyter'}:{tmp_path / 'prefix' / 'share' / 'jupyter'}")
    assert not batch._runs_this_python(KernelSpecManager().get_kernel_spec("python3").argv)
    assert batch.kernel_name(prefix=str(tmp_path / "prefix")) == batch.KERNEL
    assert KernelSpecManager().get_kernel_spec(batch.KERNEL).argv[0] == sys.executable
    with pytest.raises(DefectlabError, match="kernel 'nope' not found"):
        batch.kernel_name("nope")


def test_cli_maps_notebooks_and_sweep(tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(batch, "run", lambda cfg, params=None: seen.append(cfg) or tmp_path)
    assert cli.main(["sweep", "grid.yaml", "--out", "o"]) == 0
    assert cli.main(["notebooks", "--only", "02,03", "--params", "p.yaml"]) == 0
    assert seen == [batch.SweepConfig(spec="grid.yaml", out="o"), batch.NotebooksConfig(only="02,03", params="p.yaml")]
    monkeypatch.undo()
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  method: [full\n")
    capsys.readouterr()
    assert cli.main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("defectlab: error: malformed YAML in") and err.count("\n") == 1


def test_demo_and_shipped_configs_use_declared_parameters():
    specs = {name: params.declared(name) for name in params.NOTEBOOKS}
    params.check_names(demo.params(demo.DemoConfig()), specs, "demo")
    params.check_names(params.load_yaml(paths.PACKAGE / "configs" / "params.yaml"), specs, "params.yaml")
    stages = {k: v for k, v in specs.items() if k[:2] in batch.STAGES}
    shipped = (("sweep-tiny.yaml", 3), ("sweep-dit-xl.yaml", 60), ("sweep-mini.yaml", 7), ("sweep-mini-lr-size.yaml", 6),
               ("sweep-mini-long.yaml", 3), ("study-pairs.yaml", 2))
    for name, count in shipped:
        spec = params.load_yaml(paths.PACKAGE / "configs" / name)
        points = batch.expand(spec, name, stages)
        assert len(points) == count
        assert len({batch.point_name(p, batch.grid_keys(spec)) for p in points}) == count
    xl = batch.expand(params.load_yaml(paths.PACKAGE / "configs" / "sweep-dit-xl.yaml"), "xl", stages)
    assert {p["lr"] for p in xl} == {1e-6, 1e-5, 2e-5, 3e-5} and {p["image_size"] for p in xl} == {64, 128, 256}


# ----------------------------------------------------------------------------- sweeps
DISTIL = dict(iterations=2, phases=1, student_steps=2, distill_batch_size=2, compare_per_class=1)


@pytest.mark.slow
def test_sweep_runs_resumes_and_restarts_a_killed_point(tmp_path, monkeypatch):
    """A sweep point with a teacher and its distilled student: 05 runs after 02, and 03 / 04 sample
    and evaluate the student; summary, links, resume and a killed point's restart. (A point without
    ``distill`` is the notebook batch above; several points per sweep: the grid test below.)"""
    spec = tmp_path / "sweep.yaml"
    base = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in {**TRAIN, **LATER, **DISTIL}.items())
    spec.write_text(f"base:\n{base}\ngrid:\n  distill: [steps]\n")
    cfg = batch.SweepConfig(spec=str(spec), out=str(tmp_path / "sweep"))
    out = batch.run(cfg)
    lines = (out / "summary.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("point,status,distill,") and lines[0].endswith(",run_folder,notebooks")
    summary = (out / "summary.md").read_text()
    assert summary.count("| done |") == 1 and "(1 of 1 points done)" in summary
    # each row links its run folder and executed notebooks, relative to the sweep folder
    assert "[distill=steps](points/distill=steps/)" in summary and "[03](points/distill=steps/03_sample.ipynb)" in summary
    run_link = summary.split("[run](")[1].split(")")[0]
    assert (out / run_link / "config.json").is_file()
    assert (out / "figures" / "sweep-summary.png").stat().st_size > 5000
    points = sorted((out / "points").iterdir())
    assert [p.name for p in points] == ["distill=steps"]
    row = runs.read_json(points[0] / "done.json")
    assert math.isfinite(row["acc[real+gen]"]) and not (points[0] / "01_explore_data.ipynb").exists()
    done = runs.read_json(points[0] / "batch.json")
    student = Path(done["run"])
    assert runs.load_config(student)["distilled"]["steps"] == 2 and done["teacher"] != str(student)
    assert math.isfinite(report.run_summary(done["teacher"])["best_val_loss"])
    assert list(done["notebooks"]) == ["02_finetune", "05_distill", "03_sample", "04_evaluate"]
    assert done["notebooks"]["04_evaluate"]["parameters"]["run"] == str(student)
    assert (student / "figures" / "teacher-student.png").is_file()
    nb = nbformat.read(points[0] / "05_distill.ipynb", as_version=4)
    text = "".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells for o in c.get("outputs", []))
    assert "forwards / image" in text and "teacher ÷ student" in text
    sheet = page.run(page.PageConfig(target=str(out))).read_text()  # defectlab report SWEEP: one page
    assert sheet.count("<h3>Run ") == 2 and "sweep-summary" in sheet and "<table>" in sheet  # the student's teacher too

    calls = []

    def spy(cfg, params=None):
        calls.append((cfg.out, dict(params)))
        raise KeyboardInterrupt  # killed in the middle of the point

    monkeypatch.setattr(batch, "run_notebooks", spy)
    assert batch.run(cfg) == out and calls == []  # everything done: nothing re-runs
    (points[0] / "done.json").unlink()
    (points[0] / "stale.txt").write_text("half a point")
    with pytest.raises(KeyboardInterrupt):
        batch.run(cfg)
    assert [c[0] for c in calls] == [str(points[0])] and calls[0][1]["distill"] == "steps"
    assert points[0].is_dir() and not list(points[0].iterdir())  # restarted from an empty folder
    assert "(0 of 1 points done)" in (out / "summary.md").read_text()  # the killed sweep left its summary


def test_sweep_grid_lists_and_shards(tmp_path, monkeypatch):
    """A list of grids joins their combinations; --shard i/n runs every n-th point and leaves the
    others alone (reported as pending until their shard finishes them)."""
    spec = tmp_path / "s.yaml"
    spec.write_text("base: {epochs: 1}\ngrid:\n  - {model: [mini], method: [full, difffit]}\n"
                    "  - {model: [mini-scratch], method: [full], lr: [0.01]}\n")
    stages = {k: params.declared(k) for k in params.NOTEBOOKS if k[:2] in batch.STAGES}
    points = batch.expand(params.load_yaml(spec), "s", stages)
    assert [(p["model"], p["method"], p.get("lr")) for p in points] == [
        ("mini", "full", None), ("mini", "difffit", None), ("mini-scratch", "full", 0.01)]
    assert batch.grid_keys(params.load_yaml(spec)) == ["model", "method", "lr"]
    assert batch.point_name(points[2], ["model", "method", "lr"]) == "model=mini-scratch__method=full__lr=0.01"
    calls = []

    def fail(cfg, params=None):
        calls.append(Path(cfg.out).name)
        late = tmp_path / "o" / "points" / "model=mini-scratch__method=full__lr=0.01"
        late.mkdir(parents=True)  # shard 0 finishes another point meanwhile: the summary shows it
        runs.write_json(late / "done.json", {"point": late.name, "params": points[2], "status": "done",
                                             "best_val_loss": 0.5})
        raise DefectlabError("boom")

    monkeypatch.setattr(batch, "run_notebooks", fail)
    other = tmp_path / "o" / "points" / "model=mini__method=full"
    other.mkdir(parents=True)
    (other / "half.txt").write_text("shard 0 is still working on this")
    with pytest.raises(DefectlabError, match="1 of 3 sweep points failed"):
        batch.run(batch.SweepConfig(spec=str(spec), out=str(tmp_path / "o"), shard="1/2"))
    assert calls == ["model=mini__method=difffit"] and (other / "half.txt").is_file()
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert summary.count("| pending |") == 1 and "| pending | mini | full |" in summary
    assert "| done | mini-scratch | full | 0.01 |" in summary and "| failed | mini | difffit |" in summary
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(DefectlabError, match="--shard must be i/n"):
            batch.run(batch.SweepConfig(spec=str(spec), shard=bad))


def test_sweep_refuses_bad_specs(tmp_path):
    spec = tmp_path / "s.yaml"
    for text, message in (("base: {epochs: 1}\n", "has no grid"), ("grid: {method: full}\n", "non-empty list"),
                          ("grid: {methd: [full]}\n", "unknown notebook parameter 'methd'"),
                          ("grid: {method: [full]}\nbse: {}\n", "unknown key 'bse'"),
                          ("grid: {show_per_class: [1]}\n", "'show_per_class'")):  # 01 is not in a sweep
        spec.write_text(text)
        with pytest.raises(DefectlabError, match=message):
            batch.run(batch.SweepConfig(spec=str(spec), out=str(tmp_path / "o")))
    with pytest.raises(DefectlabError, match="needs its YAML"):
        batch.run(batch.SweepConfig())
