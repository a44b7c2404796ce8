"""Which parameters train: full / bitfit / difffit / bias_norm / lora, in one switch.

Names below are diffusers' ``DiTTransformer2DModel`` names. Every block owns a class table
(``transformer_blocks.i.norm1.emb.class_embedder.embedding_table``, K rows + the null row);
all methods except ``full``'s "everything" list them explicitly because new defect classes have
to be learned whatever else is frozen.

- ``full``: every parameter.
- ``bitfit``: every bias + the class tables.
- ``difffit``: every bias + affine weights of LayerNorm/GroupNorm-type modules (DiT's LayerNorms
  are built without affine parameters, so on DiT this adds nothing; the adaLN MLPs
  ``norm1.linear`` are *not* norm layers here) + the class tables + a learned per-channel scale
  γ on the attention and MLP branch of each selected block (init 1: the model is unchanged at
  step 0). γ lives on the block (``transformer_blocks.i.difffit_gamma_attn`` / ``_ff``) and is
  applied by the model's own block forward (``dit.block_forward``).
- ``bias_norm``: the original experiments' baseline: every bias + every parameter under a module
  whose name contains ``norm`` (in diffusers that includes the adaLN MLPs ``norm1.linear`` and
  the per-block timestep embedders ``norm1.emb``) + the class tables: ~40% of DiT-XL.
- ``lora``: peft LoRA (rank r, alpha r) on q/k/v/out and both MLP linears + the class tables.
- ``vpt``: visual prompt tuning (``dit.Prompts``): N learnable tokens joined to the image tokens
  at the input (shallow) or at every block (deep), the backbone frozen; trains the prompts + the
  class tables (+ every bias with ``vpt_bias``). The null class sees the same prompts.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import DefectlabError
from . import dit

METHODS = ("full", "bitfit", "difffit", "bias_norm", "lora", "vpt")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.RMSNorm)


def _is_class_table(name: str) -> bool:
    return "class_embedder.embedding_table" in name


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def apply(transformer: nn.Module, method: str, lora_rank: int = 8, difffit_blocks: int = 0,
          verbose: bool = True, vpt_tokens: int = 8, vpt_depth: str = "shallow", vpt_bias: bool = False) -> nn.Module:
    """Set ``requires_grad`` for ``method`` (adding DiffFit scales or LoRA layers first) and return
    the module to train (the transformer itself, modified in place). ``difffit_blocks``: γ in the
    first N blocks (0 = all). Call once per freshly loaded model, after ``model.set_classes``."""
    if method not in METHODS:
        raise DefectlabError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    done = getattr(transformer, "defectlab_method", None)
    if done is not None:
        if done == (method, lora_rank, difffit_blocks) + ((vpt_tokens, vpt_depth, vpt_bias) if method == "vpt" else ()):
            return transformer
        raise DefectlabError(f"method {done[0]!r} was already applied to this model; load a fresh base")
    if method == "difffit":
        _add_difffit_scales(transformer, difffit_blocks)
    if method == "vpt":
        dit.of(transformer).add_prompts(vpt_tokens, vpt_depth)
    if method == "lora":
        if lora_rank < 1:
            raise DefectlabError(f"lora_rank must be >= 1, got {lora_rank}")
        from peft import LoraConfig, inject_adapter_in_model

        # in place (no PeftModel wrapper): the model is still called model(x, t, y), and LoRA
        # parameter names are deterministic (…to_q.lora_A.default.weight) across processes
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0,
                                           target_modules=LORA_TARGETS), transformer)
    norm_params = {f"{m}.{p}" if m else p for m, mod in transformer.named_modules() if isinstance(mod, _NORMS)
                   for p, _ in mod.named_parameters(recurse=False)}
    for name, param in transformer.named_parameters():
        param.requires_grad_(_trains(method, name, norm_params) or (method == "vpt" and vpt_bias and _is_bias(name)))
    transformer.defectlab_method = (method, lora_rank, difffit_blocks) + (
        (vpt_tokens, vpt_depth, vpt_bias) if method == "vpt" else ())
    if verbose:
        print(summary(transformer))
    return transformer


def _trains(method: str, name: str, norm_params: set[str]) -> bool:
    if method == "full":
        return True
    if _is_class_table(name):
        return True
    if method == "lora":
        return ".lora_A." in name or ".lora_B." in name
    if method == "vpt":
        return name.startswith("prompts.")
    if method == "bitfit":
        return _is_bias(name)
    if method == "difffit":
        return _is_bias(name) or name in norm_params or "difffit_gamma" in name
    return _is_bias(name) or any("norm" in part for part in name.split(".")[:-1])  # bias_norm


def _add_difffit_scales(transformer: nn.Module, blocks: int) -> None:
    chosen = dit.of(transformer).transformer_blocks  # dit.block_forward applies γ
    if blocks < 0 or blocks > len(chosen):
        raise DefectlabError(f"difffit_blocks must be 0 (all) .. {len(chosen)}, got {blocks}")
    for block in list(chosen)[: blocks or None]:
        ref = block.norm1.linear.weight
        for name in dit.DIFFFIT:
            block.register_parameter(name, nn.Parameter(torch.ones(ref.shape[1], device=ref.device, dtype=ref.dtype)))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the tensors with ``requires_grad``, by parameter name (detached, not copied)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a ``trainable_state`` into a model prepared the same way (same base, classes, method)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise DefectlabError(f"trained state does not fit this model (same method/classes?): "
                             f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    for name, p in params.items():
        if p.shape != state[name].shape:
            raise DefectlabError(f"trained state: {name} has shape {tuple(state[name].shape)}, "
                                 f"model has {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def trainable_table(model: nn.Module) -> str:
    """Markdown table: trainable / total parameters by kind (what a fine-tuning method touches)."""
    def kind(name: str) -> str:
        if "class_embedder.embedding_table" in name:
            return "class tables"
        if "difffit_gamma" in name:
            return "DiffFit scales γ"
        if ".lora_" in name:
            return "LoRA adapters"
        if name.endswith(".bias"):
            return "biases"
        if "norm" in name:
            return "adaLN / norm weights"
        return "other weights"

    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        c = counts.setdefault(kind(name), [0, 0])
        c[0] += p.numel() if p.requires_grad else 0
        c[1] += p.numel()
    total = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
    lines = ["| parameters | trainable | total | share trained |", "|---|---:|---:|---:|"]
    for k, (t, n) in [*sorted(counts.items()), ("**all**", total)]:
        lines.append(f"| {k} | {t:,} | {n:,} | {100 * t / max(n, 1):.1f}% |")
    return "\n".join(lines)


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def summary(model: nn.Module) -> str:
    """``"difffit: 12,345 / 1,234,567 trainable (1.0%)"``."""
    trainable, total = count(model)
    method = getattr(getattr(model, "module", model), "defectlab_method", ("custom",))[0]  # DDP-wrapped too
    return f"{method}: {trainable:,} / {total:,} trainable ({100 * trainable / max(total, 1):.1f}%)"


def cast_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Frozen parameters to ``dtype`` (memory at XL scale), trained ones kept in float32 (their
    updates are tiny relative to the weights). Run the forward under ``torch.autocast`` so layers
    that mix a frozen bf16 weight with a trained fp32 bias get one dtype."""
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    return model


# ----------------------------------------------------------------------------- class tables
def _label_embedders(transformer) -> list[nn.Module]:
    return [b.norm1.emb.class_embedder for b in transformer.transformer_blocks]


def num_classes(transformer) -> int:
    """K, the number of real classes; the null (unconditional) row is index K."""
    return _label_embedders(transformer)[0].num_classes


def set_classes(transformer, k: int, init: str | int | list[int] | list[list[int]] = "random",
                seed: int = 0) -> None:
    """Replace the class table in every block with K new rows + the old null row.

    ``init``: a base class id (or list of K ids, or a 1-list) to copy, K lists of ids whose rows
    are averaged (the mean of each defect class's top-k), ``"mean"`` of the base's
    class rows, or ``"random"`` N(0, 0.02) (the same rows in every block, as the original DiT has
    one table). Call before ``methods.apply`` (it replaces the table parameters). Each block's
    LabelEmbedding keeps its ``dropout_prob`` and now drops to the new null index K; note that
    diffusers draws that dropout independently per block (train.py zeroes it and drops labels once
    per sample itself)."""
    old_k = num_classes(transformer)
    if k < 1:
        raise DefectlabError(f"number of classes must be >= 1, got {k}")
    ids = groups = None
    if isinstance(init, (list, tuple)) and init and all(isinstance(g, (list, tuple)) for g in init):
        groups = [[operator.index(i) for i in g] for g in init]
        if len(groups) != k or not all(g and all(0 <= i < old_k for i in g) for g in groups):
            raise DefectlabError(f"class init needs {k} non-empty lists of base class ids in [0, {old_k}); got {init!r}")
        init = "groups"
    if groups is None and not isinstance(init, str):
        try:  # ints of any kind (numpy, tensors) and any sequence of them
            seq = hasattr(init, "__len__") and getattr(init, "ndim", 1) != 0
            ids = [operator.index(i) for i in (init if seq else [init])]
        except TypeError:
            pass
        ids = ids * k if ids is not None and len(ids) == 1 else ids
    if not (init in ("mean", "random", "groups") if isinstance(init, str)
            else ids is not None and len(ids) == k and all(0 <= i < old_k for i in ids)):
        raise DefectlabError(f"class init must be 'mean', 'random', or {k} (or 1) base class ids in "
                             f"[0, {old_k}); got {init!r}")
    table = _label_embedders(transformer)[0].embedding_table.weight
    noise = torch.randn(k, table.shape[1], generator=torch.Generator().manual_seed(seed)) * 0.02
    for emb in _label_embedders(transformer):
        w = emb.embedding_table.weight.detach()
        if w.shape[0] != old_k + 1:
            raise DefectlabError("class table has no null row: classifier-free guidance needs one")
        rows = (w[ids] if ids is not None else noise.to(w) if init == "random"
                else torch.stack([w[g].mean(0) for g in groups]) if groups is not None
                else w[:old_k].mean(0, keepdim=True).expand(k, -1))
        new = nn.Embedding(k + 1, w.shape[1], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(torch.cat([rows, w[old_k:]]))
        new.weight.requires_grad_(emb.embedding_table.weight.requires_grad)
        emb.embedding_table, emb.num_classes = new, k
    for block in transformer.transformer_blocks:
        block.num_embeds_ada_norm = k
    transformer.register_to_config(num_embeds_ada_norm=k)  # so save/from_pretrained rebuild K+1 rows


# ----------------------------------------------------------------------------- the mask channel (masks.py's condition mode)
class MaskPatchEmbed(nn.Module):
    """``conv(x[:, :C]) + mask_conv(x[:, C:])`` with mask_conv zero at init and bias-free (the base
    bias already shifts every patch). Holds the base conv's own parameters, so their keys stay
    ``pos_embed.proj.weight/bias``. ``config.in_channels`` stays C on purpose: sample/model read it
    as the latent channels; ``restore.restore`` re-adds the channel through ``restore.build``."""

    def __init__(self, conv: nn.Conv2d, extra: int = 1):
        super().__init__()
        self.weight, self.bias, self.channels = conv.weight, conv.bias, conv.in_channels
        self.stride, self.padding = conv.stride, conv.padding
        self.mask_weight = nn.Parameter(torch.zeros(conv.out_channels, extra, *conv.kernel_size,
                                                    device=conv.weight.device, dtype=conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the slice of a concatenated input is a strided view: a contiguous copy gives the base
        # conv the same memory layout (same kernels, same bits) as without the mask
        out = F.conv2d(x[:, :self.channels].contiguous(), self.weight, self.bias, self.stride, self.padding)
        if x.shape[1] == self.channels:  # no mask passed: the same as an all-zero mask
            return out
        return out + F.conv2d(x[:, self.channels:].contiguous(), self.mask_weight, None, self.stride, self.padding)


def add_mask_channel(transformer: nn.Module, extra: int = 1) -> nn.Module:
    """Give a (plain, not yet ``methods.apply``-ed) DiT ``extra`` zero-initialised input channels."""
    if not isinstance(transformer.pos_embed.proj, MaskPatchEmbed):
        transformer.pos_embed.proj = MaskPatchEmbed(transformer.pos_embed.proj, extra)
    return transformer


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.mask_weight for m in model.modules() if isinstance(m, MaskPatchEmbed)]


def has_mask_channel(model: nn.Module) -> bool:
    return bool(mask_parameters(model))
