"""Real adapter folders and checkpoints for the inference and store tests, without a training run:
LoRA attached with peft, its up-weights set to seeded noise (a fresh LoRA is a no-op), written by
the same `save_adapter` / `save_checkpoint` the training loop uses."""

from __future__ import annotations

from pathlib import Path

import torch

PROMPT = "a photo of sks dog"


def perturbed_lora(tiny_model: Path, seed: int, *, text_encoder: bool = False):
    """UNet and text encoder with LoRA attached whose up-weights are seeded noise (so no no-op)."""
    from trainer_core import components

    parts, _ = components.load_components(str(tiny_model))
    unet, te = parts["unet"], parts["text_encoder"]
    torch.manual_seed(seed)
    components.add_lora(unet, te, rank=4, alpha=8.0, train_text_encoder=text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, te) if text_encoder else (unet,):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return unet, te


def lora_adapter(
    tiny_model: Path, out: Path, seed: int, *, text_encoder: bool = False, with_samples: bool = False, **meta
) -> Path:
    """A real adapter folder written by save_adapter from `perturbed_lora`."""
    from trainer_core import adapters

    unet, te = perturbed_lora(tiny_model, seed, text_encoder=text_encoder)
    metadata = {"base_model": str(tiny_model), "instance_prompt": PROMPT, "token": "sks", "steps": 1}
    metadata.update(meta)
    samples = None
    if with_samples:
        from PIL import Image

        samples = out.parent / f".samples-{out.name}"
        samples.mkdir(parents=True, exist_ok=True)
        for i, label in enumerate(("with", "without")):
            Image.new("RGB", (64, 64), (40 * seed % 255, 80 + 60 * i, 30)).save(
                samples / f"{label}-token-0.png"
            )
    adapters.save_adapter(
        out,
        unet=unet,
        text_encoder=te if text_encoder else None,
        name=out.name,
        metadata=metadata,
        config_json="{}",
        samples_dir=samples,
    )
    return out


def lora_checkpoint(tiny_model: Path, run: Path, seed: int, step: int) -> Path:
    """A checkpoint-N folder as the loop writes it (peft keys prefixed by component)."""
    from trainer_core import checkpoints
    from trainer_core.adapters import peft_lora_state

    unet, _ = perturbed_lora(tiny_model, seed)
    return checkpoints.save_checkpoint(
        run / "checkpoints",
        step,
        lora_state={f"unet.{k}": v for k, v in peft_lora_state(unet).items()},
        optimizer_state={},
        scheduler_state={},
        state={"base_model": str(tiny_model), "rank": 4, "alpha": 8.0, "train_text_encoder": False},
        total_limit=None,
    )


def stop_after(n: int):
    """A `should_stop` for train() that asks to stop at its n-th call (train asks once a step)."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= n

    return should_stop


def assert_same_weights(dir_a: Path, dir_b: Path, name: str = "pytorch_lora_weights.safetensors") -> dict:
    """The safetensors file `name` of two folders holds the same tensors (a resumed run against a
    straight one: equal to float rounding); returns the first folder's tensors."""
    from safetensors.torch import load_file

    a, b = load_file(str(Path(dir_a) / name)), load_file(str(Path(dir_b) / name))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    return a
