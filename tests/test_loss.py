"""The DreamBooth loss as a pure function: total = instance + prior_loss_weight x prior, with the
instance half first. Each test here fails for a loss that ignores the weight, swaps the halves, or
lets the class half leak into the instance term; and end to end, with prior_loss_weight 0 the
adapter cannot depend on the class images (with 1 it must)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import base_config, write_class_images

from trainer_core.loop import compute_loss


def _batch(seed: int = 0, instance: int = 2, klass: int = 2):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(instance + klass, 4, 8, 8, generator=g)
    # Different error sizes in the two halves, so a swap changes every number.
    scale = torch.tensor([0.5] * instance + [2.0] * klass).view(-1, 1, 1, 1)
    pred = (target + scale * torch.randn(target.shape, generator=g)).requires_grad_(True)
    return pred, target


def test_halves_are_instance_first_and_weighted():
    pred, target = _batch()
    total, instance, prior = compute_loss(pred, target, instance_count=2, prior_loss_weight=2.0)
    expect_instance = F.mse_loss(pred[:2], target[:2])
    expect_prior = F.mse_loss(pred[2:], target[2:])
    assert expect_prior > 4 * expect_instance  # the halves really differ
    assert instance.item() == pytest.approx(expect_instance.item(), rel=1e-6)
    assert prior.item() == pytest.approx(expect_prior.item(), rel=1e-6)
    assert total.item() == pytest.approx((expect_instance + 2.0 * expect_prior).item(), rel=1e-6)


def test_weight_zero_gives_the_class_half_no_gradient():
    pred, target = _batch()
    total, _, prior = compute_loss(pred, target, instance_count=2, prior_loss_weight=0.0)
    assert prior.item() > 0  # still reported
    total.backward()
    assert torch.count_nonzero(pred.grad[2:]) == 0
    assert torch.count_nonzero(pred.grad[:2]) == pred.grad[:2].numel()


def test_weight_two_gives_instance_gradient_plus_twice_the_prior_gradient():
    pred, target = _batch(seed=1)
    compute_loss(pred, target, instance_count=2, prior_loss_weight=2.0)[0].backward()
    got = pred.grad.clone()
    ref = pred.detach().clone().requires_grad_(True)
    g_instance = torch.autograd.grad(F.mse_loss(ref[:2], target[:2]), ref)[0]
    g_prior = torch.autograd.grad(F.mse_loss(ref[2:], target[2:]), ref)[0]
    torch.testing.assert_close(got, g_instance + 2.0 * g_prior, rtol=1e-5, atol=1e-9)


def test_without_prior_the_whole_batch_is_instance():
    pred, target = _batch(instance=3, klass=0)
    total, instance, prior = compute_loss(pred, target, instance_count=3, prior_loss_weight=1.0)
    assert prior.item() == 0.0
    assert total.item() == pytest.approx(F.mse_loss(pred, target).item(), rel=1e-6)
    assert instance.item() == total.item()


def test_per_sample_weights_apply_before_each_half_is_averaged():
    pred, target = _batch(seed=2)
    weights = torch.tensor([1.0, 3.0, 0.5, 0.0])
    total, instance, prior = compute_loss(
        pred, target, instance_count=2, prior_loss_weight=1.0, weights=weights
    )
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights
    assert instance.item() == pytest.approx(per[:2].mean().item(), rel=1e-6)
    assert prior.item() == pytest.approx(per[2:].mean().item(), rel=1e-6)


@pytest.fixture(scope="module")
def other_class_dir(tmp_path_factory):
    return write_class_images(tmp_path_factory.mktemp("class-other"), seed=999)


def _lora_after(cfg):
    from trainer_core.loop import train

    unet = train(cfg).unet
    return {k: v.clone() for k, v in unet.state_dict().items() if "lora_" in k}


def test_prior_weight_zero_makes_the_adapter_independent_of_class_images(
    tiny_model, photos, class_dir, other_class_dir, tmp_path
):
    """End to end through the real loop: weight 0 -> bit-identical LoRA whatever the class images;
    weight 1 -> the class images change it. A loop that ignores prior_loss_weight, or that mixes
    the class half into the instance term, fails one of the two."""
    cfg = base_config(tiny_model, photos, tmp_path / "a", class_data_dir=str(class_dir), max_train_steps=4)
    runs = {}
    for weight in (0.0, 1.0):
        for name, folder in (("a", class_dir), ("b", other_class_dir)):
            runs[weight, name] = _lora_after(
                dataclasses.replace(
                    cfg,
                    prior_loss_weight=weight,
                    class_data_dir=str(folder),
                    output_dir=str(tmp_path / f"{weight}-{name}"),
                )
            )
    for key in runs[0.0, "a"]:
        assert torch.equal(runs[0.0, "a"][key], runs[0.0, "b"][key]), key
    differs = [k for k in runs[1.0, "a"] if not torch.equal(runs[1.0, "a"][k], runs[1.0, "b"][k])]
    assert len(differs) > len(runs[1.0, "a"]) // 2
    # and weight 0 is not "no training": the LoRA moved away from the weight-1 run
    assert any(not torch.equal(runs[0.0, "a"][k], runs[1.0, "a"][k]) for k in runs[0.0, "a"])
