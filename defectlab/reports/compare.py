"""``defectlab runs``: every fine-tuning run under a folder (the CLI's ``outputs/runs``, the demo's,
notebook batches', sweeps'), filtered by its settings, as one table: the settings that differ
between the runs listed, and their results (best validation loss, steps, the judge, the
copy-baseline benchmark's generated − cut-paste). Markdown or CSV, and a comparison figure.

A run folder is recognised by its ``config.json`` beside a ``checkpoints/`` folder; nothing is
written unless ``--out`` is given.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ..base import paths, runs
from ..base.errors import DefectlabError
from ..core import viz
from ..stages import benchmark
from . import report

ALWAYS = ("model", "method", "product")                      # settings shown even when all runs agree
IGNORED = {"runs_dir", "progress", "name", "resume", "report_to", "data"}  # where and how, not what


@dataclass
class RunsConfig:
    root: str = ""                 # folder searched for run folders, at any depth ("" = outputs/)
    filter: str = ""               # only runs with these settings: key=value[,key=value] (e.g. method=difffit,product=screw)
    sort: str = "time"             # time | name | best_val_loss
    format: str = "md"             # md | csv
    out: str = ""                  # folder for runs.md / runs.csv and runs.png ("" = print the table only)


def find(root: Path) -> list[Path]:
    """Run folders (``NNN-name`` with ``config.json`` and ``checkpoints/``) under ``root``."""
    if not root.is_dir():
        raise DefectlabError(f"--root {root}: not a folder")
    return [p.parent for p in root.rglob("config.json")
            if re.match(r"\d{3,}-", p.parent.name) and (p.parent / runs.CHECKPOINTS).is_dir()]


def _filters(text: str) -> dict[str, str]:
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DefectlabError(f"--filter: {item!r} is not key=value (e.g. method=difffit)")
        out[key.strip()] = value.strip()
    return out


def _benchmark(folder: Path) -> dict:
    """The newest benchmark (its folder name says its settings), its generated − cut-paste per
    view (mean and 95 % interval) and its generated pairs' two-sample realism accuracy (with its interval)."""
    found = benchmark.reports(folder)
    if not found:
        return {}
    saved = json.loads(found[-1].with_suffix(".json").read_text())
    return {"benchmark": found[-1].parent.name,
            **{f"gen-cutpaste ({view})": benchmark.interval_text(v["differences"]["gen - cutpaste"])
               for view, v in saved.get("views", {}).items()},
            **({"two-sample (gen)": benchmark.realism_text(r)} if (r := saved.get("realism", {}).get("generated")) else {})}


def rows(cfg: RunsConfig) -> tuple[list[dict], list[str]]:
    """One row per matching run (settings + results) and the setting columns worth showing."""
    root = Path(cfg.root).expanduser() if cfg.root else paths.OUTPUTS
    wanted = _filters(cfg.filter)
    if cfg.sort not in ("time", "name", "best_val_loss"):
        raise DefectlabError(f"--sort: choose time, name or best_val_loss (got {cfg.sort!r})")
    table = []
    for folder in find(root):
        try:
            settings = runs.load_config(folder)
        except (KeyError, TypeError, ValueError, DefectlabError):  # a config.json of something else
            continue
        if any(str(settings.get(k)) != v for k, v in wanted.items()):
            continue
        summary = report.run_summary(folder)
        metrics = runs.read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
        judged = ((metrics.get("judge") or {}).get("generated") or {}).get("overall") or {}
        results = {"steps": summary["train_steps"], "best_val_loss": summary["best_val_loss"],
                   "judge (proxy)": f"{judged['correct']}/{judged['n']}" if {"correct", "n"} <= set(judged) else "",
                   **_benchmark(folder)}
        table.append({"run": str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder),
                      "_time": (folder / "config.json").stat().st_mtime, "_settings": settings, **results})
    key = {"time": lambda r: r["_time"], "name": lambda r: r["run"],
           "best_val_loss": lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0.0)}[cfg.sort]
    table.sort(key=key)
    keys = sorted({k for r in table for k in r["_settings"]} - IGNORED)
    differ = [k for k in keys if k in ALWAYS or len({json.dumps(r["_settings"].get(k), sort_keys=True) for r in table}) > 1]
    for r in table:
        r.update({k: _shown(k, r["_settings"].get(k, "")) for k in differ})
    return table, differ


def _shown(key: str, value):
    """A setting as a table cell: a distilled student's record in a few words, not its JSON."""
    if key == "distilled" and isinstance(value, dict):
        return (f"{value.get('mode')} of {value.get('teacher')}: {value.get('steps')} steps, "
                f"{value.get('student_layers')}/{value.get('teacher_layers')} blocks, g {value.get('teacher_guidance')}")
    return value


def format_table(table: list[dict], settings: list[str], fmt: str = "md") -> str:
    results = list(dict.fromkeys(k for r in table for k in r if not k.startswith("_") and k != "run" and k not in settings))
    columns = ["run", *settings, *results]
    cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[cell(r.get(c)) for c in columns] for r in table])
        return buf.getvalue()
    if fmt != "md":
        raise DefectlabError(f"--format: choose md or csv (got {fmt!r})")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"


def figure(table: list[dict]) -> Figure:
    """Best validation loss per run (lower is better), one bar each, labelled by run."""
    done = [r for r in table if r["best_val_loss"] is not None]
    fig = Figure(figsize=(7, 0.5 + 0.35 * max(len(done), 1)), layout="constrained")
    ax = fig.subplots()
    ax.barh([r["run"] for r in done], [r["best_val_loss"] for r in done], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("best fixed-noise validation loss (lower is better; comparable at equal size and base)")
    ax.set_title("runs")
    return fig


def run(cfg: RunsConfig) -> Path | None:
    table, settings = rows(cfg)
    if not table:
        raise DefectlabError(f"no run folder under {cfg.root or paths.OUTPUTS}"
                             + (f" with {cfg.filter}" if cfg.filter else "") + ": fine-tune first (defectlab finetune)")
    text = format_table(table, settings, cfg.format)
    print(text, end="")
    if not cfg.out:
        return None
    out = Path(cfg.out).expanduser()
    runs.ensure_dir(out, "--out")
    runs.write_text(out / f"runs.{cfg.format}", text)
    viz.save_figure(figure(table), out, "runs")
    return out
