"""Distillation: the progressive-distillation target, the grids the sampler visits, a student that
beats its teacher at the student's step count, bit-exact resume, the size student, bad input."""
import shutil

import pytest
import torch

from defectlab.base import runs
from defectlab.core import methods, model as model_mod, restore, sampler
from defectlab.stages import distill, sample, train
from defectlab.reports import compare, export
from defectlab.app import cli
from defectlab.core.diffusion import Objective
from defectlab.base.errors import DefectlabError


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny pixel-space teacher (a few fine-tuning steps: what it draws is its own, not data)."""
    return train.run(train.TrainConfig(model="tiny", image_size=16, epochs=3, max_steps=30, batch_size=4, grad_accum=1,
                                       val_every=3, val_per_class=1, val_timesteps=1, log_samples=0, progress=False,
                                       report_to="none", runs_dir=str(tmp_path_factory.mktemp("runs"))))


def _cfg(teacher, tmp_path, **kw):
    return distill.DistillConfig(**{"run": str(teacher), "iterations": 3, "batch_size": 2, "phases": 2,
                                    "student_steps": 2, "progress": False, "runs_dir": str(tmp_path), **kw})


def test_one_student_step_lands_where_two_teacher_steps_do():
    noise = distill._Noise(Objective(model_mod.dit_schedule()))
    gen = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(3, 3, 4, 4, generator=gen), torch.randn(3, 3, 4, 4, generator=gen)
    t, s = torch.tensor([999, 500, 249]), torch.tensor([749, 250, -1])
    x0, eps = distill.jump(z_t, z_s, t, s, noise)
    torch.testing.assert_close(distill._ddim(z_t, eps, t, s, noise, clip=False), z_s, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(x0[2], z_s[2])  # the last step ends on the clean image itself


def test_grids_end_on_the_samplers_ddim_pairs_and_halve():
    config = model_mod.dit_schedule()
    levels = distill.grids(config, "trailing", 4, 3)
    sched = sampler.make_scheduler("ddim", config, spacing="trailing")
    sched.set_timesteps(4)
    assert levels[0] == [(int(t), int(t) - 250) for t in sched.timesteps] == [(999, 749), (749, 499), (499, 249), (249, -1)]
    for coarse, fine in zip(levels, levels[1:]):
        assert len(fine) == 2 * len(coarse) == 2 * len(fine) // 2
        assert all(fine[2 * i][0] == t and fine[2 * i + 1][1] == s and fine[2 * i][1] == fine[2 * i + 1][0]
                   for i, (t, s) in enumerate(coarse))
    with pytest.raises(DefectlabError, match="use fewer phases"):
        distill.grids(config, "trailing", 500, 2)


def _draw(r, steps, guidance):
    gens = [sampler.generators(0, c, [i])[0] for c in r.classes for i in range(3)]
    labels = [j for j in range(len(r.classes)) for _ in range(3)]
    return sampler.generate(r.model, r.base.codec, labels, gens, steps=steps, guidance=guidance, scheduler="ddim",
                            scheduler_config=r.base.scheduler_config, image_size=16, progress=False)


def test_steps_student_draws_its_teachers_images_in_fewer_steps(teacher, tmp_path, capsys):
    student = distill.run(_cfg(teacher, tmp_path, iterations=40, batch_size=8, guidance=3.0))
    assert "2 DDIM steps × 1 forward per image (teacher: 8 × 2 = 16" in capsys.readouterr().out
    t, s = restore.restore(teacher), restore.restore(student)
    assert s.config["method"] == "full" and s.classes == t.classes and len(s.model.transformer_blocks) == 4
    reference = _draw(t, 8, 3.0)  # the teacher at the first phase's steps, guided
    own = (_draw(t, 2, 3.0) - reference).pow(2).mean()
    distilled = (_draw(s, 2, 1.0) - reference).pow(2).mean()  # one forward per step: guidance is inside
    assert distilled < 0.75 * own, (float(distilled), float(own))
    # the stages sample a distilled run as distilled unless told otherwise
    out = sample.run(sample.SampleConfig(run=str(student), per_class=1))
    assert "ddim2-g1-" in out.name
    assert "ddpm4-g2-" in sample.run(sample.SampleConfig(run=str(student), per_class=1, steps=4, guidance=2.0)).name


def test_resumed_distillation_trains_bit_for_bit_as_one_that_never_stopped(teacher, tmp_path, monkeypatch):
    whole = distill.run(_cfg(teacher, tmp_path / "a", checkpoint_every=1))
    log = runs.log

    def crash(folder, record):  # killed after step 5: the newest checkpoint is mid-way through phase 2
        if record["step"] == 6:
            raise KeyboardInterrupt
        log(folder, record)
    monkeypatch.setattr(runs, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        distill.run(_cfg(teacher, tmp_path / "b", checkpoint_every=1))
    monkeypatch.setattr(runs, "log", log)
    cut = runs.numbered(tmp_path / "b")[0]
    assert runs.latest_checkpoint(cut).name == "0000005" and (cut / distill.TEACHERS / "phase-1.safetensors").is_file()
    resumed = distill.run(distill.DistillConfig(resume=str(cut), progress=False))
    assert resumed == cut
    a, b = (runs.load_tensors(runs.latest_checkpoint(f) / runs.STATE_FILE) for f in (whole, resumed))
    assert runs.latest_checkpoint(whole).name == runs.latest_checkpoint(resumed).name == "0000006"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_size_student_keeps_evenly_spaced_blocks_and_samples(teacher, tmp_path, capsys):
    net = restore.plain(restore.restore(teacher).model)
    same, kept = distill.shrink(net, len(net.transformer_blocks))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([0, 1])
    assert kept == [0, 1, 2, 3] and torch.equal(same(x, timestep=t, class_labels=y).sample,
                                                net(x, timestep=t, class_labels=y).sample)
    assert distill.shrink(net, 2)[1] == [0, 3]
    student = distill.run(_cfg(teacher, tmp_path, mode="size", student_layers=2))
    how = runs.load_config(student)["distilled"]
    assert (how["student_layers"], how["teacher_layers"], how["steps"]) == (2, 4, 20)
    assert how["student_params"] < 0.6 * how["teacher_params"]
    assert "2 of 4 blocks" in capsys.readouterr().out
    r = restore.restore(student)
    assert len(r.model.transformer_blocks) == 2 and methods.num_classes(r.model) == len(r.classes)
    assert "ddim20-g1-" in sample.run(sample.SampleConfig(run=str(student), per_class=1)).name
    # exported with the sampler it learned; `defectlab runs` says what it is in a few words
    card = (export.run(export.ExportConfig(run=str(student))) / "README.md").read_text()
    assert "A size student of" in card and "num_inference_steps=20, guidance_scale=1" in card
    table, _ = compare.rows(compare.RunsConfig(root=str(tmp_path.parent)))
    assert any(r.get("distilled", "").startswith("size of ") for r in table)


def test_default_size_student_is_within_a_quarter_of_its_teacher():
    big = model_mod.dit.DiT(**{**model_mod.TINY_CONFIG, "num_layers": 12, "num_embeds_ada_norm": 4})
    n = distill.quarter(big)
    assert distill.count(distill.shrink(big, n)[0]) <= distill.count(big) / 4 < distill.count(distill.shrink(big, n + 1)[0])


@pytest.mark.parametrize("flags, message", [
    (["--student-steps", "0"], "--student-steps must be ≥ 1"),
    (["--mode", "size", "--student-layers", "4"], "must be smaller than its teacher"),
    (["--mode", "fast"], "mode must be steps or size"),
])
def test_bad_input_is_one_line_and_leaves_no_run_folder(teacher, tmp_path, capsys, flags, message):
    code = cli.main(["distill", "--run", str(teacher), "--runs-dir", str(tmp_path), "--no-progress", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_teacher_on_leading_ddim_spacing_gets_a_size_student_only(tmp_path):
    original = train.run(train.TrainConfig(model="tiny", image_size=16, epochs=1, max_steps=1, batch_size=2, grad_accum=1,
                                           val_every=1, val_per_class=1, val_timesteps=1, log_samples=0, progress=False,
                                           report_to="none", numerics="original", runs_dir=str(tmp_path / "t")))
    with pytest.raises(DefectlabError, match="needs DDIM's trailing timestep spacing.*use --mode size"):
        distill.run(_cfg(original, tmp_path / "s"))
    assert not (tmp_path / "s").exists()
    assert distill.grids(model_mod.dit_schedule(), "leading", 4, 0)[0][-1] == (0, -1)  # never an index below the end


def test_a_teacher_without_checkpoint_is_refused(teacher, tmp_path):
    bare = tmp_path / "000-bare"
    shutil.copytree(teacher, bare, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(DefectlabError, match="no checkpoint in run folder"):
        distill.run(_cfg(bare, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
