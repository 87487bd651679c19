"""DoRA (peft's use_dora): trained by the real loop, saved so diffusers reloads it into a fresh
pipeline as the same layers (< 1e-4), and with kohya keys whose `.dora_scale` gives ComfyUI's and
Forge's DoRA merge the same weights. Real tiny models; the DoRA is perturbed first (peft starts lora_B
at zero and the magnitude at the weight's norm: an untouched DoRA is a no-op and proves nothing)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import base_config
from foreign_lora import lora_layer_outputs, original_layout_names
from safetensors.torch import load_file

from trainer_core import components
from trainer_core.adapters import kohya_name, save_adapter

CASES = [("sd15", False), ("sd15", True), ("sdxl", True)]


def _pipeline(model_dir):
    parts, _ = components.load_components(str(model_dir))
    return components.assemble_pipeline(parts)


def _perturbed_dora(model_dir, with_te: bool, seed: int = 0):
    parts, _ = components.load_components(str(model_dir))
    torch.manual_seed(seed)
    components.add_lora(
        parts["unet"],
        parts["text_encoder"],
        rank=4,
        alpha=8.0,
        train_text_encoder=with_te,
        text_encoder_2=parts.get("text_encoder_2"),
        use_dora=True,
    )
    g = torch.Generator().manual_seed(seed)
    trained = [parts["unet"]] + ([parts["text_encoder"], parts.get("text_encoder_2")] if with_te else [])
    with torch.no_grad():
        for model in filter(None, trained):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    return parts


@pytest.fixture(scope="module")
def saved(tiny_model, tiny_sdxl, tmp_path_factory):
    models = {"sd15": tiny_model, "sdxl": tiny_sdxl}
    out = {}
    for arch, with_te in CASES:
        parts = _perturbed_dora(models[arch], with_te)
        folder = tmp_path_factory.mktemp(f"dora-{arch}-{with_te}") / "dora"
        save_adapter(
            folder,
            unet=parts["unet"],
            text_encoder=parts["text_encoder"] if with_te else None,
            text_encoder_2=parts.get("text_encoder_2") if with_te else None,
            name="dora",
            metadata={"base_model": str(models[arch])},
            config_json="{}",
        )
        out[arch, with_te] = (models[arch], parts, folder)
    return out


@pytest.mark.parametrize("arch, with_te", CASES)
def test_dora_reloads_into_a_fresh_pipeline(saved, arch, with_te):
    model, parts, folder = saved[arch, with_te]
    assert json.loads((folder / "adapter.json").read_text())["dora"] is True
    want = lora_layer_outputs(SimpleNamespace(**parts))
    pipe = _pipeline(model)
    pipe.load_lora_weights(str(folder))  # plain diffusers, as the app and users load it
    got = lora_layer_outputs(pipe)
    assert set(got) == set(want) and any(k.startswith("text_encoder") for k in got) is with_te
    assert all(pipe.unet.peft_config[a].use_dora for a in pipe.unet.peft_config)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-4
    # and the DoRA is not a no-op: the layers differ from the base model's
    plain = _pipeline(model)
    for name, module in plain.unet.named_modules():
        key = f"unet.{name}"
        if key in want:
            eye = torch.eye(module.in_features)
            with torch.no_grad():
                assert (module(eye) - want[key]).abs().max() > 1e-3, key
            break


def _comfyui_dora_merge(weight, up, down, alpha, dora_scale):
    """The merged weight ComfyUI and Forge compute for a LoRA module with a per-output dora_scale
    (comfy/weight_adapter/base.py, weight_decompose, output-axis branch): the base weight plus the
    scaled update, times dora_scale over the row norms of the base weight."""
    merged = weight + (alpha / down.shape[0]) * (up @ down)
    norm = weight.norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps
    return merged * (dora_scale / norm)


@pytest.mark.parametrize("arch, with_te", CASES)
def test_kohya_dora_scale_gives_comfyui_the_same_weights(saved, arch, with_te, tmp_path):
    model, parts, folder = saved[arch, with_te]
    kohya = load_file(str(folder / "dora.safetensors"))
    modules = {k.split(".")[0] for k in kohya}
    allowed = original_layout_names(arch, model, tmp_path)
    for module in modules:  # down, up, alpha and dora_scale under a name kohya gives the module
        assert {k for k in kohya if k.split(".")[0] == module} == {
            f"{module}.lora_down.weight",
            f"{module}.lora_up.weight",
            f"{module}.alpha",
            f"{module}.dora_scale",
        }
        assert module in allowed[re.match(r"lora_(unet|te\d?)", module).group(0)], module
    want = lora_layer_outputs(SimpleNamespace(**parts))
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if arch == "sdxl" else "lora_te"}
    prefixes["text_encoder_2"] = "lora_te2"
    sgm = parts["unet"].config.layers_per_block if arch == "sdxl" else None
    fresh = components.load_components(str(model))[0]
    checked = 0
    for key, effective in want.items():
        component, _, module_name = key.partition(".")
        name = kohya_name(prefixes[component], module_name, sgm if component == "unet" else None)
        layer = fresh[component].get_submodule(module_name)
        scale = kohya[f"{name}.dora_scale"]
        assert scale.shape == (layer.out_features, 1)  # per output feature, as ComfyUI tells it apart
        merged = _comfyui_dora_merge(
            layer.weight.detach(),
            kohya[f"{name}.lora_up.weight"],
            kohya[f"{name}.lora_down.weight"],
            kohya[f"{name}.alpha"].item(),
            scale,
        )
        bias = layer.bias.detach() if layer.bias is not None else 0.0
        assert (merged.T + bias - effective).abs().max().item() < 1e-4, name
        checked += 1
    assert checked == len(modules)


def test_dora_trains_in_the_loop(tiny_model, photos, class_dir, tmp_path):
    """Three real steps: the magnitudes move off the weights' norms and the saved DoRA reloads."""
    from trainer_core.loop import train

    cfg = base_config(
        tiny_model, photos, tmp_path, class_data_dir=str(class_dir), max_train_steps=3, use_dora=True
    )
    result = train(cfg)
    assert result.status == "finished"
    lora = load_file(str(result.adapter_dir / "pytorch_lora_weights.safetensors"))
    magnitudes = {k: v for k, v in lora.items() if "lora_magnitude_vector" in k}
    assert magnitudes and len(magnitudes) == sum(".lora.down." in k for k in lora)
    fresh = components.load_components(str(tiny_model))[0]["unet"]
    moved = 0
    for key, m in magnitudes.items():
        module = key.removeprefix("unet.").removesuffix(".lora_magnitude_vector")
        norm = fresh.get_submodule(module).weight.detach().norm(dim=1)
        moved += bool((m - norm).abs().max() > 1e-6)
    assert moved >= 0.9 * len(magnitudes)
    pipe = _pipeline(tiny_model)
    pipe.load_lora_weights(str(result.adapter_dir))
    assert pipe.unet.peft_config["default_0"].use_dora


def test_dora_import(saved, tmp_path):
    """The diffusers file of a DoRA imports as the same DoRA; its kohya file is refused with the
    reason (diffusers' loader drops dora_scale, so it would import as another adapter)."""
    from trainer_core.adapters import import_adapter
    from trainer_core.events import TrainingError

    model, parts, folder = saved["sd15", True]
    with pytest.raises(TrainingError, match="DoRA.*dora_scale") as e:
        import_adapter(folder / "dora.safetensors", str(model), tmp_path / "store")
    assert "\n" not in str(e.value) and not (tmp_path / "store" / "dora").exists()
    imported = import_adapter(folder / "pytorch_lora_weights.safetensors", str(model), tmp_path / "store")
    info = json.loads((imported / "adapter.json").read_text())
    assert info["dora"] is True and "This is a DoRA" in (imported / "README.md").read_text()
    pipe = _pipeline(model)
    pipe.load_lora_weights(str(imported))
    want, got = lora_layer_outputs(SimpleNamespace(**parts)), lora_layer_outputs(pipe)
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-4


def test_a_dora_checkpoint_loads_as_the_same_dora(saved, tmp_path):
    """Generate previews checkpoints: a DoRA checkpoint loads with its magnitudes (text encoder's too)."""
    from trainer_core import checkpoints
    from trainer_core.adapters import peft_lora_state
    from trainer_core.inference import describe_adapter, load_adapter

    model, parts, _ = saved["sd15", True]
    state = {f"unet.{k}": v for k, v in peft_lora_state(parts["unet"]).items()}
    state.update({f"text_encoder.{k}": v for k, v in peft_lora_state(parts["text_encoder"]).items()})
    ckpt = checkpoints.save_checkpoint(
        tmp_path / "checkpoints",
        5,
        lora_state=state,
        optimizer_state={},
        scheduler_state={},
        state={"base_model": str(model), "rank": 4, "alpha": 8.0, "train_text_encoder": True},
        total_limit=None,
    )
    pipe = _pipeline(model)
    load_adapter(pipe, describe_adapter(ckpt))
    want, got = lora_layer_outputs(SimpleNamespace(**parts)), lora_layer_outputs(pipe)
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-4
