"""A fine-tuned run back in memory: its base, class table, method and trained state.

``build`` is the one recipe training and ``restore`` both follow, so every parameter a checkpoint
names exists in the rebuilt model. It reads only the settings that decide those parameters
(``ModelSettings``), from a stage's settings dataclass (``train.TrainConfig``) or a run's saved
``config.json``; the stages above (``sample``, ``synthesize``, ``export``, the explorer) load a
finished run through ``restore`` without importing the training stage.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiTTransformer2DModel

from ..base import runs
from ..base.errors import DefectlabError
from . import engine, methods, model as model_mod


@dataclass(frozen=True)
class ModelSettings:
    """The settings that decide a run's parameters (``train.TrainConfig`` fields of the same
    names). The defaults are what a saved run that predates a setting trained with."""
    model: str                     # base model spec (model.load)
    method: str                    # methods.METHODS
    numerics: str = "diffusers"    # timestep frequencies; runs saved before the setting used diffusers'
    model_heads: int = 0           # attention heads of an original .pt (0 = from its shape)
    lora_rank: int = 8             # LoRA rank (method=lora)
    difffit_blocks: int = 0        # blocks with DiffFit scales (0 = all)
    vpt_tokens: int = 8            # VPT prompt tokens (method=vpt)
    vpt_depth: str = "shallow"     # VPT prompts at the input only (shallow) or at every block (deep)
    vpt_bias: bool = False         # VPT also trains every bias
    mask_condition: bool = False   # defect mask as an extra input channel
    tie_embeddings: bool = False   # one timestep/class embedder for all blocks
    seed: int = 0                  # seeds the new class rows


def model_settings(settings: dict | object) -> ModelSettings:
    """The ``ModelSettings`` inside a stage's settings dataclass or a saved ``config.json`` dict."""
    if not isinstance(settings, dict):
        settings = dataclasses.asdict(settings)
    return ModelSettings(**{f.name: settings[f.name] for f in dataclasses.fields(ModelSettings) if f.name in settings})


@dataclass
class Restored:
    base: model_mod.Base
    model: torch.nn.Module
    classes: list[str]
    config: dict
    checkpoint: Path | None
    folder: Path | None = None


Rows = str | int | list[int]   # what new class rows start from (model.set_classes' init)


def build(settings: dict | object, classes: list[str], device="cpu",
          rows: Callable[[model_mod.Base], Rows] | None = None) -> tuple[model_mod.Base, torch.nn.Module]:
    """Base model with K class rows and the method applied — identical in training and restore.
    ``rows(base)`` picks the new rows' start (training: from the data); ``None`` = random, which a
    restore overwrites with the checkpoint."""
    cfg = model_settings(settings)
    base = model_mod.load(cfg.model, device=device, numerics=cfg.numerics, heads=cfg.model_heads)
    methods.set_classes(base.transformer, len(classes), init=rows(base) if rows else "random", seed=cfg.seed)
    for block in base.transformer.transformer_blocks:
        # diffusers draws label dropout independently in each block's own table; training drops
        # labels once, consistently, in its loop instead (train._drop_labels).
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    if cfg.mask_condition:  # before apply (it sets requires_grad); zero init: step 0 is the base model
        methods.add_mask_channel(base.transformer)
    net = methods.apply(base.transformer, cfg.method, lora_rank=cfg.lora_rank, difffit_blocks=cfg.difffit_blocks,
                        verbose=False, vpt_tokens=cfg.vpt_tokens, vpt_depth=cfg.vpt_depth, vpt_bias=cfg.vpt_bias)  # training prints the summary once, on the main process
    if cfg.mask_condition:  # the new channel must learn whatever the method freezes
        for p in methods.mask_parameters(net):
            p.requires_grad_(True)
    if cfg.tie_embeddings:  # changes which parameters exist: training and restore must agree
        engine.tie_embeddings(net)
    return base, net


def restore(run: str | Path, checkpoint: str = "best", device="auto", numerics: str = "auto") -> Restored:
    """Rebuild base + trained state from a run folder (for sampling and evaluation), on
    ``device`` (``auto``: CUDA when there is one, else the CPU).

    ``numerics`` ``auto`` = what the run trained with (``config.json``; runs from before the
    setting existed trained with diffusers'), or ``original`` / ``diffusers`` to override.
    ``Restored.config`` is the saved config with every ``ModelSettings`` field filled in."""
    model_mod.check_numerics(numerics)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    folder = runs.resolve(run)
    saved = runs.load_config(folder)
    cfg = model_settings(saved)
    if numerics != "auto":
        cfg = dataclasses.replace(cfg, numerics=numerics)
    classes = runs.read_json(folder / "classes.json")
    ckpt = runs.find_checkpoint(folder, checkpoint)
    base, net = build(cfg, classes, device=device)
    state = runs.load_tensors(ckpt / runs.STATE_FILE)
    ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    trained = {k: v for k, v in state.items() if not k.startswith("ema.")}
    methods.load_trainable_state(net, ema or trained)  # EMA weights when the run kept them
    net.eval()
    return Restored(base, net, classes, {**saved, **dataclasses.asdict(cfg)}, ckpt, folder)


def plain(model: torch.nn.Module, null: int | None = None) -> DiTTransformer2DModel:
    """A plain ``DiTTransformer2DModel`` that computes what ``model`` (a restored run) computes: a
    copy with LoRA merged, tied embeddings untied, DiffFit's γ folded (γ·(Wx + b) = (γW)x + γb,
    into ``attn1.to_out.0`` and ``ff.net.2``, the layers whose output it scales) and the class
    table padded so that its null row is ``null`` (``export.NULL``: DiTPipeline's 1000; None: the
    run's own K classes and null K). Numerics: diffusers' (the config has no switch)."""
    if methods.has_mask_channel(model):
        raise DefectlabError("a mask-conditioned model has an input DiTPipeline cannot give it: not exportable")
    net = copy.deepcopy(model)
    if getattr(net, "prompts", None) is not None:  # VPT's prompts are an input: the export writes them beside
        del net.prompts
    engine.untie_embeddings(net)
    engine.merge_lora(net)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for i in range(len(net.transformer_blocks)):
        for branch, layer in (("attn", "attn1.to_out.0"), ("ff", "ff.net.2")):
            gamma = state.pop(f"transformer_blocks.{i}.difffit_gamma_{branch}", None)
            for kind, scale in (() if gamma is None else (("weight", gamma[:, None]), ("bias", gamma))):
                key = f"transformer_blocks.{i}.{layer}.{kind}"
                state[key] = state[key] * scale
    k = methods.num_classes(net)
    null = k if null is None else null
    if k > null:
        raise DefectlabError(f"{k} classes: DiTPipeline's null class is {null}, so at most {null} can be exported")
    for key in [key for key in state if key.endswith("class_embedder.embedding_table.weight")]:
        state[key] = torch.cat([state[key][:k], state[key][k:k + 1].expand(null + 1 - k, -1)])
    plain = DiTTransformer2DModel.from_config({**net.config, "num_embeds_ada_norm": null})
    plain.load_state_dict(state, strict=True)
    return plain.eval()
