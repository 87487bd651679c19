"""Importing LoRA files made elsewhere into the adapter store: kohya and diffusers files become complete
adapter folders that give the same image as the original adapter; pickles, NaN, a LoRA for another
architecture and a file without LoRA keys are refused with one sentence and leave the store untouched."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import base_config
from safetensors.torch import load_file, save_file

from trainer_core.adapters import import_adapter
from trainer_core.events import TrainingError
from trainer_core.loop import train

PROMPT = "a photo of sks dog"


def _pipeline(model_dir):
    from trainer_core.components import assemble_pipeline, load_components

    parts, _ = load_components(str(model_dir))
    return assemble_pipeline(parts)


def _image(pipe) -> np.ndarray:
    with torch.no_grad():
        return pipe(
            PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="np"
        ).images[0]


@pytest.fixture(scope="module")
def adapters(tiny_model, tiny_sdxl, photos, class_dir, tmp_path_factory):
    """A trained SD 1.5 adapter with text-encoder LoRA and a trained SDXL adapter (6 real steps each)."""
    out = {}
    for arch, model, with_te in (("sd15", tiny_model, True), ("sdxl", tiny_sdxl, False)):
        cfg = base_config(
            model,
            photos,
            tmp_path_factory.mktemp(f"import-{arch}"),
            class_data_dir=str(class_dir),
            max_train_steps=6,
            train_text_encoder=with_te,
        )
        out[arch] = (model, train(cfg).adapter_dir)
    return out


def _listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize(
    "arch, file_name",
    [
        ("sd15", "sks-dog.safetensors"),
        ("sd15", "pytorch_lora_weights.safetensors"),
        ("sdxl", "sks-dog.safetensors"),
    ],
)
def test_imported_adapter_gives_the_originals_image(adapters, arch, file_name, tmp_path):
    model, original = adapters[arch]
    store = tmp_path / "adapters"
    folder = import_adapter(original / file_name, str(model), store, name="imported")
    assert folder == store / "imported" and _listing(store) == ["imported"]
    assert {"pytorch_lora_weights.safetensors", "imported.safetensors", "adapter.json", "README.md"} <= set(
        _listing(folder)
    )
    info = json.loads((folder / "adapter.json").read_text())
    assert info["architecture"] == arch and info["imported"] is True and info["source_file"] == file_name
    assert info["base_model"] == str(model) and info["text_encoder_lora"] is (arch == "sd15")
    assert info["alpha"] == 8.0 and info["rank"] == 4  # a diffusers file's alpha comes from its metadata
    kohya = load_file(str(folder / "imported.safetensors"))
    assert all(v.item() == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))

    base = _image(_pipeline(model))
    want = _pipeline(model)
    want.load_lora_weights(str(original / "pytorch_lora_weights.safetensors"))
    got = _pipeline(model)
    got.load_lora_weights(str(folder))  # the imported folder, as the app loads any adapter
    img_want, img_got = _image(want), _image(got)
    assert np.abs(img_want - base).max() > 1e-2
    assert np.abs(img_got - img_want).max() < 1e-3
    also = _pipeline(model)
    also.load_lora_weights(str(folder / "imported.safetensors"))  # its kohya file too
    assert np.abs(_image(also) - img_want).max() < 1e-3


def _pickle_renamed(src, tmp_path):
    bad = tmp_path / "lora.safetensors"
    torch.save(load_file(str(src)), bad)  # a zip of pickles, named like a safetensors file
    return bad


def _with_nan(src, tmp_path):
    tensors = load_file(str(src))
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    return tmp_path / "nan.safetensors"


def _no_lora_keys(src, tmp_path):
    save_file({"model.weight": torch.randn(4, 4)}, str(tmp_path / "plain.safetensors"))
    return tmp_path / "plain.safetensors"


REFUSALS = {
    "pickle renamed .safetensors": ("sd15", "sd15", _pickle_renamed, "not a safetensors file"),
    "NaN": ("sd15", "sd15", _with_nan, "NaN or infinite"),
    "SD 1.5 LoRA on SDXL": ("sd15", "sdxl", lambda src, tmp: src, "is an SD 1.5 LoRA and"),
    "no LoRA keys": ("sd15", "sd15", _no_lora_keys, "holds no LoRA weights"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_the_store_untouched(case, adapters, tmp_path, monkeypatch):
    lora_arch, base_arch, make, fragment = REFUSALS[case]
    src = make(adapters[lora_arch][1] / "sks-dog.safetensors", tmp_path)
    store = tmp_path / "adapters"
    store.mkdir()
    (store / "kept").mkdir()  # an adapter already there stays as it was
    # Nothing may be unpickled on the way to a refusal.
    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, attr, lambda *a, **k: pytest.fail("something was unpickled"))
    with pytest.raises(TrainingError) as e:
        import_adapter(src, str(adapters[base_arch][0]), store)
    msg = str(e.value)
    assert fragment in msg and src.name in msg and "\n" not in msg, msg
    assert _listing(store) == ["kept"] and _listing(store / "kept") == []


def test_pickle_suffixes_and_name_clash(adapters, tmp_path):
    model, original = adapters["sd15"]
    ckpt = tmp_path / "lora.ckpt"
    ckpt.write_bytes(b"\x80\x04not read")
    with pytest.raises(TrainingError, match="pickle file"):
        import_adapter(ckpt, str(model), tmp_path / "store")
    import_adapter(original / "sks-dog.safetensors", str(model), tmp_path / "store", name="dog")
    with pytest.raises(TrainingError, match="already exists"):
        import_adapter(original / "sks-dog.safetensors", str(model), tmp_path / "store", name="dog")


def test_cli_import_adapter(adapters, tmp_path, capsys):
    from trainer_core.cli import main

    model, original = adapters["sdxl"]
    store = tmp_path / "store"
    args = ["import-adapter", str(original / "sks-dog.safetensors"), "--base-model", str(model)]
    assert main([*args, "--adapters-dir", str(store), "--name", "my-dog"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"adapter_dir": str(store / "my-dog"), "name": "my-dog", "architecture": "sdxl"}
    sd15_model = adapters["sd15"][0]
    assert main(["import-adapter", str(original / "sks-dog.safetensors"), "--base-model", str(sd15_model),
                 "--adapters-dir", str(store)]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "SDXL LoRA" in err[0]
    assert _listing(store) == ["my-dog"]


def test_peft_keys_import(adapters, tmp_path):
    """A file with peft keys (unet.<module>.lora_A.weight, no alpha: alpha = rank) imports too; the
    trained adapter's scale (alpha 8 / rank 4) is folded into lora_B so it is the same LoRA."""
    from peft.utils import get_peft_model_state_dict

    model, original = adapters["sd15"]
    pipe = _pipeline(model)
    pipe.load_lora_weights(str(original), adapter_name="default")
    tensors = {}
    for component in ("unet", "text_encoder"):
        state = get_peft_model_state_dict(getattr(pipe, component), adapter_name="default")
        for key, value in state.items():
            scale = 2.0 if ".lora_B." in key else 1.0
            tensors[f"{component}.{key}"] = (value * scale).contiguous()
    assert any(".lora_A." in k for k in tensors) and not any(k.startswith("lora_") for k in tensors)
    save_file(tensors, str(tmp_path / "peft.safetensors"))
    folder = import_adapter(tmp_path / "peft.safetensors", str(model), tmp_path / "store")
    info = json.loads((folder / "adapter.json").read_text())
    assert info["source_format"] == "diffusers" and info["text_encoder_lora"] is True
    got = _pipeline(model)
    got.load_lora_weights(str(folder))
    assert np.abs(_image(got) - _image(pipe)).max() < 1e-3


@pytest.mark.parametrize(
    ("base", "layout"), [("tiny-sd15", "kohya"), ("tiny-shapes", "kohya"), ("tiny-sdxl", "peft")]
)
def test_locon_import_keeps_its_convolutions(base, layout, tiny_model, tmp_path):
    """A kohya LoCon (LoRA on the ResNet convolutions as well as attention, the LyCORIS layout many
    shared files use) imports whole: the imported folder loads every module back, convolutions
    included, and gives the image diffusers gives from the file itself.

    tiny-shapes' first UNet block has no attention (as SDXL's): diffusers' converter renamed the
    attention keys to lora.down/up and left the conv keys lora_A/B, the file's first key was a conv
    one, and reloading the saved folder then read it as peft keys and loaded the 28 conv modules of
    84 (SDXL: 16 of 48), the attention dropped without a word."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    model = tiny_model if base == "tiny-sd15" else base
    pipe = _pipeline(model)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    gen = torch.Generator().manual_seed(3)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
    tensors, modules = {}, set()
    for key, value in get_peft_model_state_dict(pipe.unet).items():
        module, _, kind = key.rpartition(".lora_")
        modules.add(module)
        if layout == "peft":  # SDXL: a diffusers/peft file (kohya's SDXL files use the original names)
            tensors[f"unet.{key}"] = value.contiguous()
            continue
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = value.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    convs = {m for m in modules if ".resnets." in m}
    assert convs and len(convs) < len(modules)
    save_file(tensors, str(tmp_path / "locon.safetensors"))

    folder = import_adapter(tmp_path / "locon.safetensors", str(model), tmp_path / "store")
    got = _pipeline(model)
    got.load_lora_weights(str(folder))
    loaded = {n for n, m in got.unet.named_modules() if isinstance(m, LoraLayer)}
    assert loaded == modules, (len(loaded), len(modules))
    want = _pipeline(model)
    want.load_lora_weights(str(tmp_path / "locon.safetensors"))
    plain = _image(_pipeline(model))
    assert np.abs(_image(want) - plain).max() > 1e-2
    assert np.abs(_image(got) - _image(want)).max() < 1e-3
