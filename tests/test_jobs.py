"""The app's job runner with a scripted trainer: states, stop, failures, restart recovery.

The real engine is exercised end to end in test_app.py; here the trainer is a fake so each state
transition can be driven exactly.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dreambooth_ui.jobs import JobBusy, JobRunner
from trainer_core.config import TrainConfig
from trainer_core.events import CheckpointSaved, Finished, StageStarted, StepMetrics, TrainingError


@dataclass
class FakeResult:
    status: str
    adapter_dir: Path | None


class ScriptedTrainer:
    """Emits `steps` StepMetrics; waits on `gate` before each step so tests control the pace."""

    def __init__(self, steps=5, fail_at=None, error=None):
        self.steps, self.fail_at, self.error = steps, fail_at, error
        self.gate = threading.Semaphore(0)
        self.configs: list[TrainConfig] = []

    def release(self, n=1):
        for _ in range(n):
            self.gate.release()

    def __call__(self, config, emit, should_stop):
        self.configs.append(config)
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.json")
        emit(StageStarted("train", "training", total=self.steps))
        # Like the engine: a resume continues after the last checkpoint; every step is logged to
        # metrics.jsonl; the adapter folder holds weights and adapter.json (the gallery copies it).
        first = 1
        if config.resume_from_checkpoint == "latest":
            first = 1 + max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
        step = 0
        for step in range(first, self.steps + 1):
            assert self.gate.acquire(timeout=20)
            if self.fail_at == step:
                raise self.error
            emit(StepMetrics(step, self.steps, 1.0 / step, 0.5 / step, 0.5 / step, 1e-4, step * 0.5))
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
            if step % 2 == 0:
                checkpoint = out / f"checkpoints/checkpoint-{step}"
                checkpoint.mkdir(parents=True, exist_ok=True)
                (checkpoint / "state.json").write_text(json.dumps({"step": step}))
                emit(CheckpointSaved(step, str(checkpoint)))
            if should_stop():
                break
        status = "stopped" if step < self.steps else "finished"
        adapter = out / "adapter"
        adapter.mkdir(exist_ok=True)
        (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"weights at step %d" % step)
        name = config.adapter_name or "sks-dog"
        (adapter / "adapter.json").write_text(json.dumps({"name": name, "steps": step}))
        emit(Finished(status, {"steps": step}))
        return FakeResult(status, adapter)


def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def config():
    return TrainConfig(
        instance_dir="x", instance_prompt="a photo of sks dog", output_dir="unused", max_train_steps=5
    )


def test_runs_to_finished_with_metrics_eta_and_publish(tmp_path):
    trainer = ScriptedTrainer(steps=5)
    published = []
    runner = JobRunner(
        tmp_path / "runs", train_fn=trainer, on_done=lambda run, res: published.append(run) or "sks-dog"
    )
    assert runner.snapshot()["state"] == "idle"
    runner.start(config(), "run1")
    trainer.release(3)
    wait_for(lambda: runner.snapshot()["step"] == 3)
    snap = runner.snapshot()
    assert snap["state"] == "running" and snap["stage"] == "train"
    assert [m["step"] for m in snap["metrics"]] == [1, 2, 3]
    assert snap["eta_seconds"] == pytest.approx(1.0)  # 0.5 s/step, 2 steps left
    trainer.release(2)
    assert runner.wait(20)
    snap = runner.snapshot()
    assert snap["state"] == "finished"
    assert snap["adapter_name"] == "sks-dog"
    assert "sks-dog is ready" in snap["message"]
    assert published == [tmp_path / "runs" / "run1"]
    assert trainer.configs[0].output_dir == str(tmp_path / "runs" / "run1")


def test_second_start_is_refused_and_stop_saves(tmp_path):
    trainer = ScriptedTrainer(steps=50)
    runner = JobRunner(tmp_path / "runs", train_fn=trainer, on_done=lambda run, res: "a")
    runner.start(config(), "run1")
    trainer.release(2)
    wait_for(lambda: runner.snapshot()["step"] == 2)
    with pytest.raises(JobBusy, match="already running"):
        runner.start(config(), "run2")
    assert not (tmp_path / "runs" / "run2").exists()
    assert runner.stop()
    assert runner.snapshot()["state"] == "stopping"
    trainer.release(1)
    assert runner.wait(20)
    snap = runner.snapshot()
    assert snap["state"] == "stopped" and snap["step"] == 3
    assert "Stopped at step 3" in snap["message"] and snap["adapter_name"] == "a"
    assert snap["resumable"]  # a checkpoint was reported at step 2
    assert not runner.stop()  # nothing running any more


def test_failures_become_one_sentence(tmp_path):
    trainer = ScriptedTrainer(
        steps=5, fail_at=2, error=TrainingError("The loss became NaN at step 2; lower the learning rate.")
    )
    runner = JobRunner(tmp_path / "runs", train_fn=trainer)
    runner.start(config(), "run1")
    trainer.release(2)
    assert runner.wait(20)
    snap = runner.snapshot()
    assert snap["state"] == "failed"
    assert snap["message"] == "The loss became NaN at step 2; lower the learning rate."

    crash = ScriptedTrainer(steps=5, fail_at=1, error=KeyError("secret/internal/path"))
    runner = JobRunner(tmp_path / "runs2", train_fn=crash)
    runner.start(config(), "run1")
    crash.release(1)
    assert runner.wait(20)
    snap = runner.snapshot()
    assert snap["state"] == "failed"
    assert "KeyError" in snap["message"] and "secret/internal/path" not in snap["message"]


def test_a_failed_run_with_a_checkpoint_offers_resume(tmp_path):
    """A full disk at step 3 fails the run; its step-2 checkpoint is intact, so Resume is offered
    (it was hidden for failed runs). Without any checkpoint, it is not."""
    disk_full = TrainingError("Could not save checkpoint 3 (No space left on device); free disk space.")
    trainer = ScriptedTrainer(steps=5, fail_at=3, error=disk_full)
    runner = JobRunner(tmp_path / "runs", train_fn=trainer)
    runner.start(config(), "run1")
    trainer.release(3)
    assert runner.wait(20)
    snap = runner.snapshot()
    assert snap["state"] == "failed" and "free disk space" in snap["message"]
    assert snap["checkpoints"] == [2] and snap["resumable"]

    early = ScriptedTrainer(steps=5, fail_at=1, error=disk_full)
    runner = JobRunner(tmp_path / "runs2", train_fn=early)
    runner.start(config(), "run1")
    early.release(1)
    assert runner.wait(20)
    assert runner.snapshot()["state"] == "failed" and not runner.snapshot()["resumable"]


def _left_running(run_dir: Path, step: int, with_checkpoint: bool) -> None:
    run_dir.mkdir(parents=True)
    config().save(run_dir / "config.json")
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "step": step, "total_steps": 5}))
    (run_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": 1.0, "instance_loss": 0.5, "prior_loss": 0.5}) + "\n"
            for s in range(1, step + 1)
        )
    )
    if with_checkpoint:
        ckpt = run_dir / "checkpoints" / "checkpoint-2"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": 2}))


def test_restart_turns_running_into_interrupted_or_lost_and_resumes(tmp_path):
    runs = tmp_path / "runs"
    _left_running(runs / "a-lost", 1, with_checkpoint=False)
    time.sleep(0.01)
    _left_running(runs / "b-interrupted", 3, with_checkpoint=True)
    trainer = ScriptedTrainer(steps=5)
    runner = JobRunner(runs, train_fn=trainer)
    assert sorted(runner.recover()) == ["a-lost", "b-interrupted"]
    assert json.loads((runs / "a-lost" / "status.json").read_text())["status"] == "lost"
    status = json.loads((runs / "b-interrupted" / "status.json").read_text())
    assert status["status"] == "interrupted" and "Interrupted at step 3" in status["message"]
    snap = runner.snapshot()  # the newest left-running run is what the page shows
    assert snap["state"] == "interrupted" and snap["run_id"] == "b-interrupted" and snap["resumable"]
    assert len(snap["metrics"]) == 3
    assert runner.recover() == []  # nothing is "running" any more

    with pytest.raises(TrainingError, match="no checkpoint"):
        runner.resume("a-lost")
    runner.resume("b-interrupted")
    trainer.release(5)
    assert runner.wait(20)
    assert trainer.configs[0].resume_from_checkpoint == "latest"
    assert trainer.configs[0].output_dir == str(runs / "b-interrupted")


def test_stop_then_resume_leaves_one_adapter_and_the_whole_chart(tmp_path):
    """Issue 15 item 9: the resumed run replaces the adapter its stop published (no `astro-2`
    half-trained beside `astro-3` finished), and the live chart has the steps before the stop."""
    from dataclasses import replace

    from dreambooth_ui.studio import Studio

    trainer = ScriptedTrainer(steps=6)
    studio = Studio(tmp_path, train_fn=trainer)
    studio.store.add(_adapter(tmp_path / "older", "astro"))  # the requested name is taken already
    run_id = studio.start_training(replace(config(), adapter_name="astro", max_train_steps=6))["run_id"]
    trainer.release(2)
    wait_for(lambda: studio.training_status()["step"] == 2)
    studio.stop_training()
    trainer.release(1)
    assert studio.runner.wait(20)
    stopped = studio.training_status()
    assert stopped["state"] == "stopped" and stopped["adapter_name"] == "astro-2"

    studio.resume_training(run_id)
    trainer.release(1)
    wait_for(lambda: studio.training_status()["step"] == 3)
    assert [m["step"] for m in studio.training_status()["metrics"]] == [1, 2, 3]
    trainer.release(3)
    assert studio.runner.wait(20)
    done = studio.training_status()
    assert done["state"] == "finished" and done["adapter_name"] == "astro-2"
    assert [m["step"] for m in done["metrics"]] == [1, 2, 3, 4, 5, 6]
    assert sorted(a.name for a in studio.store.list()) == ["astro", "astro-2"]
    assert studio.store.get("astro-2").steps == 6  # the finished weights, not the stopped ones


def _adapter(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (folder / "adapter.json").write_text(json.dumps({"name": name, "steps": 1}))
    return folder


def test_masked_loss_from_the_app_trains_with_the_sets_masks(tmp_path):
    """The Photos tab prepares no masks; a run started from the page (or the API) with masked loss
    gets prep's own masks written into the set first, so it does not silently train every photo whole."""
    from dataclasses import replace

    from conftest import write_photos

    from dreambooth_ui.studio import Studio

    trainer = ScriptedTrainer(steps=1)
    studio = Studio(tmp_path / "data", train_fn=trainer)
    photos = sorted(write_photos(tmp_path / "photos", n=2).iterdir())
    studio.prepare_photos(photos, "dog", class_noun="dog", resolution=64)
    plain = studio.plan_training("dog", subject_type="pet", class_noun="dog", max_train_steps=1)
    folder = Path(plain.instance_dir)
    studio.start_training(plain)
    trainer.release(1)
    assert studio.runner.wait(20)
    assert not list(folder.glob("*.mask.png")), "masks only when masked loss is asked for"
    studio.start_training(replace(plain, masked_loss=True))
    trainer.release(1)
    assert studio.runner.wait(20)
    assert len(list(folder.glob("*.mask.png"))) == 2 and len(list(folder.glob("originals/*.mask.png"))) == 2
    from trainer_core.prep import read_report

    assert all(a.mask for a in read_report(folder).accepted)


def test_a_set_being_trained_on_is_not_edited(tmp_path):
    """While a run trains on a photo set, removing, re-cropping, re-captioning or adding photos to it
    is refused with one sentence and the set stays as it is (adding rebuilds the folder and swaps it
    in whole under the running job); other sets stay editable, and the set is editable again after."""
    from conftest import write_photos

    from dreambooth_ui.studio import Studio, UserError

    trainer = ScriptedTrainer(steps=2)
    studio = Studio(tmp_path / "data", train_fn=trainer)
    photos = sorted(write_photos(tmp_path / "photos", n=3).iterdir())
    studio.prepare_photos(photos[:2], "dog", class_noun="dog", resolution=64)
    studio.prepare_photos(photos[2:], "other", class_noun="dog", resolution=64)
    first = studio.dataset_report("dog")["accepted"][0]["output"]
    studio.start_training(
        studio.plan_training("dog", subject_type="pet", class_noun="dog", max_train_steps=2)
    )
    wait_for(lambda: studio.training_status()["state"] == "running")
    for edit in (
        lambda: studio.remove_photo("dog", first),
        lambda: studio.set_caption("dog", first, "a photo of sks dog on grass"),
        lambda: studio.recrop_photo("dog", first, crop="center"),
        lambda: studio.prepare_photos(photos[2:], "dog", class_noun="dog", resolution=64),
    ):
        with pytest.raises(UserError, match="being trained on"):
            edit()
    report = studio.dataset_report("dog")
    assert len(report["accepted"]) == 2 and report["accepted"][0]["caption"] != "a photo of sks dog on grass"
    studio.set_caption("other", studio.dataset_report("other")["accepted"][0]["output"], "another caption")
    trainer.release(2)
    assert studio.runner.wait(20)
    studio.remove_photo("dog", first)
    assert len(studio.dataset_report("dog")["accepted"]) == 1
