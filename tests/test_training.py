"""Training on the tiny SD 1.5 model, proven by numbers: LoRA changed, base untouched, the adapter
round-trips through a fresh pipeline, the instance loss fell, the kohya export is the same LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import Probe, base_config
from safetensors.torch import load_file

from trainer_core.events import StepMetrics


def _fresh_pipeline(model_dir):
    from trainer_core.inference import load_pipeline

    return load_pipeline(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def trained(tiny_model, photos, class_dir, tmp_path_factory):
    events = []
    cfg = base_config(
        tiny_model,
        photos,
        tmp_path_factory.mktemp("run"),
        class_data_dir=str(class_dir),
        max_train_steps=20,
        validation_steps=10,
        num_validation_images=1,
    )
    probe = Probe(tiny_model, photos, cfg.instance_prompt)
    loss_before = probe.loss(probe.parts["unet"])
    from trainer_core.loop import train

    result = train(cfg, emit=events.append)
    return dict(cfg=cfg, result=result, events=events, probe=probe, loss_before=loss_before)


@pytest.fixture(scope="module")
def trained_te(tiny_model, photos, class_dir, tmp_path_factory):
    """Text-encoder LoRA too."""
    from trainer_core.loop import train

    cfg = base_config(
        tiny_model,
        photos,
        tmp_path_factory.mktemp("run-te"),
        class_data_dir=str(class_dir),
        max_train_steps=8,
        train_text_encoder=True,
    )
    return dict(cfg=cfg, result=train(cfg))


def test_adapter_folder_is_as_specified(trained):
    result, cfg = trained["result"], trained["cfg"]
    assert result.status == "finished" and result.summary["steps"] == 20
    folder = result.adapter_dir
    names = {p.name for p in folder.iterdir()}
    assert {
        "pytorch_lora_weights.safetensors",
        "sks-dog.safetensors",
        "adapter.json",
        "config.json",
        "samples",
        "metrics.jsonl",
        "README.md",
    } <= names
    info = json.loads((folder / "adapter.json").read_text())
    assert info["rank"] == 4 and info["alpha"] == 8.0 and info["steps"] == 20
    assert info["token"] == "sks" and info["class_prompt"] == "a photo of a dog"
    assert info["architecture"] == "sd15" and info["final_loss"] == pytest.approx(
        result.summary["final_loss"]
    )
    assert json.loads((folder / "config.json").read_text()) == json.loads(cfg.to_json())
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21))
    for x in lines:
        assert x["loss"] == pytest.approx(
            x["instance_loss"] + cfg.prior_loss_weight * x["prior_loss"], rel=1e-5
        )
        assert x["lr"] > 0
    assert {p.name for p in (folder / "samples").iterdir()} == {"with-token-0.png", "without-token-0.png"}
    assert "sks" in (folder / "README.md").read_text()
    # validation images at step 10 and at the end, with and without the token
    run = folder.parent
    assert (run / "samples" / "step-000010" / "without-token-0.png").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 20


def test_events_report_both_losses(trained):
    metrics = [e for e in trained["events"] if isinstance(e, StepMetrics)]
    assert len(metrics) == 20
    assert all(m.prior_loss is not None and m.instance_loss > 0 for m in metrics)


def test_lora_changed_and_base_untouched(trained, tiny_model):
    from diffusers import UNet2DConditionModel

    unet = trained["result"].unet
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    trained_sd = unet.state_dict()
    lora_b = {k: v for k, v in trained_sd.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), "lora_B starts at zero and must move"
    compared = 0
    for key, value in trained_sd.items():
        if "lora_" in key:
            continue
        base_key = key.replace(".base_layer", "")
        assert torch.equal(value, base[base_key]), key
        compared += 1
    assert compared == len(base)


def test_saved_adapter_reproduces_trained_prediction(trained, tiny_model):
    probe = trained["probe"]
    trained_pred = probe.predict(trained["result"].unet)
    base_pred = probe.predict(probe.parts["unet"])
    assert (trained_pred - base_pred).abs().max() > 1e-3, "training must have changed the prediction"
    pipe = _fresh_pipeline(tiny_model)
    pipe.load_lora_weights(str(trained["result"].adapter_dir))
    reloaded = probe.predict(pipe.unet)
    assert (reloaded - trained_pred).abs().max().item() < 1e-4


def test_instance_loss_went_down(trained):
    probe = trained["probe"]
    after = probe.loss(trained["result"].unet)
    assert after < trained["loss_before"] * 0.97, (trained["loss_before"], after)


def _image(pipe, prompt="a photo of sks dog"):
    from trainer_core.inference import generate

    return np.asarray(generate(pipe, prompt, seed=3, steps=4)[0], dtype=np.float32) / 255.0


@pytest.mark.parametrize("which", ["trained", "trained_te"])
def test_kohya_export_loads_as_the_same_lora(which, request, tiny_model):
    result = request.getfixturevalue(which)["result"]
    folder = result.adapter_dir
    kohya = load_file(str(folder / "sks-dog.safetensors"))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    assert all(v.item() == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    if which == "trained_te":
        assert any(k.startswith("lora_te_") for k in kohya)
    base = _image(_fresh_pipeline(tiny_model))
    a = _fresh_pipeline(tiny_model)
    a.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    b = _fresh_pipeline(tiny_model)
    b.load_lora_weights(str(folder), weight_name="sks-dog.safetensors")
    img_a, img_b = _image(a), _image(b)
    assert np.abs(img_a - base).max() > 1e-2, "the adapter must change the image"
    assert np.abs(img_a - img_b).max() < 1e-3


def test_text_encoder_lora_round_trip(trained_te, tiny_model):
    result = trained_te["result"]
    te = result.text_encoder
    assert any("lora_" in k for k in te.state_dict())
    pipe = _fresh_pipeline(tiny_model)
    ids = pipe.tokenizer(
        ["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        base_out = pipe.text_encoder(ids)[0]
        te.eval()
        trained_out = te(ids)[0]
    assert (trained_out - base_out).abs().max() > 1e-4
    pipe.load_lora_weights(str(result.adapter_dir))
    with torch.no_grad():
        reloaded = pipe.text_encoder(ids)[0]
    assert (reloaded - trained_out).abs().max().item() < 1e-4
