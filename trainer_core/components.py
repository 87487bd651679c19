"""Base model parts: load them from a Hub id, a local diffusers folder or a single-file checkpoint,
build the tiny offline test models, and attach LoRA adapters with peft.

`tiny-sd15` is a random model with the real SD 1.5 layout (CLIP text encoder, KL VAE with four
blocks, a UNet with three cross-attention down blocks) at toy widths; `tiny-sdxl` one with the SDXL
layout (two text encoders, the second with a pooled projection, a UNet whose first block has no
attention and whose "text_time" embedding takes the pooled prompt and the image sizes). They are
written once to a cache folder and then loaded through the same `from_pretrained` path as a real
model. SDXL parts carry `text_encoder_2` and `tokenizer_2`; `is_sdxl(parts)` tells them apart.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TINY_MODELS
from .events import TrainingError, first_line
from .shapes import TINY_SD15, TINY_SDXL, SD15Shape, SDXLShape

log = logging.getLogger(__name__)

ARCHITECTURES = ("sd15", "sdxl")
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def studio_home() -> Path:
    """Root of the app's caches (tiny models, class images). DREAMBOOTH_STUDIO_HOME overrides."""
    env = os.environ.get("DREAMBOOTH_STUDIO_HOME")
    return Path(env) if env else Path.home() / ".cache" / "dreambooth-studio"


# ---------------------------------------------------------------------------------------------
# Tiny offline model
# ---------------------------------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE tokenizers (CLIP's too) use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_tokenizer():
    """A CLIP tokenizer with a character-level vocabulary, generated here (no Hub)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_level_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_sd15(shape: SD15Shape, seed: int = 0) -> dict[str, Any]:
    """Random SD 1.5-architecture components at `shape`'s widths, with the SD 1.5 noise schedule.

    The tokenizer is the locally generated character-level CLIP tokenizer (no Hub).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=shape.resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=shape.text_hidden,
        attention_head_dim=shape.attention_head_dim,
        norm_num_groups=shape.norm_groups,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=shape.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=shape.vae_layers_per_block,
        norm_num_groups=shape.norm_groups,
        sample_size=shape.resolution,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_intermediate,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=shape.text_hidden,
        )
    )
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_training_scheduler()
    )


def _training_scheduler():
    """The SD 1.5 / SDXL training noise schedule (both models were trained on it)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_sdxl(shape: SDXLShape, seed: int = 0) -> dict[str, Any]:
    """Random SDXL-architecture components at `shape`'s widths (both tokenizers generated here)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    blocks = len(shape.unet_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=shape.resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",),
        transformer_layers_per_block=shape.transformer_layers_per_block,
        attention_head_dim=shape.attention_head_dim,
        cross_attention_dim=shape.text_hidden + shape.text2_hidden,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=shape.addition_time_embed_dim,
        # pooled text embedding + 6 size numbers, each embedded in addition_time_embed_dim
        projection_class_embeddings_input_dim=shape.text2_projection + 6 * shape.addition_time_embed_dim,
        norm_num_groups=shape.norm_groups,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=shape.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels),
        latent_channels=4,
        layers_per_block=shape.vae_layers_per_block,
        norm_num_groups=shape.norm_groups,
        sample_size=shape.resolution,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=True,  # SDXL's VAE overflows in fp16
    )

    def clip_config(hidden, layers, heads, intermediate, projection, act):
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=projection,
            hidden_act=act,
        )

    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        clip_config(
            shape.text_hidden,
            shape.text_layers,
            shape.text_heads,
            shape.text_intermediate,
            shape.text_hidden,
            "quick_gelu",
        )
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_config(
            shape.text2_hidden,
            shape.text2_layers,
            shape.text2_heads,
            shape.text2_intermediate,
            shape.text2_projection,
            "gelu",
        )
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=_training_scheduler(),
    )


def build_tiny_sdxl(seed: int = 0) -> dict[str, Any]:
    """Tiny random SDXL-architecture components, built offline in about a second."""
    return build_sdxl(TINY_SDXL, seed)


def architecture(model: Any) -> str:
    """ "sdxl" or "sd15" for loaded parts (a dict), a pipeline or a UNet: the one rule everywhere
    is the UNet's, SDXL's takes the "text_time" added embedding (pooled prompt and image sizes).
    (A single-file checkpoint, not loaded yet, is told by its tensor names: single_file_architecture.)"""
    unet = model.get("unet") if isinstance(model, dict) else getattr(model, "unet", model)
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd15"


def is_sdxl(model: Any) -> bool:
    return architecture(model) == "sdxl"


def build_tiny_sd15(seed: int = 0) -> dict[str, Any]:
    """Tiny random SD 1.5-architecture components, built offline in about a second."""
    return build_sd15(TINY_SD15, seed)


def assemble_pipeline(parts: dict[str, Any], scheduler=None):
    """A StableDiffusionPipeline, or for SDXL parts a StableDiffusionXLPipeline, over already-loaded
    parts (no copy), progress bar off.

    No safety checker and no watermarker: the models are the user's own, and the checker is a
    separate download. `scheduler` replaces the parts' (training) scheduler, e.g. a DPM-Solver.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if is_sdxl(parts):
        pipe = StableDiffusionXLPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            text_encoder_2=parts["text_encoder_2"],
            tokenizer=parts["tokenizer"],
            tokenizer_2=parts["tokenizer_2"],
            unet=parts["unet"],
            scheduler=scheduler or parts["scheduler"],
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            unet=parts["unet"],
            scheduler=scheduler or parts["scheduler"],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sd15(parts: dict[str, Any], out_dir: str | Path, *, tiny: bool) -> Path:
    """Write components (SD 1.5 or SDXL) as a diffusers folder (atomically), loadable by `from_pretrained`."""
    from .fileio import atomic_directory

    out = Path(out_dir)
    pipe = assemble_pipeline(parts)
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if tiny:
            marker = {"tiny": True, "arch": architecture(parts)}
            (tmp / "dreambooth_studio.json").write_text(json.dumps(marker) + "\n")
    return out


save_model = save_sd15


def make_tiny_model(out_dir: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Save a tiny random model ("sd15" or "sdxl") as a diffusers folder loadable by `from_pretrained`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    parts = build_tiny_sdxl(seed) if arch == "sdxl" else build_tiny_sd15(seed)
    return save_model(parts, out_dir, tiny=True)


def tiny_model_dir(name: str) -> Path:
    """The cached folder of a built-in tiny model, built on first use.

    A file lock makes concurrent first uses (several `accelerate launch` processes, two app
    threads) build it once; the others wait and then load the finished folder.
    """
    import fcntl

    if name == "tiny-shapes":  # pretrained, shipped in the repository (see tiny_shapes.py)
        from .tiny_shapes import model_dir

        return model_dir()
    arch = TINY_MODELS[name][0]
    path = studio_home() / "models" / name
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (path / "model_index.json").exists():
                log.info("building %s in %s", name, path)
                make_tiny_model(path, arch=arch)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "tiny", "local", "single_file" or "hub"
    location: str  # folder, file or Hub id actually loaded
    name: str  # what the user gave

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny" or _is_tiny_folder(Path(self.location))


def _is_tiny_folder(path: Path) -> bool:
    marker = path / "dreambooth_studio.json"
    try:
        return bool(json.loads(marker.read_text()).get("tiny"))
    except (OSError, ValueError):
        return False


def resolve_base_model(base_model: str) -> ModelSource:
    name = str(base_model).strip()
    if name in TINY_MODELS:
        return ModelSource("tiny", str(tiny_model_dir(name)), name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists() and not (path / "unet" / "config.json").exists():
            raise TrainingError(
                f"The folder {name} is not a diffusers model (no model_index.json); "
                "pass a diffusers folder, a .safetensors checkpoint, a Hub id or tiny-sd15."
            )
        return ModelSource("local", str(path.resolve()), name)
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
        if not path.is_file():
            raise TrainingError(f"The checkpoint file {name} does not exist.")
        if path.suffix.lower() != ".safetensors":
            raise TrainingError(
                f"{path.name} is a pickle checkpoint, which can run code when loaded; "
                "convert it to .safetensors first."
            )
        return ModelSource("single_file", str(path.resolve()), name)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise TrainingError(f"The base model path {name} does not exist.")
    return ModelSource("hub", name, name)


def _offline_message(source: ModelSource, err: Exception) -> str:
    return (
        f"Could not load the base model '{source.name}' from the Hugging Face Hub "
        f"(offline or not in the local cache: {type(err).__name__}); "
        "pass a local diffusers folder or .safetensors file, or use tiny-sd15 to try the workflow offline."
    )


def load_components(
    base_model: str,
    *,
    dtype: torch.dtype = torch.float32,
    single_file_config: str | None = None,
) -> tuple[dict[str, Any], ModelSource]:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler (for SDXL also
    `tokenizer_2` and `text_encoder_2`), from a Hub id, a diffusers folder or a single file.

    Returns the parts and where they came from. Errors are TrainingError with one sentence.
    """
    source = resolve_base_model(base_model)
    if source.kind == "single_file":
        return _load_single_file(source, dtype=dtype, config=single_file_config), source

    loc = source.location
    try:
        parts = _from_pretrained(loc, dtype, local_only=True)
    except (OSError, ValueError) as e:
        if source.kind != "hub":
            raise TrainingError(f"Could not load the base model from {loc}: {first_line(e)}") from e
        # Not (fully) in the local cache. Without network, huggingface_hub would retry every
        # file for minutes before failing; a short connect to the Hub decides at once.
        if _hub_offline() or not _hub_reachable():
            raise TrainingError(_offline_message(source, e)) from e
        try:
            parts = _from_pretrained(loc, dtype, local_only=False)
        except (OSError, ValueError) as e2:
            raise TrainingError(
                f"Could not download the base model '{source.name}' from the Hugging Face Hub: {first_line(e2)}"
            ) from e2
    _check_layout(parts, source)
    return parts, source


def _from_pretrained(loc: str, dtype: torch.dtype, *, local_only: bool) -> dict[str, Any]:
    """The parts of a diffusers folder or Hub repo; SDXL (a "text_time" UNet) adds the second
    tokenizer and text encoder (with its pooled projection)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw: dict[str, Any] = dict(local_files_only=local_only)
    unet = UNet2DConditionModel.from_pretrained(loc, subfolder="unet", torch_dtype=dtype, **kw)
    parts = dict(
        tokenizer=CLIPTokenizer.from_pretrained(loc, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(loc, subfolder="text_encoder", dtype=dtype, **kw),
        vae=AutoencoderKL.from_pretrained(loc, subfolder="vae", torch_dtype=dtype, **kw),
        unet=unet,
        scheduler=DDPMScheduler.from_pretrained(loc, subfolder="scheduler", **kw),
    )
    if is_sdxl(unet):
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(loc, subfolder="tokenizer_2", **kw)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            loc, subfolder="text_encoder_2", dtype=dtype, **kw
        )
    return parts


def load_vae(vae: str, *, dtype: torch.dtype = torch.float32):
    """A replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix) from a Hub id or a local folder that
    holds either the VAE itself (config.json) or a whole model (vae/config.json)."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    local = path.is_dir()
    if local:
        loc, subfolder = str(path), (None if (path / "config.json").exists() else "vae")
    elif vae.startswith((".", "/", "~")):
        raise TrainingError(f"The VAE folder {vae} does not exist.")
    else:
        loc, subfolder = vae, None
    try:
        return AutoencoderKL.from_pretrained(
            loc, subfolder=subfolder, torch_dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError) as e:
        # As for base models: without network huggingface_hub would retry for minutes.
        if local:
            raise TrainingError(f"Could not load the VAE from {vae}: {first_line(e)}") from e
        if _hub_offline() or not _hub_reachable():
            raise TrainingError(
                f"Could not load the VAE {vae} from the Hugging Face Hub (offline or not in the local cache)."
            ) from e
    try:
        return AutoencoderKL.from_pretrained(loc, subfolder=subfolder, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise TrainingError(f"Could not download the VAE {vae}: {first_line(e)}") from e


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint (HF_ENDPOINT) opens within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def single_file_architecture(path: str | Path) -> str:
    """ "sdxl" or "sd15" from a single-file checkpoint's tensor names (read from its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise TrainingError(
            f"Could not load the single-file checkpoint {Path(path).name}: {first_line(e)}."
        ) from e
    # SDXL checkpoints hold a second text encoder ("conditioner.embedders.1") and the size embedding.
    sdxl = any(k.startswith("conditioner.embedders.1.") or ".label_emb." in k for k in keys)
    return "sdxl" if sdxl else "sd15"


def _load_single_file(source: ModelSource, *, dtype: torch.dtype, config: str | None) -> dict[str, Any]:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    arch = single_file_architecture(source.location)
    pipeline_class = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    kw: dict[str, Any] = dict(torch_dtype=dtype, local_files_only=_hub_offline())
    if config is not None:
        config_source = resolve_base_model(config)
        kw["config"] = config_source.location
        kw["local_files_only"] = kw["local_files_only"] or config_source.kind != "hub"
    try:
        pipe = pipeline_class.from_single_file(source.location, **kw)
    except Exception as e:  # diffusers raises many types here (OSError, ValueError, KeyError)
        hint = (
            "; offline, pass the matching diffusers folder with --single-file-config"
            if config is None
            else ""
        )
        raise TrainingError(
            f"Could not load the single-file checkpoint {Path(source.location).name}: {first_line(e)}{hint}."
        ) from e
    parts = dict(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
    )
    if arch == "sdxl":
        parts.update(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)
    _check_layout(parts, source)
    return parts


def _check_layout(parts: dict[str, Any], source: ModelSource) -> None:
    """The UNet's cross-attention width must be the text encoder(s)' hidden size(s) together."""
    unet = parts["unet"]
    if is_sdxl(unet) != (parts.get("text_encoder_2") is not None):
        raise TrainingError(f"'{source.name}' has a UNet and text encoders of different architectures.")
    width = parts["text_encoder"].config.hidden_size
    if is_sdxl(parts):
        width += parts["text_encoder_2"].config.hidden_size
    if unet.config.cross_attention_dim != width:
        raise TrainingError(f"'{source.name}' has a UNet and text encoder that do not match.")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def default_resolution(unet, vae) -> int:
    return int(unet.config.sample_size) * vae_scale_factor(vae)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def unet_lora_config(rank: int, alpha: float, use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=UNET_LORA_TARGETS,
        use_dora=use_dora,
    )


def text_encoder_lora_config(
    rank: int, alpha: float, use_dora: bool = False, *, num_layers: int | None = None
):
    """LoRA (or DoRA) for a CLIP text encoder's attention; with `num_layers`, only on its first
    `num_layers` encoder layers (SDXL reads the first encoder's penultimate hidden state, so a LoRA on
    its last layer would never get a gradient: dead weights, and under DDP an unfinished reduction)."""
    from peft import LoraConfig

    layers = dict(layers_to_transform=list(range(num_layers)), layers_pattern="layers") if num_layers else {}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=TEXT_ENCODER_LORA_TARGETS,
        use_dora=use_dora,
        **layers,
    )


def add_lora(
    unet,
    text_encoder,
    *,
    rank: int,
    alpha: float,
    train_text_encoder: bool,
    text_encoder_2=None,
    use_dora: bool = False,
) -> None:
    """Freeze the base weights and attach LoRA adapters (peft) that are the only trainable params.

    With `train_text_encoder`, each text encoder (both of SDXL's) gets its own LoRA, on the layers
    whose output the UNet's conditioning uses: SDXL conditions on both encoders' penultimate hidden
    states (plus the second one's pooled output, which runs through its last layer), so the first
    encoder's last layer gets none. With `use_dora`, DoRA (each layer's weight magnitude trained
    apart from its LoRA-updated direction).
    """
    encoders = [te for te in (text_encoder, text_encoder_2) if te is not None]
    unet.requires_grad_(False)
    for te in encoders:
        te.requires_grad_(False)
    unet.add_adapter(unet_lora_config(rank, alpha, use_dora))
    if train_text_encoder:
        sdxl = text_encoder_2 is not None
        first_layers = text_encoder.config.num_hidden_layers - 1 if sdxl else None
        text_encoder.add_adapter(text_encoder_lora_config(rank, alpha, use_dora, num_layers=first_layers))
        if sdxl:
            text_encoder_2.add_adapter(text_encoder_lora_config(rank, alpha, use_dora))


def lora_parameters(*models) -> list[torch.nn.Parameter]:
    return [p for m in models for p in m.parameters() if p.requires_grad]


def dora_magnitudes(*models) -> list[torch.nn.Parameter]:
    """The trainable DoRA magnitude vectors (peft's `lora_magnitude_vector`) of the models."""
    return [
        p
        for m in models
        for name, p in m.named_parameters()
        if p.requires_grad and "lora_magnitude_vector" in name
    ]
