"""TrainConfig: validation names the field, JSON round trip, presets."""

import dataclasses
import json

import pytest

from trainer_core.config import TrainConfig, field_help, preset_config

OK = dict(instance_dir="p", instance_prompt="a photo of sks dog", output_dir="o")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(resolution=500), "resolution"),
        (dict(resolution=0), "resolution"),
        (dict(rank=0), "rank"),
        (dict(instance_prompt="   "), "instance_prompt"),
        (dict(with_prior_preservation=True, class_prompt=None), "class_prompt"),
        (dict(with_prior_preservation=True, class_prompt=" "), "class_prompt"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(lr_scheduler="warp"), "lr_scheduler"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(max_train_steps=0), "max_train_steps"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(alpha=-1.0), "alpha"),
        (dict(prior_loss_weight=-0.5), "prior_loss_weight"),
        (dict(prediction_type="sample"), "prediction_type"),
        (dict(token="zzz"), "token"),
        (dict(checkpoints_total_limit=0), "checkpoints_total_limit"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{**OK, **overrides})
    assert str(e.value).startswith(f"{field}:")


def test_replace_revalidates():
    c = TrainConfig(**OK)
    with pytest.raises(ValueError, match="^rank:"):
        dataclasses.replace(c, rank=0)


def test_json_round_trip_and_unknown_keys():
    c = TrainConfig(
        **OK, class_prompt="a photo of a dog", with_prior_preservation=True, alpha=8.0, resolution=256
    )
    assert TrainConfig.from_json(c.to_json()) == c
    data = json.loads(c.to_json())
    data["learning_rat"] = 1e-4
    with pytest.raises(ValueError, match="^learning_rat: unknown config key"):
        TrainConfig.from_dict(data)
    with pytest.raises(ValueError, match="^config:"):
        TrainConfig.from_json("[1, 2]")


def test_every_field_has_help():
    for f in dataclasses.fields(TrainConfig):
        assert field_help(f.name), f.name


def test_derived_values():
    c = TrainConfig(**OK, class_prompt="a photo of a dog", rank=8)
    assert c.lora_alpha == 8.0
    assert c.identifier_token == "sks"
    assert c.prompt_without_token("a photo of sks dog on a beach") == "a photo of dog on a beach"
    assert c.prompt_without_token("a photo of a cat") is None


@pytest.mark.parametrize("subject", ["person", "pet", "object", "style"])
def test_presets(subject):
    few, many = (
        preset_config(subject, 5, instance_dir="p", output_dir="o"),
        preset_config(subject, 20, instance_dir="p", output_dir="o"),
    )
    assert few.max_train_steps <= many.max_train_steps
    assert "sks" in few.instance_prompt
    if subject == "style":
        assert not few.with_prior_preservation
    else:
        assert few.with_prior_preservation and few.class_prompt
        assert many.num_class_images >= few.num_class_images >= 100
    assert preset_config(subject, 8, rank=32, instance_dir="p", output_dir="o").rank == 32


def test_preset_rejects_unknown_subject():
    with pytest.raises(ValueError, match="^subject_type:"):
        preset_config("car", 5)
