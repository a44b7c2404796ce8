"""DiT-XL/2-256 speed and memory: defectlab's engine and stock diffusers, side by side, one run.

Random weights (a step costs the same whatever the values), the DiT-XL/2-256 architecture and
its VAE. Stock cases are the reference's own functions (``--stock`` path to
``stock_dit_baseline.py``; without it, the verbatim copy ``STOCK_SOURCE`` below, which a test
holds equal to the reference). defectlab cases go through ``methods.apply``,
``engine.prepare_for_training`` / ``engine.prepare_for_sampling`` and ``sampler.generate``.

    python benchmarks/xl_speed.py                      # everything, CUDA
    python benchmarks/xl_speed.py --only sample        # sampling part (+ its stock cases)
    python benchmarks/xl_speed.py --quick              # smoke run: few steps, few cases
    python benchmarks/xl_speed.py --device cpu --tiny --quick   # same code paths, tiny model, CPU

One JSON line per case, then a markdown table. See BENCHMARKS.md for what each number means.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

GF_FWD = 237.2e9            # DiT-XL/2 forward at 256 px per image: 118.6 G multiply-adds (DiT paper) x 2
PEAKS = {"790": 790e12,      # H100 bf16 practical peak used by /work/shared/bench/README.md (targets use this)
         "989": 989e12}      # H100 SXM bf16 dense, nominal datasheet
# forwards' worth of matrix work per training image: forward + input gradients (+ weight gradients
# for full); LoRA/bias/norm/γ weight gradients are vectors or rank-r: < 0.5% and not counted;
# recomputation under gradient checkpointing is not model work and not counted either
TRAIN_FORWARDS = {"full": 3, "bitfit": 2, "difffit": 2, "bias_norm": 2, "lora": 2}
STOCK_MODE = {"full": "full", "bitfit": "bias_only", "difffit": "bias_only", "bias_norm": "bias_norm",
              "lora": "bias_only"}   # the stock selection each method is compared with
DEFAULT_STOCK = ROOT.parent / "shared" / "bench" / "stock_dit_baseline.py"

XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)          # = stock xl()
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            sample_size=16, patch_size=2, num_embeds_ada_norm=1000)         # latent 16x16, 64 tokens
# (the stock training case feeds its hard-coded 32x32 latents: PatchEmbed recomputes the positions)
VAE_XL = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, latent_channels=4, sample_size=256, scaling_factor=0.18215)  # = stock vae()
VAE_TINY = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                up_block_types=["UpDecoderBlock2D"], block_out_channels=[8], layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)

# training variants: what prepare_for_training gets (frozen weights bf16 in all of them)
TRAIN_VARIANTS = {
    "eager": dict(grad_checkpointing=False, compile=False),
    "compiled": dict(grad_checkpointing=False, compile="default"),
    "lowmem": dict(grad_checkpointing=True, compile="default"),
    "lowmem-graphs": dict(grad_checkpointing=True, compile="reduce-overhead"),
}
SAMPLE_VARIANTS = {
    "bf16": dict(compile=False),
    "compiled": dict(compile="default"),
    "graphs": dict(compile="reduce-overhead"),
}

STOCK_SOURCE = r'''"""Baseline: stock diffusers DiT-XL/2-256 as a user would run it (random weights,
same architecture and cost as facebook/DiT-XL-2-256). Measures sampling throughput
and fine-tuning step memory/throughput on one GPU. Prints one JSON line per case."""
import json, time, sys, os
import torch
from diffusers import DiTTransformer2DModel, AutoencoderKL, DiTPipeline, DDIMScheduler, DPMSolverMultistepScheduler

dev = "cuda"
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

def xl():
    return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)

def vae():
    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                         sample_size=256, scaling_factor=0.18215)

def emit(**kw):
    print(json.dumps(kw), flush=True)

def sync():
    torch.cuda.synchronize()

def bench_sampling(dtype, batch, steps, guidance, sched="ddim"):
    t = xl().to(dev, dtype)
    v = vae().to(dev, dtype)
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False) \
        if sched == "ddim" else DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    pipe = DiTPipeline(transformer=t, vae=v, scheduler=s)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 1000 for i in range(batch)]
    pipe(class_labels=labels[:2], num_inference_steps=2, guidance_scale=guidance, output_type="np")
    sync(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    sync(); dt = time.perf_counter() - t0
    emit(case="stock_sampling", dtype=str(dtype), batch=batch, steps=steps, guidance=guidance, sched=sched,
         seconds=round(dt, 3), images_per_s=round(batch / dt, 3),
         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del pipe, t, v
    torch.cuda.empty_cache()

def bench_train(mode, batch, amp, steps=12):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    t = xl().to(dev)
    t.train()
    if mode == "full":
        params = list(t.parameters())
    else:  # bias_norm: biases + everything under a "norm" module (adaLN MLPs, class table);
        # bias_only: biases + class table (BitFit-style)
        params = []
        for n, p in t.named_parameters():
            keep = n.endswith("bias") or "class_embedder" in n or (mode == "bias_norm" and "norm" in n)
            p.requires_grad_(keep)
            if keep:
                params.append(p)
    n_tr = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in t.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randn(batch, 4, 32, 32, device=dev)
    ts = torch.randint(0, 1000, (batch,), device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = t(x, timestep=ts, class_labels=y).sample
            loss = (out[:, :4].float() - x).pow(2).mean()
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    try:
        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(); dt = (time.perf_counter() - t0) / steps
        emit(case="stock_train_step", mode=mode, batch=batch, amp=amp, trainable=n_tr, total=n_all,
             step_s=round(dt, 4), images_per_s=round(batch / dt, 1),
             peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    except torch.OutOfMemoryError as e:
        emit(case="stock_train_step", mode=mode, batch=batch, amp=amp, error="OOM")
    del t, opt
    torch.cuda.empty_cache()

if __name__ == "__main__":
    emit(device=torch.cuda.get_device_name(), torch=torch.__version__)
    for mode in ("full", "bias_norm", "bias_only"):
        for amp in (False, True):
            for b in (8, 32):
                bench_train(mode, b, amp)
    bench_sampling(torch.float32, 16, 50, 4.0)
    bench_sampling(torch.float16, 16, 50, 4.0)
    bench_sampling(torch.float16, 64, 50, 4.0)
    bench_sampling(torch.float16, 64, 250, 4.0)
'''

OUT: list[dict] = []


def emit(**kw) -> dict:
    OUT.append(kw)
    print(json.dumps(kw), flush=True)
    return kw


# ----------------------------------------------------------------------------- stock
class _CpuCuda:
    """The stock code's torch.cuda calls on a machine without CUDA (--device cpu)."""
    synchronize = reset_peak_memory_stats = empty_cache = staticmethod(lambda *a, **k: None)
    max_memory_allocated = staticmethod(lambda *a, **k: 0)


class _CpuTorch:
    """``torch`` for the stock module in --device cpu runs: cuda calls no-op, autocast on the CPU."""
    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type, **kw):
        return torch.autocast("cpu", **kw)


def load_stock(path: str | None, device: str, tiny: bool):
    """The reference module (from ``path``) or the inline copy; on CPU/tiny its environment
    (device, model builders, cuda calls) is swapped, never its code."""
    if path and Path(path).is_file():
        spec = importlib.util.spec_from_file_location("stock_dit_baseline", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        source = str(Path(path).resolve())
    else:
        mod = types.ModuleType("stock_dit_baseline")
        exec(compile(STOCK_SOURCE, "stock_dit_baseline (inline copy)", "exec"), mod.__dict__)
        source = "inline copy"
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    if tiny:
        mod.xl = lambda: DiTTransformer2DModel(**TINY)
        mod.vae = lambda: AutoencoderKL(**VAE_TINY)
    if device != "cuda":
        mod.dev, mod.torch, mod.sync = device, _CpuTorch(), (lambda: None)
    return mod, source


def run_stock(fn, *args, source: str, device: str, **kw) -> list[dict]:
    """Run one stock case; its printed JSON lines are re-emitted with where they came from."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kw)
    recs = [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]
    for rec in recs:
        if device != "cuda":
            rec["peak_gib"] = None  # no CUDA memory counter
        emit(**rec, source=source)
    return recs


# ----------------------------------------------------------------------------- defectlab
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fresh_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def hub_like(t):
    """Random weights, but every block's timestep/class embedder equal to block 0's, as in the
    converted facebook/DiT-XL-2-256 checkpoint (so tying is exact, not adopted)."""
    src = t.transformer_blocks[0].norm1.emb.state_dict()
    for block in t.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(src)
    return t


def counted_flops(cfg: dict) -> float:
    """FLOPs of one forward per image, counted by torch's FlopCounterMode on the meta device."""
    from diffusers import DiTTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        t = DiTTransformer2DModel(**cfg)
        x = torch.randn(1, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
        ts, y = torch.tensor([500]), torch.tensor([1])
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        t(x, timestep=ts, class_labels=y)
    return float(fc.get_total_flops())


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float | None:
    """The device's bf16 matrix-product rate measured here (n³ products, mean of ``reps`` after 3
    warm-ups): the peak that a target stated for an H100 (790) is scaled by on another device."""
    if device != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, 1)


def mfu(images_per_s: float, forwards_per_image: float, device: str, gf: float) -> dict:
    if device != "cuda":
        return {"mfu_790": None, "mfu_989": None}  # a CPU figure against an H100 peak means nothing
    tflops = images_per_s * forwards_per_image * gf
    return {"model_tflops": round(tflops / 1e12, 1), **{f"mfu_{k}": round(tflops / v, 3) for k, v in PEAKS.items()}}


def engine_train(args, method: str, batch: int, variant: str, gf: float) -> dict:
    from defectlab.core import dit, engine, methods, model
    from defectlab.core.diffusion import Objective

    dev, cfg = args.device, (TINY if args.tiny else XL)
    torch.compiler.reset()  # each case compiles afresh: no recompile limit reached, no graph of another case
    fresh_memory(dev)
    with torch.device(dev):
        t = hub_like(dit.DiT(**cfg))
    for block in t.transformer_blocks:  # as train.build: label dropout is drawn once, in the loop
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    t.train()
    n_cls = args.classes or 1000
    if args.classes:  # a real fine-tune: K defect classes + the null row (stock keeps all 1000 rows)
        methods.set_classes(t, args.classes, "random")
    methods.apply(t, method, verbose=False)
    engine.prepare_for_training(t, frozen_dtype=torch.bfloat16, tie_embeddings=args.tie_train,
                                compile_scope="blocks", **TRAIN_VARIANTS[variant])
    trainable = [p for p in t.parameters() if p.requires_grad]
    n_tr, n_all = methods.count(t)
    fresh_memory(dev)  # the peak below starts from the prepared model (bf16 frozen, fp32 trained)
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=dev == "cuda")
    objective = Objective(model.dit_schedule(True), dev)
    c, s = cfg["in_channels"], cfg["sample_size"]
    x0, noise = torch.randn(batch, c, s, s, device=dev), torch.randn(batch, c, s, s, device=dev)
    ts = torch.randint(0, 1000, (batch,), device=dev)
    y = torch.randint(0, n_cls, (batch,), device=dev)

    def step():
        engine.step_begin(t)
        xt = objective.add_noise(x0, noise, ts)
        out = t(xt, timestep=ts, class_labels=y).sample
        mse, vb = objective.loss(out, x0, xt, noise, ts)
        (mse + vb).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warmup, steps = (1, 2) if args.quick else (4, 12)  # warm-up holds compilation and graph capture
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(dev)
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t1) / steps
    ips = batch / dt
    rec = dict(case="defectlab_train_step", method=method, batch=batch, variant=variant, classes=n_cls,
               engine=engine.report(t), trainable=n_tr, total=n_all, warmup_s=round(t1 - t0, 1),
               step_s=round(dt, 4), images_per_s=round(ips, 1), peak_gib=peak_gib(dev),
               **mfu(ips, TRAIN_FORWARDS[method], dev, gf))
    del t, opt
    fresh_memory(dev)
    return emit(**rec)


def engine_sampling(args, batch: int, steps_list: list[int], variant: str, gf: float) -> list[dict]:
    from diffusers import AutoencoderKL

    from defectlab.core import dit, engine, model, sampler

    dev = args.device
    torch.compiler.reset()
    fresh_memory(dev)
    with torch.device(dev):
        t = hub_like(dit.DiT(**(TINY if args.tiny else XL))).eval()
        codec = model.VAECodec(AutoencoderKL(**(VAE_TINY if args.tiny else VAE_XL)))
    codec.to(dev, torch.bfloat16)
    net = engine.prepare_for_sampling(t, dtype=torch.bfloat16, inplace=True, compile_scope=args.sample_scope,
                                      **SAMPLE_VARIANTS[variant])
    labels = [i % 1000 for i in range(batch)]
    gens = lambda: sampler.generators(0, "bench", range(batch))  # noqa: E731
    run = lambda n: sampler.generate(net, codec, labels, gens(), steps=n, guidance=4.0, scheduler="ddim",  # noqa: E731
                                    batch_size=batch, progress=False)
    t0 = time.perf_counter()
    run(3)  # full batch: compilation and graph capture happen for the shapes that are timed
    sync(dev)
    warm = time.perf_counter() - t0
    recs = []
    for n in steps_list:
        fresh_memory(dev)
        t1 = time.perf_counter()
        images = run(n)
        sync(dev)
        dt = time.perf_counter() - t1
        ips = batch / dt
        recs.append(emit(case="defectlab_sampling", variant=variant, batch=batch, steps=n, guidance=4.0,
                         sched="ddim", engine=engine.report(net),
                         warmup_s=round(warm, 1), seconds=round(dt, 3), images_per_s=round(ips, 3),
                         finite=bool(torch.isfinite(images).all()), peak_gib=peak_gib(dev),
                         **mfu(ips, 2 * n, dev, gf)))
    del t, net, codec
    fresh_memory(dev)
    return recs


def guarded(args, fn, *a, **kw):
    """A failing case is reported and the run goes on (a GPU hour yields every figure it can);
    ``--strict`` re-raises (tests)."""
    try:
        return fn(*a, **kw)
    except Exception as err:  # noqa: BLE001 - reported, not hidden
        if args.strict:
            raise
        fresh_memory(args.device)
        name = "OOM" if isinstance(err, torch.OutOfMemoryError) else f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        emit(case=f"defectlab_{fn.__name__.removeprefix('engine_')}", args=[str(v) for v in a], error=name)
        return None


# ----------------------------------------------------------------------------- report
def table(records: list[dict]) -> str:
    """Markdown: each defectlab case with its stock baseline from the same run."""
    train_stock = {(r["mode"], r["batch"], r["amp"]): r for r in records
                   if r.get("case") == "stock_train_step" and "images_per_s" in r}
    samp_stock = {(r["batch"], r["steps"]): r for r in records
                  if r.get("case") == "stock_sampling" and r.get("dtype") == "torch.float16"}
    fmt = lambda v, nd=1: "–" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = ["| case | defectlab | img/s | stock img/s | × stock | stock (amp) img/s | MFU vs 790 | MFU vs 989 "
            "| peak GiB | stock peak GiB |", "|" + "---|" * 10]
    for r in records:
        if r.get("case") == "defectlab_train_step" and "images_per_s" in r:
            base = train_stock.get((STOCK_MODE[r["method"]], r["batch"], False), {})
            amp = train_stock.get((STOCK_MODE[r["method"]], r["batch"], True), {})
            name = f"train {r['method']} b{r['batch']}"
            stock_ips, stock_peak = base.get("images_per_s"), base.get("peak_gib")
        elif r.get("case") == "defectlab_sampling" and "images_per_s" in r:
            base, amp = samp_stock.get((r["batch"], r["steps"]), {}), {}
            name = f"sample {r['steps']} steps b{r['batch']}"
            stock_ips, stock_peak = base.get("images_per_s"), base.get("peak_gib")
        else:
            continue
        ratio = r["images_per_s"] / stock_ips if stock_ips else None
        rows.append(f"| {name} | {r['variant']} | {fmt(r['images_per_s'], 2)} | {fmt(stock_ips, 2)} | {fmt(ratio, 2)} "
                    f"| {fmt(amp.get('images_per_s'), 2)} | {fmt(r.get('mfu_790'), 3)} | {fmt(r.get('mfu_989'), 3)} "
                    f"| {fmt(r.get('peak_gib'), 2)} | {fmt(stock_peak, 2)} |")
    rows.append("\nimg/s and × stock: training vs stock fp32 (amp=False) with the same parameter selection, sampling vs "
                "stock DiTPipeline fp16; both DDIM, CFG 4.0, VAE decode included. MFU = model FLOPs / peak: 237.2 GFLOP "
                "per forward, guided sampling 2 forwards per step, training 2 forwards per image (3 for full; "
                "recomputation not counted); 790 TFLOP/s = practical H100 bf16 peak of the reference README (the "
                "targets use it), 989 = nominal dense bf16.")
    return "\n".join(rows)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (measurements) or cpu (smoke runs only)")
    p.add_argument("--tiny", action="store_true", help="a tiny DiT + VAE instead of DiT-XL/2-256 (code paths only)")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, bitfit/difffit at batch 8, 1 variant each")
    p.add_argument("--only", choices=("train", "sample"), help="one part (each part runs its own stock cases)")
    p.add_argument("--methods", default="full,bitfit,difffit,bias_norm,lora")
    p.add_argument("--batches", default="8,32", help="training batch sizes")
    p.add_argument("--train-variants", default="", help=f"comma list of {','.join(TRAIN_VARIANTS)} "
                   "('' = eager+compiled at every batch, lowmem+lowmem-graphs at batch 8)")
    p.add_argument("--sample-variants", default="bf16,compiled,graphs", help=",".join(SAMPLE_VARIANTS))
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--sample-scope", choices=("model", "blocks"), default="model",
                   help="what torch.compile compiles for sampling: the whole model (one graph, longer compile) "
                   "or each block (one graph shared by the blocks, shorter compile)")
    p.add_argument("--sample-steps", default="250,50")
    p.add_argument("--tie-train", action="store_true", help="tie the conditioning embedders in training too "
                   "(changes what trains; sampling ties whenever the copies are identical)")
    p.add_argument("--classes", type=int, default=0, help="training: K class rows as after model.set_classes "
                   "(0 = the 1000-row ImageNet table, as stock trains)")
    p.add_argument("--stock", default=str(DEFAULT_STOCK), help="path of the reference stock_dit_baseline.py "
                   "(missing: the inline copy)")
    p.add_argument("--no-stock", action="store_true", help="skip the stock cases")
    p.add_argument("--strict", action="store_true", help="stop at the first failing case")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu --tiny for a smoke run (no performance figures)")
    if args.quick:
        args.methods = "bitfit,difffit" if args.methods == p.get_default("methods") else args.methods
        args.batches = "8" if args.batches == p.get_default("batches") else args.batches
        args.train_variants = args.train_variants or "compiled"
        args.sample_variants = "compiled" if args.sample_variants == p.get_default("sample_variants") else args.sample_variants
        args.sample_batch = 8 if args.sample_batch == 64 else args.sample_batch
        args.sample_steps = "5" if args.sample_steps == p.get_default("sample_steps") else args.sample_steps
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    OUT.clear()
    import diffusers

    from defectlab.core import engine

    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = True  # as the stock script sets at import (fp32 parts)
    torch.backends.cudnn.allow_tf32 = True
    counted = counted_flops(TINY if args.tiny else XL)
    gf = counted if args.tiny else GF_FWD
    emit(case="environment", device=torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
         torch=torch.__version__, diffusers=diffusers.__version__, model="tiny" if args.tiny else "DiT-XL/2-256",
         flop_per_forward_nominal=None if args.tiny else GF_FWD, flop_per_forward_counted=counted,
         sdpa_bf16=engine.attention_backends(*((2, 16, 64) if args.tiny else (16, 72, 256)), dtype=torch.bfloat16, device=dev),
         sdpa_fp32=engine.attention_backends(*((2, 16, 64) if args.tiny else (16, 72, 256)), dtype=torch.float32, device=dev),
         bf16_matmul_tflops_measured=matmul_tflops(dev), performance_figures=dev == "cuda" and not args.tiny)
    stock, source = (None, None) if args.no_stock else load_stock(args.stock, dev, args.tiny)
    methods_ = [m for m in args.methods.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    steps_list = [int(s) for s in args.sample_steps.split(",") if s]
    stock_steps = 2 if args.quick else 12

    if args.only in (None, "train"):
        if stock is not None:
            for mode in dict.fromkeys(STOCK_MODE[m] for m in methods_):
                for amp in (False, True):
                    for b in batches:
                        run_stock(stock.bench_train, mode, b, amp, steps=stock_steps, source=source, device=dev)
        for b in batches:
            variants = ([v for v in args.train_variants.split(",") if v] if args.train_variants
                        else ["eager", "compiled"] + (["lowmem", "lowmem-graphs"] if b <= 8 else []))
            for m in methods_:
                for v in variants:
                    guarded(args, engine_train, args, m, b, v, gf)
    if args.only in (None, "sample"):
        if stock is not None:
            for n in steps_list:
                run_stock(stock.bench_sampling, torch.float16, args.sample_batch, n, 4.0, source=source, device=dev)
        for v in [v for v in args.sample_variants.split(",") if v]:
            guarded(args, engine_sampling, args, args.sample_batch, steps_list, v, gf)

    print("\n" + ("Smoke run on the CPU with a tiny model: code paths only, NOT performance figures.\n\n"
                  if dev != "cuda" or args.tiny else "") + table(OUT), flush=True)
    return OUT


if __name__ == "__main__":
    main()
