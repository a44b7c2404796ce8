"""Run notebooks 01-04 through papermill (batch runs, CI, the demo) and sweep 02-04 over a grid.

``run(NotebooksConfig(...), params)`` executes the notebooks in ``notebooks/`` with the given
parameters and leaves, in one out folder: the executed notebooks, ``runs/`` (the run folder
notebook 02 made), ``figures/`` (every figure of the batch) and ``batch.json`` (what ran, with
which parameters, how long). The stages are wired here, not by "latest": 02 trains into
``<out>/runs``, and 03/04 get that run folder.

Each notebook receives the parameters its ``parameters`` cell declares, and in ``settings`` any
other field of its stage dataclass (``params.py``): a name that is neither is refused.

``run(SweepConfig(spec))`` expands a YAML grid (``base:`` parameters, ``grid:`` lists) and runs
02-04 once per point into ``<out>/points/<point>/``. A point whose folder holds ``done.json``
is skipped, so a sweep is resumed by running it again; a point without it (killed, failed) is
wiped and run from the start. The summary (``report.sweep_summary``) is rewritten after every
point, so a killed sweep leaves one.
YAML is data: ``yaml.safe_load`` only.
"""
from __future__ import annotations

import ast
import contextlib
import itertools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill
from ipykernel.kernelspec import install as install_kernel
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from ..base import paths, progress, runs
from ..base.errors import DefectlabError
from ..stages import evaluate
from ..reports import report
from .params import DISTILL, NOTEBOOKS, RUN_ORDER, check_names, coerce, declared, for_notebook, kinds, load_yaml, notebook_path

KERNEL = "defectlab"   # registered into sys.prefix only if "python3" would start another interpreter
STAGES = ("02", "03", "04")  # what one sweep point runs


@dataclass
class NotebooksConfig:
    params: str = ""               # YAML file of notebook parameters (name: value), see defectlab/configs/params.yaml
    out: str = ""                  # folder for executed notebooks and figures ("" = outputs/notebooks/<time>, the run in outputs/runs); a given one holds its run too
    only: str = ""                 # notebooks to run, e.g. 02,03 ("" = all four)
    kernel: str = ""               # Jupyter kernel name ("" = this Python interpreter)
    cell_timeout: int = 0          # seconds a cell may run (0 = no limit)


@dataclass
class SweepConfig:
    POSITIONAL = ("spec",)         # `defectlab sweep SPEC.yaml`
    spec: str = ""                 # sweep YAML: base (parameters for every point) and grid (lists to combine)
    out: str = ""                  # sweep folder ("" = outputs/sweeps/<spec name>); run again to resume
    kernel: str = ""               # Jupyter kernel name ("" = this Python interpreter)
    shard: str = ""                # "i/n": run only points i, i+n, i+2n, ... (0-based), e.g. one process per core/GPU


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n); ``""`` → (0, 1)."""
    if not shard:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise DefectlabError(f"--shard must be i/n with 0 <= i < n, e.g. 0/2 (got {shard!r})")
    return int(m.group(1)), int(m.group(2))


def run(cfg: NotebooksConfig | SweepConfig, params: dict | None = None) -> Path:
    """``defectlab notebooks`` and ``defectlab sweep`` (both CLI stages land here)."""
    if isinstance(cfg, SweepConfig):
        return run_sweep(cfg)
    return run_notebooks(cfg, params)


# ----------------------------------------------------------------------------- notebooks
def _select(only: str, given: dict | None = None) -> list[str]:
    """The notebooks to run, in ``RUN_ORDER``: those ``only`` names, else 01-04, and 05 when the
    parameters ask for a distillation (``distill: steps|size``)."""
    wanted = [w.strip() for w in re.split(r"[,\s]+", only) if w.strip()]
    if not wanted:
        return [n for n in RUN_ORDER if n != "05_distill" or (given or {}).get(DISTILL)]
    out = []
    for w in wanted:
        match = [n for n in NOTEBOOKS if n == w or n.split("_")[0] == w.zfill(2)]
        if not match:
            raise DefectlabError(f"unknown notebook {w!r} in --only; use {', '.join(n[:2] for n in NOTEBOOKS)}")
        out += match
    return [n for n in RUN_ORDER if n in out]


# ----------------------------------------------------------------------------- kernel
def _runs_this_python(argv: list[str]) -> bool:
    exe = argv[0] if argv else ""
    short = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    # jupyter_client swaps a bare "python" for sys.executable; a path must be in our environment
    return exe in short or Path(exe).parent == Path(sys.executable).parent


def kernel_name(name: str = "", prefix: str | None = None) -> str:
    """The kernel papermill starts: ``name`` if given, else ``python3`` when it runs this
    interpreter, else a ``defectlab`` kernel registered into ``prefix`` (this environment)."""
    ksm = KernelSpecManager()
    if name:
        try:
            ksm.get_kernel_spec(name)
        except NoSuchKernel:
            found = ", ".join(sorted(ksm.find_kernel_specs())) or "none"
            raise DefectlabError(f"Jupyter kernel {name!r} not found (installed: {found})") from None
        return name
    for candidate in ("python3", KERNEL):
        try:
            if _runs_this_python(ksm.get_kernel_spec(candidate).argv):
                return candidate
        except NoSuchKernel:
            pass
    try:  # what `python -m ipykernel install --sys-prefix --name defectlab` does
        install_kernel(kernel_name=KERNEL, display_name=f"Python (defectlab, {sys.prefix})",
                       prefix=prefix or sys.prefix)
    except OSError as err:
        raise DefectlabError(f"cannot register a Jupyter kernel for {sys.executable} ({err}); "
                             "pass --kernel NAME of a kernel that has defectlab installed") from None
    return KERNEL


# ----------------------------------------------------------------------------- one batch
# Set for the kernel process unless the user set them. On shared CPUs (CI, 2 cores, other jobs),
# OpenMP threads that spin while waiting slow torch down several-fold (measured: a tiny-DiT
# forward 3.6 s spinning vs 0.6 s passive at load 9 on 2 cores); idle machines lose nothing.
# progress.PLAIN: papermill gives the kernel no frontend, so bars are plain text that ends at 100 %.
KERNEL_ENV = {"OMP_WAIT_POLICY": "PASSIVE", progress.PLAIN: "1"}
# ipykernel's own log (not cell output: errors in cells end up in the executed notebook): ipykernel 7
# warns about TCP transport on every start and logs an interrupt at shutdown.
QUIET = ["--IPKernelApp.log_level=CRITICAL"]


@contextlib.contextmanager
def _kernel_env(values: dict):
    """The kernel inherits our environment; papermill has no other way to hand it variables."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def execute(name: str, output: Path, parameters: dict, kernel: str, cell_timeout: int = 0) -> float:
    """Execute one notebook into ``output``; a failing cell becomes one DefectlabError line."""
    t0 = time.time()
    try:
        with _kernel_env(KERNEL_ENV):
            papermill.execute_notebook(str(notebook_path(name)), str(output), parameters=parameters,
                                       kernel_name=kernel, progress_bar=False, execution_timeout=cell_timeout or None,
                                       extra_arguments=QUIET if kernel in ("python3", KERNEL) else [])
    except papermill.PapermillExecutionError as err:
        msg = (str(err.evalue).strip().splitlines() or [""])[0][:300]
        raise DefectlabError(f"notebook {name} failed in cell {err.exec_count}: {err.ename}: {msg} "
                             f"(traceback in {output})") from None
    finally:
        if Path(output).is_file():
            settle_streams(Path(output))
    return time.time() - t0


def settle_streams(path: Path) -> None:
    """Merge each cell's consecutive stdout/stderr outputs and keep what a terminal would show
    after every carriage return, so any renderer (nbconvert, GitHub, not only JupyterLab, which
    merges them itself) shows a progress bar's last state, not its 0 % line."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream" \
                    and merged[-1].get("name") == out.get("name"):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = "\n".join(line.rsplit("\r", 1)[-1] for line in out["text"].split("\n"))
        if "outputs" in cell:
            cell["outputs"] = merged
    runs.atomic_write(path, lambda tmp: nbformat.write(nb, str(tmp)))


def run_notebooks(cfg: NotebooksConfig, params: dict | None = None) -> Path:
    """Execute the chosen notebooks with ``params`` (over the YAML file's); returns the out folder."""
    t0 = time.time()
    source = cfg.params or "the given parameters"
    given = {**(load_yaml(cfg.params) if cfg.params else {}), **(params or {})}
    chosen = _select(cfg.only, given)
    specs = {name: declared(name) for name in NOTEBOOKS}  # all four: one params file serves any --only
    check_names(given, specs, source)
    out = Path(cfg.out).expanduser() if cfg.out else paths.OUTPUTS / "notebooks" / time.strftime("%Y%m%d-%H%M%S")
    if out.is_dir() and any(out.iterdir()) and not (out / "batch.json").is_file():
        raise DefectlabError(f"out folder {out} is not empty and holds no batch.json: choose another --out")
    figures, kernel = out / "figures", kernel_name(cfg.kernel)
    if not cfg.only and figures.is_dir():
        shutil.rmtree(figures)  # a full batch replaces the previous batch's figures
    figures.mkdir(parents=True, exist_ok=True)
    record: dict = {"notebooks": {}, "run": None, "kernel": kernel, "python": sys.executable}
    run_folder = None
    for i, name in enumerate(chosen, 1):
        spec = specs[name]
        p = for_notebook(name, given, specs, source)
        if "figures_dir" in spec:
            p.setdefault("figures_dir", str(figures))
        if "runs_dir" in spec:  # a batch in its own --out keeps its runs there; otherwise with the CLI's runs
            p.setdefault("runs_dir", str(out / "runs" if cfg.out else paths.RUNS))
        if "run" in spec:  # the run this batch just trained, else the one asked for, resolved once
            run_folder = run_folder or report.resolve_run(p.get("run", ast.literal_eval(spec["run"]["default"])))
            p["run"] = str(run_folder)
        runs_dir = Path(p.get("runs_dir") or paths.RUNS)
        before = set(runs.numbered(runs_dir))
        print(f"[{i}/{len(chosen)}] {name} …", flush=True)
        try:
            seconds = execute(name, out / f"{name}.ipynb", p, kernel, cfg.cell_timeout)
        except DefectlabError as err:  # keep what ran, and why it stopped, beside the failed notebook
            record["notebooks"][name] = {"parameters": p, "error": str(err), "output": f"{name}.ipynb"}
            runs.write_json(out / "batch.json", {**record, "failed": name})
            raise
        print(f"[{i}/{len(chosen)}] {name} done in {seconds:.0f} s", flush=True)
        if name in ("02_finetune", "05_distill"):  # 03 and 04 take the run 02 trained, or 05's student of it
            new = sorted(set(runs.numbered(runs_dir)) - before, key=lambda f: int(f.name.split("-")[0]))
            if not new:
                raise DefectlabError(f"notebook {name} made no run folder under {runs_dir}")
            if name == "05_distill":
                record["teacher"] = str(run_folder)
            run_folder = new[-1]
        record["notebooks"][name] = {"parameters": p, "seconds": round(seconds, 1), "output": f"{name}.ipynb"}
        record["run"] = str(run_folder) if run_folder else None
    if run_folder is not None and (run_folder / "figures").is_dir():
        for f in sorted((run_folder / "figures").iterdir()):
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, figures / f.name)
    record["figures"] = sorted(f.name for f in figures.iterdir())
    record["seconds"] = round(time.time() - t0, 1)
    runs.write_json(out / "batch.json", record)
    return out


# ----------------------------------------------------------------------------- sweeps
def grid_keys(spec: dict) -> list[str]:
    """The swept parameter names, in file order, over all sub-grids."""
    grids = spec.get("grid")
    keys: list[str] = []
    for grid in grids if isinstance(grids, list) else [grids or {}]:
        keys += [k for k in (grid if isinstance(grid, dict) else {}) if k not in keys]
    return keys


def expand(spec: dict, source: str, specs: dict[str, dict]) -> list[dict]:
    """``base`` merged with every combination of ``grid`` (keys in file order), types coerced.
    ``grid`` may also be a list of such mappings: their combinations are joined, in order
    (e.g. all methods on one base, two of them on another)."""
    extra = sorted(set(spec) - {"base", "grid"})
    if extra:
        raise DefectlabError(f"unknown key {extra[0]!r} in sweep {source} (expected base: and grid:)")
    base, grids = spec.get("base") or {}, spec.get("grid") or {}
    grids = grids if isinstance(grids, list) else [grids]
    if not isinstance(base, dict) or not all(isinstance(g, dict) for g in grids):
        raise DefectlabError(f"sweep {source}: base and grid must be mappings of parameter: value "
                             "(grid may be a list of them)")
    if not any(grids):
        raise DefectlabError(f"sweep {source} has no grid: (lists of values to combine)")
    known = kinds(specs)
    points = []
    for grid in grids:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise DefectlabError(f"sweep {source}: grid {key!r} must be a non-empty list (got {values!r})")
        check_names({**base, **grid}, specs, f"sweep {source}")
        for combo in itertools.product(*grid.values()):
            point = {**base, **dict(zip(grid, combo))}
            points.append({k: coerce(k, v, known[k], f"sweep {source}") for k, v in point.items()})
    return points


def point_name(point: dict, keys) -> str:
    """Stable folder name from the grid values: ``method=full__lr=1e-05``."""
    fmt = lambda v: format(v, "g") if isinstance(v, float) else str(v)  # noqa: E731
    return "__".join(f"{k}={re.sub(r'[^A-Za-z0-9_.+-]+', '-', fmt(point[k]))}" for k in keys if k in point)


def run_sweep(cfg: SweepConfig) -> Path:
    """Run 02-04 for every grid point (skipping finished ones), then write the summary."""
    if not cfg.spec:
        raise DefectlabError("a sweep needs its YAML file: defectlab sweep SPEC.yaml (examples in defectlab/configs/)")
    spec = load_yaml(cfg.spec)
    shard, shards = parse_shard(cfg.shard)
    specs = {name: declared(name) for name in NOTEBOOKS if name[:2] in (*STAGES, "05")}
    points = expand(spec, cfg.spec, specs)
    keys = grid_keys(spec)
    out = Path(cfg.out).expanduser() if cfg.out else paths.OUTPUTS / "sweeps" / Path(cfg.spec).stem
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(out / "sweep.json", {"spec": spec, "source": str(cfg.spec), "points": len(points)})
    kernel = kernel_name(cfg.kernel)
    names = [point_name(point, keys) for point in points]
    rows: list[dict] = [{"point": name, "params": point, "status": "pending"} for name, point in zip(names, points)]
    failed: list[str] = []

    def summary() -> None:
        """Rewritten after every point, with other shards' points as they stand now: a killed
        sweep leaves a summary of what it finished."""
        for j, name in enumerate(names):
            done = out / "points" / name / "done.json"
            if rows[j]["status"] == "pending" and done.is_file():
                rows[j] = runs.read_json(done)
        report.sweep_summary(out, rows, keys, (spec.get("base") or {}).get("formats", "png"))

    summary()  # from the start: a sweep killed in its first point still says where it stands
    for i, (name, point) in enumerate(zip(names, points), 1):
        folder = out / "points" / name
        done = folder / "done.json"
        if (i - 1) % shards != shard:  # another shard's point: never touched, reported as it stands
            continue
        if done.is_file():
            row = runs.read_json(done)
            if row.get("params") != json.loads(json.dumps(point)):
                raise DefectlabError(f"sweep point {folder} was run with other parameters (was the base changed?): "
                                     "delete it or choose another --out")
            print(f"[{i}/{len(points)}] {name}: done before, skipped", flush=True)
            rows[i - 1] = row
            continue
        if folder.exists():
            shutil.rmtree(folder)  # killed or failed earlier: start this point again from nothing
        folder.mkdir(parents=True)
        print(f"[{i}/{len(points)}] {name}", flush=True)
        try:
            stages = STAGES + (("05",) if point.get(DISTILL) else ())  # the point's student is sampled and evaluated
            batch = run_notebooks(NotebooksConfig(out=str(folder), only=",".join(stages), kernel=kernel), point)
        except DefectlabError as err:
            failed.append(f"{name}: {err}")
            rows[i - 1] = {"point": name, "params": point, "status": "failed", "error": str(err)}
            summary()
            continue
        row = _point_row(name, point, runs.read_json(batch / "batch.json"))
        runs.write_json(done, row)  # written last: its presence means the point is complete
        rows[i - 1] = row
        summary()
    summary()
    if failed:
        raise DefectlabError(f"{len(failed)} of {len(points)} sweep points failed (first: {failed[0]}); the others "
                             f"are in {out / 'summary.md'}; run the sweep again to retry the failed ones")
    return out


def _point_row(name: str, point: dict, batch: dict) -> dict:
    folder = Path(batch["run"])
    result = evaluate.EvalResult.load(folder) if (folder / "metrics.json").is_file() else None
    return {"point": name, "params": point, "status": "done", "run": str(folder), **report.run_summary(folder),
            **(report.metrics_summary(result) if result else {}), "note": report.caption(result) if result else "",
            "seconds": round(sum(n["seconds"] for n in batch["notebooks"].values()), 1)}
