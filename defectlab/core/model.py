"""Base models: ``load(spec)`` → transformer + codec + scheduler config, and class-table surgery.

One loading path for everything: the hub model, a local diffusers folder, the ``tiny`` preset
(saved once with ``save_pretrained`` and read back like any folder) and the original
facebookresearch ``.pt`` (converted to ``DiTTransformer2DModel`` keys). Training and sampling
see a ``Base`` and never ask where it came from.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from filelock import FileLock
from huggingface_hub import hf_hub_download
from torch import nn

from ..base import folders, paths
from ..base.errors import DefectlabError, first_line
from ..base.runs import load_tensors, read_json  # one-line errors for malformed JSON, naming the file
from ..data import corpus, fetch, sources
from . import diffusion, dit, methods
from .codec import PixelCodec, VAECodec
from .convert import DIT_ARCH, convert_original_state_dict, heads_beside, original_config

HUB_DIT = "facebook/DiT-XL-2-256"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"   # what DiT trained with; `-mse` also works
VAE_ENV = "DEFECTLAB_VAE"                   # hub id or folder of the VAE for .pt / bare transformers
SIDECAR = "defectlab.json"  # an export's own settings (numerics, image size, classes): DiTPipeline never reads it
PROMPTS = "prompts.safetensors"  # a VPT export's prompt tokens (SIDECAR's defectlab_prompts says how many, where)
TINY_SEED = 0
TINY_CONFIG = dict(  # pixel-space DiT, 1.9M parameters (0.5M in the class tables): fast on a CPU
    DIT_ARCH, sample_size=64, patch_size=4, in_channels=3, out_channels=6,  # 6 = eps + learned sigma, as DiT
    num_layers=4, num_attention_heads=4, attention_head_dim=32,
    num_embeds_ada_norm=1000,  # ImageNet-sized table: anchor ids (990, 783) and DiTPipeline's null 1000 work
)

# How the timestep is turned into frequencies before the timestep MLP. The original DiT
# (models.py TimestepEmbedder) uses exp(-ln(10000) * i / half); diffusers' DiT builds
# Timesteps(downscale_freq_shift=1), i.e. / (half - 1). Weights trained by the original code
# (a DiT-*.pt, facebook/DiT-* on the hub, any DiTPipeline folder converted from them) only
# compute what they were trained to with the original's; models defectlab trains itself (tiny,
# mini, mini-scratch, their exports) were trained with diffusers' and keep it.
NUMERICS = {"original": 0, "diffusers": 1}   # name → Timesteps.downscale_freq_shift


# Defaults that reflect the original experiments' findings for the real model (batch 2-4,
# lr 1e-5, 128 px, 100 epochs); the small pixel-space bases need a larger step size.
PRESETS = {
    "real": {"lr": 1e-5, "image_size": 128, "epochs": 100},
    "small": {"lr": 1e-3, "image_size": 64, "epochs": 60},   # tiny
    "mini": {"lr": 1e-3, "image_size": 32, "epochs": 60},    # mini, mini-scratch: their native 32 px
    "mini-latent": {"lr": 3e-3, "image_size": 64, "epochs": 200},  # latent, 64 px; DiffFit (README, "Measured")
}
SHIPPED, SMALL_BASES = ("mini", "mini-latent"), ("tiny", "mini", "mini-scratch", "mini-latent")  # shipped: paths.ASSETS / name


def preset(model: str) -> dict:
    """Defaults for lr / image_size / epochs that depend on the base model."""
    return PRESETS["mini" if model == "mini-scratch" else model if model in SHIPPED else "small" if model in SMALL_BASES else "real"]


def dit_schedule(learned_sigma: bool = True, clip_sample: bool = False) -> dict:
    """DiT's training diffusion: 1000 steps, linear betas 1e-4..0.02, learned variance range."""
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
            "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": clip_sample,
            "variance_type": "learned_range" if learned_sigma else "fixed_small"}


@dataclass
class Base:
    transformer: DiTTransformer2DModel
    codec: PixelCodec | VAECodec
    scheduler_config: dict          # DDPM training schedule (1000 steps, linear betas, learned_range)
    spec: str                       # what was asked for ("tiny", hub id, path)
    default_image_size: int         # tiny 64, mini 32, DiT-XL-2-256 → 256
    class_names: list[str] | None   # names of the base's own classes if known
    anchors: dict | None = None     # product → the base's closest class (model_index.json "defectlab_anchors")
    numerics: str = "diffusers"     # timestep frequencies the transformer computes with (NUMERICS)


# ----------------------------------------------------------------------------- loading
def load(spec: str, device="cpu", dtype=torch.float32, vae: str | None = None, numerics: str = "auto",
         heads: int = 0) -> Base:
    """``tiny``, ``mini``, a hub id, a diffusers folder (full layout or bare transformer) or an
    original ``.pt``. ``vae`` (or ``$DEFECTLAB_VAE``) is used when the spec brings none.

    ``numerics``: ``auto`` (the original DiT's timestep frequencies for weights trained by the
    original code, diffusers' for everything else; see ``NUMERICS``), ``original`` or
    ``diffusers``; the result is ``Base.numerics``. ``heads``: attention heads of an original
    ``.pt`` whose width is not DiT-S/B/L/XL (0 = from the shape or a ``config.json`` beside it)."""
    check_numerics(numerics)
    vae = vae or os.environ.get(VAE_ENV) or DEFAULT_VAE
    if spec == "tiny":
        base = _load_folder(_ensure_tiny(), spec, vae)
    elif spec in SHIPPED:
        folder = paths.ASSETS / spec
        if not folder.is_dir():
            raise DefectlabError(f"the {spec!r} base model is not in this install (looked in {folder}); "
                                 "use --model tiny, a hub id, a diffusers folder or a DiT .pt")
        base = _load_folder(folder, spec, vae)
    elif spec == "mini-scratch":
        base = _load_folder(_ensure_mini_scratch(), spec, vae)
    elif Path(spec).expanduser().is_file():
        base = _load_original(Path(spec).expanduser(), spec, vae, heads)
    elif Path(spec).expanduser().is_dir():
        base = _load_folder(Path(spec).expanduser(), spec, vae)
    elif (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.startswith(".")
          and not spec.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        base = _load_hub(spec, vae)
    else:
        raise DefectlabError(f"model not found: {spec} is not a file or folder (expected tiny, mini, mini-latent, mini-scratch, "
                             f"a hub id like {HUB_DIT}, a diffusers folder or a DiT .pt file)")
    base.transformer.to(device).eval()
    if base.transformer.dtype != dtype:  # a dtype-less .to() when none is needed: diffusers warns on every cast
        base.transformer.to(dtype)
    base.codec.to(device, dtype)
    for module in (base.transformer, getattr(base.codec, "vae", None)):
        _realign(module)
    if numerics != "auto":
        base.numerics = numerics
    set_numerics(base.transformer, base.numerics)
    return base


def load_codec(spec: str, vae: str | None = None) -> tuple[PixelCodec | VAECodec, int]:
    """Base ``spec``'s codec and sampling size without the transformer's weights (its config.json
    only; DiT-XL's weights are 2.7 GB). Built bases and original ``.pt`` files load whole."""
    vae = vae or os.environ.get(VAE_ENV) or DEFAULT_VAE
    folder = paths.ASSETS / spec if spec in SHIPPED else Path(spec).expanduser()
    local = folder.is_dir() and spec not in ("tiny", "mini-scratch")
    if not local and (spec in SMALL_BASES or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec)):
        base = load(spec, vae=vae)  # built bases, a .pt file, or the one-line error of what is missing
        return base.codec, base.default_image_size
    if local:
        sub = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
        if not (sub / "config.json").is_file():
            raise DefectlabError(f"{folder} is not a diffusers DiT folder (no transformer/config.json or config.json)")
        config = read_json(sub / "config.json")
        index = {k: v for f in ("model_index.json", SIDECAR) if (folder / f).is_file() for k, v in read_json(folder / f).items()}
        try:
            codec = (VAECodec(AutoencoderKL.from_pretrained(folder / "vae")) if (folder / "vae").is_dir()
                     else _codec_for(config["in_channels"], vae))
        except (OSError, ValueError, RuntimeError) as err:
            raise DefectlabError(f"cannot load the autoencoder in {folder}: {first_line(err)}") from err
    else:
        with fetch.hub_errors(spec, "transformer/config.json"):
            config = read_json(hf_hub_download(spec, "transformer/config.json"))
            index = read_json(hf_hub_download(spec, "model_index.json"))
            codec = VAECodec(AutoencoderKL.from_pretrained(spec, subfolder="vae"))
    _realign(getattr(codec, "vae", None))
    return codec, int(index.get("defectlab_image_size") or config["sample_size"] * codec.downsample)


def check_numerics(numerics: str) -> None:
    if numerics not in ("auto", *NUMERICS):
        raise DefectlabError(f"numerics must be auto, original or diffusers (got {numerics!r})")


def set_numerics(transformer, numerics: str) -> None:
    """Make every block's timestep projection compute the ``numerics`` frequencies (``NUMERICS``).

    ``downscale_freq_shift`` is the constructor argument of diffusers' ``Timesteps`` that the
    DiT model fixes at 1 and gives no config switch for; it is a plain setting read in forward,
    so it survives ``deepcopy``, peft wrapping and the engine's copies."""
    if numerics not in NUMERICS:
        raise DefectlabError(f"numerics must be original or diffusers (got {numerics!r})")
    for block in _blocks(transformer):
        block.norm1.emb.time_proj.downscale_freq_shift = NUMERICS[numerics]


def numerics_of(transformer) -> str:
    """The numerics a transformer computes with now (``set_numerics``); a model without DiT
    blocks (a test oracle) has no timestep projection and counts as diffusers'."""
    shifts = {block.norm1.emb.time_proj.downscale_freq_shift for block in _blocks(transformer)}
    if len(shifts) > 1 or shifts - set(NUMERICS.values()):
        raise DefectlabError(f"blocks disagree on their timestep frequencies (shifts {sorted(shifts)})")
    return next((name for name, shift in NUMERICS.items() if {shift} == shifts), "diffusers")


def unwrap(transformer) -> nn.Module:
    """The diffusers model inside a peft wrapper (LoRA hides it one level down), else itself."""
    return transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer


def _blocks(transformer) -> list[nn.Module]:
    return list(getattr(unwrap(transformer), "transformer_blocks", []))


def default_numerics(index: dict | None, original_pt: bool = False) -> str:
    """What ``auto`` means for a model: ``original`` for an original ``.pt`` and for DiTPipeline
    folders / hub repos (every published one is converted from the original weights); a folder
    that says which it was trained with (``defectlab_numerics`` in ``SIDECAR`` or ``model_index.json``,
    written by defectlab) keeps that; bare transformer folders (``save_pretrained``: tiny) are diffusers'."""
    index = index or {}
    said = index.get("defectlab_numerics")
    if said is not None and said not in NUMERICS:
        raise DefectlabError(f"{SIDECAR} / model_index.json: defectlab_numerics must be original or diffusers "
                             f"(got {said!r})")
    return "original" if original_pt else said or ("original" if index.get("_class_name") == "DiTPipeline" else "diffusers")


def _realign(module: nn.Module | None) -> None:
    """from_pretrained leaves CPU weights as views into one buffer at 8-byte offsets; oneDNN then
    takes other kernels and outputs differ (~1e-6) from the same weights freshly allocated. Own,
    aligned storage makes a loaded model compute bit-identically to one built in memory."""
    for p in module.parameters() if module is not None else ():
        if p.device.type == "cpu" and p.data_ptr() % 64:
            p.data = p.data.clone()


def mini_config(image_size: int = 32, patch_size: int = 4, width: int = 192, heads: int = 3, depth: int = 6,
                channels: int = 3) -> dict:
    """``DiTTransformer2DModel`` config of the defectlab-mini architecture (the defaults are mini's)
    over the corpus classes: a DiT with learned sigma on pixels (``channels`` 3) or, for a latent
    base, on ``image_size``-sized latent grids of ``channels`` channels."""
    if image_size % patch_size:
        raise DefectlabError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if width % heads:
        raise DefectlabError(f"width {width} is not a multiple of heads {heads}")
    return dict(DIT_ARCH, sample_size=image_size, patch_size=patch_size, in_channels=channels, out_channels=2 * channels,
                num_layers=depth, num_attention_heads=heads, attention_head_dim=width // heads,
                num_embeds_ada_norm=len(corpus.CLASSES))


def mini_schedule(prediction_type: str = "v_prediction", clip_sample: bool = True) -> dict:
    """mini's training schedule (``scheduler/scheduler_config.json``): DiT's, v-prediction, x0
    clipped in pixel space (``clip_sample``; latents are unbounded: off for a latent base)."""
    return {**dit_schedule(True, clip_sample=clip_sample), "prediction_type": prediction_type}


def build_mini(config: dict, seed: int = 0) -> DiTTransformer2DModel:
    """A mini-architecture DiT with seeded random weights; label dropout off (the training loops
    drop labels once per sample themselves)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = dit.DiT(**config)
    for block in net.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return net


def save_folder(net: DiTTransformer2DModel, out: Path, schedule: dict, fp16: bool = False,
                extra_files: dict[str, str] | None = None, vae: Path | None = None, image_size: int = 0) -> Path:
    """``save_pretrained`` + ``model_index.json`` (corpus class names, anchors, numerics, the
    image size it was trained at when given: a copy of the folder then samples at that size) +
    ``scheduler/scheduler_config.json`` (+ ``extra_files``; + ``vae/``, a copy of the autoencoder
    folder ``vae``, for a latent base), swapped in atomically."""
    with folders.building(out) as tmp:
        if vae is not None:
            shutil.copytree(vae, tmp / "vae", ignore=shutil.ignore_patterns("training.json"))
        (net.half() if fp16 else net).save_pretrained(tmp, safe_serialization=True)
        net.float()
        index = {"_class_name": "DiTTransformer2DModel", "id2label": dict(enumerate(corpus.CLASSES)),
                 "defectlab_anchors": corpus.ANCHORS, "corpus_version": corpus.CORPUS_VERSION,
                 "defectlab_numerics": "diffusers"}  # trained with diffusers' timestep frequencies (NUMERICS)
        if image_size:
            index["defectlab_image_size"] = int(image_size)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule, indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text(tmp) if callable(text) else text)
    return Path(out)


def _ensure_built(name: str, want: dict[str, dict], build) -> Path:
    """``paths.MODELS/name``, made by ``build(folder)`` once, under a lock, and again when a JSON file
    in ``want`` lacks one of its values (absent, unreadable, an older architecture)."""
    final = paths.MODELS / name
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{name}.lock")):
        saved = {}
        for file in want:
            try:
                saved[file] = json.loads((final / file).read_text())
            except (OSError, json.JSONDecodeError):
                saved[file] = {}  # absent or unreadable: build it
        if any(saved[file].get(k) != v for file, keys in want.items() for k, v in keys.items() if not k.startswith("_")):
            build(final)
    return final


def _ensure_mini_scratch() -> Path:
    """mini's architecture and classes with seeded random weights, built once: the from-scratch
    baseline that shows what pre-training buys (``--model mini-scratch``)."""
    return _ensure_built("mini-scratch", {"config.json": mini_config(), "scheduler/scheduler_config.json": mini_schedule()},
                         lambda out: save_folder(build_mini(mini_config()), out, mini_schedule()))


def _ensure_tiny() -> Path:
    """The tiny model, built once (fixed seed) and saved atomically (``folders.building``)."""
    def build(out: Path) -> None:
        with torch.random.fork_rng(devices=[]):  # don't disturb the caller's RNG stream
            torch.manual_seed(TINY_SEED)
            net = DiTTransformer2DModel(**TINY_CONFIG)
        with folders.building(out) as tmp:
            net.save_pretrained(tmp)
    return _ensure_built("tiny", {"config.json": TINY_CONFIG}, build)


def _load_folder(folder: Path, spec: str, vae: str) -> Base:
    sub = "transformer" if (folder / "transformer" / "config.json").is_file() else None
    if sub is None and not (folder / "config.json").is_file():
        raise DefectlabError(f"{folder} is not a diffusers DiT folder (no transformer/config.json or config.json)")
    try:
        transformer = dit.DiT.from_pretrained(folder, subfolder=sub)
        codec = (VAECodec(AutoencoderKL.from_pretrained(folder / "vae")) if (folder / "vae").is_dir()
                 else _codec_for(transformer.config.in_channels, vae))
    except (OSError, ValueError, RuntimeError) as err:
        raise DefectlabError(f"cannot load the model in {folder}: {first_line(err)}") from err
    sched, index, extra = (folder / name for name in ("scheduler/scheduler_config.json", "model_index.json", SIDECAR))
    sched, index, extra = (read_json(f) if f.is_file() else None for f in (sched, index, extra))
    if (folder / PROMPTS).is_file():  # a VPT export: its prompt tokens are part of the model
        transformer.load_prompts(load_tensors(folder / PROMPTS).get("weight"), (extra or {}).get("defectlab_prompts"),
                                 folder / PROMPTS)
    return _base(transformer, codec, spec, sched, index, extra)


def _load_hub(repo: str, vae: str) -> Base:
    with fetch.hub_errors(repo, "scheduler/scheduler_config.json"):  # small files first: fails before any weights
        sched = read_json(hf_hub_download(repo, "scheduler/scheduler_config.json"))
        index = read_json(hf_hub_download(repo, "model_index.json"))  # id2label
        transformer = dit.DiT.from_pretrained(repo, subfolder="transformer")
        codec = VAECodec(AutoencoderKL.from_pretrained(repo, subfolder="vae"))
    return _base(transformer, codec, repo, sched, index)


def _codec_for(in_channels: int, vae: str) -> PixelCodec | VAECodec:
    """Pixels for a 3-channel transformer, otherwise the VAE named by ``vae`` (folder or hub id)."""
    if in_channels == 3:
        return PixelCodec()
    folder = Path(vae).expanduser()
    if folder.is_dir():
        return VAECodec(AutoencoderKL.from_pretrained(folder / "vae" if (folder / "vae").is_dir() else folder))
    with fetch.hub_errors(vae, "config.json", what="VAE"):
        return VAECodec(AutoencoderKL.from_pretrained(vae))


def _base(transformer, codec, spec, sched: dict | None, index: dict | None, extra: dict | None = None,
          original_pt: bool = False) -> Base:
    if bad := [n for n, o in (("scheduler_config.json", sched), ("model_index.json", index), (SIDECAR, extra))
               if o is not None and not isinstance(o, dict)]:
        raise DefectlabError(f"{bad[0]} of model {spec} is not a JSON object: fix or remove it")
    index = {**(index or {}), **(extra or {})}  # an export keeps its settings beside model_index.json
    transformer = dit.DiT.adopt(transformer)  # every loaded model computes through defectlab's forward
    cfg = transformer.config
    # Keep DiT's DDPM training schedule; take the numbers a shipped scheduler config pins down
    # (the hub's is a DDIM config: same betas, but no variance_type).
    schedule = dit_schedule(cfg.out_channels == 2 * cfg.in_channels, clip_sample=codec.clip_sample)
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type")
    schedule.update({k: v for k, v in (sched or {}).items() if k in keys})
    if problem := diffusion.schedule_problem(schedule):
        raise DefectlabError(f"scheduler/scheduler_config.json of model {spec}: {problem}: fix or remove it")
    labels = index.get("id2label")
    k = methods.num_classes(transformer)  # an export names its run's classes, the first of its 1000 rows
    names = ([str(labels.get(str(i), i)) for i in range(k)] if isinstance(labels, dict) and 0 < len(labels) <= k
             else None)
    size = index.get("defectlab_image_size") or cfg.sample_size * codec.downsample  # export: the run's
    return Base(transformer, codec, schedule, spec, size, names, index.get("defectlab_anchors"),
                default_numerics(index, original_pt))


def anchor_class(base: Base, product: str) -> int | None:
    """The base class a product's new classes start from: the base's own mapping (mini ships
    one), else the ImageNet anchor (hazelnut → 990 buckeye, screw → 783 screw) when it exists."""
    anchors = base.anchors or {p: c for p, (c, _) in sources.ANCHOR_CLASSES.items()}
    anchor = anchors.get(product)
    return anchor if anchor is not None and anchor < methods.num_classes(base.transformer) else None


# ----------------------------------------------------------------------------- original .pt
def _load_original(path: Path, spec: str, vae: str, heads: int = 0) -> Base:
    try:  # weights_only: a pickle that would run code is refused, not executed
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DefectlabError(f"cannot load {path} as a DiT checkpoint (only plain tensor state dicts are "
                             f"accepted, torch.load weights_only=True): {first_line(err)}") from err
    if isinstance(sd, dict) and isinstance(sd.get("ema", sd.get("model")), dict):
        sd = sd.get("ema", sd.get("model"))  # a DiT train.py checkpoint: prefer the EMA weights
    if not isinstance(sd, dict) or "x_embedder.proj.weight" not in sd:
        raise DefectlabError(f"{path} is not a facebookresearch DiT state dict (no x_embedder.proj.weight)")
    from accelerate import init_empty_weights

    heads = heads or heads_beside(path)
    with init_empty_weights():  # parameters on meta; buffers (pos_embed) computed for real
        transformer = dit.DiT(**original_config(sd, heads=heads, source=path))
    if not torch.allclose(sd["pos_embed"].float(), transformer.pos_embed.pos_embed, atol=1e-5):
        raise DefectlabError(f"{path}: its pos_embed is not DiT's sin-cos table for the inferred size")
    try:
        transformer.load_state_dict(convert_original_state_dict(sd), strict=True, assign=True)
    except RuntimeError as err:
        raise DefectlabError(f"{path}: weights don't fit the inferred DiT config: {first_line(err)}") from err
    return _base(transformer, _codec_for(transformer.config.in_channels, vae), spec, None, None, original_pt=True)
