"""CPU cost per training step of the issue-16 options against plain training, in one run.

Trains the tiny SD 1.5 (built offline) on the same mixed landscape/portrait/square photos, with
prior preservation, in several ways: plain (square crops, UNet LoRA), masked_loss (every photo with
a half mask), bucketing, text_encoder (a text-encoder LoRA too), pivotal (pivotal tuning: two new
token embeddings), pivotal+text_encoder (the person preset's pair) and dora. The ways take turns,
round by round, so a change in machine load hits all alike; the per-step time is the median gap
between consecutive steps in each run's metrics.jsonl.

    python bench/option_cost.py [--steps 20] [--rounds 2] [--resolution 128] [--ways plain,pivotal]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WAYS = {
    "plain": {},
    "masked_loss": {"masked_loss": True},
    "bucketing": {"bucketing": True},
    "text_encoder": {"train_text_encoder": True},
    "pivotal": {"pivotal_tuning": True},
    "pivotal+text_encoder": {"pivotal_tuning": True, "train_text_encoder": True},
    "dora": {"use_dora": True},
}
SIZES = {"wide": (160, 80), "tall": (80, 160), "square": (96, 96), "wide-2": (150, 72)}


def _photos(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    from trainer_core.data import mask_path

    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name, (w, h) in SIZES.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"{name}.png")
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[:, : w // 2] = 255
        Image.fromarray(mask).save(mask_path(folder / f"{name}.png"))
    return folder


def _class_images(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(100)
    for i in range(4):
        Image.fromarray((rng.random((128, 128, 3)) * 255).astype("uint8")).save(folder / f"class-{i}.png")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--ways", default=",".join(WAYS), help="comma list (plain is always measured)")
    args = parser.parse_args()
    ways = {w: WAYS[w] for w in WAYS if w == "plain" or w in args.ways.split(",")}

    import torch

    from trainer_core.components import make_tiny_model
    from trainer_core.config import TrainConfig
    from trainer_core.loop import train

    torch.set_num_threads(1)  # one core: comparable on a shared machine
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny-sd15")
        photos, klass = _photos(root / "photos"), _class_images(root / "class")
        per_step: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(args.rounds):
            for way, options in ways.items():
                out = root / f"{way}-{r}"
                config = TrainConfig(
                    base_model=str(model), instance_dir=str(photos), instance_prompt="a photo of sks dog",
                    output_dir=str(out), class_prompt="a photo of a dog", with_prior_preservation=True,
                    class_data_dir=str(klass), num_class_images=4, max_train_steps=args.steps,
                    resolution=args.resolution, checkpointing_steps=0, num_validation_images=0,
                    report_to="none", **options,
                )  # fmt: skip
                train(config)
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                gaps = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:], strict=False)]
                per_step[way].append(statistics.median(gaps))
        base = statistics.median(per_step["plain"])
        result = {
            way: {
                "s_per_step": round(statistics.median(v), 4),
                "ratio": round(statistics.median(v) / base, 3),
            }
            for way, v in per_step.items()
        }
        print(json.dumps({"resolution": args.resolution, "steps": args.steps, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
