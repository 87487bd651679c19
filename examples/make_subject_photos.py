"""Write the photos of the demo subject for the built-in tiny-shapes model: one particular orange
circle (a colour the model was never shown), at a different place, size and background in each photo.

    python examples/make_subject_photos.py OUT_DIR [--count 5]

`make demo` and the app's "Quick try" teach it to tiny-shapes as "sks circle".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core.tiny_shapes import draw_subject  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=5, help="How many photos to write.")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        draw_subject(i).save(args.out_dir / f"circle-{i}.png")
    print(f"wrote {args.count} photos to {args.out_dir}")


if __name__ == "__main__":
    main()
