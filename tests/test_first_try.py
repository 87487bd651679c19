"""The app's first try on the built-in tiny-shapes model, without a browser: the example photo set,
the Quick try preset's numbers on tiny-shapes, and the sampling the Generate tab picks for an adapter
of tiny-shapes (the learning itself is tests/test_tiny_shapes.py's)."""

from __future__ import annotations

import gradio as gr
import pytest

from trainer_core import tiny_shapes
from trainer_core.config import QUICK_TRY, quick_try_config

needs_weights = pytest.mark.skipif(
    not (tiny_shapes.MODEL_DIR / "model_index.json").exists(),
    reason="tiny-shapes weights not built (make pretrain-shapes)",
)


@needs_weights
def test_the_example_button_prepares_the_orange_circle(tmp_path):
    import numpy as np
    from PIL import Image

    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import photos

    studios = Studios(tmp_path / "data", base_model="tiny-sd15")
    summary, gallery, table, _rejected, dataset, *rest = photos.on_example(studios, None)
    editor, fields = rest[:6], rest[6:]
    assert dataset == "orange-circle-example" and len(gallery) == 5 and "5 photos ready" in summary
    assert editor[0].visible is False
    # Subject type, token, class noun and base model follow the set.
    assert fields == ["object", "sks", "circle", "tiny-shapes"]
    assert {row[1] for row in table} == {"a photo of sks circle"}
    studio = studios.get(None)
    squares = [
        Image.open(studio.datasets_dir / dataset / a["output"])
        for a in studio.dataset_report(dataset)["accepted"]
    ]
    assert {s.size for s in squares} == {(64, 64)}, "prepared at tiny-shapes' resolution"
    assert tiny_shapes.colour_distance(squares, tiny_shapes.SUBJECT_COLOUR) < 15
    # A second click gives the same set back: nothing doubled, an edit kept.
    studio.set_caption(dataset, "001-orange-circle-1.png", "a photo of sks circle on grey")
    again = photos.on_example(studios, None)
    assert len(again[1]) == 5 and "a photo of sks circle on grey" in {row[1] for row in again[2]}
    assert np.asarray(squares[0]).std() > 10


def test_the_quick_try_on_tiny_shapes_is_the_measured_one(tmp_path):
    """The page's Quick try on tiny-shapes is config.QUICK_TRY (what the learning tests train); on
    any other model a short run."""
    from dreambooth_ui.tabs import train

    on_shapes = train.preset_overrides("Quick try", "tiny-shapes")
    config = quick_try_config(str(tmp_path), str(tmp_path / "run"))
    for key in ("num_class_images", "rank", "learning_rate", "max_train_steps", "train_batch_size"):
        assert on_shapes[key] == getattr(config, key) == QUICK_TRY[key], key
    assert on_shapes["class_generation_steps"] == QUICK_TRY["sampler_steps"]
    assert train.preset_overrides("Quick try", "tiny-sd15") == {
        "max_train_steps": 150,
        "num_class_images": 25,
        "base_model": "tiny-sd15",
    }
    assert train.preset_overrides("Full", "tiny-shapes") == {"base_model": "tiny-shapes"}


@needs_weights
def test_the_plan_for_the_example_set_takes_the_quick_try(tmp_path):
    """Through the Studio's own checks (client fields, limits): the example set's Quick try plan."""
    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import train

    studios = Studios(tmp_path / "data")
    studio = studios.get(None)
    report = studio.prepare_example_photos()
    config = studio.plan_training(
        report["dataset"], subject_type="object", token="sks", class_noun="circle",
        **train.preset_overrides("Quick try", "tiny-shapes"),
    )  # fmt: skip
    assert (config.base_model, config.instance_prompt, config.class_prompt) == (
        "tiny-shapes",
        tiny_shapes.SUBJECT_PROMPT,
        tiny_shapes.CLASS_PROMPT,
    )
    assert config.with_prior_preservation and config.max_train_steps == QUICK_TRY["max_train_steps"]
    assert config.train_batch_size == QUICK_TRY["train_batch_size"]


def test_generate_takes_the_sampling_of_the_adapters_base_model(tmp_path, monkeypatch):
    """A tiny-shapes adapter picked: 20 steps, guidance 4 and no negative prompt (a negative prompt of
    words tiny-shapes never saw ruins its pictures); any other adapter leaves the boxes alone."""
    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import generate

    studios = Studios(tmp_path)
    adapters = [
        {"name": "orange", "base_model": "tiny-shapes", "instance_prompt": "a photo of sks circle"},
        {"name": "dog", "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "instance_prompt": "a photo of sks dog"},
    ]  # fmt: skip
    monkeypatch.setattr(type(studios.get(None)), "list_adapters", lambda self: adapters)
    assert generate.on_adapter(studios, None, "orange") == ("a photo of sks circle", 20, 4.0, "")
    prompt, *rest = generate.on_adapter(studios, None, "dog")
    assert prompt == "a photo of sks dog" and rest == [gr.skip()] * 3
