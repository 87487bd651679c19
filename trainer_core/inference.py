"""Image generation with a base model and zero or more saved adapters.

The pipeline is built from the same loaded parts as training (so every base-model source works),
adapters are loaded by name with `load_lora_weights` and combined with `set_adapters`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .adapters import LORA_WEIGHT_NAME, read_adapter, sanitize_name
from .components import assemble_pipeline, load_components
from .events import TrainingError

log = logging.getLogger(__name__)

SCHEDULERS = ("dpm++", "euler_a", "ddim")


def load_pipeline(
    base_model: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    scheduler: str = "dpm++",
    single_file_config: str | None = None,
):
    """A text-to-image pipeline for `base_model`: fp16 on CUDA, fp32 on the CPU, progress bars off."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    parts, _source = load_components(base_model, dtype=dtype, single_file_config=single_file_config)
    pipe = assemble_pipeline(parts, make_scheduler(scheduler, parts["scheduler"].config))
    return pipe.to(device)


def make_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    raise ValueError(f"scheduler: must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def apply_adapters(
    pipe, adapter_dirs: Sequence[str | Path], weights: Sequence[float] | None = None
) -> list[str]:
    """Load the adapters (once each, by name) and activate them with their weights."""
    if weights is not None and len(weights) != len(adapter_dirs):
        raise ValueError(f"adapter_weights: {len(weights)} weights for {len(adapter_dirs)} adapters")
    names = []
    loaded = set(pipe.get_list_adapters().get("unet", [])) if hasattr(pipe, "get_list_adapters") else set()
    for folder in adapter_dirs:
        folder = Path(folder)
        if not (folder / LORA_WEIGHT_NAME).is_file():
            raise TrainingError(f"{folder} is not an adapter folder (no {LORA_WEIGHT_NAME}).")
        info = read_adapter(folder) if (folder / "adapter.json").exists() else {"name": folder.name}
        if info.get("architecture", "sd15") != "sd15":
            raise TrainingError(
                f"The adapter {folder.name} was trained for {info['architecture']}, not SD 1.5."
            )
        name = sanitize_name(info.get("name") or folder.name)
        while name in names:
            name += "_"
        if name not in loaded:
            pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=list(weights) if weights is not None else [1.0] * len(names))
    elif hasattr(pipe, "disable_lora"):
        pipe.disable_lora()
    return names


def generate(
    pipe,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
):
    """Images for `prompt`; the same seed and settings give the same images."""
    if not prompt or not prompt.strip():
        raise ValueError("prompt: must contain text")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or size, height or size
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise ValueError(f"{name}: must be a multiple of 8, got {value}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        return pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            num_images_per_prompt=num_images,
            generator=generator,
        ).images
