"""Class ranking by denoising error on the tiny model: determinism, a learned class ranks first,
--class-init nearest in train.run, bad shortlists."""
import dataclasses

import pytest
import torch
from diffusers import DiTTransformer2DModel

from defectlab.base import runs
from defectlab.data import dataset, sources as data_mod, synth
from defectlab.core import methods, model
from defectlab.stages import classes
from defectlab.core.diffusion import Objective
from defectlab.base.errors import DefectlabError

SIZE = 16  # the tiny model at 16 px: 16 tokens, cheap enough for busy CPUs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A small synthetic hazelnut set: 4 training images in each of 4 defect classes."""
    return synth.generate(tmp_path_factory.mktemp("classes") / "data", size=64, per_class=5, good=2,
                          products=("hazelnut",))


@pytest.fixture(scope="module")
def hazelnuts(root):
    return data_mod.load(data_mod.DataConfig(data=str(root), product="hazelnut", image_size=SIZE))


def test_ranking_is_deterministic_and_independent_of_batching(root, hazelnuts):
    base = model.load("tiny")
    cfg = classes.RankConfig(model="tiny", data=str(root), image_size=SIZE, candidates="0-3,990", timesteps=2, batch_size=64,
                             progress=False)
    a = classes.rank(base, hazelnuts, cfg)
    b = classes.rank(base, hazelnuts, cfg)
    assert a["scores"] == b["scores"] and a["ranking"] == b["ranking"]
    assert a["candidates"] == [0, 1, 2, 3, 990] and a["classes"] == hazelnuts.classes
    # other chunking (7 noisy inputs x 1 candidate per forward): same numbers up to float rounding
    c = classes.rank(base, hazelnuts, dataclasses.replace(cfg, batch_size=7))
    for d in a["classes"]:
        assert torch.allclose(torch.tensor(a["scores"][d]), torch.tensor(c["scores"][d]), rtol=1e-4)
    assert a["nearest"] == [r[0]["id"] for r in a["ranking"].values()]
    assert a["anchor"]["id"] == 990 and a["ranking"]["crack"][0]["mse"] <= min(a["scores"]["crack"])


def test_a_class_learned_from_the_images_ranks_first(tmp_path, root, hazelnuts, capsys):
    j = 7
    base = model.load("tiny")
    net = base.transformer
    for block in net.transformer_blocks:  # no label dropout: every step teaches class j
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    crack = [s for s in hazelnuts.train if s.defect == "crack"]
    ds = dataset.DefectDataset(crack, data_mod.DataConfig(image_size=SIZE), augment=False)
    x0 = torch.stack([ds[i]["image"] for i in range(len(ds))])
    obj, gen = Objective(base.scheduler_config), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(40):  # plain full fine-tuning, every crack image labelled as class j
        t = torch.randint(0, obj.num_timesteps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = obj.add_noise(x0, noise, t)
        out = net(xt, timestep=t, class_labels=torch.full((len(x0),), j)).sample
        obj.loss(out, x0, xt, noise, t)[0].mean().backward()
        opt.step()
        opt.zero_grad()
    net.save_pretrained(tmp_path / "base")

    cfg = classes.RankConfig(data=str(root), model=str(tmp_path / "base"), image_size=SIZE, candidates="0-15", top_k=3,
                             timesteps=4, out=str(tmp_path / "rank"), progress=False)
    printed = classes.cli(cfg)
    result = runs.read_json(tmp_path / "rank" / "ranking.json")
    assert printed == str(tmp_path / "rank" / "ranking.json")
    assert result["ranking"]["crack"][0]["id"] == j
    scores = result["scores"]["crack"]
    assert scores[j] < 0.5 * min(s for i, s in enumerate(scores) if i != j)  # by a clear margin
    assert [len(r) for r in result["ranking"].values()] == [3] * 4 and result["anchor"] is None
    assert (tmp_path / "rank" / "ranking.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "crack" in table and f"   1  {j} " in table


def test_train_with_nearest_init_starts_from_the_best_base_rows(tmp_path, root, hazelnuts, monkeypatch):
    from defectlab.stages import train  # here: the other tests don't depend on the training module

    # an 8-class tiny base keeps the ranking (every class is a candidate) fast
    folder = tmp_path / "base8"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        DiTTransformer2DModel(**{**model.TINY_CONFIG, "num_embeds_ada_norm": 8}).save_pretrained(folder)
    cfg = train.TrainConfig(data=str(root), model=str(folder), method="full", product="hazelnut", image_size=SIZE,
                            epochs=1, max_steps=1, lr=1e-3, batch_size=4, grad_accum=1, val_per_class=1,
                            val_timesteps=2, class_init="nearest", runs_dir=str(tmp_path / "runs"), progress=False)
    expected = classes.nearest_rows(model.load(str(folder)), hazelnuts, cfg)
    assert len(expected) == len(hazelnuts.classes) and all(0 <= i < 8 for i in expected)

    seen = {}
    real = methods.set_classes

    def spy(transformer, k, init="random", seed=0):
        tables = lambda: [b.norm1.emb.class_embedder.embedding_table.weight.detach().clone()  # noqa: E731
                          for b in transformer.transformer_blocks]
        before = tables()
        real(transformer, k, init=init, seed=seed)
        seen.update(init=init, before=before, after=tables())

    monkeypatch.setattr(methods, "set_classes", spy)
    train.run(cfg)
    assert seen["init"] == expected
    for old, new in zip(seen["before"], seen["after"]):
        assert torch.equal(new[:len(expected)], old[expected])  # the chosen base rows, copied
        assert torch.equal(new[-1], old[-1])                     # the null row kept


def test_topk_lists_best_first(root, hazelnuts):
    base = model.load("tiny")
    cfg = classes.RankConfig(model="tiny", data=str(root), image_size=SIZE, candidates="0-5", timesteps=1, progress=False)
    top = classes.topk_mean_rows(base, hazelnuts, cfg, k=3)
    assert len(top) == len(hazelnuts.classes) and all(len(ids) == 3 for ids in top)
    assert [ids[0] for ids in top] == classes.nearest_rows(base, hazelnuts, cfg)


@pytest.mark.parametrize("shortlist", ["3,x", "1,2.5", "5-2", "1000", "0,,1"])
def test_a_bad_shortlist_is_one_line(shortlist):
    with pytest.raises(DefectlabError) as err:
        classes.parse_candidates(shortlist, 1000)
    assert "\n" not in str(err.value) and "candidates" in str(err.value)


def test_bad_shortlist_fails_before_and_after_loading_the_model(tmp_path, root):
    with pytest.raises(DefectlabError, match="not a class id"):
        classes.run(classes.RankConfig(model="tiny", candidates="990,screw", out=str(tmp_path)))
    with pytest.raises(DefectlabError, match="outside the base model's classes 0-999"):
        classes.run(classes.RankConfig(model="tiny", data=str(root), candidates="7,1000", image_size=SIZE, out=str(tmp_path)))
    assert classes.parse_candidates("", 4) == [0, 1, 2, 3]
    assert classes.parse_candidates(" 990, 783,0-2,1 ", 1000) == [990, 783, 0, 1, 2]
