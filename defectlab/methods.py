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
  applied by forward hooks on ``attn1`` / ``ff``, so state-dict keys are stable.
- ``bias_norm``: the original experiments' baseline: every bias + every parameter under a module
  whose name contains ``norm`` (in diffusers that includes the adaLN MLPs ``norm1.linear`` and
  the per-block timestep embedders ``norm1.emb``) + the class tables: ~40% of DiT-XL.
- ``lora``: peft LoRA (rank r, alpha r) on q/k/v/out and both MLP linears + the class tables.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .errors import DefectlabError

METHODS = ("full", "bitfit", "difffit", "bias_norm", "lora")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.RMSNorm)


def _is_class_table(name: str) -> bool:
    return "class_embedder.embedding_table" in name


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def apply(transformer: nn.Module, method: str, lora_rank: int = 8, difffit_blocks: int = 0,
          verbose: bool = True) -> nn.Module:
    """Set ``requires_grad`` for ``method`` (adding DiffFit scales or LoRA layers first) and return
    the module to train (the transformer itself, modified in place). ``difffit_blocks``: γ in the
    first N blocks (0 = all). Call once per freshly loaded model, after ``model.set_classes``."""
    if method not in METHODS:
        raise DefectlabError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    done = getattr(transformer, "defectlab_method", None)
    if done is not None:
        if done == (method, lora_rank, difffit_blocks):
            return transformer
        raise DefectlabError(f"method {done[0]!r} was already applied to this model; load a fresh base")
    if method == "difffit":
        _add_difffit_scales(transformer, difffit_blocks)
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
        param.requires_grad_(_trains(method, name, norm_params))
    transformer.defectlab_method = (method, lora_rank, difffit_blocks)
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
    if method == "bitfit":
        return _is_bias(name)
    if method == "difffit":
        return _is_bias(name) or name in norm_params or "difffit_gamma" in name
    return _is_bias(name) or any("norm" in part for part in name.split(".")[:-1])  # bias_norm


def _add_difffit_scales(transformer: nn.Module, blocks: int) -> None:
    chosen = transformer.transformer_blocks
    if blocks < 0 or blocks > len(chosen):
        raise DefectlabError(f"difffit_blocks must be 0 (all) .. {len(chosen)}, got {blocks}")
    for block in list(chosen)[: blocks or None]:
        ref = block.norm1.linear.weight
        for branch, module in (("attn", block.attn1), ("ff", block.ff)):
            name = f"difffit_gamma_{branch}"
            block.register_parameter(name, nn.Parameter(torch.ones(ref.shape[1], device=ref.device, dtype=ref.dtype)))
            module.register_forward_hook(partial(_scale_output, block, name))


def _scale_output(block: nn.Module, name: str, module, inputs, output):
    gamma = getattr(block, name)
    return output * gamma.to(output.dtype)  # γ·branch, before adaLN's gate (gate·γ·attn(x))


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
