"""Notebook parameters: what a params file, a sweep or the demo may set, its type, and which
notebook receives it.

A name goes to the notebooks whose parameters cell declares it (papermill's inspection,
``declared``), converted to the declared type (YAML reads ``1e-5`` as text). Any other name that
is a field of a notebook's settings dataclass (``CONFIGS``) goes into that notebook's
``settings`` parameter, a JSON object that the notebook merges into the dataclass with
``with_settings``: so every stage setting (``crop``, ``rotations``, ``lr_schedule``,
``timestep_spacing``, …) can be set and swept, though only the common ones are notebook
parameters. Anything else is refused, naming the key and the file. Notebook parameters mirror the
dataclass defaults; ``tests/test_params.py`` holds them equal (``RENAMED`` where names differ).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import papermill
import yaml

from ..base import paths
from ..base.errors import DefectlabError
from ..data import sources
from ..stages import distill, evaluate, sample, train

NOTEBOOKS = ("01_explore_data", "02_finetune", "03_sample", "04_evaluate", "05_distill")
# 05 runs right after 02 when a batch sets ``distill`` (steps | size): 03 and 04 then take the student
RUN_ORDER = ("01_explore_data", "02_finetune", "05_distill", "03_sample", "04_evaluate")
DISTILL = "distill"   # the parameter that asks a batch for 05
# The settings dataclass each notebook fills, and the notebook parameters named otherwise than its field.
CONFIGS = {"01_explore_data": sources.DataConfig, "02_finetune": train.TrainConfig, "03_sample": sample.SampleConfig,
           "04_evaluate": evaluate.EvalConfig, "05_distill": distill.DistillConfig}
RENAMED = {"03_sample": {"sample_seed": "seed"},
           "05_distill": {DISTILL: "mode", "teacher_guidance": "guidance", "distill_batch_size": "batch_size",
                          "distill_seed": "seed"}}
SETTINGS = "settings"  # the parameter that carries the dataclass's other fields, as JSON


def notebook_path(name: str) -> Path:
    path = paths.NOTEBOOKS / f"{name}.ipynb"
    if not path.is_file():
        raise DefectlabError(f"notebook not found: {path} (notebooks ship with the source checkout: pip install -e .)")
    return path


def declared(name: str) -> dict[str, dict]:
    """The notebook's parameters as papermill reads them: name → {inferred_type_name, default, help}."""
    return papermill.inspect_notebook(notebook_path(name))


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping, or a one-line error naming the file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DefectlabError(f"file not found: {p}")
    try:
        obj = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DefectlabError(f"{p} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DefectlabError(f"malformed YAML in {p}{where}: {what}") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise DefectlabError(f"{p} must be a mapping of name: value (got {type(obj).__name__})")
    return obj


def coerce(name: str, value, kind: str, source: str):
    """YAML gives ``1e-5`` as a string and ``3`` as an int: convert to the declared type
    (``list[int]``: a list, or comma-separated text, of them)."""
    if kind.startswith("list["):
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        return [coerce(name, v.strip() if isinstance(v, str) else v, kind[5:-1], source) for v in items if v != ""]
    bad = DefectlabError(f"parameter {name!r} from {source} must be {kind} (got {value!r})")
    if value is None or isinstance(value, dict):
        raise bad
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if kind == "str":
        if isinstance(value, (list, tuple)):  # classes: [crack, hole] → "crack,hole"
            return ",".join(str(v) for v in value)
        return str(value)
    if isinstance(value, (list, tuple)):
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if kind == "float":
        return number
    if kind == "int" and number.is_integer():
        return int(number)
    raise bad


def settings_fields(name: str, spec: dict[str, dict]) -> dict[str, str]:
    """The fields of notebook ``name``'s dataclass that its parameters do not cover → their type."""
    if SETTINGS not in spec:
        return {}
    cls = CONFIGS[name]
    covered = {RENAMED.get(name, {}).get(k, k) for k in spec}
    hints = typing.get_type_hints(cls)
    kind = lambda h: f"list[{typing.get_args(h)[0].__name__}]" if typing.get_origin(h) in (tuple, list) else h.__name__  # noqa: E731
    return {f.name: kind(hints[f.name]) for f in dataclasses.fields(cls) if f.name not in covered}


def kinds(specs: dict[str, dict[str, dict]]) -> dict[str, str]:
    """Every name a params file or sweep may set → its type: the notebooks' parameters, then the
    other fields of their settings dataclasses."""
    fields = {k: v for name, spec in specs.items() for k, v in settings_fields(name, spec).items()}
    return {**fields, **{k: s[k]["inferred_type_name"] for s in specs.values() for k in s if k != SETTINGS}}


def check_names(given: dict, specs: dict[str, dict], source: str) -> None:
    known = kinds(specs)
    for key in given:
        if key == SETTINGS:
            raise DefectlabError(f"{SETTINGS!r} in {source} is filled by the batch: set the fields themselves "
                                 "(e.g. crop: 200)")
        if key not in known:
            params = sorted({k for s in specs.values() for k in s if k != SETTINGS})
            classes = ", ".join(CONFIGS[n].__name__ for n in specs if SETTINGS in specs[n])
            raise DefectlabError(f"unknown notebook parameter {key!r} in {source} (known: {', '.join(params)}; "
                                 f"or a field of {classes})")


def for_notebook(name: str, given: dict, specs: dict[str, dict], source: str) -> dict:
    """What notebook ``name`` receives of ``given`` (names checked by ``check_names``): the
    parameters it declares, typed, and in ``settings`` the fields of its dataclass that no
    notebook declares as a parameter."""
    spec = specs[name]
    p = {k: coerce(k, v, spec[k]["inferred_type_name"], source) for k, v in given.items() if k in spec}
    anywhere = {k for s in specs.values() for k in s}
    fields = settings_fields(name, spec)
    extra = {k: coerce(k, v, fields[k], source) for k, v in given.items() if k in fields and k not in anywhere}
    if extra:
        p[SETTINGS] = json.dumps(extra)
    return p


def stage_config(name: str, given: dict, specs: dict[str, dict], source: str):
    """The settings dataclass notebook ``name`` builds from ``given`` (a flat mapping, as a params
    file or the demo gives it): what the notebook receives (``for_notebook``), its parameters under
    their field names (``RENAMED``; notebook-only ones such as ``explorer_images`` dropped), its
    ``settings`` merged. Code that runs the stages without Jupyter gets the notebooks' own configs."""
    received = for_notebook(name, given, specs, source)
    settings = received.pop(SETTINGS, "")
    renamed, cls = RENAMED.get(name, {}), CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{renamed.get(k, k): v for k, v in received.items() if renamed.get(k, k) in fields})
    return with_settings(config, settings)


def with_settings(config, settings: str):
    """``config`` (a stage dataclass) with the fields in a notebook's ``settings`` parameter, a
    JSON object such as ``{"crop": 200, "rotations": []}``, replaced."""
    if not settings:
        return config
    cls = type(config).__name__
    try:
        values = json.loads(settings)
    except json.JSONDecodeError as err:
        raise DefectlabError(f'settings must be a JSON object of {cls} fields, e.g. {{"crop": 200}} ({err})') from None
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - names) if isinstance(values, dict) else ["(not an object)"]
    if unknown:
        raise DefectlabError(f"settings: {unknown[0]!r} is not a field of {cls}")
    return dataclasses.replace(config, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
