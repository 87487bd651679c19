"""Training options: mixed precision keeps LoRA in fp32, gradient checkpointing changes nothing but
memory, other targets and loss weightings change the loss, CUDA-only options fail with a sentence."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import base_config
from safetensors.torch import load_file

from trainer_core.events import TrainingError
from trainer_core.loop import train


@pytest.fixture
def cfg(tiny_model, photos, class_dir, tmp_path):
    return base_config(tiny_model, photos, tmp_path / "run", class_data_dir=str(class_dir), max_train_steps=3)


def _lora(result):
    return load_file(str(result.adapter_dir / "pytorch_lora_weights.safetensors"))


def test_bf16_trains_lora_in_fp32_over_bf16_base(cfg):
    result = train(dataclasses.replace(cfg, mixed_precision="bf16"))
    unet = result.unet
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    base = [p for n, p in unet.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert all(torch.isfinite(t).all() for t in _lora(result).values())


def test_gradient_checkpointing_gives_the_same_weights(cfg, tmp_path):
    plain = _lora(train(cfg))
    ckpt = _lora(
        train(dataclasses.replace(cfg, output_dir=str(tmp_path / "gc"), gradient_checkpointing=True))
    )
    for key in plain:
        torch.testing.assert_close(plain[key], ckpt[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "change", [dict(prediction_type="v_prediction"), dict(snr_gamma=0.1), dict(noise_offset=0.1)]
)
def test_targets_and_weightings_change_the_loss(cfg, tmp_path, change):
    reference = train(cfg).summary
    other = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "other"), **change)).summary
    assert other["final_loss"] == other["final_loss"]  # finite, not NaN
    assert abs(other["final_loss"] - reference["final_loss"]) > 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(mixed_precision="fp16"), "fp16"),
        (dict(use_8bit_adam=True), "8-bit Adam"),
        (dict(enable_xformers=True), "xformers"),
        (dict(compile_unet=True), "Compiling the UNet needs a CUDA GPU"),
    ],
)
def test_cuda_only_options_fail_with_a_sentence(cfg, change, fragment):
    with pytest.raises(TrainingError, match=fragment):
        train(dataclasses.replace(cfg, **change))


def test_fused_adam_builds_a_fused_adamw_and_excludes_8bit(cfg):
    from trainer_core.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(cfg, params, []).param_groups[0]["fused"] in (None, False)
    fused = make_optimizer(dataclasses.replace(cfg, fused_adam=True), params, [])
    assert isinstance(fused, torch.optim.AdamW) and fused.param_groups[0]["fused"] is True
    params[0].grad = torch.ones(3)
    fused.step()  # the fused kernel runs here (torch has one for the CPU too)
    assert torch.all(params[0] < 0)
    with pytest.raises(ValueError, match="fused_adam"):
        dataclasses.replace(cfg, fused_adam=True, use_8bit_adam=True)
