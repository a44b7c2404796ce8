"""synth.py: deterministic, MVTec AD layout, defects inside their masks, classes distinguishable."""
import itertools

import numpy as np
import pytest
from PIL import Image

from defectlab import data, synth
from defectlab.errors import DefectlabError

SMALL = dict(size=64, per_class=3, good=3)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("synth") / "a", seed=0, **SMALL)


def test_layout_and_counts(small):
    assert data.detect_layout(small) == ("mvtec", ["hazelnut", "screw"])
    for product, spec in synth.PRODUCTS.items():
        assert len(list((small / product / "train" / "good").glob("*.png"))) == 3
        assert len(list((small / product / "test" / "good").glob("*.png"))) == 2
        for defect in spec.defects:
            images = sorted((small / product / "test" / defect).glob("*.png"))
            assert len(images) == 3
            for img in images:
                mask = small / product / "ground_truth" / defect / f"{img.stem}_mask.png"
                with Image.open(img) as im, Image.open(mask) as m:
                    assert im.size == m.size == (64, 64) and im.mode == "RGB" and m.mode == "L"
                    values = set(np.unique(np.asarray(m)).tolist())
                    assert values == {0, 255}                 # binary and never empty


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    again = synth.generate(tmp_path / "b", seed=0, **SMALL)
    other = synth.generate(tmp_path / "c", seed=1, **SMALL)
    a, b, c = _files(small), _files(again), _files(other)
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


@pytest.mark.parametrize("product", list(synth.PRODUCTS))
def test_defect_pixels_lie_inside_mask(product):
    for defect in synth.PRODUCTS[product].defects:
        for i in range(4):
            rng = np.random.default_rng([i, 99])
            clean, parts = synth.product_image(product, rng, 96)
            out, mask = synth.draw_defect(clean, defect, rng, parts)
            changed = (out != clean).any(axis=-1)
            assert changed.any() and mask.any()
            assert not (changed & ~mask).any(), f"{defect}: pixels changed outside the mask"
            assert changed.sum() >= 0.8 * mask.sum(), f"{defect}: mask much larger than the defect"
            assert out.shape == clean.shape and out.dtype == np.uint8


def _mean_colour(product, defect, n=6, size=64):
    colours = []
    for i in range(n):
        rng = np.random.default_rng([i, 7])
        clean, parts = synth.product_image(product, rng, size)
        out, mask = synth.draw_defect(clean, defect, rng, parts)
        colours.append(out[mask].mean(axis=0))
    return np.mean(colours, axis=0)


@pytest.mark.parametrize("product", list(synth.PRODUCTS))
def test_classes_have_distinct_colour_signatures(product):
    means = {d: _mean_colour(product, d) for d in synth.PRODUCTS[product].defects}
    for (a, ma), (b, mb) in itertools.combinations(means.items(), 2):
        assert np.linalg.norm(ma - mb) > 40, f"{a} and {b} look alike: {ma.round()} vs {mb.round()}"


def test_products_look_like_their_stand_ins():
    rng = np.random.default_rng(0)
    nut, nut_parts = synth.product_image("hazelnut", rng, 64)
    screw, screw_parts = synth.product_image("screw", rng, 64)
    nut_obj, screw_obj = nut_parts > 0, screw_parts > 0
    assert nut[~nut_obj].mean() < 50                            # dark background
    r, g, b = nut[nut_obj].mean(axis=0)
    assert r > g > b                                             # brown
    assert screw[~screw_obj].mean() > 170                        # light background
    assert {synth.HEAD, synth.NECK, synth.BODY, synth.TIP} <= set(np.unique(screw_parts).tolist())


def test_defects_land_on_their_part():
    for defect, part in (("scratch_head", synth.HEAD), ("thread_top", synth.NECK)):
        for i in range(3):
            rng = np.random.default_rng(i)
            clean, parts = synth.product_image("screw", rng, 128)
            _, mask = synth.draw_defect(clean, defect, rng, parts)
            assert (parts[mask] == part).all()


def test_draw_defect_without_region_and_bad_names():
    img = np.full((48, 48, 3), 128, np.uint8)
    out, mask = synth.draw_defect(img, "hole", np.random.default_rng(0))
    assert mask.any() and not mask[:12].any() and (img == 128).all()   # central half, input untouched
    with pytest.raises(DefectlabError, match="unknown synthetic defect"):
        synth.draw_defect(img, "melted", np.random.default_rng(0))
    with pytest.raises(DefectlabError, match="unknown synthetic product.*hazelnut"):
        synth.product_image("bolt", np.random.default_rng(0), 32)
