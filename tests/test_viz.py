"""Figure helpers: grid layout, titles, no ticks, saving formats and resolution."""
import ast
import base64
from pathlib import Path

import pytest
import torch
from PIL import Image

from defectlab.core import sampler, viz
from defectlab.reports import explorer as explorer_mod
from defectlab.base.errors import DefectlabError
from defectlab.reports.explorer import ALL_CLASSES, Explorer


def images(n, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_grid_figure_columns_are_classes():
    names = ["crack", "thread_side", "a_very_long_defect_class_name"]
    imgs = images(6)
    fig = viz.grid_figure(imgs, names, rows=2)
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == ["crack", "thread side", "a very long\ndefect class\nname"]
    assert all(ax.get_xticks().size == 0 and ax.get_yticks().size == 0 for ax in axes)
    # class by class: images[c * rows + r] sits in row r, column c
    shown = axes[1 * 3 + 2].get_images()[0].get_array()  # row 1, column 2 → image 2*2+1
    assert torch.allclose(torch.as_tensor(shown), (imgs[5].permute(1, 2, 0) + 1) / 2, atol=1e-6)
    assert [ax.get_ylabel() for ax in axes[::3]] == ["#0", "#1"]  # rows: the sample index that seeds them
    assert [ax.get_ylabel() for ax in viz.grid_figure(imgs, names, 2, row_labels=["seed 3", "seed 4"]).axes[::3]] \
        == ["seed 3", "seed 4"]
    assert not viz.grid_figure(images(3), names, rows=1).axes[0].get_ylabel()  # one row: nothing to tell apart
    with pytest.raises(DefectlabError, match="do not fill"):
        viz.grid_figure(images(5), names, rows=2)


def test_titles_wrap_between_phrases():
    title = "000-hazelnut-difffit · ddim 4 steps · guidance 1.5 (all)"
    assert viz._wrap(title, 2.2) == "000-hazelnut-difffit ·\nddim 4 steps ·\nguidance 1.5 (all)"
    assert viz._wrap(title, 20) == title
    assert max(len(line) for line in viz._wrap("x" * 60 + " · end", 2.2).split("\n")) <= 24  # one long phrase: cut


def test_pdf_fonts_are_type42_and_svg_text_is_text(tmp_path):
    """What journals and editors need: TrueType (Type 42) fonts embedded in PDFs, no Type 3
    bitmaps, and SVG text as <text> elements (viz.STYLE)."""
    fig = viz.loss_figure([{"step": s, "loss": 1 / s, "objective": "v_prediction"} for s in range(1, 30)], "run")
    pdf, svg = viz.save_figure(fig, tmp_path, "loss", "pdf,svg")
    raw = pdf.read_bytes()
    assert (b"/FontFile2" in raw or b"/Subtype /TrueType" in raw) and b"/Type3" not in raw
    assert "<text" in svg.read_text()


def test_real_vs_generated_figure():
    real = {"crack": images(2), "hole": images(1, seed=1)}
    gen = {"crack": images(3, seed=2), "hole": images(3, seed=3), "scratch": images(3, seed=4)}
    fig = viz.real_vs_generated_figure(real, gen, rows=2, title="screw")
    sub_real, sub_gen = fig.subfigs
    assert len(sub_real.axes) == 2 * 3 and len(sub_gen.axes) == 2 * 3  # rows capped, columns = union
    assert [ax.get_title() for ax in sub_gen.axes[:3]] == ["crack", "hole", "scratch"]
    assert (sub_real.axes[2].get_images()[0].get_array() == 0.94).all()  # no real scratch: grey cell
    assert sub_real.get_supylabel() == "real" and sub_gen.get_supylabel() == "generated"


def test_save_figure_formats_and_dpi(tmp_path):
    fig = viz.grid_figure(images(2), ["crack", "hole"])
    paths = viz.save_figure(fig, tmp_path / "figures", "grid", formats=("png", "pdf", "svg"))
    assert [p.name for p in paths] == ["grid.png", "grid.pdf", "grid.svg"]
    assert paths[1].read_bytes()[:4] == b"%PDF" and b"<svg" in paths[2].read_bytes()[:1000]
    with Image.open(paths[0]) as im:
        assert round(im.info["dpi"][0]) == viz.DPI
        assert im.width > viz.CELL * 2 * viz.DPI * 0.8  # saved at 200 dpi, not the screen's 100
    assert viz.save_figure(fig, tmp_path, "x", formats="png,svg")[1].suffix == ".svg"
    assert not list(tmp_path.glob("**/.*.tmp"))
    with pytest.raises(DefectlabError, match="jpg"):
        viz.save_figure(fig, tmp_path, "grid", formats=("jpg",))


def test_import_is_light():
    """ipywidgets and pyplot only inside functions: importing viz needs no notebook extras."""
    tree = ast.parse(Path(viz.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not {"ipywidgets", "matplotlib.pyplot"} & names


# ----------------------------------------------------------------------------- datasets, runs, explorer
@pytest.fixture(scope="module")
def hazelnut():
    from defectlab.data import sources

    return sources.load(sources.DataConfig(image_size=32))


def test_dataset_figure_rows_are_classes_with_masks(hazelnut):
    fig = viz.dataset_figure(hazelnut, per_class=3, with_masks=True, size=32)
    rows = ["good", *hazelnut.classes]
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3 * len(rows)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert [lab.split("\n")[0] for lab in labels] == rows and labels[1].endswith("(n=20)")
    crack = fig.axes[3 * 1]  # first crack image: red tint + the mask outline
    assert crack.collections and not fig.axes[0].collections  # good images have no mask
    plain = viz.dataset_figure(hazelnut, per_class=3, with_masks=False, size=32)
    assert not any(ax.collections for ax in plain.axes)
    assert not (crack.get_images()[0].get_array() == plain.axes[3].get_images()[0].get_array()).all()
    with pytest.raises(DefectlabError, match="per_class"):
        viz.dataset_figure(hazelnut, per_class=0)


def test_dataset_figure_on_a_real_mvtec_root(shared_screws):
    from defectlab.data import sources

    product = sources.detect_layout(shared_screws)[1][0]
    real = sources.load(sources.DataConfig(data=str(shared_screws), product=product))
    fig = viz.dataset_figure(real, per_class=2, size=48)
    assert len([ax for ax in fig.axes if ax.get_ylabel()]) == len(real.classes) + bool(real.good)


def test_counts_figure_and_trainable_table(hazelnut):
    from defectlab.core import methods, restore
    from defectlab.stages import train

    fig = viz.counts_figure(hazelnut)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["good", *hazelnut.classes]
    assert len(ax.patches) == 2 * len(hazelnut.classes) + 1  # train + test per class, one good bar
    _, net = restore.build(train.TrainConfig(model="tiny", method="bitfit"), hazelnut.classes)
    table = methods.trainable_table(net)
    trainable, total = methods.count(net)
    assert f"| **all** | {trainable:,} | {total:,} |" in table and "| class tables |" in table


def test_show_accepts_figures_files_and_pairs(tmp_path, capsys):
    fig = viz.grid_figure(images(2), ["crack", "hole"])
    path = viz.save_figure(fig, tmp_path, "grid")[0]
    viz.show(fig, path, ("grid", fig))  # outside a kernel IPython prints a repr; nothing raises
    assert viz.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def explorer():
    """An untrained tiny model: enough to check what the explorer draws and that seeds work."""
    from defectlab.core import restore
    from defectlab.stages import train

    classes = ["crack", "cut", "hole", "print"]
    cfg = train.TrainConfig(model="tiny", image_size=16)
    base, net = restore.build(cfg, classes)
    restored = restore.Restored(base, net, classes, {"image_size": 16}, None)
    return Explorer(restored, steps=2, guidance=1.5, n=3, scheduler="ddim")


def test_explorer_render_shape_and_seeds(explorer):
    fig = explorer.render("hole", steps=2, seed=5, guidance=2.0, n=3)
    assert len(fig.axes) == 3 and [ax.get_title() for ax in fig.axes] == ["hole #0", "hole #1", "hole #2"]
    first = explorer.last_images.clone()
    assert first.shape == (3, 3, 16, 16)
    explorer.render("hole", steps=2, seed=5, guidance=2.0, n=3)
    assert torch.equal(explorer.last_images, first)              # same seed: same grid
    explorer.render("hole", steps=2, seed=6, guidance=2.0, n=3)
    assert not torch.allclose(explorer.last_images, first)       # another seed: another grid
    explorer.render("hole", steps=2, seed=5, guidance=2.0, n=2)
    # image i does not depend on n: same noise, same result up to the last bits (CPU kernels may
    # differ with the batch size: 4e-5 measured on an AMX machine, where torch.equal failed)
    assert torch.allclose(explorer.last_images, first[:2], rtol=0, atol=1e-4)
    fig = explorer.render(ALL_CLASSES, steps=2, seed=5, guidance=2.0, n=2)
    assert len(fig.axes) == 4 * 2 and [ax.get_title() for ax in fig.axes[:4]] == explorer.classes
    assert torch.allclose(explorer.last_images[2 * 2:2 * 2 + 2], first[:2], rtol=0, atol=1e-4)  # column "hole" = the same images
    with pytest.raises(DefectlabError, match="unknown class 'dent'"):
        explorer.render("dent", 2, 0, 1.5)


def test_explorer_widget_runs_on_click(explorer):
    ui = explorer.widget()
    c = explorer.controls
    assert {"class", "scheduler", "steps", "seed", "guidance", "run", "image", "progress"} <= set(c)
    first = bytes(c["image"].value)
    assert first[:8] == b"\x89PNG\r\n\x1a\n"  # the explorer's current grid from the start
    # the static twin: one output with the live widget and a PNG of its grid (what a saved notebook shows)
    bundle = ui._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == first
    assert explorer_mod.STATIC in c["hide_static"].value  # a live widget hides the saved copy of the grid
    assert c["image"].layout.width == f"{explorer_mod._width(first)}px"  # shown at its own size, not stretched
    c["class"].value, c["steps"].value, c["seed"].value, c["guidance"].value, c["n"].value = "cut", 2, 3, 1.0, 2
    c["scheduler"].value = "ddim"
    c["run"].click()
    assert c["image"].value[:8] == b"\x89PNG\r\n\x1a\n" and bytes(c["image"].value) != first
    assert c["status"].value.startswith("done")
    assert explorer.last_images.shape[0] == 2 and not c["run"].disabled


def test_explorer_cache_hit_does_not_sample(explorer, monkeypatch):
    fig = explorer.render("print", steps=2, seed=11, guidance=2.0, n=2, scheduler="ddim")
    first = explorer.last_images.clone()
    calls = []
    real = sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda *a, **kw: calls.append(len(a[2])) or real(*a, **kw))
    explorer.render("print", steps=2, seed=11, guidance=2.0, n=2, scheduler="ddim")
    assert calls == [] and torch.equal(explorer.last_images, first)      # seen before: shown at once
    explorer.render("print", steps=2, seed=11, guidance=2.0, n=3, scheduler="ddim")
    assert calls == [1] and torch.equal(explorer.last_images[:2], first)  # one more image: only it is sampled
    explorer.render("print", steps=2, seed=11, guidance=2.0, n=2, scheduler="dpmsolver")
    assert calls == [1, 2]                                                # another sampler: sampled again
    assert len(fig.axes) == 2


def test_explorer_is_fast_unless_the_settings_already_are(explorer):
    from defectlab.stages import sample

    slow = Explorer.from_config(explorer.restored, sample.SampleConfig(scheduler="ddpm", steps=250))
    assert (slow.scheduler, slow.steps) == ("dpmsolver", 25)
    quick = Explorer.from_config(explorer.restored, sample.SampleConfig(scheduler="ddim", steps=4))
    assert (quick.scheduler, quick.steps) == ("ddim", 4)  # what sample.run exports for these settings
    assert Explorer(explorer.restored).scheduler == "dpmsolver"


def test_sweep_figure_one_bar_group_per_point():
    rows = [{"method": m, "lr": lr, "best_val_loss": 0.1 * i + 0.05, "acc[real]": 0.6, "acc[real+gen]": 0.5 + 0.1 * i}
            for i, (m, lr) in enumerate([("full", 1e-3), ("full", 3e-3), ("lora", 1e-3)])]
    fig = viz.sweep_figure(rows, ["method", "lr"])
    loss, acc = fig.axes
    assert len(loss.patches) == 3 and len(acc.patches) == 2 * 3
    assert [t.get_text() for t in acc.get_xticklabels()] == ["full · 0.001", "full · 0.003", "lora · 0.001"]
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["real", "real+gen"]
    assert loss.get_yscale() == "linear"
    rows[2]["best_val_loss"] = 5.0  # a diverged point (0.05 vs 5.0): log scale keeps the others readable
    assert viz.sweep_figure(rows, ["method", "lr"]).axes[0].get_yscale() == "log"
    assert fig.get_suptitle() == "sweep: 3 of 3 points"
    assert not [c for c in acc.containers if getattr(c, "has_yerr", False)]  # one seed: no intervals
    for r in rows:
        r["acc_std[real+gen]"] = 0.05  # several classifier seeds: ± one sd on those bars
    fig = viz.sweep_figure(rows, ["method", "lr"], total=5)
    assert fig.get_suptitle() == "sweep: 3 of 5 points" and "sd over seeds" in fig.axes[1].get_ylabel()
    assert len([c for c in fig.axes[1].containers if getattr(c, "has_yerr", False)]) == 1
