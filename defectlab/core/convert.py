"""The original facebookresearch DiT checkpoint layout ↔ diffusers' ``DiTTransformer2DModel``.

Pure functions on state dicts: the config a ``DiT-*.pt`` implies (``original_config``: the head
count is taken only where the width determines it), and the key mapping both ways. ``model.load``
uses them for ``--model path.pt``; tests and export use the inverse.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..base.errors import DefectlabError, first_line

DIT_ARCH = dict(norm_type="ada_norm_zero", norm_elementwise_affine=False, activation_fn="gelu-approximate",
                attention_bias=True, norm_eps=1e-6)  # DiT's LayerNorms use eps 1e-6 (diffusers' default is 1e-5)
_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}   # DiT XL/L/B/S; head count is not in the weights
HEADS_FILE = "config.json"  # beside an original .pt: {"num_attention_heads": N} for a width not in _HEADS


def heads_beside(path: Path) -> int:
    """``num_attention_heads`` from a ``config.json`` next to an original ``.pt`` (0 = none there)."""
    beside = path.with_name(HEADS_FILE)
    if not beside.is_file():
        return 0
    try:
        heads = json.loads(beside.read_text()).get("num_attention_heads", 0)
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise DefectlabError(f"{beside}: not a JSON object with num_attention_heads ({first_line(err)})") from err
    if not isinstance(heads, int) or heads < 0:
        raise DefectlabError(f"{beside}: num_attention_heads must be a positive integer (got {heads!r})")
    return heads


def original_config(sd: dict, heads: int = 0, source: Path | str = "the state dict") -> dict:
    """DiTTransformer2DModel config of an original state dict, from tensor shapes.

    The head count is not in the weights: DiT-S/B/L/XL widths (``_HEADS``) determine it, any
    other width needs ``heads`` (``--model-heads`` or a ``config.json`` beside the ``.pt``); nothing is guessed."""
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = sum(1 for k in sd if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k))
    grid = math.isqrt(sd["pos_embed"].shape[1]) if "pos_embed" in sd else None
    if not depth or grid is None or sd["blocks.0.mlp.fc1.weight"].shape[0] != 4 * hidden:
        raise DefectlabError(f"{source} is not a standard DiT state dict (blocks, pos_embed or mlp_ratio 4)")
    if heads and heads != _HEADS.get(hidden, heads):
        raise DefectlabError(f"{source}: width {hidden} is a standard DiT with {_HEADS[hidden]} heads, not {heads}")
    heads = heads or _HEADS.get(hidden, 0)
    if not heads:
        raise DefectlabError(f"{source}: width {hidden} is not DiT-S/B/L/XL, so its head count is unknown; pass "
                             f"--model-heads N or put {{\"num_attention_heads\": N}} in {HEADS_FILE} beside it")
    if hidden % heads:
        raise DefectlabError(f"{source}: width {hidden} is not a multiple of heads {heads}")
    return dict(DIT_ARCH, sample_size=grid * patch, patch_size=patch, in_channels=in_ch,
                out_channels=sd["final_layer.linear.weight"].shape[0] // (patch * patch), num_layers=depth,
                num_attention_heads=heads, attention_head_dim=hidden // heads,
                num_embeds_ada_norm=sd["y_embedder.embedding_table.weight"].shape[0] - 1)  # last row = null


_SHARED = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
           "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}
_PER_BLOCK = {"adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0",
              "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
_TOP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
        "final_layer.linear": "proj_out_2"}


def convert_original_state_dict(sd: dict) -> dict:
    """facebookresearch DiT → diffusers keys. diffusers keeps a copy of the timestep and class
    embedders in every block (the original has one of each): the copies are cloned, not shared,
    so they train and save independently. ``pos_embed`` is dropped (diffusers recomputes it)."""
    depth = sum(1 for k in sd if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k))
    out, used = {}, {"pos_embed"}
    for old, new in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{new}.{p}"] = sd[f"{old}.{p}"]
            used.add(f"{old}.{p}")
    for i in range(depth):
        blk = f"transformer_blocks.{i}"
        for old, new in _SHARED.items():
            for p in ("weight", "bias"):
                if f"{old}.{p}" in sd:
                    out[f"{blk}.{new}.{p}"] = sd[f"{old}.{p}"].clone()
                    used.add(f"{old}.{p}")
        for old, new in _PER_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{blk}.{new}.{p}"] = sd[f"blocks.{i}.{old}.{p}"]
                used.add(f"blocks.{i}.{old}.{p}")
        for p in ("weight", "bias"):  # timm's fused qkv → separate q, k, v
            q, k, v = (t.clone() for t in sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0))  # own storage
            out.update({f"{blk}.attn1.to_q.{p}": q, f"{blk}.attn1.to_k.{p}": k, f"{blk}.attn1.to_v.{p}": v})
            used.add(f"blocks.{i}.attn.qkv.{p}")
    if extra := sorted(set(sd) - used):
        raise DefectlabError(f"unexpected keys in the DiT state dict: {', '.join(extra[:5])}")
    return out


def to_original_state_dict(sd: dict, pos_embed: torch.Tensor | None = None) -> dict:
    """diffusers → facebookresearch keys (tests, export). Needs the per-block embedder copies to be
    identical (true for converted/hub models, not after training them per block)."""
    depth = sum(1 for k in sd if re.fullmatch(r"transformer_blocks\.\d+\.attn1\.to_q\.weight", k))
    out = {old + s: sd[new + s] for old, new in _TOP.items() for s in (".weight", ".bias")}
    for old, new in _SHARED.items():
        for s in (".weight", ".bias"):
            keys = [f"transformer_blocks.{i}.{new}{s}" for i in range(depth)]
            copies = [sd[key] for key in keys if key in sd]
            if copies and not all(torch.equal(c, copies[0]) for c in copies):
                raise DefectlabError(f"blocks have different {new}{s}: the original layout has only one")
            if copies:
                out[old + s] = copies[0]
    for i in range(depth):
        blk = f"transformer_blocks.{i}"
        for s in (".weight", ".bias"):
            out.update({f"blocks.{i}.{old}{s}": sd[f"{blk}.{new}{s}"] for old, new in _PER_BLOCK.items()})
            out[f"blocks.{i}.attn.qkv{s}"] = torch.cat([sd[f"{blk}.attn1.to_{c}{s}"] for c in "qkv"])
    if pos_embed is not None:
        out["pos_embed"] = pos_embed
    return out
