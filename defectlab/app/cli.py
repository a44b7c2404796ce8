"""``defectlab`` command line: flags → the stage's settings dataclass → ``run(cfg)``.

Flags are generated from the dataclass fields, so the CLI, the notebooks' parameter cells
and the tests always fill the same settings. User errors print one line and exit 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import re
import sys
import typing
from pathlib import Path

from ..base import paths
from ..base.errors import DefectlabError
from ..data import fetch, sources, synth
from ..stages import presets

# subcommand → (module, settings class, one-line help)
STAGES = {
    "finetune": ("stages.train", "TrainConfig", "fine-tune a DiT on a defect dataset (writes a run folder)"),
    "distill": ("stages.distill", "DistillConfig", "distil a run into a student that samples in a few steps (progressive "
                "distillation, guidance distilled in) or with fewer blocks (writes a run folder)"),
    "sample": ("stages.sample", "SampleConfig", "generate images from a run (grids, bulk export, manifest)"),
    "synthesize": ("stages.synthesize", "MaskSampleConfig", "image + mask pairs: defects inside given masks (mask-conditioned "
                   "run) or inpainted onto good images"),
    "benchmark": ("stages.benchmark", "BenchmarkConfig", "generated pairs against copy-paste and real-only on a folder of real "
                  "test images: downstream accuracy with intervals, two-sample realism"),
    "runs": ("reports.compare", "RunsConfig", "list and compare runs under outputs/ (the demo's, notebook batches' and sweeps' "
             "too): the settings that differ and the results, Markdown or CSV, and a figure"),
    # evaluate: report.cli runs evaluate.run and writes its report (metrics.md / .csv, figures)
    "evaluate": ("reports.report", "EvalConfig", "FID/KID/IS, diversity and downstream-classifier gain"),
    "report": ("reports.page", "PageConfig", "one self-contained HTML page of a run, a sweep or a notebook batch (the demo's): "
               "figures, tables, settings, links"),
    "classes": ("stages.classes", "RankConfig", "rank ImageNet classes by the base model's denoising error"),
    "explore": ("reports.explore", "ExploreConfig", "the explorer of a run (class, sampler, steps, seed, guidance) as a web "
                "page on 127.0.0.1, served by Voilà"),
    "export": ("reports.export", "ExportConfig", "write a run as a diffusers folder (DiTPipeline for latent bases) with a "
               "model card; --push-to-hub uploads it"),
    "pretrain-mini": ("stages.pretrain", "PretrainConfig", "pre-train the small shipped base model (defectlab-mini)"),
    "pretrain-ae": ("stages.autoencoder", "AEConfig", "pre-train the small autoencoder of a latent base (the SD VAE's "
                    "offline stand-in)"),
    "adapt-vae": ("stages.adapt_vae", "AdaptVAEConfig", "adapt a latent base's autoencoder decoder to a product's images "
                  "(writes a model folder for finetune --model; the latents stay the same)"),
    "sweep": ("app.batch", "SweepConfig", "run notebooks 02-04 over a grid of parameters (resumable)"),
    "notebooks": ("app.batch", "NotebooksConfig", "execute notebooks 01-04 through papermill"),
    "demo": ("app.demo", "DemoConfig", "the main job on the embedded default: data, fine-tune, sample, evaluate"),
}


def _first_doc_line(obj) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""


def _field_help(cls) -> dict[str, str]:
    """The ``# comment`` after each field in the class source is its help text."""
    import inspect

    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", src, re.M):
            helps[m.group(1)] = m.group(2).strip()
    return helps


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (``DefectlabError``, exit 2), not a usage block."""

    def error(self, message: str):
        where = self.prog.removeprefix("defectlab").strip()
        raise DefectlabError(f"{where + ': ' if where else ''}{message.removeprefix('argument ')} "
                             f"(see `{self.prog} --help`)")


def _typed(kind):
    """``kind(text)``, or the one-line reason: ``'abc' is not a float``."""
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an' if kind is int else 'a'} {kind.__name__}") from None
    return convert


def _parse_list(kind):
    def parse(text: str):
        return tuple(_typed(kind)(x) for x in text.split(",") if x.strip() != "")
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls, positional: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{helps.get(f.name, '')} (default: {default!r})".replace("%", "%%")  # argparse formats help with %
        name = f.name if f.name in positional else "--" + f.name.replace("_", "-")
        kw: dict = {"help": help_text}
        if f.name in positional:
            kw["nargs"] = "?"
        if f.name not in positional:
            kw["dest"] = f.name
        if hint is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
            continue
        origin = typing.get_origin(hint)
        if origin in (tuple, list):
            inner = typing.get_args(hint)[0]
            kw["type"], kw["metavar"] = _parse_list(inner), "A,B,…"
        elif hint in (int, float):
            kw["type"] = _typed(hint)
        parser.add_argument(name, **kw)


def config_from_args(cls, args: argparse.Namespace):
    """Only the flags the user gave override the dataclass defaults, after a ``--preset``'s."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    preset = presets.settings(args.preset, args.command) if getattr(args, "preset", None) else {}
    return cls(**{**preset, **given})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="defectlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, inspect and download datasets").add_subparsers(dest="action", required=True)
    p = data.add_parser("synth", help="generate the embedded procedural defect dataset (MVTec AD layout)")
    p.add_argument("--out", type=Path, default=None,
                   help="destination (default: data/synthetic for the default settings, else data/synthetic-<settings>)")
    p.add_argument("--seed", type=_typed(int), default=0, help="generator seed (default: 0)")
    p.add_argument("--size", type=_typed(int), default=256, help="image side in pixels (default: 256)")
    p.add_argument("--per-class", type=_typed(int), default=20, help="images per defect class (default: 20)")
    p.add_argument("--version", type=_typed(int), default=synth.GENERATOR_VERSION, choices=synth.VERSIONS,
                   help="drawing version: 1 = flat colour-coded defects, 2 = varied albedo, texture, light and pose, "
                        f"defects drawn through them (default: {synth.GENERATOR_VERSION})")
    p = data.add_parser("info", help="layout, products, classes, counts and image sizes of a dataset root")
    p.add_argument("root", help="dataset root folder, or 'synthetic'")
    p = data.add_parser("fetch", help="download DefectSpectrum (hub) or unpack an MVTec AD archive")
    p.add_argument("source", choices=["defectspectrum", "mvtec"])
    p.add_argument("--product", default="hazelnut", help="product to fetch (default: hazelnut)")
    p.add_argument("--archive", type=Path, default=None, help="MVTec AD archive file (for source=mvtec)")
    p.add_argument("--dest", type=Path, default=None, help="destination root (default: data/<source>)")
    p.add_argument("--force", action="store_true",
                   help="mvtec: replace the archive's files in a product folder that exists (nothing else is touched)")

    for name, (module, cls_name, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(stage=(module, cls_name))
        if name == command:  # import only the stage that runs: torch/diffusers imports are slow
            cls = getattr(importlib.import_module(f"defectlab.{module}"), cls_name)
            add_dataclass_args(p, cls, positional=getattr(cls, "POSITIONAL", ()))
            if name in presets.commands():
                p.add_argument("--preset", choices=sorted(presets.PRESETS), default=None,
                               help=f"a named recipe; flags given beside it win ({presets.describe(name)})")
    return parser


def _run_data(args) -> int:
    if args.action == "synth":
        settings = {"seed": args.seed, "size": args.size, "per_class": args.per_class}
        if args.out is None and all(sources.SYNTHETIC[k] == v for k, v in settings.items()):
            out = sources.resolve_root("synthetic", args.version)  # stamped, reused by every stage
        else:
            tag = "synthetic-s{seed}-{size}px-{per_class}".format(**settings) + (
                f"-v{args.version}" if args.version != synth.GENERATOR_VERSION else "")
            out = synth.generate(args.out or paths.DATA / tag, **settings, version=args.version)
        print(sources.format_info(sources.info(out)))
    elif args.action == "info":
        print(sources.format_info(sources.info(sources.resolve_root(args.root))))
    elif args.action == "fetch":
        dest = args.dest or paths.DATA / args.source
        if args.source == "defectspectrum":
            out = fetch.fetch_defectspectrum(args.product, dest)
        else:
            if args.archive is None:
                raise DefectlabError("--archive is required for 'data fetch mvtec' (the MVTec AD .tar.xz you downloaded)")
            out = fetch.fetch_mvtec(args.archive, dest, product=args.product, force=args.force)
        print(f"fetched into {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        command = next((a for a in argv if not a.startswith("-")), None)
        args = build_parser(command).parse_args(argv)
        if args.command == "data":
            return _run_data(args)
        module, cls_name = args.stage
        mod = importlib.import_module(f"defectlab.{module}")
        cfg = config_from_args(getattr(mod, cls_name), args)
        # a stage may define cli(cfg) to print a report; otherwise run(cfg) and show where it wrote
        result = (getattr(mod, "cli", None) or mod.run)(cfg)
        if isinstance(result, (str, Path)):
            print(result)
        return 0
    except DefectlabError as err:
        if debug:
            raise
        print(f"defectlab: error: {err}", file=sys.stderr)
        return 2
    except _oom_errors() as err:
        if debug:
            raise
        print("defectlab: error: out of GPU memory — lower --batch-size (keep the effective batch with "
              "--grad-accum), use --mixed-precision bf16, or a method with fewer trainable parameters "
              f"({str(err).splitlines()[0][:120]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectlab: interrupted; finished work is kept (run again, or --resume, to continue)", file=sys.stderr)
        return 130
    except OSError as err:  # a file-system fault no stage turned into its own line: still one line
        if debug or err.errno not in _DISK_FAULTS:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"defectlab: error: cannot write{where}: {err.strerror}; free space, fix permissions or choose "
              "another folder, then run again (finished files are kept)", file=sys.stderr)
        return 2


_DISK_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR,
                errno.EISDIR)


def _oom_errors() -> tuple[type[BaseException], ...]:
    try:
        import torch
        return (torch.cuda.OutOfMemoryError,)
    except ImportError:  # pragma: no cover
        return ()


if __name__ == "__main__":
    sys.exit(main())
