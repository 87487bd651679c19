"""Progress as a person reads it, in the app's status line and the CLI's bar: after a checkpoint or a
validation round the label is "Training" again and the bar reaches the last step (issue 15, item 2).
The event sequence is the one `trainer_core.loop` emits; no training is needed to draw it."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from trainer_core.config import TrainConfig
from trainer_core.events import CheckpointSaved, Finished, Progress, SamplesSaved, StageStarted, StepMetrics


def run_events(total: int = 30, every: int = 10):
    """Training with a checkpoint and a validation round every `every` steps, as the loop emits them."""
    yield StageStarted("train", f"training {total} steps", total=total)
    for step in range(1, total + 1):
        yield StepMetrics(step, total, 1.0 / step, 0.5 / step, 0.5 / step, 1e-4, step * 0.1)
        if step % every == 0 and step < total:
            yield StageStarted("save", f"saving checkpoint {step}")
            yield CheckpointSaved(step, f"checkpoint-{step}")
            yield StageStarted("validate", f"validation images at step {step}")
            yield Progress("validate", 1, 2)
            yield Progress("validate", 2, 2)
            yield SamplesSaved(step, [])


@dataclass
class _Result:
    status: str
    adapter_dir: Path | None


def test_the_status_reads_training_again_after_a_checkpoint(tmp_path):
    from dreambooth_ui.jobs import JobRunner
    from dreambooth_ui.views import status_html

    seen_after_validation = []
    gate = threading.Event()

    def train(config, emit, should_stop):
        for event in run_events():
            emit(event)
            if isinstance(event, StepMetrics) and event.step == 12:
                seen_after_validation.append(runner.snapshot())
                gate.wait(10)
        emit(Finished("finished", {}))
        return _Result("finished", None)

    runner = JobRunner(tmp_path / "runs", train_fn=train)
    config = TrainConfig(
        instance_dir="x", instance_prompt="a photo of sks dog", output_dir="u", max_train_steps=30
    )
    runner.start(config, "run1")
    try:
        for _ in range(200):
            if seen_after_validation:
                break
            threading.Event().wait(0.05)
        snap = seen_after_validation[0]
        assert snap["stage_label"] == "Training", snap
        assert snap["progress"] == [12, 30]
        assert "Training: 12/30" in status_html(snap)
    finally:
        gate.set()
        assert runner.wait(20)


def test_the_cli_bar_reaches_the_last_step(capsys):
    from trainer_core.cli import _ProgressPrinter

    printer = _ProgressPrinter()
    for event in run_events():
        printer(event)
    printer(Finished("finished", {}))
    err = capsys.readouterr().err
    counts = re.findall(r"train:.*?(\d+)/30", err)
    assert counts and counts[-1] == "30", err[-500:]
