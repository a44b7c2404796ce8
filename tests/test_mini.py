"""defectlab-mini: the shipped pre-trained base, its corpus and its pre-training loop."""
import re

import numpy as np
import pytest
import torch

from defectlab.base import paths, runs
from defectlab.data import corpus, dataset, sources
from defectlab.core import classifier, methods, model, restore, sampler
from defectlab.stages import pretrain, train
from defectlab.base.errors import DefectlabError

MINI = paths.ASSETS / "mini"
needs_mini = pytest.mark.skipif(not (MINI / "config.json").is_file(), reason="defectlab/assets/mini not built")


@needs_mini
def test_shipped_mini_loads_and_matches_its_card():
    base = model.load("mini")
    card = (MINI / "MODEL_CARD.md").read_text()
    digest = re.search(r"sha256 \| `([0-9a-f]{64})`", card).group(1)
    assert pretrain.sha256(MINI / pretrain.WEIGHTS) == digest
    assert (MINI / pretrain.WEIGHTS).stat().st_size <= 10 * 2 ** 20
    t = base.transformer
    assert t.dtype == torch.float32  # stored as fp16, used as fp32
    assert methods.num_classes(t) == len(corpus.CLASSES) and base.class_names == corpus.CLASSES
    assert base.default_image_size == 32 and t.config.out_channels == 6
    assert f"{sum(p.numel() for p in t.parameters()):,}" in card
    with torch.no_grad():  # the pre-trained model denoises its own corpus far better than chance
        x0, y = corpus.batch(10_000_000, 18, size=32)
        t_ = torch.full((18,), 300)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        from defectlab.core.diffusion import Objective
        obj = Objective(base.scheduler_config)
        assert obj.prediction_type == "v_prediction"  # from the shipped scheduler/scheduler_config.json
        pred = t(obj.add_noise(x0, noise, t_), timestep=t_, class_labels=y).sample[:, :3]
        target = obj.target(x0, noise, t_)
        assert ((pred - target) ** 2).mean() < 0.25 * (target ** 2).mean()


@needs_mini
def test_mini_scratch_is_mini_with_seeded_random_weights():
    mini, scratch = model.load("mini").transformer, model.load("mini-scratch").transformer
    assert {**scratch.config, "_name_or_path": 0} == {**mini.config, "_name_or_path": 0}
    a, b = mini.state_dict(), scratch.state_dict()
    assert a.keys() == b.keys() and not torch.equal(a["proj_out_2.weight"], b["proj_out_2.weight"])
    again = model.load("mini-scratch").transformer.state_dict()  # built once, then loaded
    assert all(torch.equal(b[k], again[k]) for k in b)
    config = paths.MODELS / "mini-scratch" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 32', '"sample_size": 64'))  # an older build
    assert model.load("mini-scratch").transformer.config.sample_size == mini.config.sample_size == 32
    sched = paths.MODELS / "mini-scratch" / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace("v_prediction", "epsilon"))  # built before mini predicted v
    assert model.load("mini-scratch").scheduler_config["prediction_type"] == "v_prediction"


def test_corpus_is_deterministic_and_varied():
    assert len(corpus.CLASSES) >= 10 and set(corpus.ANCHORS) == {"hazelnut", "screw"}
    a, ka, da = corpus.item(123, seed=7, size=32)
    b, kb, db = corpus.item(123, seed=7, size=32)
    assert np.array_equal(a, b) and (ka, da) == (kb, db) and a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, corpus.item(123, seed=8, size=32)[0])
    x, y = corpus.batch(0, len(corpus.CLASSES), seed=0, size=16)
    assert y.tolist() == list(range(len(corpus.CLASSES))) and x.shape[1:] == (3, 16, 16)
    assert -1 <= x.min() and x.max() <= 1
    # a class is a (product, defect) pair: the class decides the mark
    for i in (0, 5, 200, 1000 + 7):
        k, defect = corpus.item(i, size=16)[1:]
        assert k == i % len(corpus.CLASSES) and corpus.PAIRS[k][1] == defect
    assert {d for _, d in corpus.PAIRS} == {"good", *corpus.DEFECTS}
    assert all(corpus.PAIRS[k][1] == "good" for k in corpus.ANCHORS.values())
    # none of the embedded dataset's defect types is in the corpus
    assert not set(corpus.DEFECTS) & {d for p in ("hazelnut", "screw") for d in data_defects(p)}


def data_defects(product):
    from defectlab.data import synth
    return synth.PRODUCTS[product].defects


# a pre-training run small enough for a test: a few CPU-seconds per step
TINY_PRETRAIN = dict(image_size=16, patch_size=4, width=16, heads=1, depth=1, batch_size=2, progress=False,
                     fp16=False, preview=0)


def test_pretraining_resumes_exactly(tmp_path):
    tiny = dict(TINY_PRETRAIN, checkpoint_every=1)
    straight = pretrain.run(pretrain.PretrainConfig(**tiny, max_steps=4, runs_dir=str(tmp_path / "a"),
                                                    out=str(tmp_path / "m4")))
    pretrain.run(pretrain.PretrainConfig(**tiny, max_steps=2, runs_dir=str(tmp_path / "b"), out=str(tmp_path / "m2")))
    folder = runs.resolve("000", tmp_path / "b")
    resumed = pretrain.run(pretrain.PretrainConfig(resume=str(folder), max_steps=4, progress=False))
    assert resumed == tmp_path / "m2"  # the saved out folder
    s4 = runs.load_tensors(runs.latest_checkpoint(runs.resolve("000", tmp_path / "a")) / runs.STATE_FILE)
    s22 = runs.load_tensors(runs.latest_checkpoint(folder) / runs.STATE_FILE)
    assert runs.read_json(runs.latest_checkpoint(folder) / runs.META_FILE)["step"] == 4
    assert s4.keys() == s22.keys() and all(torch.equal(s4[k], s22[k]) for k in s4)
    a = model.load(str(straight)).transformer.state_dict()
    b = model.load(str(resumed)).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert model.load(str(straight)).scheduler_config["prediction_type"] == "v_prediction"  # exported with it
    png = pretrain.preview(straight, per_class=1, steps=2)  # the card's picture: every product, and the nut's defects
    assert png == straight / "samples.png" and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_bfloat16_optimizer_checkpoints_are_smaller_and_resume_close(tmp_path):
    """``optimizer_dtype`` bfloat16 (a long run's checkpoints a third smaller): the moments are
    stored rounded, resume casts them back, and two more steps land near the exact resume."""
    tiny = dict(TINY_PRETRAIN, width=64, checkpoint_every=1)
    exact = pretrain.run(pretrain.PretrainConfig(**tiny, max_steps=2, runs_dir=str(tmp_path / "a"), out=str(tmp_path / "ma")))
    pretrain.run(pretrain.PretrainConfig(**tiny, max_steps=1, runs_dir=str(tmp_path / "b"), out=str(tmp_path / "mb"),
                                         optimizer_dtype="bfloat16"))
    folder = runs.resolve("000", tmp_path / "b")
    one = runs.latest_checkpoint(folder)
    moments = runs.load_tensors(one / runs.OPTIM_FILE)
    assert {v.dtype for k, v in moments.items() if not k.endswith(".step")} == {torch.bfloat16}
    assert {v.dtype for k, v in moments.items() if k.endswith(".step")} == {torch.float32}
    assert runs.read_json(one / runs.META_FILE)["optimizer_dtype"] == "bfloat16"
    a_one = runs.latest_checkpoint(runs.resolve("000", tmp_path / "a")).parent / one.name
    assert (one / runs.OPTIM_FILE).stat().st_size < 0.6 * (a_one / runs.OPTIM_FILE).stat().st_size
    resumed = pretrain.run(pretrain.PretrainConfig(resume=str(folder), max_steps=2, progress=False))  # float32 again
    a = model.load(str(exact)).transformer.state_dict()
    b = model.load(str(resumed)).transformer.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # rounded moments: not bit-exact ...
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)  # ... but the same step
    with pytest.raises(DefectlabError, match="optimizer_dtype"):
        pretrain.run(pretrain.PretrainConfig(**tiny, optimizer_dtype="float16", runs_dir=str(tmp_path / "c")))


def test_corpus_masks_cover_the_drawn_defect_and_weight_pretraining(tmp_path):
    """``corpus.batch(masks=True)``: the same images, and each defect's coverage (0 for good
    classes, where the picture changed for defect classes); ``--mask-loss`` weights pre-training
    with it, logged per record, per call on resume, and refuses a negative weight."""
    n = len(corpus.CLASSES)
    x, y, m = corpus.batch(0, n, seed=0, size=16, masks=True)
    assert torch.equal(x, corpus.batch(0, n, seed=0, size=16)[0]) and m.shape == (n, 1, 16, 16)
    assert 0 <= m.min() and m.max() <= 1
    good = torch.tensor([corpus.PAIRS[k][1] == "good" for k in y.tolist()])
    assert (m[good] == 0).all() and (m[~good].flatten(1).sum(1) > 0).all()
    assert all(0 < c < 0.25 for c in m[~good].mean((1, 2, 3)).tolist())   # a mark, not the whole picture
    # plain and weighted runs from the same seed part ways; the weight is in the log
    plain = pretrain.run(pretrain.PretrainConfig(**TINY_PRETRAIN, max_steps=2, runs_dir=str(tmp_path / "a"),
                                                 out=str(tmp_path / "p"), checkpoint_every=1))
    weighted = pretrain.run(pretrain.PretrainConfig(**TINY_PRETRAIN, max_steps=2, runs_dir=str(tmp_path / "b"),
                                                    out=str(tmp_path / "w"), mask_loss=20.0))
    a, b = (model.load(str(f)).transformer.state_dict() for f in (plain, weighted))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    folder = runs.resolve("000", tmp_path / "a")
    pretrain.run(pretrain.PretrainConfig(resume=str(folder), max_steps=20, mask_loss=5.0, progress=False))
    assert [(r["step"], r["mask_loss"]) for r in runs.read_log(folder) if "mask_loss" in r] == [
        (0, 0.0), (2, 5.0), (20, 5.0)]                                   # two start records, one every 20 steps
    assert pretrain.mask_history(folder, 20) == [(0, 0.0), (2, 5.0)] and pretrain.mask_history(folder, 1) == [(0, 0.0)]
    assert "0 from step 0; 5 from step 2 |" in (tmp_path / "p" / "MODEL_CARD.md").read_text()
    with pytest.raises(DefectlabError, match="mask_loss"):
        pretrain.run(pretrain.PretrainConfig(**TINY_PRETRAIN, mask_loss=-1, runs_dir=str(tmp_path / "c")))


def test_runs_from_before_prediction_type_resume_as_epsilon(tmp_path):
    """A run folder written before the field existed trained eps: resuming it must not switch
    the objective to the new default."""
    pretrain.run(pretrain.PretrainConfig(**TINY_PRETRAIN, runs_dir=str(tmp_path), max_steps=1, out=str(tmp_path / "m"), prediction_type="epsilon"))
    folder = runs.resolve("000", tmp_path)
    saved = runs.read_json(folder / "config.json")
    del saved["config"]["prediction_type"]
    runs.write_json(folder / "config.json", saved)
    out = pretrain.run(pretrain.PretrainConfig(resume=str(folder), max_steps=2, progress=False))
    assert model.load(str(out)).scheduler_config["prediction_type"] == "epsilon"
    assert "epsilon output" in (out / "MODEL_CARD.md").read_text()


@pytest.fixture(scope="module")
def short_finetune(tmp_path_factory):
    """A brief DiffFit fine-tune of mini on the embedded hazelnut set (4 new classes, 210 steps, ~30 s)."""
    cfg = train.TrainConfig(model="mini", product="hazelnut", method="difffit", lr=3e-3, epochs=30,
                            val_per_class=1, val_every=100, val_timesteps=1,
                            runs_dir=str(tmp_path_factory.mktemp("runs")), progress=False)
    return restore.restore(train.run(cfg), "latest")


@needs_mini
@pytest.mark.slow
def test_short_finetune_from_mini_tells_the_new_classes_apart(short_finetune):
    """Class surgery, labels and class-conditional training end to end: after a brief DiffFit
    fine-tune (210 steps), the class whose conditioning denoises a *held-out* real image best is its defect
    type far more often than chance (a diffusion classifier, ``classes.scores``). Measured 0.50
    on the 20 test images (chance 0.25); wrong labels or a class table that does not train give chance."""
    from defectlab.stages import classes
    r = short_finetune
    dcfg = sources.DataConfig(product="hazelnut", image_size=32)
    dd = sources.load(dcfg)
    test = dataset.DefectDataset(dd.test, dcfg, augment=False)
    x0 = torch.stack([test[i]["image"] for i in range(len(test))])
    y = torch.tensor([test[i]["label"] for i in range(len(test))])
    err = classes.scores(r.model, x0, list(range(len(dd.classes))), r.base.scheduler_config, noise_draws=4)
    acc = (err.argmin(0) == y).float().mean().item()
    assert acc >= 1 / len(dd.classes) + 0.15, f"accuracy {acc:.2f} on {len(dd.classes)} classes"


def _chance_p(correct: int, n: int, p: float) -> float:
    """P(at least ``correct`` of ``n`` right) for a guesser right with probability ``p``."""
    from math import comb
    return sum(comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(correct, n + 1))


@needs_mini
@pytest.mark.slow
def test_short_finetune_from_mini_samples_the_intended_classes(short_finetune):
    """Guidance + class handling end to end: a fixed classifier trained on the real images
    recognises the class of images sampled after a brief DiffFit fine-tune of mini more often than
    chance (binomial p < 0.01). Measured 35/48 at guidance 6 and 10 DDIM steps (25 steps: 23/48,
    15: 32/48; chance 0.25, p(23) ≈ 0.0005); a base pre-trained on corpus v1 (one class per
    product, 25 steps) gave 16/48 (p ≈ 0.12)."""
    dcfg = sources.DataConfig(product="hazelnut", image_size=32)
    dd = sources.load(dcfg)
    k = len(dd.classes)
    real = dataset.DefectDataset(dd.train + dd.test, dcfg, augment=False)
    xs = torch.stack([real[i]["image"] for i in range(len(real))])
    ys = torch.tensor([real[i]["label"] for i in range(len(real))])
    judge = classifier.train(xs, ys, k, steps=100, batch_size=8, lr=2e-3, seed=0)
    r = short_finetune
    per = 12
    labels = [c for c in range(k) for _ in range(per)]
    gens = [torch.Generator().manual_seed(1000 * c + i) for c in range(k) for i in range(per)]
    imgs = sampler.generate(r.model, r.base.codec, labels, gens, steps=10, guidance=6.0, scheduler="ddim",
                           scheduler_config=r.base.scheduler_config, batch_size=48, progress=False)
    correct = int((classifier.predict(judge, imgs).argmax(1) == np.array(labels)).sum())
    p = _chance_p(correct, len(labels), 1 / k)
    assert p < 0.01, f"{correct}/{len(labels)} right on {k} classes (chance p = {p:.3f})"
