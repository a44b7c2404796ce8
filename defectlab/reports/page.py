"""``defectlab report RUN|SWEEP|DEMO``: one self-contained HTML page of a finished run, sweep or
notebook batch (the demo's), for a report or a browser: figures embedded (base64 PNG), the
Markdown tables the stages wrote (metrics, benchmark against copy-paste, sweep summary), the
settings, and links to the files beside it. Nothing is fetched when it is opened.

What a folder is decides the sections: a run (``config.json``): its summary, metrics,
benchmark reports and figures; a sweep (``summary.md``): the summary table, its figures, a section
per run; a batch (``batch.json``: ``make demo``, ``defectlab notebooks``): the executed notebooks
and their figures, then the section of the run it trained. ``make demo`` writes
``outputs/demo/report.html``.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import markdown

from ..base import runs
from ..base.errors import DefectlabError
from . import report

STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em}"""


@dataclass
class PageConfig:
    POSITIONAL = ("target",)       # `defectlab report FOLDER`
    target: str = "latest"         # a run (folder/name/number, or latest), a sweep folder or a notebook batch folder (outputs/demo)
    out: str = ""                  # the HTML file ("" = <target>/report.html)


def run(cfg: PageConfig) -> Path:
    """Write the page (see module doc); returns its path."""
    folder = _target(cfg.target)
    out = Path(cfg.out) if cfg.out else folder / "report.html"
    if out.exists() and out.is_dir():
        raise DefectlabError(f"--out {out} is a folder: give the HTML file's path")
    kind, body = _body(folder, out.parent)
    title = f"defectlab {kind}: {folder.name}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p><code>{html.escape(str(folder))}</code></p>{body}</body></html>")
    runs.ensure_dir(out.parent, "--out")
    runs.write_text(out, page)
    return out


def _target(target: str) -> Path:
    path = Path(target).expanduser()
    if path.is_dir() and ((path / "summary.md").is_file() or (path / "batch.json").is_file()):
        return path
    return runs.resolve(target)  # a run, or one line naming what was not found


def _body(folder: Path, here: Path) -> tuple[str, str]:
    if (folder / "batch.json").is_file():
        return "notebook batch", _batch(folder, here)
    if (folder / "summary.md").is_file():
        return "sweep", _sweep(folder, here)
    return "run", _run(folder, here)


def _run(folder: Path, here: Path, level: int = 2, shown: frozenset = frozenset()) -> str:
    h = f"h{level}"
    parts = [f"<{h}>Run {html.escape(folder.name)}</{h}>", _table(report.run_summary(folder))]
    proxy = "synthetic" in json.dumps(runs.load_config(folder).get("data", ""))
    if proxy:
        parts.append("<p class='note'>Offline proxy numbers: the embedded procedural dataset and shipped small base, "
                     "not DiT-XL on real defects.</p>")
    for name in ("metrics.md",):
        if (folder / name).is_file():
            parts += [f"<{h}>Metrics</{h}>", _markdown(folder / name)]
    for md in sorted(folder.glob("benchmark/*/benchmark.md")):
        parts += [f"<{h}>Benchmark against copy-paste ({html.escape(md.parent.name)})</{h}>", _markdown(md, level)]
        parts += [_figure(p, here) for p in sorted(md.parent.glob("figures/*.png"))]
    if figures := [p for p in sorted(folder.glob("figures/*.png")) if p.name not in shown]:  # not twice on a page
        parts += [f"<{h}>Figures</{h}>", *(_figure(p, here) for p in figures)]
    parts += [f"<details><summary>Settings (config.json)</summary><pre>"
              f"{html.escape(json.dumps(runs.load_config(folder), indent=1))}</pre></details>",
              _links(folder, here, ("config.json", "log.jsonl", "metrics.csv", "split.json"))]
    return "\n".join(parts)


def _sweep(folder: Path, here: Path) -> str:
    parts = ["<h2>Summary</h2>", _markdown(folder / "summary.md"),
             *(_figure(p, here) for p in sorted(folder.glob("*.png")) + sorted(folder.glob("figures/*.png")))]
    parts.append(_links(folder, here, ("summary.csv", "summary.md")))
    for run_folder in sorted(p.parent for p in folder.rglob("config.json") if (p.parent / "log.jsonl").is_file()):
        parts.append(_run(run_folder, here, level=3))
    return "\n".join(parts)


def _batch(folder: Path, here: Path) -> str:
    record = runs.read_json(folder / "batch.json")
    notebooks = record.get("notebooks", {})
    rows = {name: f"{info.get('seconds', 0):.0f} s → {info.get('output', '')}" for name, info in notebooks.items()}
    parts = ["<h2>Notebooks</h2>", _table(rows), _links(folder, here, [info.get("output", "") for info in notebooks.values()])]
    figures = sorted(folder.glob("figures/*.png"))
    if figures:
        parts += ["<h2>Figures</h2>", *(_figure(p, here) for p in figures)]
    shown = frozenset(p.name for p in figures)
    run_dirs = {info.get("parameters", {}).get("runs_dir") for info in notebooks.values()} - {None, ""}
    trained = [p for d in run_dirs for p in Path(d).glob("*/config.json")] if run_dirs else []
    names = {info.get("parameters", {}).get("run") for info in notebooks.values()} - {None, ""}
    for cfg in sorted(trained, key=lambda p: p.stat().st_mtime)[-1:] if not names else []:
        parts.append(_run(cfg.parent, here, shown=shown))
    for name in sorted(names):
        try:
            parts.append(_run(runs.resolve(name), here, shown=shown))
        except DefectlabError:
            parts.append(f"<p>run {html.escape(name)}: not found</p>")
    return "\n".join(parts)


def _markdown(path: Path, shift: int = 1) -> str:
    text = path.read_text()
    lines = ["#" * shift + line if line.startswith("#") else line for line in text.splitlines()]
    return markdown.markdown("\n".join(lines), extensions=["tables"])


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _figure(path: Path, here: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(_relative(path, here))}</figcaption></figure>")


def _links(folder: Path, here: Path, names) -> str:
    found = [folder / n for n in names if n and (folder / n).is_file()]
    items = "".join(f"<li><a href='{html.escape(_relative(p, here))}'>{html.escape(p.name)}</a></li>" for p in found)
    return f"<p>Files:</p><ul>{items}</ul>" if items else ""


def _relative(path: Path, here: Path) -> str:
    try:
        return path.resolve().relative_to(here.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_uri()
