"""The kohya-key file of every adapter folder (what AUTOMATIC1111 and ComfyUI load) is the same LoRA
as the diffusers file: loaded by plain diffusers `load_lora_weights(<file>)` into a fresh pipeline it
gives the same image, for SD 1.5 and SDXL, with and without text-encoder LoRA, after real training."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import base_config
from safetensors.torch import load_file, save_file

from trainer_core.loop import train

PROMPT = "a photo of sks dog"
CASES = [("sd15", False), ("sd15", True), ("sdxl", False), ("sdxl", True)]


def _pipeline(arch, model_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model_dir), local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    with torch.no_grad():
        return pipe(
            PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np"
        ).images[0]


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_sdxl, photos, class_dir, tmp_path_factory):
    """Each case trained for 6 real steps (peft starts lora_B at zero: an untrained LoRA is a no-op)."""
    models = {"sd15": tiny_model, "sdxl": tiny_sdxl}
    out = {}
    for arch, with_te in CASES:
        cfg = base_config(
            models[arch],
            photos,
            tmp_path_factory.mktemp(f"{arch}-te{int(with_te)}"),
            class_data_dir=str(class_dir),
            max_train_steps=6,
            train_text_encoder=with_te,
        )
        out[arch, with_te] = (models[arch], train(cfg).adapter_dir)
    return out


@pytest.mark.parametrize("arch, with_te", CASES)
def test_kohya_keys_are_what_a1111_and_comfyui_read(runs, arch, with_te):
    _, folder = runs[arch, with_te]
    kohya = load_file(str(folder / "sks-dog.safetensors"))
    te_prefixes = {"sd15": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}[arch]
    modules = {k.split(".")[0] for k in kohya}
    for module in modules:  # every module has its down, up and alpha, nothing else
        assert {k for k in kohya if k.split(".")[0] == module} == {
            f"{module}.lora_down.weight",
            f"{module}.lora_up.weight",
            f"{module}.alpha",
        }
        assert kohya[f"{module}.alpha"].item() == 8.0
        rank = kohya[f"{module}.lora_down.weight"].shape[0]
        assert rank == 4 and kohya[f"{module}.lora_up.weight"].shape[1] == 4
    prefixes = {re.match(r"(lora_unet|lora_te\d?)_", m).group(1) for m in modules}
    assert prefixes == ({"lora_unet", *te_prefixes} if with_te else {"lora_unet"})
    for module in modules:
        if module.startswith("lora_te"):  # A1111 and ComfyUI name the text encoder's modules from text_model
            assert re.fullmatch(r"lora_te\d?_text_model_encoder_layers_\d+_self_attn_[qkvout]+_proj", module)
        else:
            assert re.fullmatch(r"lora_unet_(down_blocks|mid_block|up_blocks)_\w+_to_(q|k|v|out_0)", module)
    if arch == "sdxl":
        assert not any(m.startswith("lora_unet_down_blocks_0_") for m in modules)  # no attention there


@pytest.mark.parametrize("arch, with_te", CASES)
def test_kohya_file_gives_the_same_image(runs, arch, with_te):
    model, folder = runs[arch, with_te]
    base = _image(_pipeline(arch, model))
    a = _pipeline(arch, model)
    a.load_lora_weights(str(folder / "pytorch_lora_weights.safetensors"))
    b = _pipeline(arch, model)
    b.load_lora_weights(str(folder / "sks-dog.safetensors"))  # plain diffusers, kohya converter
    img_a, img_b = _image(a), _image(b)
    assert np.abs(img_a - base).max() > 1e-2, "the trained adapter must change the image"
    assert np.abs(img_a - img_b).max() < 1e-3
    if with_te:
        te_names = ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]
        for name in te_names:
            assert any("lora_" in k for k in getattr(b, name).state_dict()), name


def test_kohya_alpha_matters(runs, tmp_path):
    """Negative control: without its alpha keys the same file loads at another scale (alpha = rank),
    and the image differs; so the equality above depends on the exported alpha."""
    model, folder = runs["sdxl", True]
    kohya = load_file(str(folder / "sks-dog.safetensors"))
    save_file(
        {k: v for k, v in kohya.items() if not k.endswith(".alpha")}, str(tmp_path / "no-alpha.safetensors")
    )
    a = _pipeline("sdxl", model)
    a.load_lora_weights(str(folder / "sks-dog.safetensors"))
    b = _pipeline("sdxl", model)
    b.load_lora_weights(str(tmp_path / "no-alpha.safetensors"))
    assert np.abs(_image(a) - _image(b)).max() > 1e-3
