"""model.py: loading (tiny preset, folders, original .pt, hub errors), codecs, class surgery."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from defectlab.base import paths
from defectlab.core import convert, methods, model
from defectlab.base.errors import DefectlabError
from dit_reference import RefDiT

MICRO = dict(model.TINY_CONFIG, sample_size=16, num_layers=2, num_attention_heads=2)  # 16 tokens, width 64


def micro(seed=0, **over):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**MICRO, **over}).eval()


def run(t, labels, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, s = t.config.in_channels, t.config.sample_size
    x = torch.randn(len(labels), c, s, s, generator=g)
    steps = torch.randint(0, 1000, (len(labels),), generator=g)
    with torch.no_grad():
        return t(x, steps, torch.tensor(labels)).sample


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1)


def tables(t):
    return [b.norm1.emb.class_embedder.embedding_table.weight.detach().clone() for b in t.transformer_blocks]


# ----------------------------------------------------------------------------- tiny preset / folders
def test_tiny_preset_built_once_and_loaded_through_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "MODELS", tmp_path)
    base = model.load("tiny")
    folder = tmp_path / "tiny"
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == ["tiny"]  # no temp folder left behind
    stamp = (folder / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = model.load("tiny")
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    with torch.random.fork_rng():
        torch.manual_seed(model.TINY_SEED)
        direct = DiTTransformer2DModel(**model.TINY_CONFIG).eval()
    out = run(base.transformer, [990])
    assert torch.equal(out, run(again.transformer, [990])) and torch.equal(out, run(direct, [990]))
    assert out.shape == (1, 6, 64, 64)
    assert isinstance(base.codec, model.PixelCodec) and base.codec.latent_shape(64) == (3, 64, 64)
    assert base.default_image_size == 64 and methods.num_classes(base.transformer) == 1000
    assert base.scheduler_config["variance_type"] == "learned_range"
    assert (base.scheduler_config["beta_start"], base.scheduler_config["beta_end"]) == (1e-4, 0.02)
    sched = DDPMScheduler.from_config(base.scheduler_config)
    assert sched.config.variance_type == "learned_range" and len(sched.betas) == 1000
    # a stale preset (config changed since) is rebuilt, not trusted
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_layers": 1}))
    assert torch.equal(run(model.load("tiny").transformer, [990]), out)


def test_full_layout_folder_reads_scheduler_and_labels(tmp_path):
    t = micro()
    methods.set_classes(t, 2, [1, 2])
    t.save_pretrained(tmp_path / "transformer")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_end": 0.03, "num_train_timesteps": 1000, "clip_sample": False}))
    (tmp_path / "model_index.json").write_text(json.dumps({"id2label": {"0": "crack", "1": "hole"}}))
    base = model.load(str(tmp_path))
    assert base.class_names == ["crack", "hole"] and base.scheduler_config["beta_end"] == 0.03
    assert base.scheduler_config["variance_type"] == "learned_range"     # kept from DiT's training diffusion
    assert base.scheduler_config["_class_name"] == "DDPMScheduler"
    assert torch.equal(run(base.transformer, [0, 1]), run(t, [0, 1]))


def test_vae_codec_shapes_and_deterministic_encode():
    vae = tiny_vae()
    codec = model.VAECodec(vae).to("cpu", torch.float32)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, *codec.latent_shape(16)) == (2, 4, 8, 8)
    assert torch.equal(z, codec.encode(x))                 # posterior mean: cacheable latents
    assert torch.allclose(z, vae.encode(x).latent_dist.mean * 0.18215)
    y = codec.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("spec", ["no-such-org/no-such-dit", "/no/such/dit.pt", "./missing-folder"])
def test_missing_model_is_one_line_naming_it(spec, offline):
    with pytest.raises(DefectlabError) as err:
        model.load(spec)
    msg = str(err.value)
    assert spec in msg and "\n" not in msg
    if "/" in spec and not spec.startswith((".", "/")):
        assert "hf download no-such-org/no-such-dit" in msg and "cache" in msg


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")
def test_hub_id_loads_offline_from_the_cache(tmp_path, monkeypatch, offline):
    """The hub path with HF_HUB_OFFLINE=1: a cache laid out like huggingface_hub's, DiT repo layout."""
    import huggingface_hub.constants as hub

    snap = tmp_path / "models--acme--dit-micro" / "snapshots" / ("0" * 40)
    t = micro()
    t.save_pretrained(snap / "transformer")
    tiny_vae().save_pretrained(snap / "vae")
    (snap / "scheduler").mkdir()
    (snap / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "num_train_timesteps": 1000}))
    (snap / "model_index.json").write_text(json.dumps({"id2label": {str(i): f"c{i}" for i in range(1000)}}))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    base = model.load("acme/dit-micro")
    assert isinstance(base.codec, model.VAECodec) and base.default_image_size == 32
    assert base.class_names[990] == "c990" and base.scheduler_config["variance_type"] == "learned_range"
    assert torch.equal(run(base.transformer, [990]), run(t, [990]))
    with pytest.raises(DefectlabError, match="'acme/other'.*hf download acme/other"):
        model.load("acme/other")


def test_mini_absent_and_bad_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "ASSETS", tmp_path)
    with pytest.raises(DefectlabError, match="'mini'"):
        model.load("mini")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefectlabError, match="not a diffusers DiT folder"):
        model.load(str(tmp_path / "empty"))


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x_embedder.proj.weight": Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DefectlabError, match="weights_only") as err:
        model.load(str(tmp_path / "evil.pt"))
    assert not marker.exists() and "\n" not in str(err.value)
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DefectlabError, match="not a facebookresearch DiT"):
        model.load(str(tmp_path / "other.pt"))


# ----------------------------------------------------------------------------- classes
def test_set_classes_every_block_null_row_and_roundtrip(tmp_path):
    t = micro()
    old = tables(t)
    base_out = run(t, [990, 783])
    methods.set_classes(t, 3, [990, 783, 5])
    for w_old, w in zip(old, tables(t), strict=True):
        assert w.shape == (4, 64)
        assert torch.equal(w[:3], w_old[[990, 783, 5]]) and torch.equal(w[3], w_old[1000])  # null row kept
    assert methods.num_classes(t) == 3 and t.config.num_embeds_ada_norm == 3
    assert torch.equal(run(t, [0, 1]), base_out)               # copied class = the base class, exactly
    t.save_pretrained(tmp_path / "k3")
    back = model.load(str(tmp_path / "k3")).transformer           # a bare transformer folder
    assert methods.num_classes(back) == 3
    assert all(torch.equal(a, b) for a, b in zip(tables(t), tables(back)))
    assert torch.equal(run(back, [0, 2, 3]), run(t, [0, 2, 3]))


def test_set_classes_inits():
    t = micro()
    old = tables(t)[0]
    methods.set_classes(t, 2, "mean")
    assert torch.allclose(tables(t)[0][0], old[:1000].mean(0)) and torch.equal(tables(t)[0][0], tables(t)[0][1])
    methods.set_classes(t, 4, "random", seed=3)
    a = tables(t)
    assert all(torch.equal(w[:4], a[0][:4]) for w in a)        # the same new rows in every block
    assert 0.01 < a[0][:4].std() < 0.03 and torch.equal(a[0][4], old[1000])
    u = micro()
    methods.set_classes(u, 4, "random", seed=3)
    assert torch.equal(tables(u)[0], a[0])                     # seeded
    methods.set_classes(u, 3, [1])                               # a 1-list (or an int) broadcasts
    assert torch.equal(tables(u)[0][2], tables(u)[0][0])
    for bad in ([0, 1], [7], "zeros", 0.5):
        with pytest.raises(DefectlabError):
            methods.set_classes(u, 3, bad)                       # wrong length, id >= K, unknown init


def test_label_dropout_drops_to_the_new_null_row():
    t = micro()
    methods.set_classes(t, 3, "mean")
    outs = []
    for b in t.transformer_blocks:
        emb = b.norm1.emb.class_embedder
        assert emb.dropout_prob == 0.1                          # diffusers' CFG dropout stays on
        emb.dropout_prob = 1.0                                  # (every label dropped, to see where to)
        emb.register_forward_hook(lambda m, args, out: outs.append((out, m.embedding_table.weight[3])))
    t.train()
    with torch.no_grad():
        t(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), class_labels=torch.tensor([0, 2]))
    assert len(outs) == 3 and all(torch.equal(out, null.expand_as(out)) for out, null in outs)
    outs.clear()
    t.eval()
    run(t, [0, 2])                                              # eval mode: the labels are used
    assert torch.equal(outs[0][0], t.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight[[0, 2]])
    methods.set_classes(t, 2, np.array([1, 2]))                  # numpy ids are ids too
    assert methods.num_classes(t) == 2


# ----------------------------------------------------------------------------- original DiT checkpoints
def inputs(n=3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0, 500, 999])[:n], torch.tensor([3, 10, 7])[:n]


def test_converted_original_matches_reference_forward():
    torch.manual_seed(0)
    ref = RefDiT(freq_shift=1).eval()
    sd = ref.state_dict()
    cfg = convert.original_config(sd, heads=2)
    assert (cfg["sample_size"], cfg["patch_size"], cfg["num_layers"], cfg["num_attention_heads"],
            cfg["out_channels"], cfg["num_embeds_ada_norm"]) == (8, 2, 2, 2, 8, 10)
    t = DiTTransformer2DModel(**cfg).eval()
    t.load_state_dict(convert.convert_original_state_dict(sd), strict=True)
    x, steps, y = inputs()
    with torch.no_grad():
        want, got = ref(x, steps, y), t(x, steps, y).sample
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # diffusers' DiT spaces timestep frequencies by 1/(half-1) where the original uses 1/half:
    # close, not equal; set_numerics("original") computes the original's (test_original.py)
    ref.freq_shift = 0
    with torch.no_grad():
        diff = (ref(x, steps, y) - got).abs().max()
        assert 1e-5 < diff < 0.1 * want.abs().max()
        model.set_numerics(t, "original")
        assert torch.allclose(t(x, steps, y).sample, ref(x, steps, y), atol=1e-5)
    back = convert.to_original_state_dict(t.state_dict(), pos_embed=sd["pos_embed"])
    assert sd.keys() == back.keys() and all(torch.equal(sd[k], back[k]) for k in sd)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")
def test_load_original_pt_with_local_vae(tmp_path, monkeypatch, offline):
    torch.manual_seed(0)
    ref = RefDiT().eval()  # the original's frequencies: a .pt loads with them (numerics "original")
    torch.save(ref.state_dict(), tmp_path / "DiT-test.pt")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2}))  # width 128: not S/B/L/XL
    with pytest.raises(DefectlabError, match="VAE 'stabilityai/sd-vae-ft-ema'"):
        model.load(str(tmp_path / "DiT-test.pt"))        # 4 channels, no VAE given, offline
    tiny_vae().save_pretrained(tmp_path / "vae")
    monkeypatch.setenv(model.VAE_ENV, str(tmp_path / "vae"))
    base = model.load(str(tmp_path / "DiT-test.pt"))
    assert isinstance(base.codec, model.VAECodec) and base.default_image_size == 16
    assert base.scheduler_config["variance_type"] == "learned_range"
    x, steps, y = inputs()
    with torch.no_grad():
        assert torch.allclose(base.transformer(x, steps, y).sample, ref(x, steps, y), atol=1e-5)
    # the per-block embedder copies are independent tensors (train and save separately)
    embs = [b.norm1.emb.class_embedder.embedding_table.weight for b in base.transformer.transformer_blocks]
    assert embs[0].data_ptr() != embs[1].data_ptr()
    base.transformer.save_pretrained(tmp_path / "converted")   # safetensors refuses shared storage


def test_set_classes_averages_groups_of_base_rows():
    import torch
    from diffusers import DiTTransformer2DModel

    from defectlab.core import methods as m

    t = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6,
                              num_layers=2, sample_size=8, patch_size=4, num_embeds_ada_norm=10)
    before = [b.norm1.emb.class_embedder.embedding_table.weight.detach().clone() for b in t.transformer_blocks]
    m.set_classes(t, 2, init=[[1, 2, 3], [7]])
    for w0, b in zip(before, t.transformer_blocks):
        w = b.norm1.emb.class_embedder.embedding_table.weight
        assert torch.allclose(w[0], w0[[1, 2, 3]].mean(0)) and torch.equal(w[1], w0[7])
        assert torch.equal(w[2], w0[10])  # the null row survives
    with pytest.raises(m.DefectlabError, match="non-empty lists"):
        m.set_classes(t, 2, init=[[0], []])


def test_anchor_class_uses_the_base_mapping_then_imagenet():
    from defectlab.core import model as m

    tiny = m.load("tiny")
    assert m.anchor_class(tiny, "hazelnut") == 990 and m.anchor_class(tiny, "screw") == 783
    assert m.anchor_class(tiny, "bottle") is None
    mini = m.load("mini")  # ships its own product → class mapping (nut, screw look-alikes)
    assert m.anchor_class(mini, "hazelnut") == 0 and mini.class_names[0] == "nut"
    assert mini.class_names[m.anchor_class(mini, "screw")] == "screw"
