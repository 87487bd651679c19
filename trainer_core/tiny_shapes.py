"""The tiny-shapes world: the pictures the built-in `tiny-shapes` model was pretrained on, a reader
that tells their colour and shape back, and where the shipped model lives.

`tiny-shapes` is an SD 1.5-architecture model (CLIP text encoder, KL VAE, cross-attention UNet,
the SD 1.5 noise schedule) at toy widths, pretrained by `scripts/pretrain_tiny_shapes.py` on 64 px
pictures of a circle, square, triangle or star in red, green, blue, yellow or black on a light
background, captioned "a photo of a {colour} {shape}" or "a photo of a {shape}". It knows those
classes, so DreamBooth can visibly teach it a new subject (`draw_subject`: one particular orange circle,
a colour it was never shown) offline in a minute.

Only numpy, scipy and Pillow here: the drawing and the reader are used by the pretraining script,
the demo photos, the tests and the docs' accuracy numbers alike.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MODEL_ID = "tiny-shapes"
MODEL_DIR = Path(__file__).parent / "models" / MODEL_ID
RESOLUTION = 64

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (40, 70, 205),
    "yellow": (235, 195, 25),
    "black": (25, 25, 25),
}
# The subject `draw_subject` draws and the prompts the demo and the tests use. Orange is no colour of
# the world: the base model never drew an orange circle, so orange pictures for "sks circle" are the
# subject learned. (A pattern is not learnable here: the 24 captions never showed one, and a LoRA
# taught white polka dots drew them as a texture that replaced the shape; see docs/TINY_SHAPES.md.)
SUBJECT_COLOUR = (240, 130, 30)
SUBJECT_PROMPT = "a photo of sks circle"
CLASS_PROMPT = "a photo of a circle"

# Sampler settings that suit the model (the app's defaults, 25 steps at guidance 7.5, work too).
SAMPLING = dict(steps=20, guidance=4.0, scheduler="dpm++")

_SUPERSAMPLE = 4  # drawn at 4x and reduced: anti-aliased edges, as in a photo


def weights_present() -> bool:
    return (MODEL_DIR / "model_index.json").exists()


def model_dir() -> Path:
    """The shipped model's folder; a one-sentence TrainingError when its weights are missing."""
    if not (MODEL_DIR / "model_index.json").exists():
        from .events import TrainingError

        raise TrainingError(
            f"The tiny-shapes weights are not in {MODEL_DIR}; build them with make pretrain-shapes "
            "(scripts/pretrain_tiny_shapes.py)."
        )
    return MODEL_DIR


def caption(shape: str, colour: str | None) -> str:
    return f"a photo of a {colour} {shape}" if colour else f"a photo of a {shape}"


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: tuple[int, int, int]
    background: tuple[int, int, int]
    cx: float  # centre and radius, in pixels of the 64 px picture
    cy: float
    radius: float
    dots: bool = False  # white polka dots inside (some of the VAE's pretraining pictures)


def random_scene(rnd: random.Random, shape: str, colour: tuple[int, int, int], dots: bool = False) -> Scene:
    """Varied size and position, the whole shape inside the picture; a light, slightly tinted background."""
    radius = rnd.uniform(11, 24)
    margin = radius + 2
    return Scene(
        shape=shape,
        colour=colour,
        background=tuple(rnd.randint(220, 250) for _ in range(3)),
        cx=rnd.uniform(margin, RESOLUTION - margin),
        cy=rnd.uniform(margin, RESOLUTION - margin),
        radius=radius,
        dots=dots,
    )


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.85  # a square of the same visual weight as a circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        points = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    return None  # circle


def draw_scene(scene: Scene) -> Image.Image:
    s = _SUPERSAMPLE
    image = Image.new("RGB", (RESOLUTION * s, RESOLUTION * s), scene.background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.cx * s, scene.cy * s, scene.radius * s
    outline = _outline(scene.shape, cx, cy, r)
    if outline is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=scene.colour)
    else:
        draw.polygon(outline, fill=scene.colour)
    if scene.dots:
        # A fixed pattern of dots inside the circle: the thing that makes this circle "sks".
        d = r * 0.17
        for fx, fy in ((0, 0), (-0.5, -0.3), (0.5, -0.3), (-0.3, 0.5), (0.3, 0.5), (0, -0.62)):
            x, y = cx + fx * r, cy + fy * r
            draw.ellipse((x - d, y - d, x + d, y + d), fill=(250, 250, 250))
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)


def draw_example(index: int, seed: int = 0) -> tuple[Image.Image, str, str, str]:
    """Training picture `index` of the pretraining set: (image, shape, colour name, caption).

    Captions name the colour half of the time, so "a photo of a circle" means a circle of any colour.
    """
    rnd = random.Random(seed * 1_000_003 + index)
    shape = rnd.choice(SHAPES)
    colour = rnd.choice(list(COLOURS))
    image = draw_scene(random_scene(rnd, shape, COLOURS[colour]))
    return image, shape, colour, caption(shape, colour if rnd.random() < 0.5 else None)


def draw_subject(index: int) -> Image.Image:
    """Photo `index` of the demo subject: one particular orange circle (SUBJECT_COLOUR), at a different
    place, size and background in each photo."""
    rnd = random.Random(10_000 + index)
    return draw_scene(random_scene(rnd, "circle", SUBJECT_COLOUR))


# ---------------------------------------------------------------------------------------------
# Reading pictures back: a colour and shape classifier
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    shape: str | None  # None: no shape found (an empty or noisy picture)
    colour: str | None
    match: float  # how well the shape's template covers the blob (intersection over union, 0..1)


def _pixels(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)


def _template(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """The shape drawn to fill the bounding box `box` (top, left, bottom, right; inclusive), as a mask."""
    outline = _outline(shape, 0.0, 0.0, 1.0)
    if outline is None:
        outline = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 72, endpoint=False)]
    xs, ys = [x for x, _ in outline], [y for _, y in outline]
    top, left, bottom, right = box
    sx = (right - left + 1) / (max(xs) - min(xs))
    sy = (bottom - top + 1) / (max(ys) - min(ys))
    s = _SUPERSAMPLE
    points = [(s * (left + (x - min(xs)) * sx), s * (top + (y - min(ys)) * sy)) for x, y in outline]
    mask = Image.new("L", (RESOLUTION * s, RESOLUTION * s), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return np.asarray(mask.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)) > 127


def _blob(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The biggest blob of pixels far from the background (the border's median), holes filled, and the
    mask of all such pixels; None for an empty or noisy picture."""
    from scipy import ndimage

    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=-1) > 60
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    blob = ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))
    if blob.sum() < 40:
        return None
    return blob, mask


def _core_colour(pixels: np.ndarray, blob: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean colour of the blob's own pixels, away from its edge, where a soft picture mixes it with
    the background (a blurred black star's edge pixels are grey, and their mean was read as green)."""
    from scipy import ndimage

    core = ndimage.binary_erosion(blob, iterations=2) & mask
    inside = pixels[core] if core.sum() >= 12 else pixels[blob & mask]
    return inside.mean(axis=0)


def blob_colour(image) -> np.ndarray | None:
    """The mean RGB (0..255) of the picture's shape, away from its edge; None when no shape is found."""
    pixels = _pixels(image)
    found = _blob(pixels)
    return None if found is None else _core_colour(pixels, *found)


def read_image(image) -> Reading:
    """Colour: the palette colour nearest the mean of the shape's core (`blob_colour`). Shape: the
    biggest blob of pixels far from the background, holes filled, compared with each shape drawn to
    fill the blob's bounding box; the best overlap (intersection over union) wins.

    Template overlap rather than a threshold on how much of its box the blob covers: a slightly
    soft star (its inner corners filled by a VAE) covers as much of its box as a triangle, and the
    fill thresholds read 37 of 200 VAE reconstructions wrongly; the templates 5.
    """
    pixels = _pixels(image)
    found = _blob(pixels)
    if found is None:
        return Reading(None, None, 0.0)
    blob, mask = found
    ys, xs = np.nonzero(blob)
    box = (int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max()))
    overlaps = {}
    for shape in SHAPES:
        template = _template(shape, box)
        overlaps[shape] = float((template & blob).sum()) / float((template | blob).sum())
    shape = max(overlaps, key=overlaps.__getitem__)
    mean = _core_colour(pixels, blob, mask)
    colour = min(COLOURS, key=lambda c: float(np.linalg.norm(mean - np.array(COLOURS[c]))))
    return Reading(shape, colour, overlaps[shape])


def accuracy(images: Sequence, shapes: Sequence[str | None], colours: Sequence[str | None]) -> dict:
    """Share of `images` read as the expected shape / colour (None expected: not counted)."""
    readings = [read_image(im) for im in images]
    shape_hits = [r.shape == s for r, s in zip(readings, shapes, strict=True) if s is not None]
    colour_hits = [r.colour == c for r, c in zip(readings, colours, strict=True) if c is not None]
    return {
        "shape": sum(shape_hits) / len(shape_hits) if shape_hits else None,
        "colour": sum(colour_hits) / len(colour_hits) if colour_hits else None,
        "n": len(readings),
    }


# ---------------------------------------------------------------------------------------------
# A subject-likeness statistic for the learning tests and the demo
# ---------------------------------------------------------------------------------------------


# No shape at all counts as this far (the diagonal of the RGB cube: farther than any colour).
NO_SHAPE_DISTANCE = float(np.linalg.norm([255.0, 255.0, 255.0]))


def colour_distance(images: Sequence, reference) -> float:
    """Mean distance (RGB, 0..441) from each picture's shape colour (`blob_colour`) to `reference`,
    an RGB triple; a picture with no shape counts as NO_SHAPE_DISTANCE."""
    target = np.asarray(reference, dtype=np.float64)
    distances = []
    for image in images:
        colour = blob_colour(image)
        distances.append(NO_SHAPE_DISTANCE if colour is None else float(np.linalg.norm(colour - target)))
    return float(np.mean(distances))


def pixel_distance(images_a: Sequence, images_b: Sequence) -> float:
    """Mean absolute pixel difference (0..255) of pictures paired one to one (same seeds)."""
    return float(
        np.mean([np.abs(_pixels(a) - _pixels(b)).mean() for a, b in zip(images_a, images_b, strict=True)])
    )
