"""Reports of runs, evaluations and sweeps: Markdown tables, CSV rows, figures, captions, and the
one-line helpers the notebooks call (``run_summary``, ``sample_figure``, ``caption``, …).

``evaluate(cfg)`` is the evaluate stage followed by its report: ``evaluate.run`` writes
``metrics.json``, ``write`` adds ``metrics.md``, ``metrics.csv`` and ``figures/eval-*`` beside it.
``defectlab evaluate`` and notebook 04 call it.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..base import runs
from ..base.errors import DefectlabError
from ..data import synth
from ..core import classifier, gain, presence, viz
from ..core.model import SMALL_BASES
from ..stages import evaluate
from ..stages.evaluate import EvalConfig, EvalResult

CSV_FIELDS = ["section", "condition", "class", "metric", "value", "std", "n"]


# ----------------------------------------------------------------------------- evaluate + report
def evaluate_run(cfg: EvalConfig) -> EvalResult:
    """``evaluate.run`` and the report files beside its metrics.json."""
    result = evaluate.run(cfg)
    write(result)
    return result


def cli(cfg: EvalConfig) -> Path:
    """``defectlab evaluate``: evaluate, write the report, print the table, return where metrics.json went."""
    result = evaluate_run(cfg)
    print(format_table(result))
    return Path(result.run) / "metrics.json"


def write(result: EvalResult) -> list[Path]:
    """``metrics.md``, ``metrics.csv`` and the ``figures/eval-*`` files (``config.formats``) in the run folder."""
    folder = Path(result.run)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows(result))
    written = [runs.write_text(folder / "metrics.md", format_table(result)), runs.write_text(folder / "metrics.csv",
                                                                                            buf.getvalue())]
    for name, fig in figures(result):
        written += viz.save_figure(fig, folder / "figures", name, result.config.formats)
    return written


# ----------------------------------------------------------------------------- tables
def _fmt(v, spec: str = ".4g") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _pm(d: dict | None, spec: str = ".3f") -> str:
    if not d or d.get("mean") is None:
        return "—"
    return _fmt(d["mean"], spec) + ("" if d.get("std") is None else " ± " + _fmt(d["std"], spec.lstrip("+")))


def format_table(m: EvalResult) -> str:
    """Markdown report of an evaluation: what produced the numbers, then the numbers."""
    out = [f"## Evaluation: {Path(m.run).name} — {m.product}, {len(m.classes)} classes, {m.image_size} px"]
    n = m.images
    counts = ", ".join(f"{c} {n['train'][c]}/{n['test'][c]}/{n['generated'][c]}" for c in m.classes)
    out.append(f"Samples `{m.samples}`. Images per class (train / held-out test / generated): {counts}.")
    if m.distribution:
        fe, dist = m.feature_extractor, m.distribution
        out += ["", "### Generated vs held-out real test images",
                f"Feature extractor: {fe['name']}, weights `{fe['weights']}` (sha256 {fe['sha256']}…, {fe['source']}) "
                f"— **{fe['note']}**.", "",
                "| class | n real | n gen | FID | FID 95% CI | KID | KID subset | IS |", "|---|---|---|---|---|---|---|---|"]
        for name, r in [*dist["per_class"].items(), ("**pooled**", dist["pooled"])]:
            if "reason" in r:
                out.append(f"| {name} | {r.get('n_real', '—')} | {r.get('n_gen', '—')} | {r['reason']} | | | | |")
                continue
            ci = lambda k: "—" if k not in r else f"[{_fmt(r[k][0])}, {_fmt(r[k][1])}]"  # noqa: E731
            kid = "—" if "kid" not in r else f"{_fmt(r['kid'])} ± {_fmt(r['kid_std'], '.2g')} {ci('kid_ci95')}"
            out.append(f"| {name} | {r['n_real']} | {r['n_gen']} | {_fmt(r.get('fid'))} | {ci('fid_ci95')} | {kid} "
                       f"| {r.get('kid_subset_size', '—')} | {_fmt(r.get('inception_score'))} |")
    out += ["", "### Diversity (weight-free: mean |Δpixel| in [0, 1]; IC-LPIPS when LPIPS weights exist)", "",
            "| class | pairwise gen | pairwise real train | gen → nearest train | IC-LPIPS |", "|---|---|---|---|---|"]
    for c, d in m.diversity["per_class"].items():
        out.append(f"| {c} | {_fmt(d['pixel_l1_gen'], '.3f')} | {_fmt(d['pixel_l1_real'], '.3f')} "
                   f"| {_fmt(d['nearest_train_l1'], '.3f')} | {_fmt(d['ic_lpips'], '.3f')} |")
    if m.diversity["ic_lpips_reason"]:
        out.append(f"\nIC-LPIPS: null — {m.diversity['ic_lpips_reason']}.")
    if m.downstream:
        dn, s = m.downstream, m.downstream["setup"]
        conds, diffs = list(dn["conditions"]), list(dn["diff"])
        init = "ImageNet init" if s["pretrained"] else "from scratch"
        out += ["", f"### Downstream defect-type classifier (ResNet-18, {init}, "
                f"{s['steps']} steps × batch {s['batch']}, {s['size']} px, mean ± std over {s['seeds']} seeds; "
                f"tested on {s['n_test']} held-out real images; {s['seconds']} s)", "",
                "| metric | " + " | ".join(f"{c} (n={dn['conditions'][c]['n_train']})" for c in conds)
                + "".join(f" | Δ {d}" for d in diffs) + " |", "|---" * (1 + len(conds) + len(diffs)) + "|"]
        for k in classifier.SUMMARY:
            out.append(f"| {k} | " + " | ".join(_pm(dn["conditions"][c][k]) for c in conds)
                       + "".join(f" | {_pm(dn['diff'][d][k], '+.3f')}" for d in diffs) + " |")
        out += ["", "| class | " + " | ".join(f"F1 {c} | AP {c}" for c in conds) + " |",
                "|---" * (1 + 2 * len(conds)) + "|"]
        for name in m.classes:
            pc = [dn["conditions"][c]["per_class"][name] for c in conds]
            out.append(f"| {name} | " + " | ".join(f"{_pm(p['f1'])} | {_pm(p['ap'])}" for p in pc) + " |")
    if m.judge:
        jd, gen, real = m.judge["judge"], m.judge["generated"], m.judge["real_test"]
        out += ["", f"### Judge (offline proxy: a small CNN trained on abundant procedural images at {jd['size']} px, "
                f"{jd['source']}; chance {m.judge['chance']:.0%})", "",
                "| class | generated recognised | generated judged defect-free | real held-out recognised |",
                "|---|---|---|---|"]
        for name in [*m.classes, "overall"]:
            g = gen["overall"] if name == "overall" else gen["per_class"][name]
            r = real["overall"] if name == "overall" else real["per_class"][name]
            share = lambda d: "—" if not d["n"] else f"{d['correct']}/{d['n']} ({d['share']:.0%}"  # noqa: E731
            out.append(f"| {name} | {share(g)}{', p=' + format(g['p_value'], '.2g') + ')' if g['n'] else ''} "
                       f"| {g.get('good', 0)} | {share(r)}{')' if r['n'] else ''} |")
    if m.gain:
        g = m.gain
        iv = lambda d: "—" if d["mean"] is None else (f"{d['mean']:.3f}" if d["low"] is None  # noqa: E731
                                                       else f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]")
        givs = lambda d: f"{d['mean']:+.3f}" + ("" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]")  # noqa: E731
        seeds = len({r["seed"] for r in g["runs"]})
        out += ["", f"### Gain study (offline proxy: small CNN, {g['steps']} steps × batch {g['batch_size']}, "
                f"{g['size']} px, {seeds} seeds, mean [95% t-interval]; tested on {len(g['classes'])} × "
                f"{g['test_per_class']} procedural images)", "",
                "| k real / class | real only | real + generated | gain | generated only (CAS) | CAS ÷ real |",
                "|---|---|---|---|---|---|"]
        for k, r in g["per_k"].items():
            out.append(f"| {k} (+{g['n_generated'][k]} gen.) | {iv(r['real'])} | {iv(r['real_gen'])} | "
                       f"{givs(r['gain'])} | {iv(r['gen'])} | {r['cas_ratio']:.2f} |")
    out += presence.section(m.presence) if m.presence else []
    notes = list(m.skipped.values()) + m.warnings
    if m.config.bootstrap and m.distribution:
        notes.append("95% intervals: percentile bootstrap over images; at small n they are wide and may exclude the "
                     "point estimate (resampling duplicates images, and FID's small-n bias grows)")
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def rows(m: EvalResult) -> list[dict]:
    """Long-format rows (section, condition, class, metric, value, std, n) for metrics.csv."""
    out = []
    add = lambda sec, cond, cls, key, val, std=None, n=None: out.append(dict(zip(  # noqa: E731
        CSV_FIELDS, (sec, cond, cls, key, val, std, n))))
    dist = m.distribution or {}
    for cls, r in [*dist.get("per_class", {}).items(), *([("pooled", dist["pooled"])] if dist else [])]:
        for key in ("fid", "kid", "inception_score"):
            if key in r:
                add("distribution", "", cls, key, r[key], r.get(f"{key}_std"), min(r["n_gen"], r["n_real"]))
    for cls, d in m.diversity["per_class"].items():
        for key, val in d.items():
            add("diversity", "", cls, key, val)
    dn = m.downstream or {}
    for cond, r in dn.get("conditions", {}).items():
        for key in classifier.SUMMARY:
            add("downstream", cond, "overall", key, r[key]["mean"], r[key]["std"], r[key]["n"])
        for cls, pc in r["per_class"].items():
            for key, v in pc.items():
                add("downstream", cond, cls, key, v["mean"], v["std"], v["n"])
    for cond, r in dn.get("diff", {}).items():
        for key, v in r.items():
            add("downstream", cond, "overall", key, v["mean"], v["std"], v["n"])
    for cls, share in (m.presence or {}).get("per_class", {}).items():  # share of free samples showing the product
        add("presence", "", cls, "share", share, None, None)
    return out


# ----------------------------------------------------------------------------- figures
def figures(m: EvalResult) -> list[tuple[str, Figure]]:
    """Per-class FID/KID bars (95% CI / subset std as error bars) and downstream conditions with std over seeds."""
    figs = []
    with viz.style():
        items = [(c, r) for c, r in [*m.distribution["per_class"].items(), ("pooled", m.distribution["pooled"])]
                 if "reason" not in r] if m.distribution else []
        keys = [k for k in ("fid", "kid") if any(k in r for _, r in items)]
        if items and keys:
            names = [c for c, _ in items]
            fig = Figure(figsize=(max(4.5, 1.2 + 0.6 * len(items)), 2.4 * len(keys) + 0.4), layout="constrained")
            for ax, key in zip(fig.subplots(len(keys), 1, squeeze=False)[:, 0], keys):
                ax.bar(names, [r.get(key, np.nan) for _, r in items], color="#4c72b0",
                       yerr=[r.get("kid_std", 0.0) for _, r in items] if key == "kid" else None, capsize=3)
                ci = [(x, r[f"{key}_ci95"]) for x, (_, r) in enumerate(items) if f"{key}_ci95" in r]
                if ci:  # drawn as a segment: at small n the interval may not contain the estimate
                    ax.vlines([x for x, _ in ci], [lo for _, (lo, _) in ci], [hi for _, (_, hi) in ci],
                              color="#dd8452", lw=3, label="bootstrap 95% interval")
                    ax.legend(fontsize=7)
                ax.set_ylabel(key.upper() + (" (± std over subsets)" if key == "kid" else ""))
                ax.tick_params(axis="x", labelrotation=30)
            fig.suptitle(f"generated vs held-out real test images\n{m.feature_extractor['note']}", fontsize=8)
            figs.append(("eval-distribution", fig))
        dn = m.downstream
        if dn:
            conds, keys = list(dn["conditions"]), classifier.SUMMARY
            fig = Figure(figsize=(1.5 + 1.1 * len(keys), 2.8), layout="constrained")
            ax, width = fig.subplots(), 0.8 / len(conds)
            for i, c in enumerate(conds):
                r = dn["conditions"][c]
                ax.bar(np.arange(len(keys)) + (i - (len(conds) - 1) / 2) * width, [r[k]["mean"] for k in keys], width,
                       yerr=[r[k]["std"] or 0.0 for k in keys], capsize=3, label=f"{c} (n={r['n_train']})")
            ax.set_xticks(np.arange(len(keys)), keys)
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            ax.set_title(f"downstream ResNet-18, {dn['setup']['seeds']} seeds (mean ± std), "
                         f"{dn['setup']['n_test']} real test images")
            figs.append(("eval-downstream", fig))
    if m.gain:  # accuracy against k, real only vs real + generated (gain.efficiency_figure)
        figs.append(("eval-efficiency", gain.efficiency_figure(gain.gain_from_json(m.gain))))
    return figs


def real_vs_generated_for_run(run: str | Path, samples: str | Path, rows: int = 4, real: str = "train") -> Figure:
    """``viz.real_vs_generated_figure`` of a run: its own ``train`` (what it was fine-tuned on) or
    held-out ``test`` images from its split manifest, above images from a sampler output folder."""
    if real not in ("train", "test"):
        raise DefectlabError(f"real must be train or test (got {real!r})")
    dcfg, dd = evaluate.run_split(Path(run))
    size, pool = dcfg.image_size, dd.train if real == "train" else dd.test
    real_imgs = {c: evaluate.load_images([s.image for s in pool if s.defect == c][:rows], size, dcfg.crop)
                 for c in dd.classes}
    gen = {c: evaluate.load_images(p[:rows], size)
           for c, p in evaluate.generated_paths(Path(samples), dd.product, dd.classes).items()}
    return viz.real_vs_generated_figure(real_imgs, gen, rows,
                                        title=f"{dd.product}: real ({real} split) vs generated, {size} px")


# ----------------------------------------------------------------------------- notebook one-liners
def resolve_run(run: str | Path, runs_dir: str | Path = "") -> Path:
    """A run folder from a path, name, number, or ``latest`` (the newest with a checkpoint, ``runs.resolve``)."""
    return runs.resolve(run, Path(runs_dir) if runs_dir else None)


def run_summary(folder: str | Path) -> dict:
    """What a fine-tuning run did: method, lr, size, steps, time, best validation loss."""
    folder = Path(folder)
    cfg = runs.load_config(folder)
    train = [r for r in runs.read_log(folder) if "loss" in r]
    best_file = folder / runs.CHECKPOINTS / "best.json"
    best = runs.read_json(best_file) if best_file.is_file() else {}
    return {"run": folder.name, "model": cfg.get("model"), "method": cfg.get("method"), "lr": cfg.get("lr"),
            "image_size": cfg.get("image_size"), "epochs": cfg.get("epochs"),
            "train_steps": train[-1]["step"] if train else 0,
            "train_seconds": round(train[-1]["time"], 1) if train else None,
            "final_train_loss": _round(train[-1]["loss"]) if train else None,
            "best_val_loss": _round(best.get("val_loss")), "best_step": best.get("step")}


def _round(value, digits: int = 4):
    """A float to ``digits`` significant digits, for tables people read (None stays None)."""
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def figures_folder(run: str | Path) -> Path:
    """Where a run's figures go (``<run>/figures``; train, sample and evaluate write there too)."""
    return Path(run) / "figures"


def sample_figure(samples: str | Path) -> Path:
    """The grid figure ``sample.run`` saved for a sampler output folder ``<run>/samples/<tag>``."""
    samples = Path(samples)
    figs = figures_folder(samples.parent.parent)
    exact = figs / f"samples-{samples.name}.png"
    if exact.is_file():
        return exact
    found = sorted(figs.glob("samples-*.png"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DefectlabError(f"no sample grid figure in {figs}")
    return found[-1]


def caption(m: EvalResult) -> str:
    """What the numbers of an evaluation are worth, in one line for notebooks and summaries."""
    cfg = runs.load_config(Path(m.run))
    small = cfg.get("model") in SMALL_BASES
    synthetic = synth.embedded(cfg.get("data", "")) is not None
    down = (m.downstream or {}).get("setup", {})
    parts = ["Offline proxy numbers" if (small or synthetic or not down.get("pretrained", True)) else "Numbers"]
    if small or synthetic:
        parts.append(f"{cfg.get('model')} base on {'the procedural embedded dataset' if synthetic else cfg.get('data')}: "
                     "they show the pipeline works, not how DiT-XL does on real defects")
    if down:
        parts.append(f"downstream ResNet-18 {'ImageNet init' if down.get('pretrained') else 'from scratch'}, "
                     f"{down.get('steps')} steps, {down.get('seeds')} seed(s), {down.get('n_test')} held-out real images")
    fe = m.feature_extractor
    parts.append(f"FID/KID/IS: {fe['note']}" if fe else "no FID/KID/IS (no Inception weights offline)")
    return " — ".join(parts[:2]) + ("; " + "; ".join(parts[2:]) if len(parts) > 2 else "") + "."


def metrics_summary(m: EvalResult) -> dict:
    """Headline numbers of an evaluation: downstream accuracy per condition, paired gains, pooled FID."""
    out: dict = {}
    down = m.downstream or {}
    for cond, r in down.get("conditions", {}).items():
        out[f"acc[{cond}]"] = r["accuracy"]["mean"]
        if r["accuracy"].get("std") is not None:  # sample std over classifier seeds (none with one seed)
            out[f"acc_std[{cond}]"] = r["accuracy"]["std"]
        out[f"macro_f1[{cond}]"] = r["macro_f1"]["mean"]
    for diff, r in down.get("diff", {}).items():
        out[f"acc_gain[{diff.replace(' - real', '')}]"] = r["accuracy"]["mean"]
        out[f"acc_gain_std[{diff.replace(' - real', '')}]"] = r["accuracy"]["std"]
    for part, name in (("generated", "gen"), ("real_test", "real")):
        if m.judge:  # offline proxy: share of images the procedural judge assigns their own class
            out[f"judge[{name}]"] = m.judge[part]["overall"]["share"]
    if m.judge and m.judge["generated"]["overall"]["n"]:  # samples the judge calls defect-free (no visible mark)
        gen = m.judge["generated"]["overall"]
        out["judge_good[gen]"] = gen.get("good", 0) / gen["n"]
    for k, r in (m.gain or {}).get("per_k", {}).items():  # offline proxy: the gain study's paired gain per k
        out[f"gain[k={k}]"] = r["gain"]["mean"]
        out[f"gain_low[k={k}]"] = r["gain"]["low"]
        out[f"cas_ratio[k={k}]"] = r["cas_ratio"]
    if m.presence:  # share of free samples that show the product (classes weighted equally)
        out["presence[gen]"] = m.presence["overall"]
    pooled = (m.distribution or {}).get("pooled", {})
    for key in ("fid", "kid"):
        if key in pooled:
            out[key] = pooled[key]
    return out


# ----------------------------------------------------------------------------- sweeps
SUMMARY_SKIP = ("params", "run", "note", "error")


def _links(out: Path, row: dict) -> dict:
    """Where a point's run folder and executed notebooks are, relative to the sweep folder."""
    folder = out / "points" / row["point"]
    notebooks = sorted(p.relative_to(out).as_posix() for p in folder.glob("*.ipynb")) if folder.is_dir() else []
    run = Path(row.get("run") or "")  # a row holds the run's name (run_summary); a point trains into <point>/runs
    run = run if run.is_absolute() else folder / "runs" / run
    return {"run_folder": Path(os.path.relpath(run, out)).as_posix() if row.get("run") and run.is_dir() else "",
            "notebooks": " ".join(notebooks)}


def sweep_summary(out: Path, points: list[dict], keys: list[str], formats: str = "png") -> list[Path]:
    """``summary.csv``, ``summary.md`` and ``figures/sweep-summary.<formats>`` (val loss, downstream
    accuracy) of a sweep's point rows, each row linking its run folder and executed notebooks;
    ``keys`` are the swept parameters. Pending and failed points are rows too: written after every
    point, the summary says how far a sweep got."""
    out = Path(out)
    columns = ["point", "status", *keys]
    for r in points:
        columns += [k for k in r if k not in columns and k not in SUMMARY_SKIP and k not in r.get("params", {})]
    columns += ["run_folder", "notebooks"]
    table = [{**{k: r.get("params", {}).get(k) for k in keys}, **{k: v for k, v in r.items() if k in columns},
              **_links(out, r)} for r in points]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    written = [runs.write_text(out / "summary.csv", buf.getvalue())]
    cell = lambda v: _fmt(v) if isinstance(v, float) else "—" if v is None else str(v)  # noqa: E731
    show = [c for c in columns if c not in ("point", "run", "run_folder", "notebooks") and (c != "model" or c in keys)]
    notes = sorted({r["note"] for r in points if r.get("note")})
    done = [t for t in table if t.get("status") == "done"]
    md = [f"# Sweep summary ({len(done)} of {len(points)} points done)", "", *[f"> {n}" for n in notes], "",
          "| " + " | ".join(["point", *show, "files"]) + " |", "|" + "---|" * (len(show) + 2)]
    for t in table:
        files = ([f"[run]({t['run_folder']})"] if t["run_folder"] else []) + [
            f"[{Path(nb).name[:2]}]({nb})" for nb in t["notebooks"].split()]
        md.append("| " + " | ".join([f"[{t['point']}](points/{t['point']}/)", *(cell(t.get(c)) for c in show),
                                     " ".join(files) or "—"]) + " |")
    md += [f"- {r['point']}: {r['error']}" for r in points if r.get("status") == "failed"]
    written.append(runs.write_text(out / "summary.md", "\n".join(md) + "\n"))
    if done:
        written += viz.save_figure(viz.sweep_figure(done, keys, total=len(points)), out / "figures", "sweep-summary",
                                   formats)
    return written
