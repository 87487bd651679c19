"""Instance and class images for training: read by content, normalised, turned into tensors.

Photo preparation (face crop, captioning, dataset checks) lives in the prep stage; this module
reads a prepared (or plain) folder: every decodable image, EXIF-transposed, converted to RGB,
resized on its short side and centre-cropped to the training resolution. A `.txt` beside an image
is its caption and becomes that image's prompt.
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
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() == ".txt":
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


def image_to_tensor(image: Image.Image, resolution: int, *, flip: bool = False) -> torch.Tensor:
    """RGB image -> float tensor (3, resolution, resolution) in [-1, 1]: short-side resize, centre crop."""
    import torch

    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
