"""presence.py: a product found in products in any pose, not in blobs, empty backgrounds or
half a product; the pass mark comes from the references themselves."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectlab.base.errors import DefectlabError
from defectlab.core import gain, presence
from defectlab.data import synth


def _screws(seed: int, n: int, size: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    imgs = [synth.product_image("screw", rng, size, version=1)[0] for _ in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def refs():
    return _screws(0, 24)


def test_products_pass_and_non_products_fail(refs):
    held = _screws(1, 12)
    background = held[:, :, :2, :2].mean((2, 3), keepdim=True).expand(-1, -1, 64, 64)
    g = torch.Generator().manual_seed(0)
    blobs = (background + 0.8 * F.interpolate(torch.randn(12, 1, 6, 6, generator=g), size=64, mode="bicubic")).clamp(-1, 1)
    half = torch.where(torch.arange(64) < 32, held, background)  # the left half of each product only
    turned = torch.rot90(held, 1, dims=(-2, -1)).roll(7, dims=-1)  # another pose of the same products
    p = presence.product_presence(refs, {"held": held, "turned": turned, "blobs": blobs, "empty": background,
                                         "half": half})
    assert p.per_class["held"] >= 0.9 and p.per_class["turned"] >= 0.9
    assert p.per_class["blobs"] <= 0.1 and p.per_class["empty"] == 0.0 and p.per_class["half"] <= 0.1
    assert 0.8 <= p.real <= 1.0 and 0.0 < p.threshold < 1.0 and p.n_refs == 24
    assert p.iou["held"] > p.iou["blobs"] and presence.overall(p) == pytest.approx(np.mean(list(p.per_class.values())))
    assert p.n["held"] == 12 and p.interval["empty"][0] == 0.0 and 0.1 < p.interval["empty"][1] < 0.3
    assert p.iou_interval["held"][0] < p.iou["held"] < p.iou_interval["held"][1] and p.iou_interval["blobs"][1] < p.iou_interval["held"][0]
    lo, hi = gain.wilson(9, 12)
    assert lo < 0.75 < hi and gain.wilson(12, 12)[1] == 1.0


def test_best_iou_of_identical_and_disjoint_shapes():
    a = torch.zeros(2, 3, 16, 16) - 1
    a[0, :, 4:12, 6:9] = 1      # a bar
    a[1, :, 2:5, 2:5] = 1       # a small square
    q, r = presence.poses(a, 90), presence.poses(a, 0)[:, 0]
    assert q.shape == (2, 8, 256) and r.shape == (2, 256)
    iou = presence.best_iou(q, r)
    assert torch.allclose(iou, torch.ones(2))          # each matches itself
    loo = presence.best_iou(q, r, exclude_self=True)    # and, without itself, the other shape less well
    assert (loo < 0.5).all()


def test_bad_input_is_one_line(refs):
    with pytest.raises(DefectlabError, match="at least 3 real"):
        presence.product_presence(refs[:2], {"x": refs})
    with pytest.raises(DefectlabError, match="quantile"):
        presence.product_presence(refs, {"x": refs}, quantile=1.5)
    with pytest.raises(DefectlabError, match="same size"):
        presence.product_presence(refs, {"x": refs[:, :, :32, :32]})


def test_evaluate_reports_presence_of_free_samples_and_skips_pairs(tmp_path):
    """``evaluate --metrics presence`` on a whole-image run that learned the product: every defect
    class and ``good`` get a share, in metrics.json, metrics.md and metrics.csv; image + mask
    pairs (the real image outside the mask) are skipped with the reason."""
    from defectlab.reports import report
    from defectlab.stages import evaluate, sample, synthesize, train

    folder = train.run(train.TrainConfig(
        model="tiny", method="full", product="hazelnut", image_size=16, epochs=1, max_steps=1, batch_size=2,
        grad_accum=1, val_every=1, val_per_class=1, val_timesteps=1, log_samples=0, good_images=4,
        runs_dir=str(tmp_path / "runs"), progress=False, report_to="none"))
    sample.run(sample.SampleConfig(run=str(folder), per_class=2, steps=2, scheduler="ddim", checkpoint="latest"))
    result = report.evaluate_run(evaluate.EvalConfig(run=str(folder), metrics="presence"))
    p = result.presence
    assert set(p["per_class"]) == {*result.classes, "good"} and all(0 <= v <= 1 for v in p["per_class"].values())
    assert p["real"] >= 0.8 and p["n_refs"] >= 3 and 0 <= p["overall"] <= 1
    assert not result.warnings  # "good" is read, not ignored
    assert "### Product in the free samples" in (folder / "metrics.md").read_text()
    assert "presence,,good,share" in (folder / "metrics.csv").read_text()
    assert report.metrics_summary(result)["presence[gen]"] == p["overall"]
    synthesize.run(synthesize.MaskSampleConfig(run=str(folder), per_class=1, steps=2, scheduler="ddim",
                                               checkpoint="latest"))
    pairs = evaluate.run(evaluate.EvalConfig(run=str(folder), metrics="presence", samples="synthesized"))
    assert pairs.presence is None and "image + mask pairs" in pairs.skipped["presence"]
