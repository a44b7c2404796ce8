"""Speed and memory at DiT-XL scale, with results equal to the plain model.

The switches are settings of defectlab's own model class (``dit.DiT``: its ``engine`` record
and its forward), set here; nothing of diffusers is patched and no process-wide flag is set.

Each switch below is exact or bounded by the precision it asks for, and has a CPU test that
says so (tests/test_engine.py). What each one buys on a GPU is measured by
``benchmarks/xl_speed.py`` (see BENCHMARKS.md), not claimed here.

- Frozen weights in bf16, trained parameters in float32, forward under autocast
  (``methods.cast_frozen``): memory of the frozen 675M parameters halves, matrix products run
  on bf16 tensor cores; Adam state exists for the trained parameters only.
- Tied conditioning (``tie_embeddings``): diffusers' DiT keeps a timestep MLP + class table in
  every block's ``norm1.emb`` (28 copies, identical in the converted DiT-XL checkpoint) and
  computes all of them, plus once more for the final layer. Tied, every block shares block 0's
  module and the embedding is computed once per forward. Exact when the copies are identical.
  For training it changes the parameters: one shared class table and timestep MLP, as in the
  original DiT, so it is opt-in and must be applied the same way when a run is restored.
- Per-block gradient checkpointing: activations of the chosen blocks are recomputed in the
  backward pass instead of being kept (identical gradients).
- ``torch.compile`` of the whole model or of the block function (blocks: ``dit.block_forward``
  compiled once, each block's weights and DiffFit scales its inputs, so a graph never runs
  with another block's parameters); CUDA graphs through the ``reduce-overhead`` modes. Only on
  CUDA unless a backend is named (tests use ``backend="eager"``): elsewhere it is skipped and
  the report says so.
- Sampling copy (``prepare_for_sampling``): LoRA merged, q/k/v fused into one matrix product,
  tied conditioning, one dtype, eval. The attention stays diffusers' SDPA processor, whose
  flash/efficient kernels take head size 72 in bf16 (``attention_backends`` checks).
- The latent cache (``dataset.LatentCache``): the VAE is frozen, so each (training image,
  augmentation view) is encoded once, with the same views as ``dataset.DefectDataset``.
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings
from torch import nn

from ..base.errors import DefectlabError
from . import dit, methods

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def as_dtype(value) -> torch.dtype | None:
    """``torch.bfloat16``, ``"bfloat16"``/``"bf16"`` …; ``None``/``""`` stay None."""
    if value is None or value == "" or isinstance(value, torch.dtype):
        return value or None
    if str(value).lower() not in _DTYPES:
        raise DefectlabError(f"unknown dtype {value!r}; use float32 or bfloat16")
    return _DTYPES[str(value).lower()]


# ----------------------------------------------------------------------------- tied conditioning
def is_tied(transformer) -> bool:
    return dit.is_tied(transformer)


def embeddings_identical(transformer) -> bool:
    """True when every block's timestep MLP and class table equal block 0's (hub DiT-XL: yes)."""
    embs = dit.embedders(transformer)
    if all(e is embs[0] for e in embs):
        return True
    ref = dict(embs[0].named_parameters())
    return all(e.class_embedder.num_classes == embs[0].class_embedder.num_classes
               and dict(e.named_parameters()).keys() == ref.keys()
               and all(torch.equal(p, ref[n]) for n, p in e.named_parameters()) for e in embs[1:])


def tie_embeddings(transformer, adopt: bool = False) -> nn.Module:
    """Share block 0's timestep/class embedder with every block; computed once per forward.

    Refuses when the copies differ (tying would change the model) unless ``adopt``: then block
    0's copy is used everywhere (benchmarks on random weights). Call after ``model.set_classes``
    and ``methods.apply``; a run trained tied must be restored tied (its checkpoint holds one
    class table)."""
    net = dit.of(transformer)
    if is_tied(net):
        return transformer
    if not adopt and not embeddings_identical(net):
        raise DefectlabError("tie_embeddings: the blocks' timestep/class embedders differ (a random or per-block "
                             "trained model); tying needs identical copies, as in the converted DiT-XL checkpoint")
    shared = dit.TiedEmbedding(dit.embedders(net)[0])
    for block in net.transformer_blocks:
        block.norm1.emb = shared
    return transformer


_tie = tie_embeddings  # prepare_*'s keyword of the same name shadows it there


def untie_embeddings(transformer) -> nn.Module:
    """Independent per-block copies again (diffusers' layout, for ``save_pretrained``/export)."""
    if not is_tied(transformer):
        return transformer
    shared = dit.embedders(transformer)[0]
    width = shared.timestep_embedder.linear_1.out_features
    for block in transformer.transformer_blocks:
        emb = CombinedTimestepLabelEmbeddings(shared.class_embedder.num_classes, width, class_dropout_prob=0.1)
        for name in ("time_proj", "timestep_embedder", "class_embedder"):
            setattr(emb, name, copy.deepcopy(getattr(shared, name)))
        block.norm1.emb = emb
    return transformer


# ----------------------------------------------------------------------------- checkpointing
def set_grad_checkpointing(transformer, blocks: bool | int) -> int:
    """Recompute the activations of the first ``blocks`` blocks in backward (True or -1 = all,
    0/False = none). Which blocks does not matter for memory: every kept block's activations
    live until backward reaches it. Returns the number of checkpointed blocks."""
    net = dit.of(transformer)
    all_blocks = net.transformer_blocks
    n = len(all_blocks) if blocks is True or (not isinstance(blocks, bool) and blocks < 0) else int(blocks)
    if n > len(all_blocks):
        raise DefectlabError(f"grad_checkpointing: the model has {len(all_blocks)} blocks, got {n}")
    net.engine.checkpointed = n
    return n


# ----------------------------------------------------------------------------- compile
def _compile(module, mode, scope: str, backend: str | None) -> str:
    if not mode:
        return "off"
    mode = "default" if mode is True else mode
    if mode not in COMPILE_MODES:
        raise DefectlabError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if scope not in ("model", "blocks"):
        raise DefectlabError(f"compile scope must be model or blocks (got {scope!r})")
    device = next(module.parameters()).device.type
    if backend is None and device != "cuda":
        return f"skipped ({device}: compile runs on CUDA only; eager)"
    kw = {"backend": backend} if backend else {"mode": mode}
    if scope == "blocks":  # one compiled block function; the block (weights, DiffFit's γ) is its input
        dit.of(module).engine.block_fn = torch.compile(dit.block_forward, dynamic=False, **kw)
    else:
        module.compile(dynamic=False, **kw)  # in place: same module, names and state dict
    return f"{backend or mode} ({scope})"


def report(model) -> dict:
    """What ``prepare_for_training`` / ``prepare_for_sampling`` switched on."""
    return dit.of(model).engine.applied


def uses_cudagraphs(model) -> bool:
    return isinstance(getattr(model, "module", model), dit.DiT) and bool(report(model).get("cudagraphs"))


def step_begin(model) -> None:
    """Call at the start of each training step: tells CUDA-graph trees a new iteration begins."""
    if uses_cudagraphs(model):
        torch.compiler.cudagraph_mark_step_begin()


def _cast(module, dtype, which=lambda p: True) -> None:
    # p.data, not module.to(dtype): diffusers warns on every .to(dtype), and trained params must stay
    for p in module.parameters():
        if which(p) and p.dtype != dtype:
            p.data = p.data.to(dtype)


# ----------------------------------------------------------------------------- training
def prepare_for_training(transformer, *, frozen_dtype=torch.bfloat16, tie_embeddings: bool = False,
                         grad_checkpointing: bool | int = False, compile: bool | str = False,
                         compile_scope: str = "blocks", backend: str | None = None) -> nn.Module:
    """In place, after ``methods.apply`` and before the optimizer is built; returns the module.

    ``frozen_dtype`` bf16: frozen parameters stored in bf16, trained ones in float32, forward
    under bf16 autocast; float32/None: unchanged. ``tie_embeddings``: see ``tie_embeddings``
    (changes what trains: opt-in). ``grad_checkpointing``: True/-1 all blocks, N the first N.
    ``compile``: False or a mode (``COMPILE_MODES``); CUDA only unless ``backend`` is given.
    ``report(transformer)`` says what was applied."""
    frozen = as_dtype(frozen_dtype) or torch.float32
    if frozen not in (torch.float32, torch.bfloat16):
        raise DefectlabError(f"frozen_dtype must be float32 or bfloat16 (got {frozen}); float16 would need loss scaling")
    e = dit.of(transformer).engine
    if tie_embeddings:
        _tie(transformer)
    if frozen != torch.float32:
        methods.cast_frozen(transformer, frozen)
        e.autocast = frozen
    n_ckpt = set_grad_checkpointing(transformer, grad_checkpointing) if grad_checkpointing else 0
    compiled = _compile(transformer, compile, compile_scope, backend)
    e.applied = {
        "frozen_dtype": str(frozen).removeprefix("torch."), "autocast": str(e.autocast).removeprefix("torch."),
        "tie_embeddings": is_tied(transformer), "grad_checkpointing": n_ckpt, "compile": compiled,
        "cudagraphs": compile in _CUDAGRAPH_MODES and not compiled.startswith(("skipped", "off"))}
    return transformer


# ----------------------------------------------------------------------------- sampling
class CudaGraphSampler(nn.Module):
    """Outside the compiled region: marks a new CUDA-graph step and copies the output out of the
    graph's static buffer (the next replay overwrites it). ``config`` is the transformer's."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    @property
    def config(self):
        return self.transformer.config

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = self.transformer(*args, **kwargs)
        return type(out)(sample=out.sample.clone()) if hasattr(out, "sample") else tuple(o.clone() for o in out)


def merge_lora(transformer) -> int:
    """Fold peft LoRA layers into their base linears and put the plain linears back (sampling)."""
    merged = 0
    for name, module in list(transformer.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent) if parent else transformer, child, module.get_base_layer())
            merged += 1
    return merged


def fuse_qkv(transformer) -> int:
    """One (3d × d) matrix product for q, k, v in every self-attention (weights copied: sampling)."""
    fused = 0
    for module in transformer.modules():
        if isinstance(module, Attention) and not module.is_cross_attention and not getattr(module, "fused_projections", False):
            with torch.no_grad():
                module.fuse_projections()
            module.set_processor(FusedAttnProcessor2_0())
            fused += 1
    return fused


def prepare_for_sampling(transformer, *, dtype=None, tie_embeddings: bool | str = "auto", fuse: bool = True,
                         compile: bool | str = False, compile_scope: str = "model", backend: str | None = None,
                         inplace: bool = False) -> nn.Module:
    """A model for sampling only: a copy (unless ``inplace``) with LoRA merged, q/k/v fused,
    conditioning tied (``"auto"``: when the copies are identical), weights in ``dtype`` (None:
    bf16 on CUDA, float32 elsewhere), eval, no gradients; the input is cast to ``dtype``.
    ``compile`` as in ``prepare_for_training``; with a CUDA-graph mode the result is wrapped in
    ``CudaGraphSampler``. Pass it to ``sampler.generate`` like the transformer itself."""
    net = transformer if inplace else copy.deepcopy(transformer)
    device = next(net.parameters()).device.type
    dtype = as_dtype(dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    net.eval().requires_grad_(False)
    n_lora = merge_lora(net)
    if tie_embeddings is True or (tie_embeddings == "auto" and embeddings_identical(net)):
        _tie(net)
    _cast(net, dtype)
    n_fused = fuse_qkv(net) if fuse else 0
    e = dit.of(net).engine  # a model prepared for training: its settings don't carry over
    e.checkpointed, e.block_fn = 0, None
    e.input_dtype, e.autocast = dtype, None  # one dtype throughout, no training autocast
    compiled = _compile(net, compile, compile_scope, backend)
    graphs = compile in _CUDAGRAPH_MODES and not compiled.startswith(("skipped", "off"))
    e.applied = {"dtype": str(dtype).removeprefix("torch."), "tie_embeddings": is_tied(net),
                 "lora_merged": n_lora, "qkv_fused": n_fused, "compile": compiled, "cudagraphs": graphs}
    return CudaGraphSampler(net).eval() if graphs else net


_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sampler(transformer, **options) -> nn.Module:
    """``prepare_for_sampling(transformer, **options)``, cached per transformer and rebuilt when
    any of its parameters changed since (in-place updates bump the tensors' version counters)."""
    state = (tuple((p.data_ptr(), p._version, p.dtype) for p in transformer.parameters()),
             tuple(sorted(options.items(), key=lambda kv: kv[0])))
    hit = _SAMPLERS.get(transformer)
    if hit is None or hit[0] != state:
        hit = (state, prepare_for_sampling(transformer, **options))
        _SAMPLERS[transformer] = hit
    return hit[1]


def attention_backends(heads: int = 16, head_dim: int = 72, tokens: int = 256, batch: int = 2,
                       dtype=torch.bfloat16, device="cuda") -> dict[str, bool]:
    """Which SDPA kernels accept DiT's attention shape in ``dtype`` on ``device`` (True = ran)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype)
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                F.scaled_dot_product_attention(q, q, q)
            out[name.lower().removesuffix("_attention")] = True
        except RuntimeError:
            out[name.lower().removesuffix("_attention")] = False
    return out


def attention_processors(model) -> list[str]:
    """Distinct attention processor classes (diffusers' SDPA: AttnProcessor2_0 / FusedAttnProcessor2_0)."""
    return sorted({type(m.processor).__name__ for m in model.modules() if isinstance(m, Attention)})
