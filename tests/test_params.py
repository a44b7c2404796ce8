"""Notebook parameters against the stage dataclasses: the same defaults and types, and any other
field of a stage reachable from a params file or a sweep through the notebook's ``settings``."""
import ast
import dataclasses
import json
import typing

import jupytext
import pytest

from defectlab.base import paths
from defectlab.stages import evaluate, train
from defectlab.app import batch, cli, params
from defectlab.base.errors import DefectlabError


@pytest.fixture(scope="module")
def specs():
    return {name: params.declared(name) for name in params.NOTEBOOKS}


@pytest.mark.parametrize("name", params.NOTEBOOKS)
def test_notebook_defaults_are_the_dataclass_defaults(name, specs):
    cls, spec = params.CONFIGS[name], specs[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    renamed = params.RENAMED.get(name, {})
    assert set(renamed.values()) <= set(fields) and set(renamed) <= set(spec)  # the mapping names real things
    assert spec[params.SETTINGS]["inferred_type_name"] == "str" and spec[params.SETTINGS]["default"] == '""'
    matched = []
    for key, p in spec.items():
        field = fields.get(renamed.get(key, key))
        if field is None:  # figures_dir, explorer_images, compare_rows, …: the notebook's own
            continue
        default = ast.literal_eval(p["default"])
        assert (default, p["inferred_type_name"]) == (field.default, hints[field.name].__name__), (name, key)
        matched.append(key)
    assert len(matched) >= 2, (name, matched)


def parameter_comments(name: str) -> dict[str, str]:
    """The parameters cell of ``notebooks/<name>.py``: parameter → the ``# comment`` after it, as
    written (papermill's own parse drops a line with a second ``=``, comment included)."""
    nb = jupytext.read(paths.NOTEBOOKS / f"{name}.py")
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    return {s.target.id: lines[s.lineno - 1].encode()[s.end_col_offset:].decode().strip().removeprefix("#").strip()
            for s in ast.parse(cell.source).body}


# parameters a notebook takes more narrowly than its stage: 03 samples a run, never the base model
NARROWER = {"03_sample": {"run", "classes"}}


@pytest.mark.parametrize("name", params.NOTEBOOKS)
def test_notebook_parameter_comments_are_the_dataclass_comments(name):
    """The ``# comment`` after a parameter is its help (``papermill --help-notebook``), as the one
    after the field is the CLI's (``cli._field_help``): the same words for the same setting.
    Parameters that are not fields (figures_dir, explorer_images, settings, …) are the notebook's own.
    papermill skips a parameter line holding two ``=``, so these comments say "0 means off", not "0 = off"."""
    cls = params.CONFIGS[name]
    helps = cli._field_help(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    renamed = params.RENAMED.get(name, {})
    drifted = []
    for key, comment in parameter_comments(name).items():
        field = renamed.get(key, key)
        if field not in fields or key in NARROWER.get(name, ()):
            continue
        wanted = helps.get(field, "")
        if comment != wanted or "=" in wanted:
            drifted.append(f"notebooks/{name}.py: parameter {key!r} (field {cls.__name__}.{field}) has\n"
                           f"    notebook:  # {comment}\n    dataclass: # {wanted}"
                           + ("\n    (papermill cannot read a parameter line with two '=': reword the dataclass "
                              "comment without '=')" if "=" in wanted else ""))
    assert not drifted, "parameter comments differ from the dataclass's:\n" + "\n".join(drifted)


def test_every_train_parameter_is_a_field():
    """02 fills TrainConfig: all its parameters are fields (a new one must be added to both)."""
    spec = params.declared("02_finetune")
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert set(spec) - fields == {params.SETTINGS}


# ----------------------------------------------------------------------------- routing
GIVEN = {"epochs": 1, "crop": 200, "rotations": [0, 90], "lr_schedule": "cosine", "numerics": "diffusers",
         "timestep_spacing": "leading", "kid_subset_size": "5", "sample_seed": 3}


def test_stage_fields_go_into_settings_and_reach_the_dataclass(specs):
    params.check_names(GIVEN, specs, "p.yaml")
    p = {name: params.for_notebook(name, GIVEN, specs, "p.yaml") for name in params.NOTEBOOKS}
    settings = {name: json.loads(q.pop(params.SETTINGS, "{}")) for name, q in p.items()}
    assert p["02_finetune"] == {"epochs": 1} and p["03_sample"] == {"sample_seed": 3}  # declared: as parameters
    assert settings["01_explore_data"] == {"crop": 200, "rotations": [0, 90]}
    assert settings["02_finetune"] == {"crop": 200, "rotations": [0, 90], "lr_schedule": "cosine",
                                       "numerics": "diffusers"}
    assert settings["03_sample"] == {"numerics": "diffusers", "timestep_spacing": "leading"}  # not seed: sample_seed
    assert settings["04_evaluate"] == {"kid_subset_size": 5}
    config = params.with_settings(train.TrainConfig(epochs=1), params.for_notebook("02_finetune", GIVEN, specs, "f")[
        params.SETTINGS])
    assert (config.crop, config.rotations, config.lr_schedule, config.epochs) == (200, (0, 90), "cosine", 1)
    assert params.with_settings(evaluate.EvalConfig(), "") == evaluate.EvalConfig()


def test_unknown_names_and_fields_are_one_line_errors(specs, tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("epochs: 2\ncropp: 200\n")
    with pytest.raises(DefectlabError, match=f"unknown notebook parameter 'cropp' in {bad}") as err:
        params.check_names(params.load_yaml(bad), specs, str(bad))
    assert "\n" not in str(err.value) and "TrainConfig" in str(err.value)
    with pytest.raises(DefectlabError, match="'settings' in f is filled by the batch"):
        params.check_names({"settings": "{}"}, specs, "f")
    with pytest.raises(DefectlabError, match="parameter 'rotations' from f must be int"):
        params.for_notebook("02_finetune", {"rotations": ["a"]}, specs, "f")
    with pytest.raises(DefectlabError, match="'cropp' is not a field of TrainConfig"):
        params.with_settings(train.TrainConfig(), '{"cropp": 1}')


def test_a_swept_stage_field_reaches_the_notebook(tmp_path, monkeypatch):
    """``crop`` in a sweep grid: expanded, typed, and handed to 02 (and only the data notebooks) in
    ``settings`` by the batch runner (papermill replaced by a recorder)."""
    spec = tmp_path / "s.yaml"
    spec.write_text("base: {model: tiny, epochs: 1}\ngrid:\n  crop: [0, 200]\n")
    stages = {k: params.declared(k) for k in params.NOTEBOOKS if k[:2] in batch.STAGES}
    points = batch.expand(params.load_yaml(spec), "s", stages)
    assert [p["crop"] for p in points] == [0, 200] and batch.point_name(points[1], ["crop"]) == "crop=200"
    seen = []

    def record(name, output, parameters, kernel, cell_timeout=0):
        seen.append((name, parameters))
        raise DefectlabError("stop")  # nothing runs: the parameters are what is tested

    monkeypatch.setattr(batch, "execute", record)
    with pytest.raises(DefectlabError, match="2 of 2 sweep points failed"):
        batch.run(batch.SweepConfig(spec=str(spec), out=str(tmp_path / "o")))
    assert [(n, json.loads(p[params.SETTINGS])) for n, p in seen] == [("02_finetune", {"crop": 0}),
                                                                        ("02_finetune", {"crop": 200})]
    assert seen[1][1]["epochs"] == 1 and seen[1][1]["model"] == "tiny"


def test_the_demo_without_jupyter_builds_the_notebooks_configs(specs):
    """``demo --no-notebooks`` runs each stage on the settings object its notebook would build from
    the same parameters: the demo's recipe reaches TrainConfig (zoom, mask loss), 03 takes its own
    seed (``sample_seed``), not 02's, and a field no notebook declares travels through ``settings``."""
    from defectlab.app import demo
    given = {**demo.params(demo.DemoConfig(model="mini-latent")), "seed": 7, "sample_seed": 3, "crop": 200,
             "timestep_spacing": "leading"}
    tc = params.stage_config("02_finetune", given, specs, "test")
    recipe = demo.PRESETS["mini-latent"]
    assert isinstance(tc, train.TrainConfig)
    assert (tc.model, tc.zoom, tc.mask_loss, tc.lr, tc.seed, tc.crop) == (
        "mini-latent", recipe["zoom"], recipe["mask_loss"], recipe["lr"], 7, 200)
    sc = params.stage_config("03_sample", {**given, "run": "somewhere"}, specs, "test")
    assert (sc.run, sc.seed, sc.guidance, sc.timestep_spacing) == ("somewhere", 3, recipe["guidance"], "leading")
    assert sc.batch_size == type(sc)().batch_size  # 02's batch_size stays 02's
    ec = params.stage_config("04_evaluate", given, specs, "test")
    assert isinstance(ec, evaluate.EvalConfig) and ec.metrics == given["metrics"]
