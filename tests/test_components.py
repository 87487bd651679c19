"""Base model loading: tiny model through from_pretrained, clear errors for every bad source."""

from __future__ import annotations

import time

import pytest

from trainer_core.components import load_components, resolve_base_model
from trainer_core.events import TrainingError


def test_tiny_model_name_builds_and_loads_offline():
    parts, source = load_components("tiny-sd15")
    assert source.kind == "tiny" and source.is_tiny
    assert type(parts["unet"]).__name__ == "UNet2DConditionModel"
    assert type(parts["text_encoder"]).__name__ == "CLIPTextModel"
    assert parts["unet"].config.cross_attention_dim == parts["text_encoder"].config.hidden_size
    assert len(parts["vae"].config.block_out_channels) == 4  # SD's 8x VAE
    ids = parts["tokenizer"]("a photo of sks dog").input_ids
    assert ids[0] == parts["tokenizer"].bos_token_id and ids[-1] == parts["tokenizer"].eos_token_id


def test_local_folder_loads(tiny_model):
    parts, source = load_components(str(tiny_model))
    assert source.kind == "local" and source.is_tiny


def test_hub_id_offline_fails_fast_with_a_sentence():
    t = time.perf_counter()
    with pytest.raises(TrainingError) as e:
        load_components("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert time.perf_counter() - t < 30
    msg = str(e.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "tiny-sd15" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "name, fragment", [("/no/such/folder", "does not exist"), ("./missing.safetensors", "does not exist")]
)
def test_missing_paths(name, fragment):
    with pytest.raises(TrainingError, match=fragment):
        resolve_base_model(name)


def test_pickle_checkpoints_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(TrainingError, match="pickle"):
        resolve_base_model(str(ckpt))


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(TrainingError, match="not a diffusers model"):
        resolve_base_model(str(tmp_path))


def test_corrupt_single_file_gives_a_sentence(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(TrainingError, match="single-file checkpoint model.safetensors"):
        load_components(str(bad))


def test_hub_id_without_network_fails_fast_even_when_not_told_offline(tmp_path):
    """No HF_HUB_OFFLINE and no reachable Hub: the error comes in seconds, not after minutes of retries."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens on port 9
    code = (
        "import time; from trainer_core.components import load_components\n"
        "t = time.perf_counter()\n"
        "try:\n    load_components('someone/some-model')\n"
        "except Exception as e:\n    print(type(e).__name__, round(time.perf_counter() - t, 1), e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    ).stdout
    kind, seconds, message = out.strip().split(" ", 2)
    assert kind == "TrainingError" and "someone/some-model" in message
    assert float(seconds) < 15, out
