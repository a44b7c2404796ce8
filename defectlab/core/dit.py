"""defectlab's DiT: diffusers' ``DiTTransformer2DModel`` (same config, weights, parameter names and
outputs) with what training and sampling add held by the model itself, instead of patched in:

- tied conditioning: every block shares block 0's timestep + class embedder (``TiedEmbedding``),
  and the forward computes the conditioning vector once and hands it to each block;
- per-block activation checkpointing (the first ``engine.checkpointed`` blocks);
- DiffFit's learned per-block scales (``difffit_gamma_attn`` / ``difffit_gamma_ff`` on a block,
  γ·branch before adaLN's gate), when ``methods.apply`` added them;
- visual prompt tokens (``prompts``: learnable tokens joined to the image tokens at the input,
  or fresh ones at every block; VPT, Jia et al. 2022), when ``methods.apply`` added them;
- autocast / input dtype for frozen bf16 weights and one-dtype sampling copies, and a compiled
  block function (``engine.block_fn``).

The forward is DiT's (adaLN-Zero blocks, final adaptive layer, unpatchify) written here once,
so it does not depend on diffusers' private call shapes; with none of the above switched on it
equals ``DiTTransformer2DModel.forward`` exactly (tests/test_engine.py). Every model defectlab
loads goes through ``DiT.adopt`` (``model._base``); exports are written as plain
``DiTTransformer2DModel`` folders (``_class_name`` stays diffusers'), so ``DiTPipeline`` loads them.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..base.errors import DefectlabError

DIFFFIT = ("difffit_gamma_attn", "difffit_gamma_ff")  # per-block parameter names of DiffFit's scales


@dataclass
class Engine:
    """How a DiT computes (not what): set by ``engine.prepare_for_training`` / ``prepare_for_sampling``."""
    autocast: torch.dtype | None = None      # forward under autocast to this dtype (frozen bf16 weights)
    input_dtype: torch.dtype | None = None   # cast the input first (a one-dtype sampling copy)
    checkpointed: int = 0                    # the first N blocks recompute their activations in backward
    block_fn: Callable | None = None         # a compiled ``block_forward`` (compile scope "blocks")
    applied: dict = field(default_factory=dict)  # what was switched on, for reports


class TiedEmbedding(nn.Module):
    """Block 0's ``CombinedTimestepLabelEmbeddings``, shared by every block, with the same child
    names (``time_proj``, ``timestep_embedder``, ``class_embedder``) so parameter names, the
    method rules and ``methods.num_classes`` are unchanged."""

    def __init__(self, emb: nn.Module):
        super().__init__()
        self.time_proj, self.timestep_embedder, self.class_embedder = (
            emb.time_proj, emb.timestep_embedder, emb.class_embedder)

    def forward(self, timestep, class_labels, hidden_dtype=None) -> torch.Tensor:
        return CombinedTimestepLabelEmbeddings.forward(self, timestep, class_labels, hidden_dtype=hidden_dtype)


def embedders(model) -> list[nn.Module]:
    return [b.norm1.emb for b in model.transformer_blocks]


def is_tied(model) -> bool:
    return isinstance(embedders(model)[0], TiedEmbedding)


def block_forward(block: nn.Module, x: torch.Tensor, cond: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
    """One DiT block (diffusers' ``BasicTransformerBlock``, ``norm_type`` ada_norm_zero) given its
    conditioning vector: adaLN-Zero modulated self-attention and MLP, DiffFit's γ when present."""
    norm = block.norm1
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm.linear(norm.silu(cond)).chunk(6, dim=1)
    h = norm.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    out = block.attn1(h, encoder_hidden_states=None, attention_mask=None, **attn_kwargs)
    if (gamma := getattr(block, DIFFFIT[0], None)) is not None:
        out = out * gamma.to(out.dtype)
    x = gate_msa.unsqueeze(1) * out + x
    h = block.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    out = block.ff(h)
    if (gamma := getattr(block, DIFFFIT[1], None)) is not None:
        out = out * gamma.to(out.dtype)
    return gate_mlp.unsqueeze(1) * out + x


DEPTHS = ("shallow", "deep")


class Prompts(nn.Module):
    """VPT's learnable prompt tokens (Jia et al., "Visual Prompt Tuning", ECCV 2022): ``n`` tokens
    of the model's width joined ahead of the image tokens, at the input only (``shallow``) or new
    ones at every block (``deep``: block i's prompts replace what came out of block i − 1's). The
    output layer sees the image tokens only. Uniform init as VPT (Xavier bound of one token row)."""

    def __init__(self, n: int, width: int, blocks: int, deep: bool):
        super().__init__()
        if n < 1:
            raise DefectlabError(f"vpt_tokens must be ≥ 1 (got {n})")
        bound = math.sqrt(6.0 / (n + width))
        self.deep = deep
        self.weight = nn.Parameter(torch.empty(blocks if deep else 1, n, width).uniform_(-bound, bound))

    @property
    def settings(self) -> dict:
        return {"tokens": self.weight.shape[1], "depth": DEPTHS[self.deep]}

    def tokens(self, block: int, batch: int) -> torch.Tensor:
        return self.weight[block if self.deep else 0].expand(batch, -1, -1)


class DiT(DiTTransformer2DModel):
    """See the module doc. Build one with ``DiT.adopt(model)`` or ``DiT(**config)``."""

    @property
    def engine(self) -> Engine:
        if "_engine" not in self.__dict__:
            self.__dict__["_engine"] = Engine()
        return self.__dict__["_engine"]

    def add_prompts(self, tokens: int, depth: str = "shallow") -> Prompts:
        """VPT: learnable prompt tokens (``Prompts``) this model computes with from now on."""
        if depth not in DEPTHS:
            raise DefectlabError(f"vpt_depth must be shallow or deep (got {depth!r})")
        ref = self.proj_out_2.weight
        self.prompts = Prompts(tokens, self.inner_dim, len(self.transformer_blocks), depth == "deep").to(ref.device)
        return self.prompts

    def load_prompts(self, weight: torch.Tensor | None, settings: dict | None, where) -> "DiT":
        """An export's prompts (``weight`` and its ``{"tokens", "depth"}``) back into this model."""
        if not isinstance(settings, dict) or {"tokens", "depth"} - set(settings):
            raise DefectlabError(f"{where}: its defectlab.json does not describe the prompts (defectlab_prompts: "
                                 "tokens, depth)")
        prompts = self.add_prompts(int(settings["tokens"]), settings["depth"])
        if weight is None or weight.shape != prompts.weight.shape:
            raise DefectlabError(f"{where}: no prompt weight of shape {tuple(prompts.weight.shape)}")
        with torch.no_grad():
            prompts.weight.copy_(weight)
        return self

    @classmethod
    def adopt(cls, model: DiTTransformer2DModel) -> "DiT":
        """``model`` as a DiT: the same tensors (assigned, not copied), config and mode."""
        if isinstance(model, cls):
            return model
        _check_layout(model)
        with init_empty_weights():  # parameters on meta; buffers (pos_embed) computed for real
            net = cls(**{k: v for k, v in model.config.items() if not k.startswith("_")})
        net.load_state_dict(model.state_dict(), strict=True, assign=True)
        return net.train(model.training)

    def to_json_string(self) -> str:
        """The config as diffusers writes it, under diffusers' class name (DiTPipeline loads it)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = DiTTransformer2DModel.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None,
                return_dict: bool = True):
        e = self.engine
        x = hidden_states if e.input_dtype is None else hidden_states.to(e.input_dtype)
        # no autocast(enabled=False) when off: that would switch off an outer one (accelerate's bf16)
        amp = torch.autocast(x.device.type, dtype=e.autocast) if e.autocast else contextlib.nullcontext()
        with amp:
            out = self._compute(x, timestep, class_labels, dict(cross_attention_kwargs or {}))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _compute(self, x, timestep, class_labels, attn_kwargs) -> torch.Tensor:
        e, blocks = self.engine, self.transformer_blocks
        x = self.pos_embed(x)
        tokens = x.shape[1]
        tied = None
        if is_tied(self):  # once, in the dtype the blocks see
            tied = blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
        prompts = getattr(self, "prompts", None)
        fn = e.block_fn or block_forward
        for i, block in enumerate(blocks):
            cond = tied if tied is not None else block.norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
            if prompts is not None and (i == 0 or prompts.deep):  # VPT: prompt tokens ahead of the image's
                x = torch.cat([prompts.tokens(i, len(x)).to(x.dtype), x[:, -tokens:]], 1)
            if i < e.checkpointed and torch.is_grad_enabled() and self.training:
                x = torch.utils.checkpoint.checkpoint(fn, block, x, cond, attn_kwargs, use_reentrant=False)
            else:
                x = fn(block, x, cond, attn_kwargs)
        x = x[:, -tokens:]
        cond = tied if tied is not None else blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
        shift, scale = self.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        x = self.proj_out_2(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])
        side, p, c = int(tokens ** 0.5), self.patch_size, self.out_channels
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(-1, side, side, p, p, c))
        return x.reshape(-1, c, side * p, side * p)


def of(model) -> DiT:
    """The ``DiT`` inside ``model`` (a DDP or CUDA-graph wrapper); one line when it is a plain
    diffusers model, which computes none of the above."""
    inner = getattr(model, "module", None) or getattr(model, "transformer", None) or model
    if not isinstance(inner, DiT):
        raise DefectlabError(f"{type(inner).__name__} is not defectlab's DiT: load it with model.load, or "
                             "wrap it with dit.DiT.adopt(model)")
    return inner


def _check_layout(model: DiTTransformer2DModel) -> None:
    """``block_forward`` computes the DiT block: refuse a configuration that is not one."""
    for block in model.transformer_blocks:
        if (block.norm_type != "ada_norm_zero" or block.attn2 is not None or block.pos_embed is not None
                or block._chunk_size is not None):
            raise DefectlabError("not a DiT block layout (ada_norm_zero, no cross-attention): "
                                 f"norm_type {block.norm_type!r}")
