"""Instance and class images for training: read by content, normalised, turned into tensors.

Photo preparation (face crop, captioning, dataset checks) lives in the prep stage; this module
reads a prepared (or plain) folder: every decodable image, EXIF-transposed, converted to RGB,
resized on its short side and centre-cropped to the training resolution. A `.txt` beside an image
is its caption and becomes that image's prompt; a `.mask.png` beside it (white = subject) is its
loss mask for `masked_loss`, and is never itself a training photo.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .events import TrainingError

if TYPE_CHECKING:  # torch is imported where tensors are made, so `data` stays light for the prep stage
    import torch

log = logging.getLogger(__name__)

# Formats accepted by content (Image.open's verdict, never the file name). MPO is what phones write
# for JPEGs with a depth or preview frame; HEIF comes from the pillow-heif plugin (iPhone photos) and
# AVIF from Pillow itself when it was built with libavif.
IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO", "HEIF", "AVIF"}
MASK_SUFFIX = ".mask.png"  # `photo.png` -> `photo.mask.png`: white = subject, black = ignored by the loss


def register_image_plugins() -> None:
    """Teach Pillow HEIC/HEIF (pillow-heif); without the plugin such files are simply not images."""
    try:
        import pillow_heif
    except ImportError:
        log.debug("pillow-heif is not installed: HEIC photos are not read")
        return
    pillow_heif.register_heif_opener()


register_image_plugins()


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str


def list_images(folder: str | Path) -> list[Path]:
    """Decodable images in `folder` (not recursive), by content rather than by extension, sorted.

    Subfolders are never entered: a prepared folder keeps the user's originals in `originals/`,
    and training must see only the prepared squares beside them.
    """
    folder = Path(folder)
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() == ".txt" or is_mask(p):
            continue
        try:
            with Image.open(p) as im:
                if im.format in IMAGE_FORMATS:
                    found.append(p)
        except (UnidentifiedImageError, OSError):
            log.debug("skipping %s: not an image", p)
    return found


def load_instance_examples(instance_dir: str | Path, instance_prompt: str) -> list[Example]:
    folder = Path(instance_dir)
    if not folder.is_dir():
        raise TrainingError(f"The photo folder {instance_dir} does not exist.")
    examples = []
    for p in list_images(folder):
        caption_file = p.with_suffix(".txt")
        prompt = instance_prompt
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
            prompt = caption or instance_prompt
        examples.append(Example(p, prompt))
    if not examples:
        raise TrainingError(
            f"No usable photos in {instance_dir}; add JPEG, PNG or WEBP images of the subject."
        )
    return examples


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except (UnidentifiedImageError, OSError) as e:
        raise TrainingError(f"The image {path.name} cannot be read ({e}); remove it or re-export it.") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as the photo a person sees: EXIF orientation applied, 16-bit levels scaled
    to 8-bit, transparency composited on white, any mode (CMYK, L, P, LA, I;16) as RGB.

    Loads the pixels, so a truncated file raises OSError here.
    """
    im = ImageOps.exif_transpose(im)
    im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale scaled into 0-255.

    Pillow's convert("RGB") clips such images instead of scaling them: a 16-bit photo comes out
    almost all white.
    """
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    array = np.asarray(im, dtype=np.float64)
    top = array.max(initial=0.0)
    if im.mode == "F":
        scale = 255.0 if top <= 1.0 else (255.0 / top if top > 255 else 1.0)
    else:
        scale = 255.0 / 65535.0 if top > 255 else 1.0  # 16-bit levels in an int container
    return Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8), mode="L")


def image_to_tensor(
    image: Image.Image, resolution: int | tuple[int, int], *, flip: bool = False
) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W) in [-1, 1]: resized to cover `resolution` (a side, or a
    (width, height) bucket) and centre-cropped to it."""
    import torch

    image = fit_to_size(image, _size(resolution), flip=flip)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


def crop_box_for(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], int, int]:
    """How an image of `size` (w, h) is fitted to `target` (w, h): the resized size that covers the
    target (aspect kept), and the centred crop's left and top in that resized image."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
    return (new_w, new_h), (new_w - tw) // 2, (new_h - th) // 2


def fit_to_size(image: Image.Image, target: tuple[int, int], *, flip: bool = False) -> Image.Image:
    """Resize to cover `target` (w, h), centre-crop to it, then mirror when `flip`."""
    (new_w, new_h), left, top = crop_box_for(image.size, target)
    resample = Image.Resampling.BICUBIC if image.mode == "RGB" else Image.Resampling.BILINEAR
    image = image.resize((new_w, new_h), resample)
    image = image.crop((left, top, left + target[0], top + target[1]))
    return ImageOps.mirror(image) if flip else image


def is_mask(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_path(image_path: Path) -> Path:
    """Where the loss mask of a photo lives: `photo.jpg` -> `photo.mask.png`."""
    return image_path.with_name(image_path.stem + MASK_SUFFIX)


def load_mask(image_path: Path, image_size: tuple[int, int]) -> Image.Image | None:
    """The photo's mask as greyscale at the photo's size (None when there is no mask file)."""
    path = mask_path(image_path)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            mask = ImageOps.exif_transpose(im).convert("L")
    except (UnidentifiedImageError, OSError) as e:
        raise TrainingError(f"The mask {path.name} cannot be read ({e}); remove it or re-export it.") from e
    if mask.size != image_size:
        mask = mask.resize(image_size, Image.Resampling.BILINEAR)
    return mask


def mask_to_tensor(
    mask: Image.Image | None, image_size: tuple[int, int], target: tuple[int, int], latent_hw, *, flip=False
) -> torch.Tensor:
    """A photo's mask as the loss sees it: (1, h, w) in [0, 1] at the latent size, cropped like the
    photo (`fit_to_size`) and averaged over each latent cell; no mask is all ones."""
    import torch
    import torch.nn.functional as F

    if mask is None:
        return torch.ones((1, *latent_hw))
    assert mask.size == image_size
    pixels = np.asarray(fit_to_size(mask, target, flip=flip), dtype=np.float32) / 255.0  # (H, W)
    return F.interpolate(torch.from_numpy(pixels)[None, None], size=tuple(latent_hw), mode="area")[0]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as `load_rgb` sees it (EXIF orientation applied), without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise TrainingError(f"The image {path.name} cannot be read ({e}); remove it or re-export it.") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def uncropped_sources(paths: list[Path]) -> list[Path]:
    """For aspect-ratio bucketing: each prepared square's uncropped original (prep keeps it under
    `originals/`, named in report.json); a photo of a plain folder is its own source."""
    import json

    sources = []
    for p in paths:
        report = p.parent / "report.json"
        original = None
        if report.is_file():
            try:
                accepted = json.loads(report.read_text(encoding="utf-8")).get("accepted", [])
            except (OSError, ValueError):
                accepted = []
            for entry in accepted:
                if entry.get("output") == p.name and entry.get("original"):
                    original = p.parent / entry["original"]
            if original is not None and not original.is_file():
                log.warning("bucketing: the original of %s is missing; its square is used", p.name)
                original = None
        sources.append(original or p)
    return sources
