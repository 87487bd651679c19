"""The kohya-key file of every adapter folder (what AUTOMATIC1111 and ComfyUI load) is the same LoRA
as the diffusers file: loaded by plain diffusers `load_lora_weights(<file>)` into a fresh pipeline it
gives the same image, for SD 1.5 and SDXL, with and without text-encoder LoRA, after real training.
Its module names are kohya's own (SDXL: the original SGM UNet's; SD 1.5: diffusers'), and LoRA files
in the layouts other tools write (kohya with original names, ComfyUI's own keys) import as the same
update."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import base_config
from foreign_lora import lora_layer_outputs, original_layout_names, write_foreign
from safetensors.torch import load_file, save_file

from trainer_core.adapters import import_adapter
from trainer_core.events import TrainingError
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
    unet_blocks = (
        "input_blocks|middle_block|output_blocks" if arch == "sdxl" else "down_blocks|mid_block|up_blocks"
    )
    for module in modules:
        if module.startswith("lora_te"):  # A1111 and ComfyUI name the text encoder's modules from text_model
            assert re.fullmatch(r"lora_te\d?_text_model_encoder_layers_\d+_self_attn_[qkvout]+_proj", module)
        else:  # kohya names SDXL's UNet modules from the original (SGM) UNet, SD 1.5's from diffusers'
            assert re.fullmatch(rf"lora_unet_({unet_blocks})_\w+_to_(q|k|v|out_0)", module), module
    if arch == "sdxl":
        assert not any(m.startswith("lora_unet_input_blocks_1_") for m in modules)  # no attention there


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


@pytest.mark.parametrize("arch, with_te", CASES)
def test_every_kohya_module_names_a_module_of_the_original_layout_model(runs, arch, with_te, tmp_path):
    """kohya's train_network --network_weights and sdxl_merge_lora match modules by these names and
    skip the rest silently: each exported name must be one kohya itself gives a module."""
    model, folder = runs[arch, with_te]
    allowed = original_layout_names(arch, model, tmp_path)
    modules = {k.split(".")[0] for k in load_file(str(folder / "sks-dog.safetensors"))}
    for module in modules:
        prefix = re.match(r"lora_(unet|te\d?)", module).group(0)
        assert module in allowed[prefix], module
    te_modules = {m for m in modules if m.startswith("lora_te")}
    assert bool(te_modules) is with_te
    if arch == "sdxl":
        assert any(m.startswith("lora_unet_middle_block_1_") for m in modules)
        if with_te:
            assert {m.split("_text_model")[0] for m in te_modules} == {"lora_te1", "lora_te2"}


def _same_update(arch, model, folder_a, folder_b) -> float:
    """Largest difference between the effective LoRA weights two adapters give a fresh pipeline."""
    a = _pipeline(arch, model)
    a.load_lora_weights(str(folder_a))
    b = _pipeline(arch, model)
    b.load_lora_weights(str(folder_b))
    out_a, out_b = lora_layer_outputs(a), lora_layer_outputs(b)
    assert out_a and set(out_a) == set(out_b)
    return max((out_a[k] - out_b[k]).abs().max().item() for k in out_a)


@pytest.mark.parametrize("layout", ["kohya-original", "comfyui"])
@pytest.mark.parametrize("arch, with_te", CASES)
def test_foreign_layouts_import_as_the_same_update(runs, arch, with_te, layout, tmp_path):
    model, folder = runs[arch, with_te]
    foreign = write_foreign(folder, model, layout, tmp_path / f"{layout}.safetensors")
    imported = import_adapter(foreign, str(model), tmp_path / "store", name="foreign")
    assert json.loads((imported / "adapter.json").read_text())["text_encoder_lora"] is with_te
    assert _same_update(arch, model, folder, imported) < 1e-4


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_exported_kohya_file_imports_as_the_same_update(runs, arch, tmp_path):
    model, folder = runs[arch, True]
    imported = import_adapter(folder / "sks-dog.safetensors", str(model), tmp_path / "store", name="back")
    assert _same_update(arch, model, folder, imported) < 1e-4


def test_unplaceable_comfyui_file_says_why(runs, tmp_path):
    """A ComfyUI-layout file whose modules name no layer of the model is refused for that reason, not
    as 'a LoRA for another model'."""
    model, _ = runs["sd15", False]
    bad = tmp_path / "bad.safetensors"
    save_file(
        {
            "diffusion_model.no_such_block.lora_down.weight": torch.randn(4, 8),
            "diffusion_model.no_such_block.lora_up.weight": torch.randn(8, 4),
        },
        str(bad),
    )
    with pytest.raises(TrainingError) as e:
        import_adapter(bad, str(model), tmp_path / "store")
    msg = str(e.value)
    assert "bad.safetensors" in msg and "another model" not in msg and "\n" not in msg, msg
