"""data.py: both layouts, the split and its manifest, transforms, bad input, the real MVTec sample."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from defectlab.base import paths
from defectlab.data import dataset, sources, synth
from defectlab.data.sources import DataConfig
from defectlab.data.dataset import DefectDataset
from defectlab.base.errors import DefectlabError


def _png(path, size=32, value=(120, 80, 40), mode="RGB", square=None):
    """An image of one colour, optionally with a white square ``(y, x, side)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), np.uint8) + np.array(value, np.uint8)
    if square:
        y, x, k = square
        arr[y:y + k, x:x + k] = 255
    im = Image.fromarray(arr)
    (im.convert("L") if mode == "L" else im).save(path)
    return path


def _mask(path, size=32, square=(4, 4, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), np.uint8)
    y, x, k = square
    arr[y:y + k, x:x + k] = 255
    Image.fromarray(arr).save(path)
    return path


def make_mvtec(root, product="widget", classes=None, good=3, size=32):
    classes = classes or {"dent": 4, "bent": 5}
    for i in range(good):
        _png(root / product / "train" / "good" / f"{i:03d}.png", size)
    _png(root / product / "test" / "good" / "000.png", size)
    for c, (name, n) in enumerate(sorted(classes.items())):
        for i in range(n):
            _png(root / product / "test" / name / f"{i:03d}.png", size, value=(10 * c, 20 * i, 50))
            _mask(root / product / "ground_truth" / name / f"{i:03d}_mask.png", size)
    return root


def make_ds(root, product="widget", classes=None, size=32):
    classes = classes or {"scratch": 4, "crack": 3}
    for i in range(2):
        _png(root / product / "image" / "good" / f"{i:03d}.png", size)
    for name, n in classes.items():
        for i in range(n):
            _png(root / product / "image" / name / f"{i:03d}.png", size, value=(30, 20 * i, 90))
            if i == 0:  # the colour-mask fallback, with the dataset's own "rbg" spelling
                Image.new("RGB", (size, size), (0, 0, 200)).save(
                    _mask(root / product / "rbg_mask" / name / f"{i:03d}_rbg_mask.png", size))
            else:
                _mask(root / product / "mask" / name / f"{i:03d}_mask.png", size)
    return root


def cfg_for(root, **kw):
    return DataConfig(data=str(root), product=kw.pop("product", "widget"), image_size=kw.pop("image_size", 16), **kw)


# ----------------------------------------------------------------------------- layouts
def test_mvtec_layout(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    assert sources.detect_layout(root) == ("mvtec", ["widget"])
    d = sources.load(cfg_for(root))
    assert d.layout == "mvtec" and d.product == "widget"
    assert d.classes == ["bent", "dent"]                       # sorted, "good" excluded
    assert len(d.good) == 3 and all("train" in g.parts for g in d.good)
    every = d.train + d.test
    assert len(every) == 9
    assert all(s.mask is not None and s.mask.name == f"{s.image.stem}_mask.png" for s in every)
    assert all(s.label == d.classes.index(s.defect) and s.product == "widget" for s in every)


def test_ds_mvtec_layout_with_colour_mask_fallback(tmp_path):
    root = make_ds(tmp_path / "ds")
    assert sources.detect_layout(root) == ("ds-mvtec", ["widget"])
    d = sources.load(cfg_for(root))
    assert d.layout == "ds-mvtec" and d.classes == ["crack", "scratch"]
    assert len(d.good) == 2
    by_stem = {(s.defect, s.image.stem): s for s in d.train + d.test}
    assert by_stem[("crack", "000")].mask.parent.parent.name == "rbg_mask"
    assert by_stem[("crack", "001")].mask.parent.parent.name == "mask"
    item = DefectDataset([by_stem[("crack", "000")]], cfg_for(root), augment=False)[0]
    assert item["mask"].min() == 1  # a blue colour mask counts as defect everywhere


def test_info_and_format(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    info = sources.info(root)
    p = info["products"]["widget"]
    assert info["layout"] == "mvtec" and p["classes"] == {"bent": 5, "dent": 4}
    assert p["good"] == 3 and p["test_good"] == 1 and p["masks"] == 9
    assert p["sizes"] == {"32x32": 13} and p["modes"] == {"RGB": 13}
    text = sources.format_info(info)
    assert "MVTec AD" in text and "bent" in text and "32x32 x13" in text


# ----------------------------------------------------------------------------- split + manifest
def _names(samples):
    return sorted(str(s.image) for s in samples)


def test_split_deterministic_disjoint_per_class(tmp_path):
    root = make_mvtec(tmp_path / "mv", classes={"a": 2, "b": 8, "c": 12})
    d1, d2 = sources.load(cfg_for(root)), sources.load(cfg_for(root))
    assert _names(d1.train) == _names(d2.train) and _names(d1.test) == _names(d2.test)
    assert not set(_names(d1.train)) & set(_names(d1.test))
    for cls, n in {"a": 2, "b": 8, "c": 12}.items():
        n_test = sum(s.defect == cls for s in d1.test)
        assert n_test == max(1, round(n * 0.25)) and n - n_test >= 1
    other = sources.load(cfg_for(root, split_seed=1))
    assert _names(other.test) != _names(d1.test)
    half = sources.load(cfg_for(root, test_fraction=0.5))
    assert sum(s.defect == "c" for s in half.test) == 6


def test_manifest_written_then_reused(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    manifest = tmp_path / "run" / "split.json"
    first = sources.load(cfg_for(root), manifest=manifest)
    m = json.loads(manifest.read_text())
    assert m["layout"] == "mvtec" and m["split_seed"] == 0 and m["test_fraction"] == 0.25
    assert all(not e["image"].startswith("/") and e["image"].startswith("widget/test/") for e in m["train"])
    # Reused, not recomputed: move one training image to the test side by hand.
    moved = m["train"].pop(0)
    m["test"].append(moved)
    manifest.write_text(json.dumps(m))
    again = sources.load(cfg_for(root), manifest=manifest)
    assert str(root / moved["image"]) in _names(again.test)
    assert len(again.train) == len(first.train) - 1
    with pytest.raises(DefectlabError, match="split_seed"):
        sources.load(cfg_for(root, split_seed=3), manifest=manifest)
    _png(root / "widget" / "test" / "dent" / "099.png")
    with pytest.raises(DefectlabError, match=r"does not match.*099\.png"):
        sources.load(cfg_for(root), manifest=manifest)


def test_manifest_refuses_a_missing_file(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    manifest = tmp_path / "split.json"
    sources.load(cfg_for(root), manifest=manifest)
    (root / "widget" / "test" / "bent" / "004.png").unlink()
    with pytest.raises(DefectlabError, match="does not match"):
        sources.load(cfg_for(root), manifest=manifest)


# ----------------------------------------------------------------------------- pixels + transforms
def test_dataset_item_ranges(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    d = sources.load(cfg_for(root))
    ds = DefectDataset(d.train, cfg_for(root))
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 16, 16) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["label"] == d.train[0].label
    no_mask = sources.Sample(d.good[0], None, "good", -1, "widget")
    assert DefectDataset([no_mask], cfg_for(root))[0]["mask"].sum() == 0


def test_greyscale_becomes_rgb_and_crop(tmp_path):
    path = _png(tmp_path / "g.png", size=40, value=(90, 90, 90), mode="L", square=(10, 10, 20))
    x = dataset.load_image(path, 10)
    assert x.shape == (3, 10, 10) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    centre = dataset.load_image(path, 8, crop=20)                 # exactly the white square
    assert torch.allclose(centre, torch.ones_like(centre))


def test_augment_keeps_image_and_mask_aligned(tmp_path):
    size, sq = 32, (3, 20, 6)                                  # off-centre, so every transform moves it
    img = _png(tmp_path / "x" / "test" / "d" / "000.png", size, value=(0, 0, 0), square=sq)
    msk = _mask(tmp_path / "x" / "ground_truth" / "d" / "000_mask.png", size, square=sq)
    cfg = DataConfig(image_size=size)
    ds = DefectDataset([sources.Sample(img, msk, "d", 0, "x")], cfg)
    places = set()
    for seed in range(12):
        torch.manual_seed(seed)
        item = ds[0]
        bright = item["image"].mean(0) > 0                     # the square in the image
        mask = item["mask"][0] > 0.5
        assert mask.sum() > 20
        iou = (bright & mask).sum() / (bright | mask).sum()
        assert iou > 0.6, f"seed {seed}: image and mask moved apart (IoU {iou:.2f})"
        ys, xs = torch.nonzero(mask, as_tuple=True)
        places.add((round(ys.float().mean().item()), round(xs.float().mean().item())))
    assert len(places) >= 4                                    # flips and rotations did happen


def test_augment_is_seedable(tmp_path):
    img = _png(tmp_path / "a.png", 24, square=(2, 14, 5))
    ds = DefectDataset([sources.Sample(img, None, "d", 0, "x")], DataConfig(image_size=24))
    torch.manual_seed(7)
    a = torch.stack([ds[0]["image"] for _ in range(6)])
    torch.manual_seed(7)
    b = torch.stack([ds[0]["image"] for _ in range(6)])
    assert torch.equal(a, b)


def test_rotation_fills_corners_with_border_colour(tmp_path):
    img = _png(tmp_path / "light.png", 32, value=(200, 200, 200))
    cfg = DataConfig(image_size=32, hflip=False, vflip=False, rotations=(45,))
    ds = DefectDataset([sources.Sample(img, None, "d", 0, "x")], cfg)
    for seed in range(6):
        torch.manual_seed(seed)
        assert ds[0]["image"][:, 0, 0].min() > 0.5            # not black corners


# ----------------------------------------------------------------------------- synthetic root
def test_resolve_root_synthetic_generates_once(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "SYNTHETIC", tmp_path / "data" / "synthetic")
    monkeypatch.setattr(sources, "SYNTHETIC", {"seed": 0, "size": 32, "per_class": 2, "good": 2})
    root = sources.resolve_root("synthetic")
    assert root == paths.SYNTHETIC and (root / sources.STAMP).is_file()
    assert sources.detect_layout(root) == ("mvtec", ["hazelnut", "screw"])
    marker = root / "hazelnut" / "train" / "good" / "000.png"
    before = marker.stat().st_mtime_ns
    sources.resolve_root("synthetic")
    assert marker.stat().st_mtime_ns == before                  # up to date: not regenerated
    monkeypatch.setattr(synth, "GENERATOR_VERSION", synth.GENERATOR_VERSION + 1)
    sources.resolve_root("synthetic")
    assert json.loads((root / sources.STAMP).read_text())["generator_version"] == synth.GENERATOR_VERSION
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    d = sources.load(DataConfig(product="screw"))
    assert d.classes == sorted(synth.PRODUCTS["screw"].defects)


# ----------------------------------------------------------------------------- bad input
def test_missing_root(tmp_path):
    with pytest.raises(DefectlabError, match="not found.*nope"):
        sources.load(cfg_for(tmp_path / "nope"))


def test_neither_layout(tmp_path):
    (tmp_path / "junk" / "stuff").mkdir(parents=True)
    with pytest.raises(DefectlabError, match="neither known layout.*MVTec AD.*DS-MVTec"):
        sources.load(cfg_for(tmp_path / "junk"))
    root = make_mvtec(tmp_path / "mv")
    with pytest.raises(DefectlabError, match="product folder: pass its parent"):
        sources.detect_layout(root / "widget")


def test_unknown_product_lists_available(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    with pytest.raises(DefectlabError, match="'nut'.*available: widget"):
        sources.load(cfg_for(root, product="nut"))


def test_empty_class(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    (root / "widget" / "test" / "hollow").mkdir()
    with pytest.raises(DefectlabError, match="no images.*hollow"):
        sources.load(cfg_for(root))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_found_by_load(tmp_path, damage):
    root = make_mvtec(tmp_path / "mv")
    bad = root / "widget" / "test" / "dent" / "002.png"
    raw = bad.read_bytes()
    bad.write_bytes(b"not a png at all" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(DefectlabError, match=r"corrupt image .*dent/002\.png"):
        sources.load(cfg_for(root))
    with pytest.raises(DefectlabError, match=r"002\.png"):
        dataset.load_image(bad, 16)


def test_non_image_file_is_skipped_with_warning(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    (root / "widget" / "test" / "dent" / "notes.txt").write_text("hi")
    (root / "widget" / "test" / "dent" / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match="notes.txt"):
        d = sources.load(cfg_for(root))
    assert sum(s.defect == "dent" for s in d.train + d.test) == 4
    assert all(s.image.suffix == ".png" for s in d.train + d.test)


def test_mask_size_mismatch(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    _mask(root / "widget" / "ground_truth" / "bent" / "001_mask.png", size=30)
    with pytest.raises(DefectlabError, match=r"mask .*001_mask\.png is 30x30 but .* is 32x32"):
        sources.load(cfg_for(root))


def test_crop_larger_than_image_and_tiny_size(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    with pytest.raises(DefectlabError, match="crop 64 px is larger than image"):
        sources.load(cfg_for(root, crop=64))
    with pytest.raises(DefectlabError, match="image_size must be at least 8"):
        sources.load(cfg_for(root, image_size=4))
    with pytest.raises(DefectlabError, match="crop 64"):
        dataset.load_image(root / "widget" / "train" / "good" / "000.png", 16, crop=64)


def test_single_image_class_goes_to_training(tmp_path):
    root = make_mvtec(tmp_path / "mv", classes={"rare": 1, "common": 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = sources.load(cfg_for(root))
    assert any("single image" in str(w.message) for w in caught)
    assert [s.defect for s in d.train].count("rare") == 1 and "rare" not in {s.defect for s in d.test}


# ----------------------------------------------------------------------------- the real MVTec sample
def test_real_mvtec_screws(shared_screws):
    assert sources.detect_layout(shared_screws) == ("mvtec", ["screw"])
    d = sources.load(DataConfig(data=str(shared_screws), product="screw", image_size=32))
    assert d.classes == ["manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"]
    assert len(d.train) == 5 and len(d.test) == 5 and len(d.good) == 4   # 2 per class: 1 + 1
    for s in d.train + d.test:
        assert s.mask is not None
        with Image.open(s.image) as im, Image.open(s.mask) as m:
            assert im.size == m.size == (1024, 1024) and im.mode == "L"
    x = dataset.load_image(d.test[0].image, 64)
    assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1 and torch.equal(x[0], x[2])
    item = DefectDataset(d.train[:1], DataConfig(image_size=64), augment=False)[0]
    assert 0 < item["mask"].sum() < 64 * 64 / 4                # a small defect, kept at 64 px
    info = sources.info(shared_screws)["products"]["screw"]
    assert info["sizes"] == {"1024x1024": 16} and info["modes"] == {"L": 16} and info["test_good"] == 2


# ----------------------------------------------------------------------------- pixels, grey, links, masks
def _gradient(size=32):
    return np.linspace(0, 255, size * size).reshape(size, size).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "LA", "CMYK", "RGBA", "1"])
def test_every_mode_and_bit_depth_reads_to_the_right_range(tmp_path, mode):
    """16-bit PNGs used to read as white (99 % of pixels at 1.0)."""
    g = _gradient()
    rgb = np.stack([g, g[::-1], g.T], -1)
    if mode in ("I;16", "I"):  # 16-bit: 0..65535, the same picture
        im, ref = Image.fromarray(g.astype(np.uint16 if mode == "I;16" else np.int32) * 257), Image.fromarray(g)
    elif mode == "F":  # float in 0..1
        im, ref = Image.fromarray(g.astype(np.float32) / 255), Image.fromarray(g)
    elif mode in ("LA", "1"):
        im, ref = Image.fromarray(g).convert(mode), Image.fromarray(g).convert(mode).convert("L")
    else:
        im, ref = Image.fromarray(rgb).convert(mode), Image.fromarray(rgb).convert(mode).convert("RGB")
    path = tmp_path / ("x.tiff" if mode in ("F", "CMYK", "I") else "x.png")
    im.save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    x, want = dataset.load_image(path, 32), dataset.load_image(_save(ref, tmp_path / "ref.png"), 32)
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert (x - want).abs().max() < 2 / 255, mode  # 16-bit used to read as white


def _save(im, path):
    im.save(path)
    return path


def test_sixteen_bit_masks_and_images_resize_without_quantising(tmp_path):
    wide = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "img.png")
    x = dataset.load_image(tmp_path / "img.png", 16)
    assert torch.equal(x[0], x[2]) and len(torch.unique(x)) > 200  # finer than 8 bits
    mask = np.zeros((64, 64), np.uint16)
    mask[10:20, 10:20] = 65535
    Image.fromarray(mask).save(tmp_path / "mask.png")
    m = dataset.load_mask(tmp_path / "mask.png", 64)
    assert m.sum() == 100


def test_greyscale_datasets_are_detected(tmp_path, shared_screws):
    assert sources.load(DataConfig(data=str(shared_screws), product="screw", image_size=32)).greyscale
    assert not sources.load(cfg_for(make_mvtec(tmp_path / "colour"))).greyscale
    grey = make_mvtec(tmp_path / "grey")
    for p in grey.rglob("*.png"):
        Image.open(p).convert("L").save(p)
    assert sources.load(cfg_for(grey)).greyscale


def test_a_dataset_of_symlinks_reads_its_own_split_back(tmp_path):
    """finetune wrote split.json; evaluate, synthesize and --resume read it back and failed with
    "escapes its folder" because every file pointed outside the dataset folder."""
    real = make_mvtec(tmp_path / "real")
    links = tmp_path / "links"
    for p in sorted(real.rglob("*")):
        target = links / p.relative_to(real)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.symlink_to(p)
    manifest = tmp_path / "split.json"
    first = sources.load(cfg_for(links), manifest=manifest)
    again = sources.load(cfg_for(links), manifest=manifest)
    assert [s.image for s in again.train] == [s.image for s in first.train]
    assert all(s.image.is_symlink() for s in again.train)


def test_crop_and_empty_masks_warn_before_training(tmp_path):
    root = make_mvtec(tmp_path / "mv", size=64)
    _mask(root / "widget/ground_truth/dent/000_mask.png", 64, square=(0, 0, 6))     # cut away by crop 32
    _mask(root / "widget/ground_truth/dent/001_mask.png", 64, square=(12, 12, 10))  # half outside
    Image.new("L", (64, 64)).save(root / "widget/ground_truth/bent/000_mask.png")   # no defect pixel
    d = sources.load(cfg_for(root))
    samples = d.train + d.test
    with pytest.warns(UserWarning) as caught:
        dataset.check_masks(samples, crop=32)
    text = " ".join(str(w.message) for w in caught)
    assert "crop 32 px cuts" in text and "bent/000_mask.png" in text
    assert "entirely" in text and "partly" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset.check_masks([s for s in samples if s.defect == "bent" and "000" not in s.image.name], crop=0)


def test_training_views_depend_on_seed_epoch_and_item_only():
    cfg = DataConfig(image_size=16)
    a = [dataset.draw_view(cfg, dataset.view_generator(0, e, i)) for e in range(3) for i in range(8)]
    torch.rand(5)  # whatever else draws from torch's RNG
    b = [dataset.draw_view(cfg, dataset.view_generator(0, e, i)) for e in range(3) for i in range(8)]
    assert a == b and len(set(a)) > 4
