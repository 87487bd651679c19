"""CPU cost per training step of each training option, against plain LoRA measured in the same run.

Every run trains the tiny SD 1.5 model (tiny-sd15's shape, saved as a diffusers folder) with prior
preservation on the same synthetic photos; only the option changes. A step's cost is the process
CPU time between two StepMetrics events (one thread, so other load on the machine barely moves
it), the median over the steps after a warm-up. Runs alternate option by option for `--repeats`
rounds, and each option's ratio to the baseline is taken within its round.

    python bench/train_options.py               # 20 steps per run, 2 rounds
    python bench/train_options.py --steps 8 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # conftest's synthetic photos and class images

OPTIONS: dict[str, dict] = {
    "lora (baseline)": {},
    "prodigy": dict(optimizer="prodigy", learning_rate=1.0),
    "dora": dict(use_dora=True),
    "caption_dropout 0.1": dict(caption_dropout=0.1),
    "te lora (own lr)": dict(train_text_encoder=True),
    "te lora + dora": dict(train_text_encoder=True, use_dora=True),
}


def cpu_seconds_per_step(model: Path, photos: Path, classes: Path, out: Path, steps: int, **option) -> float:
    from trainer_core.config import TrainConfig
    from trainer_core.events import StageStarted, StepMetrics
    from trainer_core.loop import train

    marks: list[float] = []

    def emit(event) -> None:
        if isinstance(event, StageStarted) and event.stage == "train":
            marks[:] = [time.process_time()]
        elif isinstance(event, StepMetrics):
            marks.append(time.process_time())

    values = dict(
        base_model=str(model),
        instance_dir=str(photos),
        instance_prompt="a photo of sks dog",
        output_dir=str(out),
        with_prior_preservation=True,
        class_prompt="a photo of a dog",
        class_data_dir=str(classes),
        num_class_images=4,
        max_train_steps=steps,
        learning_rate=1e-4,
        checkpointing_steps=0,
        num_validation_images=0,
        report_to="none",
    )
    train(TrainConfig(**{**values, **option}), emit=emit)
    per_step = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    return statistics.median(per_step[2:])  # the first steps warm up allocators and caches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from conftest import write_class_images, write_photos

    from trainer_core.components import make_tiny_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-options-"))
    model = make_tiny_model(work / "model")
    photos, classes = write_photos(work / "photos"), write_class_images(work / "class")
    ratios: dict[str, list[float]] = {name: [] for name in OPTIONS}
    seconds: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for round_ in range(args.repeats):
        base = None
        for name, option in OPTIONS.items():
            s = cpu_seconds_per_step(model, photos, classes, work / f"run-{round_}", args.steps, **option)
            base = s if base is None else base
            seconds[name].append(s)
            ratios[name].append(s / base)
    print(f"{'option':<22} {'CPU ms/step':>12} {'x baseline':>11}")
    for name in OPTIONS:
        ms = 1000 * statistics.median(seconds[name])
        print(f"{name:<22} {ms:>12.1f} {statistics.median(ratios[name]):>11.2f}")


if __name__ == "__main__":
    main()
