"""Before a run: can this base model be used here, and roughly what will training cost?

Nothing here loads a model. `check_base_model` looks at names, folders and the local Hugging Face
cache (plus a 3 s connect test to the Hub), so a page can say at once what is missing offline.
`estimate_training` counts the frozen weights' memory exactly from the architecture's parameter
counts and takes time per step from earlier runs on the same base model and resolution; it never
invents a number it has no basis for.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from .config import TINY_MODELS, TrainConfig

# Parameter counts of the real architectures (UNet, text encoder(s), VAE), in millions.
_PARAMS_M = {
    "sd15": {"unet": 859.5, "text_encoders": 123.1, "vae": 83.7},
    "sdxl": {"unet": 2567.5, "text_encoders": 123.1 + 694.7, "vae": 83.7},
}


def check_base_model(base_model: str) -> str:
    """One sentence on whether `base_model` is usable here (without loading it)."""
    from .components import _hub_offline, _hub_reachable, resolve_base_model
    from .events import TrainingError

    name = (base_model or "").strip()
    if not name:
        return "Choose a base model."
    if name == "tiny-shapes":
        from .tiny_shapes import model_dir

        try:
            model_dir()
        except TrainingError as e:
            return str(e)
        return "tiny-shapes is a tiny model pretrained on simple coloured shapes: it learns a subject offline in minutes."
    if name in TINY_MODELS:
        return f"{name} is a tiny random model built offline in seconds: it produces noise and is for trying the app."
    try:
        source = resolve_base_model(name)
    except TrainingError as e:
        return str(e)
    if source.kind == "local":
        return f"Local diffusers folder {source.location}: ready."
    if source.kind == "single_file":
        return f"Single-file checkpoint {Path(source.location).name}: ready."
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "model_index.json"), str):
        return f"{name} is in the local Hugging Face cache: ready."
    if _hub_offline() or not _hub_reachable():
        return (
            f"{name} is not downloaded and the Hugging Face Hub cannot be reached from here; download it where "
            f"there is network (hf download {name}), or pick a local folder, a .safetensors file or a tiny model."
        )
    return f"{name} will be downloaded from the Hugging Face Hub on first use (several GB)."


def recommended_sampling(base_model: str) -> dict | None:
    """Generation settings that suit `base_model` better than the usual ones (25 steps, guidance 7.5,
    a negative prompt), or None. tiny-shapes was pretrained with an empty prompt as its unconditional
    one: a negative prompt of words it never saw pulls its pictures apart (measured: the class's
    colours 287 from the subject's orange instead of 125), and guidance 7.5 over-saturates them."""
    if (base_model or "").strip() == "tiny-shapes":
        from .tiny_shapes import SAMPLING

        return {"steps": SAMPLING["steps"], "guidance": SAMPLING["guidance"], "negative_prompt": ""}
    return None


def _unet_config(base_model: str) -> dict | None:
    """The UNet's config.json of a local diffusers folder or a cached Hub model, without loading it."""
    name = (base_model or "").strip()
    path = Path(name).expanduser()
    config_file = None
    if path.is_dir():
        config_file = path / "unet" / "config.json"
    elif path.suffix != ".safetensors" and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "unet/config.json")
            config_file = Path(cached) if isinstance(cached, str) else None
        except ValueError:  # not a valid repo id
            config_file = None
    try:
        return json.loads(config_file.read_text()) if config_file else None
    except (OSError, ValueError):
        return None


def guess_architecture(base_model: str) -> str | None:
    """ "sd15", "sdxl" or None, from the name or the UNet config on disk (cache included)."""
    name = (base_model or "").strip()
    if name in TINY_MODELS:
        return TINY_MODELS[name][0]
    config = _unet_config(name)
    if config is not None:
        # SDXL's UNet takes pooled text embeddings and time ids ("text_time"); SD 1.5's does not.
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    return "sdxl" if "xl" in Path(name).name.lower() else None


def native_resolution(base_model: str) -> int:
    """The resolution a model trains at by default: 512 for SD 1.5, 1024 for SDXL, 64 for the tiny ones."""
    from .shapes import TINY_SD15, TINY_SDXL, SD15Shape, SDXLShape

    name = (base_model or "").strip()
    if name in TINY_MODELS:
        return (TINY_SDXL if TINY_MODELS[name][0] == "sdxl" else TINY_SD15).resolution
    config = _unet_config(name)
    if config and config.get("sample_size"):
        return int(config["sample_size"]) * 8  # latents are 1/8 of the pixels (the VAE's 3 downsamples)
    return SDXLShape().resolution if guess_architecture(name) == "sdxl" else SD15Shape().resolution


@dataclass(frozen=True)
class Estimate:
    weights_gb: float | None  # frozen weights in the training precision (exact for real models)
    seconds: float | None  # training steps only, from earlier runs; None without a basis
    basis: str  # what the numbers come from, in words

    def text(self) -> str:
        parts = []
        if self.weights_gb is not None:
            parts.append(f"model weights take about {self.weights_gb:.1f} GB of memory, plus activations")
        if self.seconds is not None:
            minutes = self.seconds / 60
            parts.append(
                f"about {minutes:.0f} min of training"
                if minutes >= 1
                else f"about {self.seconds:.0f} s of training"
            )
        head = "; ".join(parts) if parts else "no estimate yet"
        return f"Estimate: {head} ({self.basis})."


def estimate_training(config: TrainConfig, runs_dir: str | Path | None = None) -> Estimate:
    arch = guess_architecture(config.base_model)
    basis = []
    weights_gb = None
    if config.base_model.startswith("tiny-"):
        weights_gb = 0.1
        basis.append("tiny test model")
    elif arch in _PARAMS_M:
        bytes_per = 2 if config.mixed_precision in ("fp16", "bf16") else 4
        millions = sum(_PARAMS_M[arch].values())
        if arch == "sdxl" and config.mixed_precision in ("fp16", "bf16"):
            millions += _PARAMS_M[arch]["vae"]  # SDXL's VAE is kept in fp32: fp16 overflows
        weights_gb = millions * 1e6 * bytes_per / 2**30
        basis.append(f"{arch.upper()} parameter counts at {'16' if bytes_per == 2 else '32'}-bit")
    seconds = None
    per_step = _seconds_per_step(config, runs_dir) if runs_dir else None
    if per_step is not None:
        seconds = per_step * config.max_train_steps
        basis.append(f"{per_step:.2f} s/step measured in earlier runs of this model")
    else:
        basis.append("time per step is shown once training starts")
    return Estimate(weights_gb, seconds, "; ".join(basis))


def _seconds_per_step(config: TrainConfig, runs_dir: str | Path) -> float | None:
    """Median seconds per step of earlier finished runs with the same model, resolution and batch."""
    rates = []
    for status_file in Path(runs_dir).glob("*/status.json"):
        try:
            status = json.loads(status_file.read_text())
            other = json.loads((status_file.parent / "config.json").read_text())
        except (OSError, ValueError):
            continue
        summary = status.get("summary") or {}
        same = all(
            other.get(k) == getattr(config, k)
            for k in ("base_model", "resolution", "train_batch_size", "gradient_accumulation_steps",
                      "with_prior_preservation", "mixed_precision", "gradient_checkpointing")
        )  # fmt: skip
        if same and summary.get("steps") and summary.get("seconds"):
            rates.append(summary["seconds"] / summary["steps"])
    return statistics.median(rates) if rates else None
