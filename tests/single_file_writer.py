"""Write a diffusers SD 1.5 or SDXL folder as ONE single-file checkpoint with the original CompVis/LDM
(SGM for SDXL) key names that AUTOMATIC1111 and ComfyUI use, so tests can load a base model through
`from_single_file`.

The mapping is the inverse of what diffusers' single-file loader undoes:

    UNet          unet/...          -> model.diffusion_model.<ldm name>
    VAE           vae/...           -> first_stage_model.<ldm name>
    text encoder  text_encoder/...  -> cond_stage_model.transformer.text_model.<name>  (names unchanged)
  SDXL:
    text encoder  text_encoder/...  -> conditioner.embedders.0.transformer.text_model.<name>
    2nd encoder   text_encoder_2/.. -> conditioner.embedders.1.model.<OpenCLIP name> (q/k/v merged into
                                       attn.in_proj_*, text_projection transposed)
    size embedding add_embedding.linear_1 / _2 -> label_emb.0.0 / label_emb.0.2

UNet layout in LDM (layers_per_block = L, blocks b = 0..n-1):
    input_blocks.0.0                      conv_in
    input_blocks.i.0 / input_blocks.i.1   down_blocks.b.resnets.j / .attentions.j,  i = 1 + b*(L+1) + j
    input_blocks.i.0.op                   down_blocks.b.downsamplers.0.conv,        i = 1 + b*(L+1) + L
    middle_block.0 / .1 / .2              mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.o.0 / output_blocks.o.1 up_blocks.b.resnets.j / .attentions.j,    o = b*(L+1) + j
    output_blocks.o.{1|2}.conv            up_blocks.b.upsamplers.0.conv (after the last resnet of block b;
                                          index 2 when that output block also holds an attention)
    time_embed.0 / .2, out.0 / out.2      time_embedding.linear_1 / linear_2, conv_norm_out / conv_out
Up blocks run deepest-first in both formats. In the VAE decoder they do not: LDM `decoder.up.k` is
diffusers `decoder.up_blocks.(n-1-k)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D sub-module -> LDM ResBlock sub-module
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size + pooled-text embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


def _split(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, param = key.rpartition(".")
    return module, param


def _rename(rest: str, table: dict[str, str]) -> str:
    """Rename the sub-module of `rest` ('norm1.weight', 'to_out.0.bias') through `table`."""
    module, param = _split(rest)
    if module not in table:
        raise KeyError(f"no LDM name for sub-module {module!r}")
    return f"{table[module]}.{param}"


def unet_ldm_key(key: str, config: dict) -> str:
    """LDM name (without the model.diffusion_model. prefix) of one diffusers UNet state-dict key."""
    per_block = config["layers_per_block"]
    parts = key.split(".")
    module, param = _split(key)
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{param}"
    if parts[0] == "down_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.<param>
            return f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op.{param}"
        i = 1 + b * (per_block + 1) + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{i}.0.{_rename(rest, UNET_RESNET)}"
        if kind == "attentions":
            return f"input_blocks.{i}.1.{rest}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_rename(rest, UNET_RESNET)}"
        if kind == "attentions":
            return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # after the block's last resnet (and its attention, when it has one)
            o = b * (per_block + 1) + per_block
            has_attention = config["up_block_types"][b].startswith("CrossAttn")
            return f"output_blocks.{o}.{2 if has_attention else 1}.conv.{param}"
        o = b * (per_block + 1) + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{o}.0.{_rename(rest, UNET_RESNET)}"
        if kind == "attentions":
            return f"output_blocks.{o}.1.{rest}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def vae_ldm_key(key: str, config: dict) -> str:
    """LDM name (without the first_stage_model. prefix) of one diffusers AutoencoderKL key."""
    num_up = len(config["up_block_types"])
    parts = key.split(".")
    module, param = _split(key)
    if module in VAE_TOP:
        return f"{VAE_TOP[module]}.{param}"
    coder = parts[0]  # encoder / decoder
    if parts[1] == "down_blocks":
        i, kind = int(parts[2]), parts[3]
        if kind == "downsamplers":
            return f"encoder.down.{i}.downsample.conv.{param}"
        return f"encoder.down.{i}.block.{parts[4]}.{_rename('.'.join(parts[5:]), VAE_RESNET)}"
    if parts[1] == "up_blocks":
        k, kind = num_up - 1 - int(parts[2]), parts[3]
        if kind == "upsamplers":
            return f"decoder.up.{k}.upsample.conv.{param}"
        return f"decoder.up.{k}.block.{parts[4]}.{_rename('.'.join(parts[5:]), VAE_RESNET)}"
    if parts[1] == "mid_block":
        kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"{coder}.mid.block_{j + 1}.{_rename(rest, VAE_RESNET)}"
        if kind == "attentions":
            return f"{coder}.mid.attn_{j + 1}.{_rename(rest, VAE_ATTENTION)}"
    raise KeyError(f"no LDM name for VAE key {key!r}")


def clip_ldm_key(key: str) -> str:
    """LDM name (without the cond_stage_model.transformer. prefix) of one CLIPTextModel key.

    transformers >= 5.6 saves CLIPTextModel without the `text_model.` level; LDM always has it.
    """
    return key if key.startswith("text_model.") else f"text_model.{key}"


# diffusers CLIP encoder-layer sub-module -> OpenCLIP resblock sub-module
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP names (without a prefix), as SDXL's
    second text encoder is stored: q, k and v merged into one in_proj, text_projection transposed."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        k = key.removeprefix("text_model.")
        module, param = _split(k)
        if k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif module == "final_layer_norm":
            out[f"ln_final.{param}"] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif k.startswith("encoder.layers."):
            parts = module.split(".")
            layer, sub = int(parts[2]), ".".join(parts[3:])
            if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[sub[-6]] = tensor
            elif sub in OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{OPEN_CLIP_LAYER[sub]}.{param}"] = tensor
            else:
                raise KeyError(f"no OpenCLIP name for {key!r}")
        elif "position_ids" not in k:
            raise KeyError(f"no OpenCLIP name for {key!r}")
    for (layer, param), parts in qkv.items():
        merged = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = merged
    return out


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def write_single_file(diffusers_dir: str | Path, out_file: str | Path) -> dict[str, dict[str, str]]:
    """Write the UNet, VAE and text encoder(s) of `diffusers_dir` to `out_file` with LDM key names.

    Returns {"unet" | "vae" | "text_encoder" [| "text_encoder_2"]: {key: full LDM key}}: every tensor
    written, each once (the second encoder's keys are its OpenCLIP names). Raises KeyError for any
    weight this mapping has no LDM name for.
    """
    src = Path(diffusers_dir)
    unet_config = json.loads((src / "unet" / "config.json").read_text())
    vae_config = json.loads((src / "vae" / "config.json").read_text())

    out: dict[str, torch.Tensor] = {}
    names: dict[str, dict[str, str]] = {"unet": {}, "vae": {}, "text_encoder": {}}

    def put(component: str, key: str, ldm_key: str, tensor: torch.Tensor) -> None:
        if ldm_key in out:
            raise KeyError(f"two {component} weights map to {ldm_key}")
        out[ldm_key] = tensor.contiguous()
        names[component][key] = ldm_key

    for key, tensor in _load_folder(src / "unet").items():
        put("unet", key, UNET_PREFIX + unet_ldm_key(key, unet_config), tensor)
    for key, tensor in _load_folder(src / "vae").items():
        ldm_key = VAE_PREFIX + vae_ldm_key(key, vae_config)
        if ".mid.attn_" in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's VAE attention uses 1x1 convs, diffusers linears
        put("vae", key, ldm_key, tensor)
    sdxl = (src / "text_encoder_2").is_dir()
    for key, tensor in _load_folder(src / "text_encoder").items():
        put("text_encoder", key, (SDXL_CLIP_PREFIX if sdxl else CLIP_PREFIX) + clip_ldm_key(key), tensor)
    if sdxl:
        names["text_encoder_2"] = {}
        for key, tensor in open_clip_tensors(_load_folder(src / "text_encoder_2")).items():
            put("text_encoder_2", key, SDXL_OPEN_CLIP_PREFIX + key, tensor)

    out_path = Path(out_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_path), metadata={"format": "pt"})
    return names
