"""The engine on a CUDA device (``pytest -m gpu``; deselected by default, skipped without CUDA).

The CPU tests (test_engine.py) prove every switch equal to the reference where it can run on a
CPU; compile and CUDA graphs only run here. On a small random DiT and on DiT-XL/2-256 shapes with
random weights: one training step of every method under every engine variant of the benchmark
equals the plain fp32 step within the CPU tolerances (loss 2 %, all gradients together 3 %);
after warm-up, further steps never recompile; sampling with the engine equals plain sampling.
Peak memory of each case is written as a JSON line to ``$DEFECTLAB_GPU_REPORT`` (if set) and
printed (``-s``)."""
import copy
import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from defectlab.core import dit, engine, methods, model, sampler
from defectlab.core.diffusion import Objective

# DEFECTLAB_GPU_DRY_RUN=1: the same code on the CPU with the small model and torch.compile's
# "eager" backend, to catch mistakes before a device is spent on them (figures mean nothing there)
DRY = os.environ.get("DEFECTLAB_GPU_DRY_RUN") == "1"
DEV, BACKEND = ("cpu", "eager") if DRY else ("cuda", None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not DRY and not torch.cuda.is_available(), reason="needs a CUDA device")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import xl_speed  # noqa: E402  (the benchmark's shapes and variants: what is measured is what is tested)

SIZES = {"small": dict(xl_speed.TINY, num_layers=4), **({} if DRY else {"xl": xl_speed.XL})}
BATCH = {"small": 8, "xl": 4}
METHODS = ["full", "bitfit", "difffit", "bias_norm", "lora"]


def report(**rec) -> None:
    line = json.dumps(rec)
    print("GPU-REPORT", line)
    if path := os.environ.get("DEFECTLAB_GPU_REPORT"):
        with open(path, "a") as f:
            f.write(line + "\n")


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if DEV == "cuda" else None


@pytest.fixture(autouse=True)
def exact_fp32():
    """The reference runs in true fp32 (no TF32), so the tolerances measure bf16 alone."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.compiler.reset()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    gc.collect()                       # test processes share the device (pytest -n): hand memory back
    if DEV == "cuda":
        torch.cuda.empty_cache()


def fresh(size: str, method: str, seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(DEV):
        t = xl_speed.hub_like(dit.DiT(**SIZES[size]))
    methods.set_classes(t, 4, "random")
    for block in t.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0  # as restore.build
    methods.apply(t, method, lora_rank=4, verbose=False)
    with torch.no_grad():  # off the zero/identity start, so every method's parameters matter
        for n, p in t.named_parameters():
            if "difffit_gamma" in n or "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    return t.train()


def batch(size: str, seed: int):
    cfg, n = SIZES[size], BATCH[size]
    g = torch.Generator(DEV).manual_seed(seed)
    shape = (n, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    x0, noise = torch.randn(shape, generator=g, device=DEV), torch.randn(shape, generator=g, device=DEV)
    ts = torch.randint(0, 1000, (n,), generator=g, device=DEV)
    ts[:3] = torch.tensor([0, 999, 400])
    return x0, noise, ts, torch.randint(0, 4, (n,), generator=g, device=DEV)


def step(t, seed: int = 1):
    """Loss and gradients of one training step (DiT's mse + vb), gradients then cleared."""
    engine.step_begin(t)
    obj = Objective(model.dit_schedule(True, True), DEV)
    x0, noise, ts, y = batch("xl" if t.config.num_layers == 28 else "small", seed)
    xt = obj.add_noise(x0, noise, ts)
    mse, vb = obj.loss(t(xt, timestep=ts, class_labels=y).sample, x0, xt, noise, ts)
    loss = (mse + vb).mean()
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in t.named_parameters() if p.requires_grad}
    t.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


@pytest.mark.parametrize("variant", list(xl_speed.TRAIN_VARIANTS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", list(SIZES))
def test_training_step_equals_plain_fp32_and_never_recompiles(size, method, variant):
    loss, grads = step(fresh(size, method))
    t = engine.prepare_for_training(fresh(size, method), frozen_dtype=torch.bfloat16, compile_scope="blocks",
                                    backend=BACKEND, **xl_speed.TRAIN_VARIANTS[variant])
    assert not engine.report(t)["compile"].startswith("skipped")
    reset_peak()
    loss_e, grads_e = step(t)                           # warm-up: compilation, graph recording
    loss_e2, grads_e2 = step(t)                         # CUDA-graph trees replay from here on
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed in (2, 3):                             # new noise, timesteps and labels: no recompile
            later, _ = step(t, seed)
            assert torch.isfinite(later)
    peak = peak_gib()
    g, ge, ge2 = (torch.cat([d[n].flatten() for n in grads]) for d in (grads, grads_e, grads_e2))
    rel_loss, rel_grad = float(abs(loss_e - loss) / abs(loss)), float((ge - g).norm() / g.norm())
    report(case="train_step", size=size, method=method, variant=variant, engine=engine.report(t),
           rel_loss=round(rel_loss, 5), rel_grad=round(rel_grad, 5), peak_gib=peak)
    assert set(grads_e) == set(grads)
    assert rel_loss < 2e-2 and rel_grad < 3e-2
    assert torch.equal(loss_e2, loss_e) or abs(loss_e2 - loss_e) < 1e-3 * abs(loss_e)  # replay = first run
    assert (ge2 - ge).norm() < 1e-3 * ge.norm()


def _codec(size: str):
    torch.manual_seed(0)
    vae = AutoencoderKL(**xl_speed.VAE_TINY).to(DEV)  # 4 latent channels, no downsampling: cheap decode
    return model.VAECodec(vae)


@pytest.mark.parametrize("variant", list(xl_speed.SAMPLE_VARIANTS))
@pytest.mark.parametrize("size", list(SIZES))
def test_generate_with_the_sampling_engine_equals_plain_generate(size, variant):
    t = fresh(size, "difffit").eval()
    codec = _codec(size)
    labels = [0, 1, 2, 3]
    kw = dict(steps=6, guidance=4.0, scheduler="ddim", batch_size=4, progress=False)
    run = lambda net, seed=0: sampler.generate(net, codec, labels, sampler.generators(seed, "g", range(4)), **kw)  # noqa: E731
    plain = run(t)
    exact = run(engine.prepare_for_sampling(t, dtype=torch.float32))
    assert torch.allclose(exact, plain, atol=1e-4)      # fused q/k/v, tied, merged: same function
    net = engine.prepare_for_sampling(t, dtype=torch.bfloat16, backend=BACKEND, **xl_speed.SAMPLE_VARIANTS[variant])
    reset_peak()
    fast = run(net)
    with torch.compiler.set_stance("fail_on_recompile"):
        again = run(net, seed=5)                        # other noise: no recompile, no stale graph output
    assert torch.equal(run(net), fast)                  # deterministic replay
    rel = float((fast - plain).norm() / plain.norm())
    report(case="generate", size=size, variant=variant, rel=round(rel, 5),
           peak_gib=peak_gib())
    assert torch.isfinite(again).all() and not torch.allclose(again, fast)
    assert rel < 5e-2
    assert {p.dtype for p in t.parameters()} == {torch.float32} and not engine.is_tied(t)  # source untouched


def test_sampler_copy_of_a_compiled_training_model_is_independent():
    t = engine.prepare_for_training(fresh("small", "bitfit"), frozen_dtype=torch.bfloat16, compile="default",
                                    backend=BACKEND)
    step(t)
    net = engine.prepare_for_sampling(t.eval(), dtype=torch.float32)
    plain = copy.deepcopy(t)
    plain.engine.autocast = None
    engine._cast(plain, torch.float32)
    x0, _, ts, y = batch("small", 4)
    with torch.no_grad():
        ref = plain(x0, timestep=ts, class_labels=y).sample
        assert torch.allclose(net(x0, timestep=ts, class_labels=y).sample, ref, atol=1e-4)
    assert engine.report(t)["compile"] == "off"


def test_attention_uses_a_fused_kernel_in_bf16():
    if DRY:
        pytest.skip("kernels: CUDA only")
    found = engine.attention_backends(16, 72, 256, dtype=torch.bfloat16, device=DEV)
    report(case="sdpa", **found)
    assert found["flash"] or found["efficient"] or found["cudnn"]
