"""Write a few synthetic "subject" photos for trying the workflow offline (used by `make run`).

Each photo is the same subject, a red-and-yellow toy, at a different place, size and background,
so the folder looks like a small DreamBooth dataset. Only Pillow is needed.

    python examples/make_demo_photos.py OUT_DIR [--count 5]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter


def draw_photo(index: int, size: int = 128) -> Image.Image:
    rnd = random.Random(index)
    background = tuple(rnd.randrange(60, 200) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # some background clutter
        x, y = rnd.randrange(size), rnd.randrange(size)
        r = rnd.randrange(4, 14)
        shade = tuple(max(0, c - rnd.randrange(20, 60)) for c in background)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
    # The subject: a red body with a yellow head, placed and scaled differently in every photo.
    s = rnd.uniform(0.35, 0.55) * size
    cx, cy = rnd.uniform(0.35, 0.65) * size, rnd.uniform(0.4, 0.65) * size
    draw.rounded_rectangle(
        (cx - s / 2, cy - s / 3, cx + s / 2, cy + s / 2), radius=int(s / 6), fill=(200, 30, 40)
    )
    draw.ellipse((cx - s / 4, cy - s * 0.8, cx + s / 4, cy - s * 0.3), fill=(240, 200, 40))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=5, help="How many photos to write.")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        draw_photo(i).save(args.out_dir / f"toy-{i}.jpg", quality=92)
    print(f"wrote {args.count} photos to {args.out_dir}")


if __name__ == "__main__":
    main()
