"""The demo's picture pair for the tiny-shapes model: a row of images for "a photo of sks circle"
and a row for "a photo of a circle", both with the trained adapter, same seeds.

    python examples/shapes_pictures.py ADAPTER_DIR OUT_DIR [--count 4] [--seed 1]

Writes OUT_DIR/with-token.png and OUT_DIR/without-token.png and prints what each picture shows
(read back by trainer_core.tiny_shapes.read_image: the nearest of the world's colours, and the shape)
and how far each row's shapes are from the subject's orange (tiny_shapes.colour_distance, RGB 0..441).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core import tiny_shapes  # noqa: E402


def row(images, scale: int = 2):
    from PIL import Image

    size = images[0].width * scale
    sheet = Image.new("RGB", (len(images) * (size + 4) - 4, size), "white")
    for i, image in enumerate(images):
        sheet.paste(image.resize((size, size), Image.Resampling.NEAREST), (i * (size + 4), 0))
    return sheet


def main() -> None:
    from trainer_core.inference import GenerateRequest, Generator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=4, help="Images per row.")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    generator = Generator(device="cpu")
    for name, prompt in (
        ("with-token", tiny_shapes.SUBJECT_PROMPT),
        ("without-token", tiny_shapes.CLASS_PROMPT),
    ):
        request = GenerateRequest(
            base_model=tiny_shapes.MODEL_ID,
            prompt=prompt,
            seed=args.seed,
            num_images=args.count,
            **tiny_shapes.SAMPLING,
            adapters=((str(args.adapter_dir), 1.0),),
        )
        images = generator.generate(request)
        row(images).save(args.out_dir / f"{name}.png")
        readings = ", ".join(f"{r.colour} {r.shape}" for r in map(tiny_shapes.read_image, images))
        distance = tiny_shapes.colour_distance(images, tiny_shapes.SUBJECT_COLOUR)
        print(
            f"{prompt!r} -> {args.out_dir / (name + '.png')}: {readings}; distance to the orange {distance:.0f}"
        )


if __name__ == "__main__":
    main()
