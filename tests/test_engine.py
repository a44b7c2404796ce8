"""engine.py: every speed/memory switch gives the reference result on the CPU (exactly, or
within the precision it asks for); the benchmark runs its code paths on a tiny model."""
import copy
import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from PIL import Image

from defectlab.data import dataset, sources
from defectlab.core import dit, engine, methods, model, sampler
from defectlab.core.diffusion import Objective
from defectlab.base.errors import DefectlabError

MICRO = dict(model.TINY_CONFIG, sample_size=16, num_layers=3, num_attention_heads=2)  # 16 tokens, width 64
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "stock_dit_baseline.py"


def fresh(method=None, seed=0, same_copies=True):
    """A micro DiT with 3 classes; ``same_copies``: every block's embedder = block 0's values
    (the converted DiT-XL checkpoint's layout)."""
    torch.manual_seed(seed)
    t = dit.DiT(**MICRO)
    methods.set_classes(t, 3, [990, 783, 5])
    for block in t.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0  # as restore.build
    if same_copies:
        for block in t.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(t.transformer_blocks[0].norm1.emb.state_dict())
    if method:
        methods.apply(t, method, lora_rank=4, verbose=False)
        if method in ("difffit", "lora"):  # move off the identity start so the method matters
            with torch.no_grad():
                for n, p in t.named_parameters():
                    if "difffit_gamma" in n or "lora_B" in n:
                        p.add_(0.05 * torch.randn_like(p))
    return t


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)
    return x0, noise, torch.tensor([3, 400, 999, 50])[:n], torch.tensor([0, 1, 3, 2])[:n]


OBJ = Objective(model.dit_schedule(True, True))


def step_grads(t):
    """Loss and gradients of one defectlab training step (DiT's mse + vb objective)."""
    x0, noise, ts, y = inputs()
    xt = OBJ.add_noise(x0, noise, ts)
    mse, vb = OBJ.loss(t(xt, timestep=ts, class_labels=y).sample, x0, xt, noise, ts)
    loss = (mse + vb).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in t.named_parameters() if p.requires_grad}


def forward(t, *args, **kw):
    x0, _, ts, y = inputs()
    with torch.no_grad():
        return t(x0, timestep=ts, class_labels=y).sample.float()


# ----------------------------------------------------------------------------- defectlab's DiT
@pytest.mark.parametrize("training", [False, True])
def test_dit_computes_what_diffusers_dit_computes(training):
    """The model's own forward (dit.py) against diffusers' DiTTransformer2DModel.forward: equal
    outputs and gradients on the same weights; saved under diffusers' class name."""
    torch.manual_seed(0)
    plain = DiTTransformer2DModel(**MICRO).train(training)
    for block in plain.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    ours = dit.DiT.adopt(plain)
    assert isinstance(ours, dit.DiT) and ours.training == training and dit.DiT.adopt(ours) is ours
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(ours.parameters(), plain.parameters()))  # no copy
    x0, noise, ts, _ = inputs()
    y = torch.tensor([0, 5, 999, 1000])
    a, b = plain(x0, timestep=ts, class_labels=y).sample, ours(x0, timestep=ts, class_labels=y).sample
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.square().mean(), list(plain.parameters()))
    gb = torch.autograd.grad(b.square().mean(), list(ours.parameters()))
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert json.loads(ours.to_json_string())["_class_name"] == "DiTTransformer2DModel"
    with pytest.raises(DefectlabError, match="not defectlab's DiT"):
        engine.set_grad_checkpointing(plain, 1)


# ----------------------------------------------------------------------------- tied conditioning
def test_tied_equals_untied_exactly_and_computes_the_embedding_once():
    t = fresh().eval()
    ref = forward(t)
    tied = engine.tie_embeddings(copy.deepcopy(t))
    calls = []
    tied.transformer_blocks[0].norm1.emb.timestep_embedder.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(forward(tied), ref)
    assert len(calls) == 1                      # untied: once per block + once for the final layer
    x0, _, ts, y = inputs()
    with torch.no_grad():                       # positional arguments take the same path
        assert torch.equal(tied(x0, ts, y).sample, ref)
    assert methods.num_classes(tied) == 3
    names = {n for n, _ in tied.named_parameters()}
    assert names < {n for n, _ in t.named_parameters()}
    assert not any(n.startswith("transformer_blocks.1.norm1.emb") for n in names)
    # back to diffusers' layout: independent copies, same function
    untied = engine.untie_embeddings(tied)
    embs = [b.norm1.emb for b in untied.transformer_blocks]
    assert embs[0] is not embs[1] and engine.embeddings_identical(untied)
    assert torch.equal(forward(untied), ref)


def test_tied_training_step_is_the_shared_table_of_the_original_dit():
    """Same loss; the one shared table's gradient is the sum of the per-block copies' gradients."""
    t = fresh("bitfit").train()
    loss, grads = step_grads(t)
    tied = engine.tie_embeddings(fresh("bitfit").train())
    loss_t, grads_t = step_grads(tied)
    assert torch.equal(loss_t, loss)
    key = "transformer_blocks.{}.norm1.emb.class_embedder.embedding_table.weight"
    summed = sum(grads[key.format(i)] for i in range(MICRO["num_layers"]))
    assert torch.allclose(grads_t[key.format(0)], summed, atol=1e-6, rtol=1e-5)
    assert [n for n in grads_t if "class_embedder" in n] == [key.format(0)]


def test_tie_with_autocast_and_bf16_frozen_weights_is_exact():
    """The precomputed conditioning uses the dtype the blocks would (PatchEmbed's under autocast)."""
    a = engine.prepare_for_training(fresh("difffit").train(), frozen_dtype="bf16")
    b = engine.prepare_for_training(fresh("difffit").train(), frozen_dtype="bf16", tie_embeddings=True)
    assert torch.equal(forward(a), forward(b))


def test_tie_refuses_different_copies_unless_adopted():
    t = fresh(same_copies=False)
    assert not engine.embeddings_identical(t)
    with pytest.raises(DefectlabError, match="differ"):
        engine.tie_embeddings(t)
    engine.tie_embeddings(t, adopt=True)
    assert engine.is_tied(t)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["full", "bitfit", "difffit", "lora", "vpt"])
def test_grad_checkpointing_gives_identical_gradients(method):
    loss, grads = step_grads(fresh(method).train())
    for blocks in (True, 1):
        t = engine.prepare_for_training(fresh(method).train(), frozen_dtype=None, grad_checkpointing=blocks)
        loss_c, grads_c = step_grads(t)
        assert engine.report(t)["grad_checkpointing"] == (3 if blocks is True else 1)
        assert torch.equal(loss_c, loss)
        assert all(torch.equal(grads_c[n], g) for n, g in grads.items())


@pytest.mark.parametrize("method", ["bitfit", "difffit", "bias_norm", "lora", "vpt"])
def test_bf16_frozen_step_close_to_fp32_and_trained_params_stay_fp32(method):
    loss, grads = step_grads(fresh(method).train())
    t = engine.prepare_for_training(fresh(method).train(), frozen_dtype=torch.bfloat16)
    loss_b, grads_b = step_grads(t)
    assert {p.dtype for p in t.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in t.parameters() if p.requires_grad} == {torch.float32}
    assert abs(loss_b - loss) < 2e-2 * abs(loss)
    # over all trained tensors together: some (to_k.bias) have a true gradient of zero
    g, gb = (torch.cat([d[n].flatten() for n in grads]) for d in (grads, grads_b))
    assert (gb - g).norm() < 3e-2 * g.norm()
    opt = torch.optim.AdamW([p for p in t.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    assert {p.dtype for p in t.parameters() if p.requires_grad} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_compile_is_skipped_on_cpu_and_traces_with_a_named_backend():
    t = engine.prepare_for_training(fresh("bitfit").train(), frozen_dtype=None, compile="default")
    assert engine.report(t)["compile"].startswith("skipped (cpu")
    loss, grads = step_grads(fresh("bitfit").train())
    c = engine.prepare_for_training(fresh("bitfit").train(), frozen_dtype=None, compile="default",
                                    compile_scope="blocks", backend="eager")
    loss_c, grads_c = step_grads(c)
    assert engine.report(c)["compile"] == "eager (blocks)"
    assert torch.allclose(loss_c, loss) and all(torch.allclose(grads_c[n], g, atol=1e-6) for n, g in grads.items())
    with pytest.raises(DefectlabError, match="compile mode"):
        engine.prepare_for_training(fresh("bitfit"), compile="fastest")
    with pytest.raises(DefectlabError, match="frozen_dtype"):
        engine.prepare_for_training(fresh("bitfit"), frozen_dtype="float16")


def test_a_difffit_model_compiled_after_another_model_runs_its_own_graph():
    """Every DiT block shares one forward: without hook guards, DiffFit blocks compiled after a
    BitFit model reused its graph and ran without γ (max |Δ| 0.9 on this micro model)."""
    first = engine.prepare_for_training(fresh("bitfit").train(), frozen_dtype=None, compile="default", backend="eager")
    forward(first)
    t = fresh("difffit").train()
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "difffit_gamma" in n:
                p.mul_(3.0)                         # γ far from 1: a graph without γ is far off
    ref = forward(t)
    engine.prepare_for_training(t, frozen_dtype=None, compile="default", backend="eager")
    assert torch.allclose(forward(t), ref, atol=1e-6)
    assert torch.allclose(forward(first), forward(fresh("bitfit").train()), atol=1e-6)


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("method", ["difffit", "lora", "vpt"])
def test_sampling_copy_equals_plain_model(method):
    t = fresh(method).eval()
    ref = forward(t)
    net = engine.prepare_for_sampling(t, dtype=torch.float32)
    rep = engine.report(net)
    assert rep["tie_embeddings"] and rep["qkv_fused"] == 3 and rep["lora_merged"] == (18 if method == "lora" else 0)
    assert engine.attention_processors(net) == ["FusedAttnProcessor2_0"]
    assert torch.allclose(forward(net), ref, atol=1e-5, rtol=1e-5)
    low = engine.prepare_for_sampling(t, dtype="bf16")
    assert next(low.parameters()).dtype == torch.bfloat16
    assert (forward(low) - ref).norm() < 2e-2 * ref.norm()
    # the model it was made from is untouched
    assert {p.dtype for p in t.parameters()} == {torch.float32}
    assert engine.attention_processors(t) == ["AttnProcessor2_0"] and not engine.is_tied(t)
    assert torch.equal(forward(t), ref)


def test_sampling_copy_of_a_model_prepared_for_training():
    """Training settings (bf16 autocast, checkpointing, compile) do not leak into the sampling
    copy, and the copy does not follow later changes of the original."""
    t = engine.prepare_for_training(fresh("bitfit").train(), frozen_dtype="bf16", grad_checkpointing=True,
                                    compile="default", compile_scope="blocks", backend="eager").eval()
    plain = copy.deepcopy(t)
    plain.engine.autocast = None  # the same (bf16-rounded) weights, computed in fp32
    engine._cast(plain, torch.float32)
    ref = forward(plain)
    net = engine.prepare_for_sampling(t, dtype=torch.float32)
    assert engine.report(net)["compile"] == "off" and net.engine.checkpointed == 0 and net.engine.block_fn is None
    assert torch.allclose(forward(net), ref, atol=1e-5)
    assert not torch.allclose(forward(t), ref, atol=1e-3)    # the original still runs under bf16 autocast
    with torch.no_grad():
        for p in t.parameters():
            p.mul_(0.5)
    assert torch.allclose(forward(net), ref, atol=1e-5)


def test_generate_with_the_engine_equals_plain_generate():
    t = fresh("difffit").eval()
    kw = dict(steps=4, guidance=3.0, scheduler="ddim", batch_size=2, progress=False)
    labels = [0, 1, 2]
    plain = sampler.generate(t, model.PixelCodec(), labels, sampler.generators(0, "c", range(3)), **kw)
    fast = sampler.generate(engine.sampler(t, dtype=torch.float32), model.PixelCodec(), labels,
                           sampler.generators(0, "c", range(3)), **kw)
    assert torch.allclose(fast, plain, atol=1e-5)


def test_sampler_is_cached_until_a_parameter_changes():
    t = fresh("bitfit").eval()
    first = engine.sampler(t, dtype=torch.float32)
    assert engine.sampler(t, dtype=torch.float32) is first
    with torch.no_grad():
        t.transformer_blocks[0].attn1.to_q.bias.add_(1.0)  # e.g. an optimizer step
    second = engine.sampler(t, dtype=torch.float32)
    assert second is not first
    assert torch.allclose(forward(second), forward(t), atol=1e-5)


def test_attention_backends_report_runs():
    found = engine.attention_backends(2, 72, 16, dtype=torch.float32, device="cpu")
    assert found["math"] is True and set(found) == {"flash", "efficient", "cudnn", "math"}


# ----------------------------------------------------------------------------- latent cache
def _samples(tmp_path, n=3, size=24):
    out = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
        mask = np.zeros((size, size), np.uint8)
        mask[2:9, 3 + i:12] = 255
        Image.fromarray(mask).save(tmp_path / f"mask{i}.png")
        out.append(sources.Sample(tmp_path / f"img{i}.png", tmp_path / f"mask{i}.png", "d", i % 2, "x"))
    return out


def test_views_are_drawn_and_applied_exactly_as_augment_pair(tmp_path):
    cfg = sources.DataConfig(image_size=24)
    item = dataset.DefectDataset(_samples(tmp_path, 1), cfg, augment=False)[0]
    assert len(dataset.views(cfg)) == 16
    for seed in range(12):
        torch.manual_seed(seed)
        img, msk = dataset.augment_pair(item["image"], item["mask"], cfg)
        after = torch.rand(())
        torch.manual_seed(seed)
        view = dataset.draw_view(cfg)
        assert torch.rand(()) == after            # the same RNG draws: later noise is unchanged
        assert view in dataset.views(cfg)
        img2, msk2 = dataset.apply_view(item["image"], item["mask"], view)
        assert torch.equal(img2, img) and torch.equal(msk2, msk)


@pytest.mark.parametrize("codec_name", ["pixels", "vae"])
def test_latent_cache_equals_encoding_on_the_fly(tmp_path, codec_name):
    cfg = sources.DataConfig(image_size=24, rotations=(45, 120))
    samples = _samples(tmp_path)
    if codec_name == "pixels":
        codec = model.PixelCodec()
    else:
        torch.manual_seed(0)
        codec = model.VAECodec(AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                                             up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4,
                                             layers_per_block=1, latent_channels=4))
    cache = dataset.LatentCache(samples, cfg, codec)
    plain, cached = dataset.DefectDataset(samples, cfg, augment=True), cache.dataset(augment=True)
    torch.manual_seed(3)
    expect = [plain[i % 3] for i in range(18)]    # 18 draws over 3 images and 12 views: repeats
    state = torch.get_rng_state()
    torch.manual_seed(3)
    got = [cached[i % 3] for i in range(18)]
    assert torch.equal(torch.get_rng_state(), state)  # training noise/timesteps after it are the same
    for e, g in zip(expect, got):
        z = codec.encode(e["image"][None])[0]
        assert torch.allclose(g["latent"], z, atol=1e-6) if codec_name == "vae" else torch.equal(g["latent"], z)
        assert torch.equal(g["mask"], e["mask"]) and g["label"] == e["label"]
    assert cache.encodes == len(cache) < 18       # each (image, view) once
    cache.fill()                                  # the views not drawn yet, and only those
    assert cache.encodes == len(cache) == 3 * len(dataset.views(cfg))
    loader = torch.utils.data.DataLoader(cached, batch_size=2)
    assert next(iter(loader))["latent"].shape == (2, *codec.latent_shape(24))


def test_latent_cache_refuses_a_sampling_codec(tmp_path):
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, layers_per_block=1, latent_channels=4)
    with pytest.raises(DefectlabError, match="posterior mean"):
        dataset.LatentCache(_samples(tmp_path, 1), sources.DataConfig(image_size=24), model.VAECodec(vae, sample=True))


# ----------------------------------------------------------------------------- benchmark script
@pytest.fixture(scope="module")
def xl_speed():
    sys.path.insert(0, str(BENCH))
    import xl_speed as module
    yield module
    sys.path.remove(str(BENCH))


def test_inline_stock_copy_is_the_reference(xl_speed):
    if not REFERENCE.is_file():
        pytest.skip(f"reference not present at {REFERENCE}")
    assert xl_speed.STOCK_SOURCE == REFERENCE.read_text()


def test_flop_count_of_dit_xl_matches_the_papers(xl_speed):
    assert abs(xl_speed.counted_flops(xl_speed.XL) / xl_speed.GF_FWD - 1) < 1e-3


def test_benchmark_runs_on_cpu_with_a_tiny_model(xl_speed, tmp_path):
    buf = io.StringIO()
    with redirect_stdout(buf):
        xl_speed.main(["--device", "cpu", "--tiny", "--quick", "--strict", "--methods", "bitfit", "--batches", "2",
                       "--sample-batch", "2", "--sample-steps", "2", "--classes", "3",
                       "--stock", str(tmp_path / "missing.py")])
    text = buf.getvalue()
    recs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    cases = [r["case"] for r in recs]
    assert cases[0] == "environment" and recs[0]["performance_figures"] is False
    assert cases.count("stock_train_step") == 2 and cases.count("stock_sampling") == 1
    assert {r["source"] for r in recs if r["case"].startswith("stock")} == {"inline copy"}
    train = next(r for r in recs if r["case"] == "defectlab_train_step")
    assert train["engine"]["frozen_dtype"] == "bfloat16" and train["images_per_s"] > 0 and train["classes"] == 3
    samp = next(r for r in recs if r["case"] == "defectlab_sampling")
    assert samp["finite"] and samp["engine"]["tie_embeddings"] and samp["mfu_790"] is None
    assert "NOT performance figures" in text and "| train bitfit b2 | compiled |" in text
