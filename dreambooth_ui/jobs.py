"""The one training job: a background thread, its stop flag, and a snapshot the page polls.

One GPU, one job. The runner lives outside `gr.State` (threads and locks cannot be deep-copied) and
is shared by every browser tab. The engine already writes `status.json` and `metrics.jsonl` into the
run folder, so the truth survives a page reload (the snapshot) and an app restart (`recover`, which
turns a run left "running" by a dead process into "interrupted at step k", resumable from its last
checkpoint).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer_core.checkpoints import list_checkpoints
from trainer_core.config import TrainConfig
from trainer_core.events import (
    CheckpointSaved,
    Failed,
    Finished,
    Progress,
    SamplesSaved,
    StageStarted,
    StepMetrics,
    TrainingError,
)
from trainer_core.fileio import atomic_write_json
from trainer_core.runs import read_metrics

log = logging.getLogger(__name__)

TrainFn = Callable[..., Any]  # train(config, emit, should_stop) -> result with .status / .adapter_dir
STAGE_LABELS = {
    "load": "Loading the base model",
    "class_images": "Generating class images",
    "cache": "Encoding photos and prompts",
    "train": "Training",
    "validate": "Making validation images",
    "save": "Saving",
}


class JobBusy(Exception):
    """A second start while a job runs."""


@dataclass
class _Job:
    run_id: str
    run_dir: Path
    config: TrainConfig | None
    state: str = "running"  # running | stopping | finished | stopped | failed | interrupted | lost
    stage: str = "load"
    stage_message: str = ""
    progress: tuple[int, int] = (0, 0)
    step: int = 0
    total_steps: int = 0
    message: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    samples: list[tuple[int, str]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    adapter_dir: str | None = None
    adapter_name: str | None = None
    started: float = field(default_factory=time.time)
    first_step: tuple[int, float] | None = None  # (step, seconds) of the first step this session
    last_step_seconds: float | None = None


class JobRunner:
    """Owns the training thread. `train_fn` is the engine's `train` (a scripted fake in tests).

    `on_done(run_dir, result)` runs in the job thread after a run ends with an adapter (the app
    publishes it to the adapter store there); `before_start()` runs before the thread starts (the app
    frees the inference pipeline there: one GPU).
    """

    def __init__(
        self,
        runs_dir: str | Path,
        *,
        train_fn: TrainFn | None = None,
        on_done: Callable[[Path, Any], str | None] | None = None,
        before_start: Callable[[], None] | None = None,
        gpu_slot: threading.Lock | None = None,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._train_fn = train_fn
        self._on_done = on_done
        self._before_start = before_start
        # Shared by every user's runner: one training on the GPU at a time.
        self._gpu = gpu_slot or threading.Lock()
        self._gpu_held = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._job: _Job | None = None

    # -- control ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """A job is training or stopping (the thread may live a moment longer, saving nothing)."""
        job = self._job
        return job is not None and job.state in ("running", "stopping") and self._thread is not None

    def training_on(self, instance_dir: str | Path) -> bool:
        """A job is training (or stopping) on the photos in `instance_dir`."""
        job = self._job
        if not self.running or job is None or job.config is None:
            return False
        return Path(job.config.instance_dir).resolve() == Path(instance_dir).resolve()

    def start(
        self, config: TrainConfig, run_id: str, *, earlier_metrics: list[dict[str, Any]] | None = None
    ) -> str:
        """Start training `config` in run folder `runs_dir/run_id`; JobBusy if a job runs.

        `earlier_metrics` are the rows a resumed run logged before it stopped (shown in the chart).
        """
        with self._lock:
            if self.running:
                raise JobBusy("A training job is already running; stop it or wait for it to finish.")
            if not self._gpu.acquire(blocking=False):
                raise JobBusy("Another training job is using the GPU; try again when it has finished.")
            self._gpu_held = True
            run_dir = self.runs_dir / run_id
            config = replace(config, output_dir=str(run_dir))
            self._stop.clear()
            try:
                self._job = _Job(
                    run_id,
                    run_dir,
                    config,
                    total_steps=config.max_train_steps,
                    metrics=list(earlier_metrics or []),
                )
                if self._before_start:
                    self._before_start()
                self._thread = threading.Thread(target=self._run, name=f"train-{run_id}", daemon=True)
                self._thread.start()
            except BaseException:
                self._gpu_held = False
                self._gpu.release()
                raise
            return run_id

    def resume(self, run_id: str) -> str:
        """Continue an interrupted or stopped run from its last checkpoint."""
        run_dir = self.runs_dir / run_id
        try:
            config = TrainConfig.load(run_dir / "config.json")
        except (OSError, ValueError) as e:
            raise TrainingError(
                f"The run {run_id} cannot be resumed: its config.json is unreadable ({e})."
            ) from e
        if not _has_checkpoint(run_dir):
            raise TrainingError(
                f"The run {run_id} has no checkpoint to resume from; start a new run instead."
            )
        # The live chart shows the whole run: the steps before the stop come from its metrics file.
        return self.start(
            replace(config, resume_from_checkpoint="latest"), run_id, earlier_metrics=read_metrics(run_dir)
        )

    def stop(self) -> bool:
        """Ask the job to stop at its next safe point (it saves a checkpoint and the adapter)."""
        with self._lock:
            if not self.running or self._job is None:
                return False
            self._stop.set()
            self._job.state = "stopping"
            self._job.message = "Stopping after the current step; the adapter is saved first."
            return True

    def wait(self, timeout: float | None = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    # -- what the page shows ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A plain dict of the current (or last) job, safe to hand to the UI or the HTTP API."""
        with self._lock:
            job = self._job
            if job is None:
                return {"state": "idle", "message": "No training has run since the app started."}
            eta = None
            if job.first_step and job.last_step_seconds is not None and job.step > job.first_step[0]:
                per_step = (job.last_step_seconds - job.first_step[1]) / (job.step - job.first_step[0])
                eta = max(0.0, per_step * (job.total_steps - job.step))
            return {
                "state": job.state,
                "run_id": job.run_id,
                "run_dir": str(job.run_dir),
                "stage": job.stage,
                "stage_label": STAGE_LABELS.get(job.stage, job.stage),
                "stage_message": job.stage_message,
                "progress": list(job.progress),
                "step": job.step,
                "total_steps": job.total_steps,
                "eta_seconds": None if eta is None else round(eta, 1),
                "message": job.message,
                "metrics": list(job.metrics),
                "samples": [{"step": s, "image": p} for s, p in job.samples],
                "checkpoints": list(job.checkpoints),
                "adapter_dir": job.adapter_dir,
                "adapter_name": job.adapter_name,
                "elapsed_seconds": round(time.time() - job.started, 1),
                # A failed run (a full disk, NaN) keeps its checkpoints: it resumes from the last good one.
                "resumable": job.state in ("interrupted", "stopped", "failed") and bool(job.checkpoints),
            }

    # -- restart recovery ------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """After an app restart: runs that say "running" but have no thread become "interrupted".

        Returns the run ids changed. The newest such run becomes the snapshot, so the page shows
        "interrupted at step k" with Resume (or "lost" when it has no checkpoint).
        """
        changed: list[tuple[float, str]] = []
        for status_file in self.runs_dir.glob("*/status.json"):
            run_dir = status_file.parent
            if self.running and self._job and self._job.run_dir == run_dir:
                continue
            try:
                status = json.loads(status_file.read_text())
            except (OSError, ValueError):
                continue
            if status.get("status") not in ("running", "stopping"):
                continue
            step = int(status.get("step", 0))
            last_update = status_file.stat().st_mtime
            resumable = _has_checkpoint(run_dir)
            new_state = "interrupted" if resumable else "lost"
            message = (
                f"Interrupted at step {step}: the app stopped while training. Resume continues from "
                "the last checkpoint."
                if resumable
                else f"Lost at step {step}: the app stopped before the first checkpoint; start again."
            )
            atomic_write_json(
                status_file, {**status, "status": new_state, "message": message, "updated": time.time()}
            )
            changed.append((last_update, run_dir.name))
            log.info("run %s was left running: now %s", run_dir.name, new_state)
        if changed and not self.running:
            newest = max(changed)[1]
            self._job = _job_from_disk(self.runs_dir / newest)
        return [name for _, name in sorted(changed)]

    # -- the thread ------------------------------------------------------------------------------

    def _emit(self, event: Any) -> None:
        with self._lock:
            job = self._job
            if job is None:
                return
            if isinstance(event, StageStarted):
                job.stage, job.stage_message = event.stage, event.message
                job.progress = (0, event.total or 0)
            elif isinstance(event, Progress):
                job.stage = event.stage
                job.progress = (event.current, event.total)
            elif isinstance(event, StepMetrics):
                if job.stage != "train":  # a step means a checkpoint or validation round has ended
                    job.stage, job.stage_message = "train", ""
                job.step, job.total_steps = event.step, event.total_steps
                job.progress = (event.step, event.total_steps)
                if job.first_step is None:
                    job.first_step = (event.step, event.seconds)
                job.last_step_seconds = event.seconds
                # Resumed from a checkpoint older than the stop: the replayed steps replace the old rows.
                while job.metrics and job.metrics[-1].get("step", 0) >= event.step:
                    job.metrics.pop()
                job.metrics.append(
                    {
                        "step": event.step,
                        "loss": event.loss,
                        "instance_loss": event.instance_loss,
                        "prior_loss": event.prior_loss,
                        "lr": event.lr,
                    }
                )
            elif isinstance(event, SamplesSaved):
                job.samples.extend((event.step, p) for p in event.paths)
            elif isinstance(event, CheckpointSaved):
                job.checkpoints.append(event.step)
            elif isinstance(event, Finished):
                job.message = str(event.summary.get("message") or "")
            elif isinstance(event, Failed):
                job.message = event.message

    def _run(self) -> None:
        try:
            self._run_job()
        finally:
            self._release_gpu()

    def _release_gpu(self) -> None:
        with self._lock:
            if self._gpu_held:
                self._gpu_held = False
                self._gpu.release()

    def _run_job(self) -> None:
        job = self._job
        assert job is not None
        train_fn = self._train_fn
        if train_fn is None:
            from trainer_core.loop import train as train_fn
        try:
            result = train_fn(job.config, self._emit, self._stop.is_set)
        except TrainingError as e:
            self._finish(job, "failed", str(e))
            return
        except Exception as e:  # noqa: BLE001 - the page shows one sentence; the log keeps the rest
            log.error("training crashed:\n%s", traceback.format_exc())
            self._finish(
                job,
                "failed",
                f"Training stopped with an unexpected error ({type(e).__name__}); see the app log.",
            )
            return
        status = getattr(result, "status", "finished")
        adapter_dir = getattr(result, "adapter_dir", None)
        name = None
        if adapter_dir is not None and self._on_done is not None:
            try:
                name = self._on_done(job.run_dir, result)
            except Exception as e:  # noqa: BLE001
                log.error("publishing the adapter failed:\n%s", traceback.format_exc())
                self._finish(
                    job, status, f"Training ended but the adapter could not be added to the gallery: {e}"
                )
                return
        with self._lock:
            job.adapter_dir = str(adapter_dir) if adapter_dir else None
            job.adapter_name = name
        if status == "stopped":
            message = f"Stopped at step {job.step}; the adapter so far is saved" + (
                f" as {name}." if name else "."
            )
        else:
            message = f"Finished {job.step} steps" + (
                f": the adapter {name} is ready in Generate." if name else "."
            )
        self._finish(job, status, message)

    def _finish(self, job: _Job, state: str, message: str) -> None:
        # The GPU is free before anyone can see the job as ended (a generate right after "finished").
        self._release_gpu()
        with self._lock:
            job.state = state
            job.message = message


def _has_checkpoint(run_dir: Path) -> bool:
    return bool(list_checkpoints(run_dir / "checkpoints"))


def _job_from_disk(run_dir: Path) -> _Job:
    """A snapshot of a run that no thread owns, from its config, status and metrics files."""
    try:
        config: TrainConfig | None = TrainConfig.load(run_dir / "config.json")
    except (OSError, ValueError):
        config = None  # still shown (status and metrics); resume reports the unreadable config
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        status = {}
    metrics = read_metrics(run_dir)  # the engine's reader: a half-written last line is skipped
    checkpoints = [step for step, _ in list_checkpoints(run_dir / "checkpoints")]
    return _Job(
        run_id=run_dir.name,
        run_dir=run_dir,
        config=config,
        state=status.get("status", "lost"),
        stage="train",
        step=int(status.get("step", 0)),
        total_steps=int(status.get("total_steps", config.max_train_steps if config else 0)),
        message=status.get("message", ""),
        metrics=metrics,
        checkpoints=checkpoints,
        started=float(status.get("updated", time.time())),
    )
