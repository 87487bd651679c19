"""Model shapes: the widths of an architecture, free of torch so that anything may import them.

`SD15Shape()` is the real SD 1.5; `TINY_SD15` is the offline test model. Random models of any
shape are built by `components.build_sd15`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SD15Shape:
    """The widths of an SD 1.5-architecture model (the real one: UNet 320-1280, VAE 128-512,
    CLIP ViT-L 768 x 12, 512 px). Block types, latent channels and the VAE factor are SD 1.5's."""

    unet_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    unet_layers_per_block: int = 2
    attention_head_dim: int = 8
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    norm_groups: int = 32
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    resolution: int = 512


TINY_SD15 = SD15Shape(
    unet_channels=(32, 32, 64, 64),
    unet_layers_per_block=1,
    vae_channels=(16, 16, 32, 32),
    vae_layers_per_block=1,
    norm_groups=16,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    text_intermediate=64,
    resolution=64,
)
