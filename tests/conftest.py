"""Shared fixtures: offline env, tiny SD 1.5 and SDXL models saved to disk, synthetic photos, and helpers
that measure a UNet with fixed noise and timesteps (real diffusers models, nothing mocked)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def studio_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("studio-home")
    os.environ["DREAMBOOTH_STUDIO_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, studio_home) -> Path:
    """A tiny SD 1.5 model written as a diffusers folder (loaded back through from_pretrained)."""
    from trainer_core.components import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory, studio_home) -> Path:
    """A tiny SDXL model (two text encoders, pooled projection, size embedding) as a diffusers folder."""
    from trainer_core.components import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", arch="sdxl")


def write_photos(folder: Path, n: int = 4, size: tuple[int, int] = (96, 80), seed: int = 0) -> Path:
    """Distinct synthetic 'subject' photos: a coloured blob on a textured background."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        a = (rng.random((h, w, 3)) * 80).astype("uint8")
        x, y = 20 + 5 * i, 15 + 3 * i
        a[y : y + 40, x : x + 40] = [220, 60 + 30 * i, 40]
        Image.fromarray(a).save(folder / f"photo-{i}.jpg", quality=95)
    return folder


def write_class_images(folder: Path, n: int = 4, seed: int = 100) -> Path:
    """Stand-in class images (for tests that exercise the loop, not class generation)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = (rng.random((64, 64, 3)) * 255).astype("uint8")
        a[16:48, 16:48] = [40, 90, 200]
        Image.fromarray(a).save(folder / f"class-{i:05d}.png")
    return folder


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def class_dir(tmp_path_factory) -> Path:
    return write_class_images(tmp_path_factory.mktemp("class"))


def base_config(tiny_model: Path, photos: Path, out: Path, **overrides):
    from trainer_core.config import TrainConfig

    values = dict(
        base_model=str(tiny_model),
        instance_dir=str(photos),
        instance_prompt="a photo of sks dog",
        output_dir=str(out),
        class_prompt="a photo of a dog",
        with_prior_preservation=True,
        num_class_images=4,
        max_train_steps=12,
        learning_rate=1e-3,
        rank=4,
        alpha=8.0,  # alpha != rank: catches adapters that reload with the wrong scale
        checkpointing_steps=0,
        validation_inference_steps=2,
        num_validation_images=0,
        seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


class Probe:
    """Fixed latents, noise, timesteps and prompt embeddings to compare UNets on, all seeded."""

    def __init__(self, tiny_model: Path, image_dir: Path, prompt: str, n: int = 4, seed: int = 1234):
        import torch

        from trainer_core.components import load_components
        from trainer_core.data import image_to_tensor, list_images, load_rgb

        parts, _ = load_components(str(tiny_model))
        self.parts = parts
        vae, te, tok = parts["vae"], parts["text_encoder"], parts["tokenizer"]
        paths = list_images(image_dir)[:n]
        pixels = torch.stack([image_to_tensor(load_rgb(p), 64) for p in paths])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
            ids = tok(
                [prompt] * len(paths),
                padding="max_length",
                max_length=tok.model_max_length,
                return_tensors="pt",
            ).input_ids
            self.prompt_embeds = te(ids)[0]
        self.noise = torch.randn(self.latents.shape, generator=g)
        self.timesteps = torch.randint(0, 1000, (len(paths),), generator=g)
        self.noisy = parts["scheduler"].add_noise(self.latents, self.noise, self.timesteps)

    def predict(self, unet, prompt_embeds=None):
        import torch

        unet.eval()
        with torch.no_grad():
            embeds = self.prompt_embeds if prompt_embeds is None else prompt_embeds
            return unet(self.noisy, self.timesteps, embeds).sample

    def loss(self, unet) -> float:
        import torch.nn.functional as F

        return F.mse_loss(self.predict(unet), self.noise).item()
