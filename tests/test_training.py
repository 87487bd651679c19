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


def _one_key_projections(unet, latent_size: int = 8) -> set[str]:
    """LoRA-wrapped `to_q`/`to_k` of self-attention layers that see a single token.

    Softmax over one key is the constant 1, so the query and key projections there cannot change
    the output and get no gradient (exactly zero, or rounding noise of ~1e-12 where a CPU's
    attention kernel sums in another order: AVX2 does, AVX-512 does not). At 64 px the tiny model's
    mid block works on a 1x1 map: that is where they are. Found by running the UNet, not by name.
    """
    from diffusers.models.attention_processor import Attention

    seen: dict[str, int] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: seen.__setitem__(
                name, (kwargs.get("hidden_states", args[0] if args else None)).shape[1]
            ),
            with_kwargs=True,
        )
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and not module.is_cross_attention
    ]
    try:
        dim = unet.config.cross_attention_dim
        with torch.no_grad():
            unet(torch.zeros(1, 4, latent_size, latent_size), torch.tensor([1]), torch.zeros(1, 77, dim))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen, "no self-attention layer ran"
    return {f"{name}.{proj}" for name, tokens in seen.items() if tokens == 1 for proj in ("to_q", "to_k")}


def test_lora_changed_and_base_untouched(trained, tiny_model):
    from diffusers import UNet2DConditionModel

    unet = trained["result"].unet
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    trained_sd = unet.state_dict()
    lora_b = {k.split(".lora_B")[0]: v for k, v in trained_sd.items() if "lora_B" in k}
    one_key = _one_key_projections(unet)
    # The tiny model at 64 px: 8x8 latents, three downsamples, so only the mid block sees 1x1.
    assert one_key == {
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
    }
    assert one_key <= set(lora_b)
    unmoved = {name for name, v in lora_b.items() if v.abs().max() == 0}
    # lora_B starts at zero: every LoRA that can receive a gradient must have moved.
    assert unmoved <= one_key, sorted(unmoved - one_key)
    assert len(lora_b) - len(one_key) >= 30
    compared = 0
    for key, value in trained_sd.items():
        if "lora_" in key:
            continue
        base_key = key.replace(".base_layer", "")
        assert torch.equal(value, base[base_key]), key
        compared += 1
    assert compared == len(base)


def test_one_key_projections_get_no_gradient(tiny_model):
    """The premise of the test above, checked directly: one backward pass, LoRA B perturbed so
    that gradients reach every LoRA matrix."""
    from trainer_core.components import add_lora, load_components

    parts, _ = load_components(str(tiny_model))
    unet = parts["unet"]
    add_lora(unet, parts["text_encoder"], rank=4, alpha=8.0, train_text_encoder=False)
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.01
    latents = torch.randn(2, 4, 8, 8, generator=g)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    unet(latents, torch.tensor([10, 500]), embeds).sample.pow(2).mean().backward()
    grads = {
        n.split(".lora_")[0]: p.grad.abs().max().item()
        for n, p in unet.named_parameters()
        if p.requires_grad and "lora_" in n
    }
    one_key = _one_key_projections(unet)
    assert max(grads[n] for n in one_key) < 1e-9
    assert min(v for n, v in grads.items() if n not in one_key) > 1e-7


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
