"""The optimizer: the UNet's and the text encoders' LoRA weights are separate parameter groups with
their own learning rate and weight decay, and a step moves each by its own rate; Prodigy comes with
its authors' LoRA settings and trains in the real loop. Real tiny models with peft LoRA, no mocks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import base_config
from lora_fixtures import assert_same_weights, stop_after

from trainer_core import components
from trainer_core.config import TrainConfig
from trainer_core.optim import make_optimizer


@pytest.fixture(scope="module")
def lora_models(tiny_sdxl):
    """SDXL's UNet and both text encoders with LoRA attached (lora_B at zero, as peft starts it)."""
    parts, _ = components.load_components(str(tiny_sdxl))
    unet, te, te2 = parts["unet"], parts["text_encoder"], parts["text_encoder_2"]
    torch.manual_seed(0)
    components.add_lora(unet, te, rank=4, alpha=4.0, train_text_encoder=True, text_encoder_2=te2)
    return unet, te, te2


def _config(tmp_path, **kw) -> TrainConfig:
    values = dict(instance_prompt="a photo of sks dog", output_dir=str(tmp_path), learning_rate=1e-3)
    values.update(kw)
    return TrainConfig(**values)


def test_unet_and_text_encoders_get_their_own_rate_and_decay(lora_models, tmp_path):
    unet, te, te2 = lora_models
    unet_params = components.lora_parameters(unet)
    te_params = components.lora_parameters(te, te2)
    config = _config(tmp_path, text_encoder_lr=2e-5, adam_weight_decay=0.0, text_encoder_weight_decay=0.0)
    optimizer = make_optimizer(config, unet_params, te_params)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"unet", "text_encoder"}
    assert groups["unet"]["lr"] == 1e-3 and groups["text_encoder"]["lr"] == 2e-5
    assert {id(p) for p in groups["unet"]["params"]} == {id(p) for p in unet_params}
    assert {id(p) for p in groups["text_encoder"]["params"]} == {id(p) for p in te_params}
    # both SDXL encoders are in (the first without its last layer, whose output SDXL never reads)
    assert len(te_params) == len(components.lora_parameters(te)) + len(components.lora_parameters(te2))
    assert len(components.lora_parameters(te)) and len(components.lora_parameters(te2))

    # One AdamW step from zero moments moves every weight by lr * g / (|g| + eps), i.e. by its
    # group's lr: the step uses each group's own rate.
    before = {id(p): p.detach().clone() for p in unet_params + te_params}
    g = torch.Generator().manual_seed(1)
    for p in unet_params + te_params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()
    with torch.no_grad():
        for params, lr in ((unet_params, 1e-3), (te_params, 2e-5)):
            moved = torch.cat([(p - before[id(p)]).abs().flatten() for p in params])
            assert moved.max().item() == pytest.approx(lr, rel=0.02)  # float32 rounding of p - p0
            assert moved.median().item() == pytest.approx(lr, rel=0.02)
            for p in params:
                p.copy_(before[id(p)])
                p.grad = None

    # Weight decay per group too: with zero gradients only the decay moves a weight, by lr * wd * p.
    config = dataclasses.replace(config, adam_weight_decay=0.1, text_encoder_weight_decay=0.5)
    optimizer = make_optimizer(config, unet_params, te_params)
    for p in unet_params + te_params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with torch.no_grad():
        for params, lr, wd in ((unet_params, 1e-3, 0.1), (te_params, 2e-5, 0.5)):
            p = next(p for p in params if p.abs().max() > 0)  # a lora_A (lora_B starts at zero)
            assert torch.allclose(p, before[id(p)] * (1 - lr * wd), rtol=0, atol=1e-9)
            for q in params:
                q.copy_(before[id(q)])
                q.grad = None


def test_without_text_encoder_lora_there_is_one_group(lora_models, tmp_path):
    unet, _, _ = lora_models
    optimizer = make_optimizer(_config(tmp_path), components.lora_parameters(unet))
    assert [g["name"] for g in optimizer.param_groups] == ["unet"]


def test_prodigy_with_its_authors_lora_settings(lora_models, tmp_path, capsys):
    from prodigyopt import Prodigy

    unet, te, te2 = lora_models
    config = _config(tmp_path, optimizer="prodigy", learning_rate=1.0, text_encoder_lr=5e-6)
    optimizer = make_optimizer(config, components.lora_parameters(unet), components.lora_parameters(te, te2))
    assert isinstance(optimizer, Prodigy)
    assert capsys.readouterr().out == ""  # prodigyopt prints on construction; the engine never does
    for group in optimizer.param_groups:
        assert group["lr"] == 1.0  # Prodigy scales one estimated step size; every group keeps lr 1.0
        assert group["use_bias_correction"] is True and group["safeguard_warmup"] is True
        assert group["d_coef"] == 1.0
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {
        "unet": 1e-2,
        "text_encoder": 1e-3,
    }


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(optimizer="sgd"), "optimizer"),
        (dict(optimizer="prodigy"), "learning_rate"),  # 1e-4 would make Prodigy crawl
        (dict(optimizer="prodigy", learning_rate=1.0, use_8bit_adam=True), "optimizer"),
        (dict(text_encoder_lr=0.0), "text_encoder_lr"),
        (dict(text_encoder_weight_decay=-1.0), "text_encoder_weight_decay"),
        (dict(prodigy_d_coef=0.0), "prodigy_d_coef"),
    ],
)
def test_bad_optimizer_settings_name_the_field(overrides, field, tmp_path):
    with pytest.raises(ValueError, match=f"^{field}: "):
        _config(tmp_path, **{"learning_rate": 1e-4, **overrides})


def test_prodigy_trains_in_the_loop(tiny_model, photos, tmp_path):
    """Two real steps with Prodigy and text-encoder LoRA: it runs, and the LoRA weights moved."""
    from safetensors.torch import load_file

    from trainer_core.loop import train

    cfg = base_config(
        tiny_model,
        photos,
        tmp_path,
        with_prior_preservation=False,
        class_prompt=None,
        max_train_steps=2,
        optimizer="prodigy",
        learning_rate=1.0,
        train_text_encoder=True,
    )
    result = train(cfg)
    assert result.status == "finished"
    lora = load_file(str(result.adapter_dir / "pytorch_lora_weights.safetensors"))
    # lora_B starts at zero, so a non-zero one was trained. (The tiny UNet's middle block attends over
    # a single latent pixel, where the softmax makes q and k gradient-free: those stay at zero.)
    moved = {k for k, v in lora.items() if ".up." in k and v.abs().max() > 0}
    te_ups = {k for k in lora if k.startswith("text_encoder.") and ".up." in k}
    assert te_ups and te_ups <= moved
    assert len(moved) >= 0.9 * sum(".up." in k for k in lora)


@pytest.mark.slow  # three short runs: about a minute of CPU
def test_stop_and_resume_with_the_new_options_equals_a_straight_run(tiny_model, photos, class_dir, tmp_path):
    """Prodigy's state (two parameter groups), DoRA magnitudes and caption dropout all survive a
    checkpoint: stopped at step 3 and resumed, the run ends with the straight run's weights."""
    import json

    from trainer_core.loop import train

    cfg = base_config(
        tiny_model,
        photos,
        tmp_path / "straight",
        class_data_dir=str(class_dir),
        max_train_steps=6,
        optimizer="prodigy",
        learning_rate=1.0,
        train_text_encoder=True,
        use_dora=True,
        caption_dropout=0.5,
    )
    straight = train(cfg)
    split = dataclasses.replace(cfg, output_dir=str(tmp_path / "split"))
    assert train(split, should_stop=stop_after(3)).summary["steps"] == 3
    resumed = train(dataclasses.replace(split, resume_from_checkpoint="latest"))
    assert resumed.status == "finished" and resumed.summary["steps"] == 6
    a = assert_same_weights(straight.adapter_dir, resumed.adapter_dir)
    assert any("lora_magnitude_vector" in k for k in a)
    metrics = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics] == list(range(1, 7))


@pytest.fixture(scope="module")
def dora_models(tiny_sdxl):
    """SDXL's UNet and both text encoders with DoRA attached (a magnitude vector per layer)."""
    parts, _ = components.load_components(str(tiny_sdxl))
    unet, te, te2 = parts["unet"], parts["text_encoder"], parts["text_encoder_2"]
    torch.manual_seed(0)
    components.add_lora(
        unet, te, rank=4, alpha=4.0, train_text_encoder=True, text_encoder_2=te2, use_dora=True
    )
    return unet, te, te2


def test_dora_magnitudes_get_no_weight_decay(dora_models, tmp_path):
    """DoRA's magnitudes are each layer's weight norms, not a low-rank update: decaying them shrinks
    the layer's output towards zero. Like biases and norms in kohya's and OneTrainer's optimizers
    (and nanoGPT's), they sit in groups without weight decay, at their component's learning rate."""
    unet, te, te2 = dora_models
    unet_params, te_params = components.lora_parameters(unet), components.lora_parameters(te, te2)
    magnitudes = components.dora_magnitudes(unet, te, te2)
    assert magnitudes and {id(p) for p in magnitudes} <= {id(p) for p in unet_params + te_params}
    config = _config(tmp_path, text_encoder_lr=2e-5, adam_weight_decay=0.1, text_encoder_weight_decay=0.5)
    optimizer = make_optimizer(config, unet_params, te_params, no_decay=magnitudes)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert [g["name"] for g in optimizer.param_groups][0] == "unet"  # metrics log the first group's lr
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert {id(p) for g in no_decay for p in g["params"]} == {id(p) for p in magnitudes}
    assert groups["unet"]["weight_decay"] == 0.1 and groups["text_encoder"]["weight_decay"] == 0.5
    assert groups["unet_no_decay"]["lr"] == 1e-3 and groups["text_encoder_no_decay"]["lr"] == 2e-5
    every = [p for g in optimizer.param_groups for p in g["params"]]
    assert sorted(map(id, every)) == sorted(map(id, unet_params + te_params))  # each exactly once

    # One step with zero gradients: only weight decay moves a weight. The LoRA matrices shrink by
    # lr * wd; the magnitudes stay bit-identical.
    before = {id(p): p.detach().clone() for p in every}
    for p in every:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with torch.no_grad():
        for p in magnitudes:
            assert torch.equal(p, before[id(p)])
        lora_a = next(p for p in unet_params if p.dim() == 2 and p.abs().max() > 0)
        assert torch.allclose(lora_a, before[id(lora_a)] * (1 - 1e-3 * 0.1), rtol=0, atol=1e-9)
        for p in every:
            p.copy_(before[id(p)])
            p.grad = None


def test_prodigy_keeps_dora_magnitudes_free_of_decay_too(dora_models, tmp_path):
    unet, te, te2 = dora_models
    config = _config(tmp_path, optimizer="prodigy", learning_rate=1.0)
    optimizer = make_optimizer(
        config,
        components.lora_parameters(unet),
        components.lora_parameters(te, te2),
        no_decay=components.dora_magnitudes(unet, te, te2),
    )
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {
        "unet": 1e-2,
        "unet_no_decay": 0.0,
        "text_encoder": 1e-3,
        "text_encoder_no_decay": 0.0,
    }
