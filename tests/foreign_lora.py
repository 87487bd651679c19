"""LoRA files in the layouts other tools write, made in the tests from an adapter's diffusers file
(independently of the code under test): kohya keys with the original (LDM/SGM) UNet names, and
ComfyUI's own keys. The original names come from single_file_writer's LDM mapping.

    kohya, original names   lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight
                            lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight (SDXL: te1/te2)
    ComfyUI                 diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight
                            text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj...
                            (SDXL's second encoder: text_encoders.clip_g.transformer...)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from single_file_writer import clip_ldm_key, unet_ldm_key, write_single_file


def lora_modules(diffusers_file: Path) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(component, module path) -> {"down", "up"[, "magnitude"]} from a diffusers LoRA file."""
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(diffusers_file), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            component, _, rest = key.partition(".")
            markers = (
                (".lora_A.weight", "down"),
                (".lora_B.weight", "up"),
                (".lora.down.weight", "down"),  # diffusers' UNet names
                (".lora.up.weight", "up"),
                (".lora_linear_layer.down.weight", "down"),  # diffusers' text-encoder names
                (".lora_linear_layer.up.weight", "up"),
            )
            for marker, kind in markers:
                if rest.endswith(marker):
                    out.setdefault((component, rest[: -len(marker)]), {})[kind] = f.get_tensor(key)
            if rest.endswith(".lora_magnitude_vector"):
                module = rest[: -len(".lora_magnitude_vector")]
                out.setdefault((component, module), {})["magnitude"] = f.get_tensor(key)
    return out


def original_name(component: str, module: str, unet_config: dict) -> str:
    """The module's path in the original-layout model (LDM/SGM UNet, HF CLIP `text_model.` names)."""
    if component == "unet":
        return unet_ldm_key(f"{module}.weight", unet_config).removesuffix(".weight")
    return module if module.startswith("text_model.") else f"text_model.{module}"


def write_foreign(adapter_dir: Path, model_dir: Path, layout: str, out: Path) -> Path:
    """The adapter's LoRA written in `layout` ("kohya-original" or "comfyui") to `out`."""
    alpha = float(json.loads((adapter_dir / "adapter.json").read_text())["alpha"])
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    sdxl = (model_dir / "text_encoder_2").is_dir()
    kohya_te = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    comfy_te = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    tensors: dict[str, torch.Tensor] = {}
    for (component, module), weights in lora_modules(
        adapter_dir / "pytorch_lora_weights.safetensors"
    ).items():
        name = original_name(component, module, unet_config)
        if layout == "kohya-original":
            prefix = "lora_unet" if component == "unet" else kohya_te[component]
            base = f"{prefix}_{name.replace('.', '_')}"
        elif layout == "comfyui":
            base = (
                f"diffusion_model.{name}"
                if component == "unet"
                else f"text_encoders.{comfy_te[component]}.transformer.{name}"
            )
        else:
            raise ValueError(layout)
        tensors[f"{base}.lora_down.weight"] = weights["down"].contiguous()
        tensors[f"{base}.lora_up.weight"] = weights["up"].contiguous()
        tensors[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(out))
    return out


def lora_layer_outputs(pipe) -> dict[str, torch.Tensor]:
    """Every LoRA-wrapped linear layer's effective weight (its output on the identity), by
    component and module name: equal outputs mean the same update, LoRA or DoRA alike."""
    from peft.tuners.lora import LoraLayer

    out = {}
    with torch.no_grad():
        for component in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, component, None)
            if model is None:
                continue
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and isinstance(module.base_layer, torch.nn.Linear):
                    eye = torch.eye(module.base_layer.in_features)
                    out[f"{component}.{name}"] = module(eye)
    return out


def original_layout_names(arch, model, tmp_path) -> dict[str, set[str]]:
    """kohya module names of every weight of the model as kohya's own trainer names them: SDXL's UNet
    from the original (SGM) model (tests/single_file_writer.py writes those names), SD 1.5's from
    diffusers; text encoders from transformers' CLIP (`text_model.` included)."""
    names = write_single_file(model, tmp_path / "single.safetensors")
    te_prefixes = {"text_encoder": "lora_te1" if arch == "sdxl" else "lora_te", "text_encoder_2": "lora_te2"}
    if arch == "sdxl":
        unet = {
            v.removeprefix("model.diffusion_model.").removesuffix(".weight") for v in names["unet"].values()
        }
    else:
        unet = {k.removesuffix(".weight") for k in names["unet"]}
    out = {"lora_unet": {f"lora_unet_{m.replace('.', '_')}" for m in unet}}
    for component, prefix in te_prefixes.items():
        keys = load_file(str(model / component / "model.safetensors")) if (model / component).is_dir() else {}
        modules = {clip_ldm_key(k).removesuffix(".weight") for k in keys}
        out[prefix] = {f"{prefix}_{m.replace('.', '_')}" for m in modules}
    return out
