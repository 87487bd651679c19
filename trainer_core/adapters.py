"""The adapter folder: diffusers/peft LoRA weights, a kohya-key copy for AUTOMATIC1111 / ComfyUI,
metadata, the training config, metrics, samples and a model card, written atomically.

Layout (the contract in DESIGN.md):
    pytorch_lora_weights.safetensors   loadable by `pipe.load_lora_weights(folder)`
    <name>.safetensors                 kohya keys (lora_unet_*, lora_te_*, with alpha)
    adapter.json, config.json, metrics.jsonl, samples/, README.md
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .events import TrainingError
from .fileio import atomic_directory

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_name(name: str) -> str:
    """A file-system-safe adapter name: letters, digits, '.', '_' and '-', no leading dot."""
    cleaned = _NAME_OK.sub("-", name.strip()).strip("-.")[:64]
    if not cleaned:
        raise ValueError(f"adapter_name: {name!r} has no usable characters")
    return cleaned


def default_adapter_name(instance_prompt: str) -> str:
    words = re.sub(
        r"^(a|an)\s+(photo|picture|image)\s+(of|in)\s+(the\s+)?", "", instance_prompt.strip(), flags=re.I
    )
    return sanitize_name(words.replace(" ", "-").lower() or "adapter")


def peft_lora_state(model) -> dict[str, torch.Tensor]:
    """The model's LoRA weights in peft's key format, detached fp32 copies on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()
    }


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise TrainingError(f"The {what} contain NaN or infinite values ({key}); nothing was saved.")


def to_kohya(
    unet_lora: dict[str, torch.Tensor],
    te_lora: dict[str, torch.Tensor] | None,
    alpha: float,
    *,
    te_prefix: str = "lora_te",
) -> dict[str, torch.Tensor]:
    """peft-key LoRA weights -> kohya sd-scripts keys, the format A1111 and ComfyUI load.

    kohya names a module by its diffusers path with dots as underscores; lora_A/lora_B become
    lora_down/lora_up, and each module carries its alpha (the update is scaled by alpha / rank).
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, state in (("lora_unet", unet_lora), (te_prefix, te_lora or {})):
        for key, tensor in state.items():
            module, _, kind = key.rpartition(".lora_")  # "down_blocks.0...to_q", "A.weight"
            name = f"{prefix}_{module.replace('.', '_')}"
            if kind == "A.weight":
                out[f"{name}.lora_down.weight"] = tensor.contiguous()
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
            elif kind == "B.weight":
                out[f"{name}.lora_up.weight"] = tensor.contiguous()
            else:
                raise ValueError(f"unexpected LoRA key {key}")
    return out


def save_adapter(
    adapter_dir: str | Path,
    *,
    unet,
    text_encoder=None,
    name: str,
    metadata: dict[str, Any],
    config_json: str,
    metrics_file: Path | None = None,
    samples_dir: Path | None = None,
) -> Path:
    """Write the complete adapter folder atomically; an existing folder is replaced only on success."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    name = sanitize_name(name)
    unet_lora = peft_lora_state(unet)
    te_lora = peft_lora_state(text_encoder) if text_encoder is not None and _has_lora(text_encoder) else None
    if not unet_lora:
        raise TrainingError("The UNet has no LoRA weights to save.")
    check_finite(unet_lora, "UNet LoRA weights")
    if te_lora:
        check_finite(te_lora, "text-encoder LoRA weights")
    unet_cfg = unet.peft_config["default"]
    alpha = float(unet_cfg.lora_alpha)

    adapter_dir = Path(adapter_dir)
    with atomic_directory(adapter_dir) as tmp:
        # The adapter metadata carries lora_alpha: without it diffusers would load alpha = rank and
        # silently scale the update wrongly whenever alpha != rank.
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_lora),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(te_lora) if te_lora else None,
            unet_lora_adapter_metadata=unet_cfg.to_dict(),
            text_encoder_lora_adapter_metadata=(
                text_encoder.peft_config["default"].to_dict() if te_lora else None
            ),
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
        )
        rank = int(unet_cfg.r)
        save_file(
            to_kohya(unet_lora, te_lora, alpha),
            str(tmp / f"{name}.safetensors"),
            metadata={
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha),
                "ss_base_model_version": "sd_v1",
                "ss_output_name": name,
            },
        )
        info = {
            "name": name,
            "architecture": "sd15",
            "rank": rank,
            "alpha": alpha,
            "text_encoder_lora": bool(te_lora),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {"diffusers": LORA_WEIGHT_NAME, "kohya": f"{name}.safetensors"},
            **metadata,
        }
        (tmp / "adapter.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(config_json.rstrip() + "\n")
        if metrics_file is not None and metrics_file.exists():
            shutil.copyfile(metrics_file, tmp / "metrics.jsonl")
        else:
            (tmp / "metrics.jsonl").write_text("")
        (tmp / "samples").mkdir()
        if samples_dir is not None and samples_dir.is_dir():
            for p in sorted(samples_dir.glob("*.png")):
                shutil.copyfile(p, tmp / "samples" / p.name)
        (tmp / "README.md").write_text(model_card(info))
    return adapter_dir


def _has_lora(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def read_adapter(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / "adapter.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"{adapter_dir} is not an adapter folder (no readable adapter.json).") from e


def model_card(info: dict[str, Any]) -> str:
    name = info["name"]
    trigger = info.get("token") or ""
    return f"""---
library_name: diffusers
base_model: {info.get("base_model", "")}
tags: [stable-diffusion, lora, dreambooth, text-to-image]
instance_prompt: {json.dumps(info.get("instance_prompt", ""))}
---

# {name}

A DreamBooth LoRA (rank {info["rank"]}, alpha {info["alpha"]:g}) trained with DreamBooth Studio on
`{info.get("base_model", "")}` for {info.get("steps", "?")} steps.

- Instance prompt: `{info.get("instance_prompt", "")}`
- Trigger word: `{trigger}`
- Class prompt (prior preservation): `{info.get("class_prompt") or "none"}`

## Use it

diffusers:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{info.get("base_model", "")}")
pipe.load_lora_weights("path/to/this/folder")
image = pipe("{info.get("instance_prompt", "")}").images[0]
```

AUTOMATIC1111: copy `{name}.safetensors` into `models/Lora` and prompt with
`<lora:{name}:1> {info.get("instance_prompt", "")}`.

ComfyUI: copy `{name}.safetensors` into `models/loras` and load it with a "Load LoRA" node.
"""
