"""Real-looking synthetic photo sets for the set checks: one dog photographed in many scenes (a park,
a living room, a beach, snow), and things that do not belong in such a set (a coffee mug on a
table). Drawn with Pillow from a seed: shapes, fur and grass textures, light, lens blur, sensor
noise and JPEG, so every photo differs the way real ones do (place, size, pose, light, background).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

SIZE = (640, 480)


def _noise(rng: np.random.Generator, size: tuple[int, int], scale: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] (h, w): random values on a coarse grid, scaled up bicubically."""
    w, h = size
    coarse = rng.uniform(-1, 1, (max(2, h // scale), max(2, w // scale))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _textured(rng, size, colour, amount, scale) -> np.ndarray:
    """A (h, w, 3) float field of `colour` with smooth and fine variation."""
    field = 0.6 * _noise(rng, size, scale) + 0.4 * _noise(rng, size, max(2, scale // 8))
    return np.clip(np.asarray(colour, np.float32) * (1 + amount * field[..., None]), 0, 255)


def _vertical(size, top, bottom) -> np.ndarray:
    w, h = size
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to(
        (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32), (h, w, 3)
    )


def _scene(rng: np.random.Generator, kind: str, size=SIZE) -> tuple[np.ndarray, float]:
    """A background (h, w, 3 float) and the height (0..1) of the ground the subject stands on."""
    w, h = size
    horizon = rng.uniform(0.35, 0.5)
    y = int(h * horizon)
    if kind == "park":
        sky = _vertical(size, (110, 160, 225), (215, 230, 245))
        ground = _textured(rng, size, (70 + rng.integers(-10, 10), 125, 50), 0.35, 24)
        trees = _textured(rng, size, (35, 70, 35), 0.4, 16)
        img = sky.copy()
        band = int(h * rng.uniform(0.06, 0.12))
        img[y - band : y] = trees[y - band : y]
        img[y:] = ground[y:]
    elif kind == "room":
        wall = _textured(rng, size, rng.choice([(225, 215, 195), (200, 205, 210), (235, 225, 210)]), 0.05, 64)
        floor = _textured(rng, size, (150, 105, 65), 0.06, 48)
        planks = (np.arange(w) // 64 % 2)[None, :, None] * 8.0
        img = wall.copy()
        img[y:] = floor[y:] - planks
        sofa_left = int(w * rng.uniform(0.0, 0.5))
        img[int(y * 0.45) : y, sofa_left : sofa_left + int(w * 0.45)] = _textured(
            rng, size, (90, 95, 120), 0.1, 16
        )[int(y * 0.45) : y, sofa_left : sofa_left + int(w * 0.45)]
    elif kind == "beach":
        sky = _vertical(size, (120, 175, 230), (220, 235, 245))
        sea = _textured(rng, size, (40, 110, 160), 0.15, 40)
        sand = _textured(rng, size, (225, 205, 160), 0.08, 20)
        img = sky.copy()
        sea_end = y + int(h * 0.08)
        img[y:sea_end] = sea[y:sea_end]
        img[sea_end:] = sand[sea_end:]
    elif kind == "snow":
        sky = _vertical(size, (170, 185, 205), (225, 230, 235))
        snow = _textured(rng, size, (240, 242, 248), 0.04, 30)
        img = sky.copy()
        img[y:] = snow[y:]
    else:
        raise ValueError(kind)
    return img, horizon


def _dog_layer(rng: np.random.Generator, size, ground: float) -> tuple[Image.Image, Image.Image]:
    """The dog (a golden retriever, more or less) and its mask, at a random place, size and pose."""
    w, h = size
    fur = np.asarray((205, 150, 80), np.float32) * rng.uniform(0.9, 1.08)
    dark = fur * 0.62
    s = w * rng.uniform(0.32, 0.5)  # body length
    cx = w * rng.uniform(0.38, 0.62)
    feet = h * rng.uniform(max(ground + 0.25, 0.75), 0.95)
    sitting = rng.random() < 0.4
    if sitting:
        s *= 0.75
    mask = Image.new("L", size, 0)
    shade = Image.new("L", size, 0)  # 1: darker fur (ears, tail)
    draw, dshade = ImageDraw.Draw(mask), ImageDraw.Draw(shade)
    body_h = s * (0.45 if not sitting else 0.6)
    body_top = feet - s * 0.3 - body_h
    legs = s * (0.3 if not sitting else 0.12)
    body = (cx - s / 2, body_top, cx + s / 2, body_top + body_h)
    if sitting:
        body = (cx - s * 0.32, body_top - s * 0.15, cx + s * 0.32, feet - s * 0.05)
    draw.ellipse(body, fill=255)
    for x in np.linspace(body[0] + s * 0.08, body[2] - s * 0.16, 4 if not sitting else 2):
        draw.rectangle((x, body[3] - s * 0.08, x + s * 0.09, body[3] + legs), fill=255)
    head_r = s * rng.uniform(0.17, 0.2)
    facing = 1 if rng.random() < 0.5 else -1
    hx = cx + facing * (s * (0.45 if not sitting else 0.12))
    hy = body[1] - head_r * (0.2 if not sitting else 0.6)
    draw.ellipse((hx - head_r, hy - head_r, hx + head_r, hy + head_r), fill=255)
    snout = (hx + facing * head_r * 0.5, hy + head_r * 0.1)
    draw.ellipse(
        (
            snout[0] - head_r * 0.6,
            snout[1] - head_r * 0.35,
            snout[0] + head_r * 0.6,
            snout[1] + head_r * 0.45,
        ),
        fill=255,
    )
    for ex in (-0.75, 0.75):
        ear = (hx + ex * head_r, hy - head_r * 0.2)
        draw.ellipse(
            (ear[0] - head_r * 0.35, ear[1], ear[0] + head_r * 0.35, ear[1] + head_r * 1.1), fill=255
        )
        dshade.ellipse(
            (ear[0] - head_r * 0.35, ear[1], ear[0] + head_r * 0.35, ear[1] + head_r * 1.1), fill=255
        )
    tail_x = (body[0] if facing > 0 else body[2]) + facing * s * 0.04
    tail_y = body[1] + (body[3] - body[1]) * (0.25 if not sitting else 0.8)
    tail = (tail_x, tail_y, tail_x - facing * s * 0.22, tail_y - s * (0.18 if not sitting else 0.02))
    for layer in (draw, dshade):
        layer.line(tail, fill=255, width=int(s * 0.06))
    texture = _textured(rng, size, (1, 1, 1), 0.18, 6)
    shading = np.asarray(shade, np.float32)[..., None] / 255
    colour = (fur * (1 - shading) + dark * shading) * texture
    # Light from above: the belly is darker.
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    colour = colour * (1.1 - 0.25 * np.clip((ys * h - body_top) / max(body_h, 1), 0, 1))
    dog = Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(dog)
    eye = head_r * 0.12
    ex = hx + facing * head_r * 0.25
    d.ellipse((ex - eye, hy - head_r * 0.3 - eye, ex + eye, hy - head_r * 0.3 + eye), fill=(25, 18, 12))
    nx = snout[0] + facing * head_r * 0.5
    d.ellipse((nx - eye * 1.6, snout[1] - eye * 1.2, nx + eye * 1.6, snout[1] + eye * 1.2), fill=(20, 15, 12))
    return dog, mask.filter(ImageFilter.GaussianBlur(1.2))


def _finish(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """The camera: exposure, colour temperature, lens softness and sensor noise."""
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.9, 1.1))
    a = np.asarray(img, np.float32) * np.asarray([rng.uniform(0.95, 1.05), 1.0, rng.uniform(0.95, 1.05)])
    a = a + rng.normal(0, 3.5, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


def dog_photo(seed: int, scene: str | None = None, size=SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    scene = scene or str(rng.choice(["park", "room", "beach", "snow"]))
    background, ground = _scene(rng, scene, size)
    dog, mask = _dog_layer(rng, size, ground)
    img = Image.composite(dog, Image.fromarray(background.astype(np.uint8)), mask)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _finish(rng, img)


def mug_photo(seed: int, size=SIZE) -> Image.Image:
    """A coffee mug on a wooden table against a kitchen wall."""
    rng = np.random.default_rng(seed)
    w, h = size
    wall = _textured(rng, size, (205, 200, 190), 0.05, 64)
    table = _textured(rng, size, (160, 110, 70), 0.2, 24)
    grain = (np.sin(np.arange(h) / 3.0 + _noise(rng, (1, h), 8)[:, 0] * 3)[:, None, None] * 10).astype(
        np.float32
    )
    edge = int(h * rng.uniform(0.5, 0.6))
    a = wall.copy()
    a[edge:] = table[edge:] + grain[edge:]
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    mw = w * rng.uniform(0.25, 0.32)
    mx = w * rng.uniform(0.4, 0.6)
    base = h * rng.uniform(0.78, 0.85)
    top = base - mw * 1.1
    colour = tuple(int(c) for c in rng.choice([(240, 240, 236), (60, 90, 170)]))
    d.ellipse(
        (mx - mw * 0.8, base - mw * 0.12, mx + mw * 0.8, base + mw * 0.14), fill=(235, 235, 230)
    )  # saucer
    d.rectangle((mx - mw / 2, top, mx + mw / 2, base), fill=colour)
    d.ellipse((mx - mw / 2, base - mw * 0.12, mx + mw / 2, base + mw * 0.12), fill=colour)
    d.ellipse(
        (mx + mw * 0.35, top + mw * 0.2, mx + mw * 0.8, top + mw * 0.7), outline=colour, width=int(mw * 0.09)
    )
    d.ellipse(
        (mx - mw / 2, top - mw * 0.12, mx + mw / 2, top + mw * 0.12), fill=tuple(int(c * 0.8) for c in colour)
    )
    d.ellipse((mx - mw * 0.44, top - mw * 0.09, mx + mw * 0.44, top + mw * 0.09), fill=(70, 40, 20))  # coffee
    # Shade on the mug's right side.
    a = np.asarray(img, np.float32)
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    inside = np.zeros((h, w, 1), np.float32)
    inside[int(top) : int(base), int(mx - mw / 2) : int(mx + mw / 2)] = 1
    a = a * (1 - inside * 0.35 * np.clip((xs * w - mx) / (mw / 2), 0, 1))
    return _finish(rng, Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))


def write_dog_set(folder: Path, n: int, seed: int = 0, with_mug: bool = False) -> list[Path]:
    """`n` dog photos (and the mug last, `mug.jpg`), saved as JPEG; their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"dog-{i:02d}.jpg"
        dog_photo(seed * 1000 + i).save(path, quality=88)
        paths.append(path)
    if with_mug:
        path = folder / "mug.jpg"
        mug_photo(seed * 1000 + 999).save(path, quality=88)
        paths.append(path)
    return paths
