"""Model shapes: the widths of an architecture, free of torch so that anything may import them.

`SD15Shape()` and `SDXLShape()` are the real models; `TINY_SD15` and `TINY_SDXL` the offline test
models. Random models of any shape are built by `components.build_sd15` / `components.build_sdxl`.
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

# The benchmarks' model (bench/train_speed.py, bench/adapter_switch.py): SD 1.5's layout at about a
# fifth of its widths, 256 px.
SMALL_SD15 = SD15Shape(
    unet_channels=(64, 128, 256, 256),
    vae_channels=(32, 64, 128, 128),
    text_hidden=256,
    text_layers=4,
    text_heads=4,
    text_intermediate=1024,
    resolution=256,
)


@dataclass(frozen=True)
class SDXLShape:
    """The widths of an SDXL-architecture model (the real base: UNet 320-1280 with 1/2/10 transformer
    layers, CLIP ViT-L 768 x 12 plus OpenCLIP bigG 1280 x 32 with a 1280 projection, 1024 px).

    The UNet's first block has no attention; its cross-attention width is the two text encoders'
    hidden sizes together, and its "text_time" embedding takes the pooled text embedding of the
    second encoder plus six size numbers (original size, crop top-left, target size).
    """

    unet_channels: tuple[int, ...] = (320, 640, 1280)
    unet_layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    attention_head_dim: tuple[int, ...] = (5, 10, 20)
    addition_time_embed_dim: int = 256
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    norm_groups: int = 32
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text2_hidden: int = 1280
    text2_layers: int = 32
    text2_heads: int = 20
    text2_intermediate: int = 5120
    text2_projection: int = 1280
    resolution: int = 1024


TINY_SDXL = SDXLShape(
    unet_channels=(32, 64),
    unet_layers_per_block=1,
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 4),
    addition_time_embed_dim=8,
    vae_channels=(16, 16, 32, 32),
    vae_layers_per_block=1,
    norm_groups=16,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    text_intermediate=64,
    # Wider than the first encoder, as in SDXL (768 / 1280): diffusers' single-file loader tells
    # the two encoders apart by their widths.
    text2_hidden=48,
    text2_layers=2,
    text2_heads=4,
    text2_intermediate=96,
    text2_projection=32,
    resolution=64,
)
