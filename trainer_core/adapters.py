"""The adapter folder: diffusers/peft LoRA weights, a kohya-key copy for AUTOMATIC1111 / ComfyUI,
metadata, the training config, metrics, samples and a model card, written atomically.

Layout (the contract in DESIGN.md):
    pytorch_lora_weights.safetensors   loadable by `pipe.load_lora_weights(folder)`
    <name>.safetensors                 kohya keys named as kohya's trainer names them (lora_unet_* from
                                       diffusers names for SD 1.5, from the original SGM UNet for SDXL;
                                       lora_te_*, or lora_te1_* / lora_te2_* for SDXL), each with its alpha
    adapter.json, config.json, metrics.jsonl, samples/, README.md

With pivotal tuning the new tokens' embeddings come too, as `<name>_emb.safetensors` in the layout
AUTOMATIC1111 and ComfyUI load (`clip_l`/`clip_g` for SDXL, `emb_params` for SD 1.5; see pivotal.py),
and the model card says how to use them in each tool.

A DoRA (use_dora) is saved with its magnitudes too: `lora_magnitude_vector` in the diffusers file,
`<module>.dora_scale` (per output feature, as ComfyUI and Forge apply it) in the kohya file.

`import_adapter` adds a LoRA file made elsewhere (diffusers/peft keys, kohya keys with diffusers or
original UNet names, ComfyUI's own keys) to an adapter store as the same kind of folder, after
checking that it is a real safetensors file that fits the base model.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .events import TrainingError, first_line
from .fileio import atomic_directory
from .store import kohya_file_name

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


def peft_lora_state(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The model's LoRA weights in peft's key format, detached fp32 copies on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise TrainingError(f"The {what} contain NaN or infinite values ({key}); nothing was saved.")


def to_kohya(
    unet_lora: dict[str, torch.Tensor],
    te_lora: dict[str, torch.Tensor] | None,
    alpha: float | dict[str, float],
    *,
    te_prefix: str = "lora_te",
    te2_lora: dict[str, torch.Tensor] | None = None,
    sgm_layers_per_block: int | None = None,
    dora_scales: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """peft-key LoRA weights -> kohya sd-scripts keys, the format A1111 and ComfyUI load.

    kohya names a module by its path with dots as underscores; lora_A/lora_B become
    lora_down/lora_up, and each module carries its alpha (the update is scaled by alpha / rank).
    `alpha` is one number, or per module ("lora_unet_..." kohya name -> alpha). SDXL passes
    te_prefix="lora_te1", its second text encoder as `te2_lora` (lora_te2_...) and its UNet's
    `sgm_layers_per_block`: kohya trains SDXL on the original (SGM) UNet and names its modules
    from it (input_blocks/middle_block/output_blocks); SD 1.5 keeps the diffusers names, as kohya
    writes them. Text-encoder modules are named from `text_model`, as A1111 and ComfyUI expect.
    A DoRA's magnitudes come as `dora_scales` (kohya name -> `<name>.dora_scale`, see
    `_dora_scales`); peft's lora_magnitude_vector keys are left out.
    """
    out: dict[str, torch.Tensor] = {
        f"{name}.dora_scale": t.contiguous() for name, t in (dora_scales or {}).items()
    }
    groups = (("lora_unet", unet_lora), (te_prefix, te_lora or {}), ("lora_te2", te2_lora or {}))
    for prefix, state in groups:
        for key, tensor in state.items():
            module, _, kind = key.rpartition(".lora_")  # "down_blocks.0...to_q", "A.weight"
            name = kohya_name(prefix, module, sgm_layers_per_block)
            if kind == "A.weight":
                out[f"{name}.lora_down.weight"] = tensor.contiguous()
                module_alpha = alpha[name] if isinstance(alpha, dict) else alpha
                out[f"{name}.alpha"] = torch.tensor(float(module_alpha))
            elif kind == "B.weight":
                out[f"{name}.lora_up.weight"] = tensor.contiguous()
            elif kind == "magnitude_vector":
                if f"{name}.dora_scale" not in out:
                    raise ValueError(f"no dora_scale given for the DoRA module {name}")
            else:
                raise ValueError(f"unexpected LoRA key {key}")
    return out


def kohya_name(prefix: str, module: str, sgm_layers_per_block: int | None = None) -> str:
    """kohya's name of a LoRA module: "lora_unet" + "down_blocks.1.attentions.0...to_q" ->
    "lora_unet_down_blocks_1_attentions_0_..._to_q", or with `sgm_layers_per_block` (SDXL)
    "lora_unet_input_blocks_4_1_..._to_q"."""
    if prefix == "lora_unet" and sgm_layers_per_block is not None:
        module = sgm_unet_module(module, sgm_layers_per_block)
    elif prefix != "lora_unet" and not module.startswith("text_model."):
        module = f"text_model.{module}"  # transformers >= 5 CLIPTextModel has no text_model level
    return f"{prefix}_{module.replace('.', '_')}"


# diffusers ResnetBlock2D sub-module -> the original (LDM/SGM) ResBlock's
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sgm_unet_module(module: str, layers_per_block: int) -> str:
    """The original-UNet (SGM/LDM) path of a diffusers UNet module, as kohya names SDXL modules:
    down_blocks.b.{resnets|attentions}.j -> input_blocks.(1 + b*(L+1) + j).{0|1},
    mid_block.{resnets.0|attentions.0|resnets.1} -> middle_block.{0|1|2},
    up_blocks.b.{resnets|attentions}.j -> output_blocks.(b*(L+1) + j).{0|1} (L = layers per block).
    """
    if module in _SGM_TOP:
        return _SGM_TOP[module]
    parts = module.split(".")
    per = layers_per_block + 1
    if parts[0] == "down_blocks" and parts[2] == "downsamplers":
        return f"input_blocks.{1 + int(parts[1]) * per + layers_per_block}.0.op"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        block = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * j}"
    elif parts[0] in ("down_blocks", "up_blocks"):
        kind, b, j, rest = parts[2], int(parts[1]), int(parts[3]), parts[4:]
        index = 1 + b * per + j if parts[0] == "down_blocks" else b * per + j
        sgm_blocks = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
        block = f"{sgm_blocks}.{index}.{1 if kind == 'attentions' else 0}"
    else:
        kind, block, rest = "", "", []
    if kind == "attentions":
        return ".".join([block, *rest])
    if kind == "resnets" and ".".join(rest) in _SGM_RESNET:
        return f"{block}.{_SGM_RESNET['.'.join(rest)]}"
    raise ValueError(f"no original-UNet name for the diffusers module {module!r}")


def _module_alphas(
    model, prefix: str, adapter: str, sgm_layers_per_block: int | None = None
) -> dict[str, float]:
    """Each LoRA module's effective alpha (scaling x rank), by kohya name: exact for per-module
    ranks and alphas (imported adapters), equal to the config's alpha for trained ones."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            name = kohya_name(prefix, module_name, sgm_layers_per_block)
            out[name] = float(module.scaling[adapter]) * int(module.r[adapter])
    return out


def _dora_scales(
    model, prefix: str, adapter: str, sgm_layers_per_block: int | None = None
) -> dict[str, torch.Tensor]:
    """Each DoRA module's magnitude in the layout ComfyUI and Forge apply, by kohya name.

    peft's DoRA gives a layer W' = m * (W + dW) / ||W + dW|| (row norms: one magnitude per output
    feature). ComfyUI and Forge read a `dora_scale` of shape (out, 1) as per-output magnitudes and
    compute W' = (W + dW) * dora_scale / ||W|| (the norm of the base weight), so the file carries
    dora_scale = m * ||W|| / ||W + dW||, which gives them peft's W' exactly on this base model.
    (AUTOMATIC1111 applies only per-input magnitudes, shape (1, in): no file can give it peft's DoRA.)
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if not (isinstance(module, LoraLayer) and module.use_dora.get(adapter)):
                continue
            base = module.get_base_layer().weight.detach().float()
            delta = module.get_delta_weight(adapter).detach().float()
            magnitude = module.lora_magnitude_vector[adapter].weight.detach().float()
            ratio = base.flatten(1).norm(dim=1) / (base + delta).flatten(1).norm(dim=1)
            name = kohya_name(prefix, module_name, sgm_layers_per_block)
            out[name] = (magnitude * ratio).reshape(-1, *[1] * (base.dim() - 1)).cpu()
    return out


def text_encoder_dora_keys(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's diffusers LoRA layers with its DoRA magnitudes under `...lora_magnitude_vector
    .weight`: transformers' adapter loader (which diffusers uses for text encoders) silently skips
    them without the ".weight" ending, and the DoRA would load as a different adapter."""
    return {f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in layers.items()}


def _with_text_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder LoRA keys under `text_model.`, the name every diffusers/transformers version
    knows (diffusers strips it again for transformers >= 5, whose CLIPTextModel lacks that level)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def adapter_architecture(unet) -> str:
    """ "sdxl" for a UNet with SDXL's text-time embedding, else "sd15"."""
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd15"


def save_adapter(
    adapter_dir: str | Path,
    *,
    unet,
    text_encoder=None,
    name: str,
    metadata: dict[str, Any],
    config_json: str | None,
    metrics_file: Path | None = None,
    samples_dir: Path | None = None,
    text_encoder_2=None,
    peft_adapter: str = "default",
    replace: bool = True,
    token_embeddings: dict[str, torch.Tensor] | None = None,
    pivotal_tokens: tuple[str, ...] = (),
) -> Path:
    """Write the complete adapter folder atomically; an existing folder is replaced only on success.

    The architecture (SD 1.5 or SDXL) comes from the UNet; `text_encoder_2` is SDXL's second text
    encoder. `peft_adapter` names the peft adapter on the models to save. A pivotal-tuning run passes
    its new tokens and their embeddings (`pivotal.rows_state`), written as `<name>_emb.safetensors`.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    from . import pivotal

    name = sanitize_name(name)
    arch = adapter_architecture(unet)
    unet_lora = peft_lora_state(unet, peft_adapter)
    if not unet_lora:
        raise TrainingError("The UNet has no LoRA weights to save.")
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    te_loras = {
        key: peft_lora_state(model, peft_adapter)
        for key, model in encoders.items()
        if model is not None and _has_lora(model)
    }
    check_finite(unet_lora, "UNet LoRA weights")
    for te_lora in te_loras.values():
        check_finite(te_lora, "text-encoder LoRA weights")
    unet_cfg = unet.peft_config[peft_adapter]
    alpha = float(unet_cfg.lora_alpha)
    rank = int(unet_cfg.r)
    te_prefix = "lora_te1" if arch == "sdxl" else "lora_te"
    sgm = int(unet.config.layers_per_block) if arch == "sdxl" else None  # kohya's SDXL names
    alphas = _module_alphas(unet, "lora_unet", peft_adapter, sgm)
    dora_scales = _dora_scales(unet, "lora_unet", peft_adapter, sgm)
    for key, prefix in (("text_encoder", te_prefix), ("text_encoder_2", "lora_te2")):
        if key in te_loras:
            alphas.update(_module_alphas(encoders[key], prefix, peft_adapter))
            dora_scales.update(_dora_scales(encoders[key], prefix, peft_adapter))

    save_kwargs: dict[str, Any] = dict(
        unet_lora_layers=_diffusers_unet_keys(unet_lora, convert_state_dict_to_diffusers),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    for key, te_lora in te_loras.items():
        te_layers = convert_state_dict_to_diffusers(_with_text_model_prefix(te_lora))
        save_kwargs[f"{key}_lora_layers"] = text_encoder_dora_keys(te_layers)
        save_kwargs[f"{key}_lora_adapter_metadata"] = encoders[key].peft_config[peft_adapter].to_dict()
    pipeline_class = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline

    kohya_file = kohya_file_name(name)
    embeddings_file = f"{name}_emb.safetensors" if token_embeddings else None
    if token_embeddings:
        check_finite(token_embeddings, "token embeddings")
    adapter_dir = Path(adapter_dir)
    with atomic_directory(adapter_dir, replace=replace) as tmp:
        # The adapter metadata carries lora_alpha: without it diffusers would load alpha = rank and
        # silently scale the update wrongly whenever alpha != rank.
        pipeline_class.save_lora_weights(tmp, **save_kwargs)
        save_file(
            to_kohya(
                unet_lora,
                te_loras.get("text_encoder"),
                alphas,
                te_prefix=te_prefix,
                te2_lora=te_loras.get("text_encoder_2"),
                sgm_layers_per_block=sgm,
                dora_scales=dora_scales,
            ),
            str(tmp / kohya_file),
            metadata={
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha),
                "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
                "ss_output_name": name,
            },
        )
        files = {"diffusers": LORA_WEIGHT_NAME, "kohya": kohya_file}
        if token_embeddings:
            save_file(
                pivotal.file_layout(token_embeddings, arch),
                str(tmp / embeddings_file),
                metadata={"tokens": ",".join(pivotal_tokens), "trigger": str(metadata.get("token") or "")},
            )
            files["embeddings"] = embeddings_file
        info = {
            "name": name,
            "architecture": arch,
            "rank": rank,
            "alpha": alpha,
            "text_encoder_lora": bool(te_loras),
            "dora": bool(unet_cfg.use_dora),
            "pivotal_tokens": list(pivotal_tokens) if token_embeddings else [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
            **metadata,
        }
        (tmp / "adapter.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if config_json is not None:
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


def _diffusers_unet_keys(unet_lora: dict[str, torch.Tensor], convert) -> dict[str, torch.Tensor]:
    """The UNet's LoRA keys for the diffusers file, in one style.

    diffusers' converter renames attention modules' lora_A/B to lora.down/up but leaves others (the
    ResNet convolutions of an imported LoCon) as they are. diffusers' loader decides the style of a
    whole file from its first key: where that is a conv module (a UNet whose first block has no
    attention, as SDXL's), the lora.down/up modules were silently not loaded. A file with modules the
    converter does not rename keeps peft's lora_A/B keys throughout, which diffusers' loader reads as they are.
    """
    converted = convert(unet_lora)
    if any(".lora_A." in key or ".lora_B." in key for key in converted):
        return dict(unet_lora)
    return converted


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
    sdxl = info.get("architecture") == "sdxl"
    tokens = info.get("pivotal_tokens") or []
    embeddings_file = (info.get("files") or {}).get("embeddings")
    pivotal = bool(tokens and embeddings_file)
    prompt = info.get("instance_prompt", "") or ""
    from .config import replace_word

    token_prompt = replace_word(prompt, trigger, "".join(tokens)) if pivotal else prompt
    emb_name = Path(embeddings_file).stem if pivotal else ""
    a1111_prompt = replace_word(prompt, trigger, emb_name) if pivotal else prompt
    comfy_prompt = replace_word(prompt, trigger, f"embedding:{emb_name}") if pivotal else prompt
    pipeline_class = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    checkpoint = "an SDXL" if sdxl else "an SD 1.5"
    if info.get("imported"):
        origin = f"Imported from `{info.get('source_file', '')}` for `{info.get('base_model', '')}`."
    else:
        origin = (
            f"A DreamBooth LoRA (rank {info['rank']}, alpha {info['alpha']:g}) trained with DreamBooth "
            f"Studio on\n`{info.get('base_model', '')}` for {info.get('steps', '?')} steps."
        )
    return f"""---
library_name: diffusers
base_model: {info.get("base_model", "")}
tags: [stable-diffusion, lora, dreambooth, text-to-image]
instance_prompt: {json.dumps(info.get("instance_prompt", ""))}
---

# {name}

{origin}

- Instance prompt: `{info.get("instance_prompt", "")}`
- Trigger word: `{trigger}`
- Class prompt (prior preservation): `{info.get("class_prompt") or "none"}`

{_pivotal_intro(trigger, tokens, embeddings_file) if pivotal else ""}## Use it

diffusers:

```python
from diffusers import {pipeline_class}
pipe = {pipeline_class}.from_pretrained("{info.get("base_model", "")}")
pipe.load_lora_weights("path/to/this/folder")
{_diffusers_embeddings(tokens, embeddings_file, sdxl) if pivotal else ""}image = pipe("{
        token_prompt
    }").images[0]
```

AUTOMATIC1111: copy `{name}.safetensors` into `models/Lora`{
        _a1111_embeddings(embeddings_file) if pivotal else ""
    } and prompt with
`<lora:{name}:1> {a1111_prompt}` with {checkpoint} checkpoint selected.

ComfyUI: copy `{name}.safetensors` into `models/loras` and load it with a "Load LoRA" node{
        _comfy_embeddings(embeddings_file, comfy_prompt) if pivotal else "."
    }
{_DORA_NOTE if info.get("dora") else ""}"""


def _pivotal_intro(trigger: str, tokens: list[str], embeddings_file: str) -> str:
    return f"""## Pivotal tuning: the trigger word is new tokens

This adapter was trained with pivotal tuning: in its prompts the trigger word `{trigger}` stood for the
new tokens `{"".join(tokens)}`, whose embeddings (one per text encoder) are in `{embeddings_file}`. Use
that file with the LoRA, and its tokens where the trigger word goes. (DreamBooth Studio does both by
itself: prompt with `{trigger}` as usual.)

"""


def _diffusers_embeddings(tokens: list[str], embeddings_file: str, sdxl: bool) -> str:
    token_list = "[" + ", ".join(f'"{t}"' for t in tokens) + "]"
    head = (
        f'from safetensors.torch import load_file\nemb = load_file("path/to/this/folder/{embeddings_file}")\n'
    )
    if not sdxl:
        return head + f'pipe.load_textual_inversion(emb["emb_params"], token={token_list})\n'
    return head + (
        f'pipe.load_textual_inversion(emb["clip_l"], token={token_list}, '
        "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)\n"
        f'pipe.load_textual_inversion(emb["clip_g"], token={token_list}, '
        "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)\n"
    )


def _a1111_embeddings(embeddings_file: str) -> str:
    return f" and `{embeddings_file}` into `embeddings` (its name is the word that calls it)"


def _comfy_embeddings(embeddings_file: str, comfy_prompt: str) -> str:
    return f"; copy `{embeddings_file}` into `models/embeddings` and prompt with `{comfy_prompt}`."


_DORA_NOTE = """
This is a DoRA: diffusers, ComfyUI and Forge apply its magnitudes. AUTOMATIC1111 reads only the
older per-input DoRA layout and would apply this file wrongly: use ComfyUI, Forge or diffusers.
"""


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_NOT_LORA = ("hada_w1", "lokr_w1", "lokr_w2", ".diff", "oft_blocks", "glora")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, judged by its content: a header length and a JSON header,
    then raw tensors. Anything else (a pickle renamed .safetensors) is refused, never unpickled."""
    from safetensors.torch import load_file

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            valid = 2 <= size <= min(100_000_000, path.stat().st_size - 8)
            header = json.loads(f.read(size)) if valid else None
        if not isinstance(header, dict):
            raise ValueError("no safetensors header")
        return load_file(str(path))
    except Exception as e:  # ValueError, UnicodeDecodeError, safetensors' own error
        raise TrainingError(
            f"{path.name} is not a safetensors file (its content is not safetensors data); "
            "pickled LoRA files are refused because loading them can run code."
        ) from e


def _lora_kind(state: dict[str, torch.Tensor], file_name: str) -> str:
    """ "kohya", "comfyui" (ComfyUI's own diffusion_model./text_encoders. keys) or "diffusers"
    (diffusers or peft keys), or a refusal sentence."""
    keys = list(state)
    if any(marker in k for k in keys for marker in _NOT_LORA):
        raise TrainingError(
            f"{file_name} is a LyCORIS (LoHa/LoKr/OFT) or diff network, not a LoRA; "
            "only LoRA files can be imported."
        )
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.startswith(_COMFYUI_PREFIXES) for k in keys):
        return "comfyui"
    lora_markers = (
        "lora_A",
        "lora_B",
        "lora.down",
        "lora.up",
        "lora_linear_layer",
        "_lora.down",
        "lora_down",
    )
    if any(m in k for k in keys for m in lora_markers):
        return "diffusers"
    raise TrainingError(
        f"{file_name} holds no LoRA weights (no lora_unet_/lora_te keys and no lora_A/lora_B keys)."
    )


_COMFYUI_PREFIXES = ("diffusion_model.", "text_encoders.")
_COMFYUI_SUFFIXES = {
    "lora_up.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.weight": "lora_down.weight",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
}


def comfyui_to_kohya(state: dict[str, torch.Tensor], arch: str, file_name: str) -> dict[str, torch.Tensor]:
    """ComfyUI's native LoRA keys -> kohya keys, which diffusers converts: the UNet's
    "diffusion_model.<original module>" becomes lora_unet_<module> (original names, as kohya's SDXL
    files have), "text_encoders.clip_l.transformer.<module>" lora_te_ (lora_te1_ for SDXL) and
    "text_encoders.clip_g.transformer.<module>" lora_te2_."""
    te_prefixes = {
        "text_encoders.clip_l.transformer.": "lora_te1" if arch == "sdxl" else "lora_te",
        "text_encoders.clip_g.transformer.": "lora_te2",
        "diffusion_model.": "lora_unet",
    }
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix = next((p for p in te_prefixes if key.startswith(p)), None)
        suffix = next((x for x in _COMFYUI_SUFFIXES if key.endswith(f".{x}")), None)
        if prefix is None or suffix is None:
            raise TrainingError(
                f"{file_name} is a ComfyUI LoRA with a key this importer cannot place ({key}); "
                "only UNet and CLIP text-encoder LoRA modules can be imported."
            )
        module = key[len(prefix) : -len(suffix) - 1]
        out[f"{te_prefixes[prefix]}_{module.replace('.', '_')}.{_COMFYUI_SUFFIXES[suffix]}"] = tensor
    return out


def _lora_architecture(converted_keys: list[str]) -> str | None:
    """ "sd15" or "sdxl" from diffusers-format LoRA keys, when the keys say; None when they do not.

    SDXL has a second text encoder, no attention in its first UNet block, and several transformer
    layers per attention; SD 1.5 has attention in down block 0 and one transformer layer each.
    """
    if any(k.startswith("text_encoder_2.") for k in converted_keys):
        return "sdxl"
    unet_keys = [k for k in converted_keys if k.startswith("unet.")]
    if any("down_blocks.0.attentions." in k for k in unet_keys):
        return "sd15"
    down_attention = any(re.search(r"down_blocks\.\d+\.attentions\.", k) for k in unet_keys)
    if down_attention or any(re.search(r"transformer_blocks\.[1-9]|add_embedding", k) for k in unet_keys):
        return "sdxl"  # attention in the down blocks but none in the first: SDXL's layout
    return None


_ARCH_LABEL = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def import_adapter(
    file: str | Path,
    base_model: str,
    adapters_dir: str | Path,
    name: str | None = None,
    *,
    single_file_config: str | None = None,
) -> Path:
    """Add a LoRA file made elsewhere (diffusers/peft keys, kohya keys with diffusers or original
    UNet names, or ComfyUI's own keys; `.safetensors` only) to the
    adapter store as a complete adapter folder `adapters_dir/<name>`; returns that folder.

    The file is checked by content (pickles are refused unread), for NaN/inf, for LoRA keys, and
    against `base_model`: its architecture must match, and every module must load into the model
    with the right shape. Any refusal is a TrainingError sentence and leaves the store unchanged.
    """
    import diffusers

    from .components import architecture, assemble_pipeline, load_components

    path = Path(file).expanduser()
    if not path.is_file():
        raise TrainingError(f"The LoRA file {file} does not exist.")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise TrainingError(
            f"{path.name} is a pickle file, which can run code when loaded; "
            "only .safetensors LoRA files can be imported."
        )
    if path.suffix.lower() != ".safetensors":
        raise TrainingError(
            f"{path.name} is not a .safetensors file; only .safetensors LoRA files can be imported."
        )
    state = read_safetensors(path)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingError(f"{path.name} contains NaN or infinite values ({key}); it was not imported.")
    kind = _lora_kind(state, path.name)
    if kind != "diffusers" and any(k.endswith(".dora_scale") for k in state):
        raise TrainingError(
            f"{path.name} is a DoRA in kohya/ComfyUI layout, whose magnitudes (dora_scale) diffusers' "
            "loader drops, so it would import as a different adapter; import its diffusers file instead."
        )
    # A diffusers file is named by its folder (every one is pytorch_lora_weights.safetensors).
    name = sanitize_name(name or (path.parent.name if path.name == LORA_WEIGHT_NAME else path.stem))
    target = Path(adapters_dir) / name
    if target.exists():
        raise TrainingError(f"An adapter named {name} already exists in {adapters_dir}; choose another name.")

    parts, _source = load_components(base_model, single_file_config=single_file_config)
    base_arch = architecture(parts)
    pipe = assemble_pipeline(parts)
    # kohya and ComfyUI files may name UNet modules from the original (LDM/SGM) UNet; diffusers maps
    # those back only when given the UNet's config (its SDXL loader passes it itself, SD 1.5's not).
    unet_config = {} if base_arch == "sdxl" else {"unet_config": parts["unet"].config}
    comfyui = comfyui_to_kohya(state, base_arch, path.name) if kind == "comfyui" else None
    try:
        converted, _alphas = type(pipe).lora_state_dict(
            dict(comfyui) if comfyui is not None else str(path), unet_config=parts["unet"].config
        )
    except Exception as e:  # diffusers' converters raise ValueError / KeyError on foreign layouts
        raise TrainingError(
            f"{path.name} has LoRA keys diffusers cannot read ({type(e).__name__}: {first_line(e)})."
        ) from e
    lora_arch = _lora_architecture(list(converted))

    def refuse(why: str) -> TrainingError:
        # The shapes decide; the key layout only names the architecture in the sentence.
        if lora_arch is not None and lora_arch != base_arch:
            return TrainingError(
                f"{path.name} is an {_ARCH_LABEL[lora_arch]} LoRA and {base_model} is an "
                f"{_ARCH_LABEL[base_arch]} model; import it with an {_ARCH_LABEL[lora_arch]} base model."
            )
        return TrainingError(f"{path.name} does not fit the base model {base_model}: {why}.")

    # diffusers logs a failed load at ERROR level before raising; the sentence below says it once.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
    try:
        # By path, not by tensors: a diffusers file keeps its alpha in the file's metadata (a
        # ComfyUI file, renamed to kohya keys in memory, carries its alphas as tensors).
        source = comfyui if comfyui is not None else str(path)
        pipe.load_lora_weights(source, adapter_name="default", **unet_config)
    except Exception as e:  # size mismatches (RuntimeError), unknown modules (ValueError)
        if "size mismatch" in str(e):
            raise refuse(
                "its layer shapes differ from the model's, so it was made for another base model"
            ) from e
        raise refuse(f"diffusers could not apply it ({first_line(e)})") from e
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)

    modules_in_file = sum(
        1 for k in state if k.endswith(("lora_down.weight", "lora_A.weight", "down.weight"))
    )
    encoders = {"text_encoder": parts["text_encoder"], "text_encoder_2": parts.get("text_encoder_2")}
    loaded = {
        key: model
        for key, model in encoders.items()
        if model is not None and "default" in (getattr(model, "peft_config", None) or {})
    }
    if "default" not in (getattr(parts["unet"], "peft_config", None) or {}):
        raise refuse(
            f"none of its LoRA modules names a layer of this model's UNet (first key: {next(iter(state))})"
        )
    modules_loaded = sum(len(peft_lora_state(m)) // 2 for m in (parts["unet"], *loaded.values()))
    if modules_loaded < modules_in_file:
        raise refuse(f"only {modules_loaded} of its {modules_in_file} LoRA modules name layers of this model")
    metadata = {
        "base_model": base_model,
        "imported": True,
        "source_file": path.name,
        "source_format": kind,
        "instance_prompt": None,
        "token": None,
        "class_prompt": None,
        "steps": None,
    }
    try:
        return save_adapter(
            target,
            unet=parts["unet"],
            text_encoder=loaded.get("text_encoder"),
            text_encoder_2=loaded.get("text_encoder_2"),
            name=name,
            metadata=metadata,
            config_json=None,
            replace=False,  # never overwrite an adapter that appeared meanwhile
        )
    except FileExistsError as e:
        raise TrainingError(
            f"An adapter named {name} already exists in {adapters_dir}; choose another name."
        ) from e
