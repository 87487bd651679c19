"""SDXL end to end through the app's generation path: an adapter trained on tiny-sdxl (text-encoder
LoRA on both encoders) is hot-swapped into the resident SDXL pipeline and gives exactly the image a
fresh diffusers pipeline with `load_lora_weights` gives; on an SD 1.5 base it is refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import base_config

from trainer_core.components import assemble_pipeline, load_components
from trainer_core.events import TrainingError
from trainer_core.inference import GenerateRequest, Generator, generate, make_scheduler
from trainer_core.loop import train

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-run")
    config = base_config(
        tiny_sdxl, photos, out, with_prior_preservation=False, class_prompt=None, max_train_steps=4,
        train_text_encoder=True, learning_rate=5e-3,
    )  # fmt: skip
    result = train(config)
    assert result.status == "finished"
    return result.adapter_dir


def pixels(image):
    return np.asarray(image, dtype=np.float32) / 255.0


def test_sdxl_adapter_swaps_in_and_matches_a_fresh_pipeline(tiny_sdxl, tiny_model, sdxl_adapter):
    gen = Generator(device="cpu")
    request = GenerateRequest(base_model=str(tiny_sdxl), prompt=PROMPT, steps=3, seed=7)
    base = gen.generate(request)[0]
    with_adapter = gen.generate(
        GenerateRequest(**{**request.__dict__, "adapters": ((str(sdxl_adapter), 1.0),)})
    )[0]
    assert np.abs(pixels(base) - pixels(with_adapter)).max() > 1e-2  # the LoRA does something

    parts, _ = load_components(str(tiny_sdxl))
    fresh = assemble_pipeline(parts)
    fresh.scheduler = make_scheduler("dpm++", fresh.scheduler.config)
    fresh.load_lora_weights(str(sdxl_adapter))
    expected = generate(fresh, PROMPT, steps=3, seed=7)[0]
    assert np.abs(pixels(expected) - pixels(with_adapter)).max() < 1e-3

    with pytest.raises(TrainingError, match="SDXL"):
        gen.generate(GenerateRequest(base_model=str(tiny_model), prompt=PROMPT, steps=2,
                                     adapters=((str(sdxl_adapter), 1.0),)))  # fmt: skip
