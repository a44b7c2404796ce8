"""Base models: ``load(spec)`` → transformer + codec + scheduler config, and class-table surgery.

One loading path for everything: the hub model, a local diffusers folder, the ``tiny`` preset
(saved once with ``save_pretrained`` and read back like any folder) and the original
facebookresearch ``.pt`` (converted to ``DiTTransformer2DModel`` keys). Training and sampling
see a ``Base`` and never ask where it came from.
"""
from __future__ import annotations

import json
import math
import operator
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from torch import nn

from . import paths
from .errors import DefectlabError

HUB_DIT = "facebook/DiT-XL-2-256"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"   # what DiT trained with; `-mse` also works
VAE_ENV = "DEFECTLAB_VAE"                   # hub id or folder of the VAE for .pt / bare transformers
TINY_SEED = 0
_DIT = dict(norm_type="ada_norm_zero", norm_elementwise_affine=False, activation_fn="gelu-approximate",
            attention_bias=True, norm_eps=1e-6)  # DiT's LayerNorms use eps 1e-6 (diffusers' default is 1e-5)
TINY_CONFIG = dict(  # pixel-space DiT, 1.9M parameters (0.5M in the class tables): fast on a CPU
    _DIT, sample_size=64, patch_size=4, in_channels=3, out_channels=6,  # 6 = eps + learned sigma, as DiT
    num_layers=4, num_attention_heads=4, attention_head_dim=32,
    num_embeds_ada_norm=1000,  # ImageNet-sized table: anchor ids (990, 783) and DiTPipeline's null 1000 work
)
_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}   # DiT XL/L/B/S; head count is not in the weights
HEADS_FILE = "config.json"  # beside an original .pt: {"num_attention_heads": N} for a width not in _HEADS

# How the timestep is turned into frequencies before the timestep MLP. The original DiT
# (models.py TimestepEmbedder) uses exp(-ln(10000) * i / half); diffusers' DiT builds
# Timesteps(downscale_freq_shift=1), i.e. / (half - 1). Weights trained by the original code
# (a DiT-*.pt, facebook/DiT-* on the hub, any DiTPipeline folder converted from them) only
# compute what they were trained to with the original's; models defectlab trains itself (tiny,
# mini, mini-scratch, their exports) were trained with diffusers' and keep it.
NUMERICS = {"original": 0, "diffusers": 1}   # name → Timesteps.downscale_freq_shift


def dit_schedule(learned_sigma: bool = True, clip_sample: bool = False) -> dict:
    """DiT's training diffusion: 1000 steps, linear betas 1e-4..0.02, learned variance range."""
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
            "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": clip_sample,
            "variance_type": "learned_range" if learned_sigma else "fixed_small"}


# ----------------------------------------------------------------------------- codecs
class PixelCodec:
    """Identity: the transformer works on pixels in [-1, 1] (tiny / mini)."""
    channels, downsample = 3, 1
    clip_sample = True  # x0 lives in [-1, 1]: samplers clip its prediction (without it samples saturate)

    def to(self, device=None, dtype=None) -> "PixelCodec":
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (3, image_size, image_size)


class VAECodec:
    """Stable-Diffusion VAE latents, scaled to about unit variance as DiT was trained.

    ``encode`` returns the posterior *mean* by default: the SD VAE's posterior std is tiny, so
    sampling adds almost nothing while the mean makes latents deterministic (cacheable per
    augmented view, identical across runs). ``sample=True`` gives DiT's ``latent_dist.sample()``.
    """

    clip_sample = False  # latents are unbounded: no clipping, as the original DiT samples

    def __init__(self, vae: AutoencoderKL, scaling_factor: float = 0.18215, sample: bool = False):
        self.vae, self.scaling_factor, self.sample = vae.eval().requires_grad_(False), scaling_factor, sample
        self.channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> "VAECodec":
        self.vae.to(device)
        if dtype is not None and self.vae.dtype != dtype:  # diffusers warns on any .to(dtype)
            self.vae.to(dtype)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if self.sample else dist.mean
        return (z * self.scaling_factor).to(x.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((z / self.scaling_factor).to(self.vae.device, self.vae.dtype)).sample
        return x.to(z.dtype).clamp(-1, 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.channels, image_size // self.downsample, image_size // self.downsample)


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
    elif spec == "mini":
        folder = paths.ASSETS / "mini"
        if not folder.is_dir():
            raise DefectlabError(f"the 'mini' base model is not in this install (looked in {folder}); "
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
        raise DefectlabError(f"model not found: {spec} is not a file or folder (expected tiny, mini, mini-scratch, "
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
    if not shifts:
        return "diffusers"
    found = [name for name, shift in NUMERICS.items() if {shift} == shifts]
    if not found:
        raise DefectlabError(f"blocks disagree on their timestep frequencies (shifts {sorted(shifts)})")
    return found[0]


def _blocks(transformer) -> list[nn.Module]:
    inner = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer  # peft
    return list(getattr(inner, "transformer_blocks", []))


def default_numerics(index: dict | None, original_pt: bool = False) -> str:
    """What ``auto`` means for a model: ``original`` for an original ``.pt`` and for DiTPipeline
    folders / hub repos (every published one is converted from the original weights); a folder
    that says which it was trained with (``model_index.json`` ``defectlab_numerics``, written by
    defectlab) keeps that; bare transformer folders (``save_pretrained``: tiny) are diffusers'."""
    if original_pt:
        return "original"
    index = index or {}
    said = index.get("defectlab_numerics")
    if said is not None:
        if said not in NUMERICS:
            raise DefectlabError(f"model_index.json: defectlab_numerics must be original or diffusers (got {said!r})")
        return said
    return "original" if index.get("_class_name") == "DiTPipeline" else "diffusers"


def _realign(module: nn.Module | None) -> None:
    """from_pretrained leaves CPU weights as views into one buffer at 8-byte offsets; oneDNN then
    takes other kernels and outputs differ (~1e-6) from the same weights freshly allocated. Own,
    aligned storage makes a loaded model compute bit-identically to one built in memory."""
    for p in module.parameters() if module is not None else ():
        if p.device.type == "cpu" and p.data_ptr() % 64:
            p.data = p.data.clone()


def _ensure_mini_scratch() -> Path:
    """mini's architecture and classes with seeded random weights, built once: the from-scratch
    baseline that shows what pre-training buys (``--model mini-scratch``)."""
    from filelock import FileLock

    from . import pretrain

    final = paths.MODELS / "mini-scratch"
    final.parent.mkdir(parents=True, exist_ok=True)
    want = {"config.json": pretrain.model_config(pretrain.PretrainConfig()),
            "scheduler/scheduler_config.json": pretrain.schedule(pretrain.PretrainConfig())}
    with FileLock(str(final.parent / ".mini-scratch.lock")):
        saved = {}
        for name in want:
            try:
                saved[name] = json.loads((final / name).read_text())
            except (OSError, json.JSONDecodeError):
                saved[name] = {}  # absent or unreadable: build it
        if any(saved[name].get(k) != v for name, keys in want.items() for k, v in keys.items()
               if not k.startswith("_")):
            pretrain.scratch(final)  # absent, or built for an older mini architecture or objective
    return final


def _ensure_tiny() -> Path:
    """Build the tiny model once (fixed seed) and save it atomically: temp folder + rename."""
    final = paths.MODELS / "tiny"
    try:
        saved = json.loads((final / "config.json").read_text())
        if all(saved.get(k) == v for k, v in TINY_CONFIG.items()):
            return final
    except (OSError, json.JSONDecodeError):
        pass  # absent or stale: (re)build below
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
    try:
        with torch.random.fork_rng(devices=[]):  # don't disturb the caller's RNG stream
            torch.manual_seed(TINY_SEED)
            DiTTransformer2DModel(**TINY_CONFIG).save_pretrained(tmp)
        umask = os.umask(0o22)
        os.umask(umask)  # mkdtemp made the folder private (0700): give it the usual permissions
        for f in (tmp, *tmp.iterdir()):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_folder(folder: Path, spec: str, vae: str) -> Base:
    sub = "transformer" if (folder / "transformer" / "config.json").is_file() else None
    if sub is None and not (folder / "config.json").is_file():
        raise DefectlabError(f"{folder} is not a diffusers DiT folder (no transformer/config.json or config.json)")
    try:
        transformer = DiTTransformer2DModel.from_pretrained(folder, subfolder=sub)
        codec = (VAECodec(AutoencoderKL.from_pretrained(folder / "vae")) if (folder / "vae").is_dir()
                 else _codec_for(transformer, vae))
    except (OSError, ValueError, RuntimeError) as err:
        raise DefectlabError(f"cannot load the model in {folder}: {_first_line(err)}") from err
    sched = folder / "scheduler" / "scheduler_config.json"
    index = folder / "model_index.json"
    return _base(transformer, codec, spec, json.loads(sched.read_text()) if sched.is_file() else None,
                 json.loads(index.read_text()) if index.is_file() else None)


def _load_hub(repo: str, vae: str) -> Base:
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo):  # small files first: a missing/gated/offline repo fails before any weights
        sched = json.loads(Path(hf_hub_download(repo, "scheduler/scheduler_config.json")).read_text())
        index = json.loads(Path(hf_hub_download(repo, "model_index.json")).read_text())  # id2label
        transformer = DiTTransformer2DModel.from_pretrained(repo, subfolder="transformer")
        codec = VAECodec(AutoencoderKL.from_pretrained(repo, subfolder="vae"))
    return _base(transformer, codec, repo, sched, index)


def _codec_for(transformer, vae: str) -> PixelCodec | VAECodec:
    """Pixels for a 3-channel transformer, otherwise the VAE named by ``vae`` (folder or hub id)."""
    if transformer.config.in_channels == 3:
        return PixelCodec()
    folder = Path(vae).expanduser()
    if folder.is_dir():
        return VAECodec(AutoencoderKL.from_pretrained(folder / "vae" if (folder / "vae").is_dir() else folder))
    with _hub_errors(vae, what="VAE"):
        return VAECodec(AutoencoderKL.from_pretrained(vae))


def _base(transformer, codec, spec, sched: dict | None, index: dict | None, original_pt: bool = False) -> Base:
    cfg = transformer.config
    # Keep DiT's DDPM training schedule; take the numbers a shipped scheduler config pins down
    # (the hub's is a DDIM config: same betas, but no variance_type).
    schedule = dit_schedule(cfg.out_channels == 2 * cfg.in_channels, clip_sample=codec.clip_sample)
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type")
    schedule.update({k: v for k, v in (sched or {}).items() if k in keys})
    labels = (index or {}).get("id2label")
    names = ([labels.get(str(i), str(i)) for i in range(num_classes(transformer))]
             if isinstance(labels, dict) and len(labels) == num_classes(transformer) else None)
    return Base(transformer, codec, schedule, spec, cfg.sample_size * codec.downsample, names,
                (index or {}).get("defectlab_anchors"), default_numerics(index, original_pt))


def anchor_class(base: Base, product: str) -> int | None:
    """The base class a product's new classes start from: the base's own mapping (mini ships
    one), else the ImageNet anchor (hazelnut → 990 buckeye, screw → 783 screw) when it exists."""
    from .data import ANCHOR_CLASSES

    anchors = base.anchors or {p: c for p, (c, _) in ANCHOR_CLASSES.items()}
    anchor = anchors.get(product)
    return anchor if anchor is not None and anchor < num_classes(base.transformer) else None


@contextmanager
def _hub_errors(repo: str, what: str = "model"):
    """Turn huggingface_hub / diffusers download errors into one line that says how to get the model."""
    try:
        yield
    except (OSError, ValueError) as err:
        from huggingface_hub import constants, errors as hub

        why = ("gated: accept its licence on huggingface.co, then `hf auth login`"
               if isinstance(err, hub.GatedRepoError) else
               "no such repository on the hub" if isinstance(err, hub.RepositoryNotFoundError) else
               "not a valid hub id" if isinstance(err, hub.HFValidationError) else
               "not in the local cache and offline" if constants.HF_HUB_OFFLINE or isinstance(
                   err, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)) else _first_line(err))
        raise DefectlabError(
            f"{what} {repo!r} not available ({why}); looked for a local file/folder of that name and in the "
            f"Hugging Face cache {constants.HF_HUB_CACHE}; get it with `hf download {repo}` (online) or pass "
            "a local folder or .pt file (presets: tiny, mini, mini-scratch)") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


# ----------------------------------------------------------------------------- original .pt
def _load_original(path: Path, spec: str, vae: str, heads: int = 0) -> Base:
    try:  # weights_only: a pickle that would run code is refused, not executed
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DefectlabError(f"cannot load {path} as a DiT checkpoint (only plain tensor state dicts are "
                             f"accepted, torch.load weights_only=True): {_first_line(err)}") from err
    if isinstance(sd, dict) and isinstance(sd.get("ema", sd.get("model")), dict):
        sd = sd.get("ema", sd.get("model"))  # a DiT train.py checkpoint: prefer the EMA weights
    if not isinstance(sd, dict) or "x_embedder.proj.weight" not in sd:
        raise DefectlabError(f"{path} is not a facebookresearch DiT state dict (no x_embedder.proj.weight)")
    from accelerate import init_empty_weights

    heads = heads or _heads_beside(path)
    with init_empty_weights():  # parameters on meta; buffers (pos_embed) computed for real
        transformer = DiTTransformer2DModel(**original_config(sd, heads=heads, source=path))
    if not torch.allclose(sd["pos_embed"].float(), transformer.pos_embed.pos_embed, atol=1e-5):
        raise DefectlabError(f"{path}: its pos_embed is not DiT's sin-cos table for the inferred size")
    try:
        transformer.load_state_dict(convert_original_state_dict(sd), strict=True, assign=True)
    except RuntimeError as err:
        raise DefectlabError(f"{path}: weights don't fit the inferred DiT config: {_first_line(err)}") from err
    return _base(transformer, _codec_for(transformer, vae), spec, None, None, original_pt=True)


def _heads_beside(path: Path) -> int:
    """``num_attention_heads`` from a ``config.json`` next to an original ``.pt`` (0 = none there)."""
    beside = path.with_name(HEADS_FILE)
    if not beside.is_file():
        return 0
    try:
        heads = json.loads(beside.read_text()).get("num_attention_heads", 0)
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise DefectlabError(f"{beside}: not a JSON object with num_attention_heads ({_first_line(err)})") from err
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
    return dict(_DIT, sample_size=grid * patch, patch_size=patch, in_channels=in_ch,
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


# ----------------------------------------------------------------------------- classes
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
