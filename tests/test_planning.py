"""Before a run: base-model checks that never load or download, and estimates with a stated basis."""

from __future__ import annotations

import json

from trainer_core.config import TrainConfig
from trainer_core.planning import check_base_model, estimate_training, guess_architecture, native_resolution

PROMPTS = dict(instance_dir="photos", instance_prompt="a photo of sks dog", output_dir="run")


def test_base_model_notes_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "produces noise" in check_base_model("tiny-sd15")
    note = check_base_model("stabilityai/stable-diffusion-xl-base-1.0")
    assert "not downloaded" in note and "cannot be reached" in note
    assert "does not exist" in check_base_model(str(tmp_path / "missing.safetensors"))
    assert "not a diffusers model" in check_base_model(str(tmp_path))
    (tmp_path / "model.ckpt").write_bytes(b"x")
    assert "pickle" in check_base_model(str(tmp_path / "model.ckpt"))
    assert check_base_model("  ") == "Choose a base model."


def test_architecture_and_resolution_from_names_and_configs(tmp_path):
    assert (native_resolution("tiny-sd15"), native_resolution("tiny-sdxl")) == (64, 64)
    assert native_resolution("stabilityai/stable-diffusion-xl-base-1.0") == 1024
    assert native_resolution("stable-diffusion-v1-5/stable-diffusion-v1-5") == 512
    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(
        json.dumps({"addition_embed_type": "text_time", "sample_size": 128})
    )
    assert guess_architecture(str(folder)) == "sdxl" and native_resolution(str(folder)) == 1024
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768, "sample_size": 64}))
    assert guess_architecture(str(folder)) == "sd15" and native_resolution(str(folder)) == 512


def test_tiny_model_folders_are_recognised(tiny_model):
    assert guess_architecture(str(tiny_model)) == "sd15"
    assert native_resolution(str(tiny_model)) == 64


def test_estimate_counts_weights_and_times_from_earlier_runs(tmp_path):
    config = TrainConfig(base_model="stabilityai/stable-diffusion-xl-base-1.0", max_train_steps=500,
                         mixed_precision="bf16", **PROMPTS)  # fmt: skip
    first = estimate_training(config, tmp_path)
    # bf16 weights of UNet + both text encoders, and the fp32 VAE (84 M params at 4 bytes).
    assert first.weights_gb is not None and 6.5 < first.weights_gb < 7.0
    assert first.seconds is None and "shown once training starts" in first.text()

    run = tmp_path / "earlier"
    run.mkdir()
    config.save(run / "config.json")
    (run / "status.json").write_text(
        json.dumps({"status": "finished", "summary": {"steps": 100, "seconds": 50.0}})
    )
    other = tmp_path / "other-resolution"
    other.mkdir()
    TrainConfig(base_model=config.base_model, resolution=512, mixed_precision="bf16", **PROMPTS).save(
        other / "config.json"
    )
    (other / "status.json").write_text(
        json.dumps({"status": "finished", "summary": {"steps": 10, "seconds": 500.0}})
    )
    second = estimate_training(config, tmp_path)
    assert second.seconds == 0.5 * 500  # only the run with the same settings counts
    assert "about 4 min" in second.text()
