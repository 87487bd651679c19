"""Run history: list, read, delete, relaunch and continue training runs; each run's summary and loss chart.

A run is a folder written by `loop.train` (see README, "What a run writes"). Everything here reads
those files, so it works for runs from the CLI, the app or another process, finished or not. The
module is torch-free at import (the app lists runs without loading the engine).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # written once, when the run folder is first used: its creation time
SUMMARY_FILE = "summary.json"
LOSS_CHART_FILE = "loss.png"
SMOOTHING = 0.6  # TensorBoard's default smoothing weight
# (label, metrics.jsonl key, matplotlib colour) of the loss curves, drawn in this order.
SCORE_KEYS = ("dino", "clip_i", "clip_t", "pres")  # scores.jsonl (trainer_core/evaluate.py)
LOSS_SERIES = (("total", "loss", "C0"), ("instance", "instance_loss", "C1"), ("prior", "prior_loss", "C2"))


@dataclass(frozen=True)
class RunInfo:
    run_id: str  # the folder name
    path: Path
    status: str  # running | finished | stopped | failed | unknown (no status.json yet)
    step: int  # the last step reached
    max_train_steps: int
    created: str  # ISO 8601 UTC
    config: dict[str, Any]  # config.json as written (the newest launch's)
    summary: dict[str, Any] | None  # summary.json, once the run has ended
    adapter_dir: Path | None  # the finished adapter, when there is one

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "path": str(self.path),
            "status": self.status,
            "step": self.step,
            "max_train_steps": self.max_train_steps,
            "created": self.created,
            "config": self.config,
            "summary": self.summary,
            "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None,
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def mark_run_started(run_dir: str | Path) -> None:
    """Record when the run folder was first used (kept when the run is resumed or continued)."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        atomic_write_json(path, {"created": _iso(time.time())})


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def read_run(run_dir: str | Path) -> RunInfo:
    """A run's state from its files; ValueError when the folder is not a readable run."""
    run_dir = Path(run_dir)
    try:
        config = _read_json(run_dir / "config.json")
    except FileNotFoundError:
        raise ValueError(f"run_dir: {run_dir} is not a run folder (no config.json)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"run_dir: {run_dir / 'config.json'} cannot be read ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"run_dir: {run_dir / 'config.json'} is not a JSON object")
    status: dict[str, Any] = {}
    if (run_dir / "status.json").is_file():
        try:
            status = _read_json(run_dir / "status.json")
        except (OSError, ValueError) as e:
            raise ValueError(f"run_dir: {run_dir / 'status.json'} cannot be read ({e})") from None
    summary = None
    if (run_dir / SUMMARY_FILE).is_file():
        try:
            summary = _read_json(run_dir / SUMMARY_FILE)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", run_dir / SUMMARY_FILE, e)
    step = status.get("step")
    if step is None:
        rows = read_metrics(run_dir)
        step = rows[-1]["step"] if rows else 0
    try:
        created = _read_json(run_dir / RUN_FILE)["created"]
    except (OSError, ValueError, KeyError, TypeError):
        created = _iso((run_dir / "config.json").stat().st_mtime)  # runs from before run.json existed
    adapter = run_dir / "adapter"
    return RunInfo(
        run_id=run_dir.name,
        path=run_dir,
        status=str(status.get("status", "unknown")),
        step=int(step),
        max_train_steps=int(config.get("max_train_steps", 0)),
        created=created,
        config=config,
        summary=summary,
        adapter_dir=adapter if (adapter / "pytorch_lora_weights.safetensors").is_file() else None,
    )


def list_runs(runs_root: str | Path) -> list[RunInfo]:
    """Every run folder directly inside `runs_root`, newest first. Other folders are not runs and
    are passed over; a run folder that cannot be read is skipped with a log line."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        # Dot-folders are temporary (a delete in progress, an atomic write).
        if child.name.startswith(".") or not child.is_dir() or not is_run_dir(child):
            continue
        try:
            found.append(read_run(child))
        except (OSError, ValueError) as e:
            log.warning("skipping run folder %s: %s", child, e)
    return sorted(found, key=lambda r: (r.created, r.run_id), reverse=True)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows in step order. A step logged twice (resumed from a checkpoint older than
    the last logged step, after a crash) appears once, with the later value; a torn last line (a
    crash mid-write) is skipped."""
    return _read_rows_by_step(Path(run_dir) / "metrics.jsonl")


def read_scores(run_dir: str | Path) -> list[dict[str, Any]]:
    """scores.jsonl rows in step order (one per scored step, the later one when a step was scored
    twice): {step, dino, clip_i, clip_t, pres, their counts dino_n ..., source, eval_models, seconds}.
    Empty when the run was not scored. The best of them: `evaluate.best_checkpoint_for_run`."""
    return _read_rows_by_step(Path(run_dir) / "scores.jsonl")


def scores_table(run_dirs: Iterable[str | Path], key: str = "dino") -> list[dict[str, Any]]:
    """Long-format rows {run, step, value} of one score (dino, clip_i, clip_t or pres) for several
    runs: one table to compare them in a line plot coloured by run."""
    if key not in SCORE_KEYS:
        raise ValueError(f"key: must be one of {', '.join(SCORE_KEYS)}, got {key!r}")
    return [
        {"run": Path(d).name, "step": r["step"], "value": r[key]}
        for d in run_dirs
        for r in read_scores(d)
        if isinstance(r.get(key), int | float)
    ]


def _read_rows_by_step(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            log.warning("skipping unreadable line %d of %s", number, path)
    return [by_step[s] for s in sorted(by_step)]


def smooth(values: Iterable[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (weight 0: the values themselves).

    Debiased, the first smoothed value is the first value, not weight x 0; non-finite values are
    passed through and do not enter the average, as in TensorBoard.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"weight: must be in [0, 1), got {weight}")
    out, last, count = [], 0.0, 0
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        count += 1
        out.append(last / (1 - weight**count))
    return out


def delete_run(run_dir: str | Path, runs_root: str | Path) -> None:
    """Delete one run folder. Refuses anything that is not a run folder directly inside `runs_root`
    (a ValueError; nothing is deleted). The folder is renamed away first, so a half-deleted run is
    never listed."""
    root = Path(runs_root).resolve()
    given = Path(run_dir)
    target = given.resolve()
    if given.is_symlink() or target.parent != root:
        raise ValueError(f"run_dir: {given} is not a run folder inside {root}; nothing was deleted")
    if not target.is_dir() or not is_run_dir(target):
        raise ValueError(f"run_dir: {given} is not a run folder (no config.json); nothing was deleted")
    doomed = root / f".deleting-{target.name}-{os.getpid()}"
    os.replace(target, doomed)
    shutil.rmtree(doomed)
    log.info("deleted run %s", target)


def unique_run_dir(runs_root: str | Path, name: str) -> Path:
    """`runs_root/name`, or `name-2`, `name-3`... when that is taken: a folder for a new run."""
    root = Path(runs_root)
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


def _config_values(run_dir: Path) -> dict[str, Any]:
    return dict(read_run(run_dir).config)


def relaunch_config(run_dir: str | Path, output_dir: str | Path, **changes: Any):
    """The run's config for a new run in `output_dir`, with `changes` (TrainConfig field names) applied.

    The new run starts from step 0 (no resume). ValueError naming the field for a bad change, an
    unknown field, or an output folder that already holds a run.
    """
    from .config import TrainConfig

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    values = _config_values(run_dir)
    if output_dir.resolve() == run_dir.resolve():
        raise ValueError(
            "output_dir: a relaunch needs a new run folder; continue the run to train it further"
        )
    if is_run_dir(output_dir):
        raise ValueError(f"output_dir: {output_dir} already holds a run; pick a new folder")
    values.update(changes)
    values.update(output_dir=str(output_dir), resume_from_checkpoint=changes.get("resume_from_checkpoint"))
    return TrainConfig.from_dict(values)


def _latest_checkpoint_step(run_dir: Path) -> int:
    from .checkpoints import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ValueError(
            f"run_dir: {run_dir} has no checkpoint to continue from; relaunch it as a new run instead"
        )
    return found[-1][0]


def continue_config(run_dir: str | Path, extra_steps: int):
    """The run's config to train `extra_steps` more steps in the same folder, from its newest checkpoint.

    The target is the checkpoint's step + extra_steps; for a finished run (its final checkpoint is at
    max_train_steps) that is max_train_steps + extra_steps.
    """
    from .config import TrainConfig

    if isinstance(extra_steps, bool) or not isinstance(extra_steps, int) or extra_steps < 1:
        raise ValueError(f"extra_steps: must be an integer >= 1, got {extra_steps!r}")
    run_dir = Path(run_dir)
    values = _config_values(run_dir)
    step = _latest_checkpoint_step(run_dir)
    values.update(
        output_dir=str(run_dir), max_train_steps=step + extra_steps, resume_from_checkpoint="latest"
    )
    return TrainConfig.from_dict(values)


def resume_config(run_dir: str | Path):
    """The run's config to finish its planned steps from its newest checkpoint (a stopped or failed run)."""
    from .config import TrainConfig

    run_dir = Path(run_dir)
    values = _config_values(run_dir)
    _latest_checkpoint_step(run_dir)
    values.update(output_dir=str(run_dir), resume_from_checkpoint="latest")
    return TrainConfig.from_dict(values)


def write_summary(run_dir: str | Path, result: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """summary.json from the loop's result summary, the config and metrics.jsonl; returns it.

    `result` holds the loop's status, steps, seconds, final_*loss and peak_rss_mb (peak_vram_mb on
    CUDA). Smoothed losses are the last value of `smooth` over every logged step.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    last_row = rows[-1] if rows else {}
    summary: dict[str, Any] = {
        "run_id": run_dir.name,
        "status": result.get("status"),
        "steps": result.get("steps"),
        "max_train_steps": config.get("max_train_steps"),
        "duration_s": result.get("seconds"),
        "learning_rate": config.get("learning_rate"),
        "rank": config.get("rank"),
        "with_prior_preservation": config.get("with_prior_preservation"),
        "prior_loss_weight": config.get("prior_loss_weight"),
        "logged_steps": len(rows),
    }
    for key in ("loss", "instance_loss", "prior_loss"):
        final = result.get(f"final_{key}")
        summary[f"final_{key}"] = final if final is not None else last_row.get(key)
        values = [r[key] for r in rows if r.get(key) is not None]
        summary[f"smoothed_final_{key}"] = smooth(values)[-1] if values else None
    if result.get("peak_vram_mb") is not None:
        summary.update(peak_memory_mb=result["peak_vram_mb"], peak_memory_kind="cuda_max_memory_allocated")
    else:
        summary.update(peak_memory_mb=result.get("peak_rss_mb"), peak_memory_kind="process_peak_rss")
    summary["peak_rss_mb"] = result.get("peak_rss_mb")
    summary["written"] = _iso(time.time())
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def write_loss_chart(run_dir: str | Path, weight: float = SMOOTHING) -> Path:
    """loss.png: total, instance and prior loss per logged step (thin) and smoothed (thick).

    Drawn with matplotlib's Agg canvas directly (no pyplot, so no global backend and no GUI). The
    PNG's "Description" text holds, per drawn line, its number of points and first/last step, read
    from the plotted lines themselves.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, key, colour in LOSS_SERIES:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, color=colour, linewidth=1, alpha=0.35, label=f"{label} loss")
        ax.plot(
            steps, smooth(values, weight), color=colour, linewidth=2, label=f"{label} (smoothed {weight})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.name}: {len(rows)} logged steps")
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=ax.transAxes)
    drawn = {
        line.get_label(): {
            "points": len(line.get_xdata()),
            "first_step": int(line.get_xdata()[0]),
            "last_step": int(line.get_xdata()[-1]),
        }
        for line in ax.get_lines()
    }
    buffer = io.BytesIO()
    fig.savefig(
        buffer, format="png", metadata={"Title": f"loss {run_dir.name}", "Description": json.dumps(drawn)}
    )
    path = run_dir / LOSS_CHART_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def finish_run(run_dir: str | Path, result: dict[str, Any], config: dict[str, Any]) -> dict[str, Any] | None:
    """At the end of a run: summary.json and loss.png. A failure here is logged, never raised: the
    adapter and checkpoints are already saved and must not be reported as a failed run."""
    try:
        summary = write_summary(run_dir, result, config)
        write_loss_chart(run_dir)
        return summary
    except Exception as e:  # noqa: BLE001 - an auxiliary file must not fail a trained run
        log.warning("could not write the run summary or loss chart in %s: %s", run_dir, e)
        return None


def loss_curves(
    run_dirs: Iterable[str | Path], key: str = "loss", weight: float = SMOOTHING
) -> list[dict[str, Any]]:
    """Long-format rows {run, step, value, smoothed} of one loss (`loss`, `instance_loss` or
    `prior_loss`) for several runs: one table to overlay their curves in a line plot coloured by run."""
    if key not in {k for _, k, _ in LOSS_SERIES}:
        raise ValueError(f"key: must be one of {', '.join(k for _, k, _ in LOSS_SERIES)}, got {key!r}")
    table = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        points = [(r["step"], r[key]) for r in read_metrics(run_dir) if r.get(key) is not None]
        smoothed = smooth([v for _, v in points], weight)
        for (step, value), sm in zip(points, smoothed, strict=True):
            table.append({"run": run_dir.name, "step": step, "value": value, "smoothed": sm})
    return table


def sample_steps(run_dir: str | Path) -> dict[int, list[Path]]:
    """The validation images per step, oldest step first ({step: [with-token-0.png, ...]})."""
    samples = Path(run_dir) / "samples"
    found: dict[int, list[Path]] = {}
    if samples.is_dir():
        for folder in samples.iterdir():
            name = folder.name
            if folder.is_dir() and name.startswith("step-") and name[5:].isdigit():
                images = sorted(folder.glob("*.png"))
                if images:
                    found[int(name[5:])] = images
    return dict(sorted(found.items()))


def runs_table(infos: Sequence[RunInfo]) -> list[dict[str, Any]]:
    """Key settings and results per run, one flat dict each (for a table or the CLI)."""
    table = []
    for r in infos:
        s = r.summary or {}
        table.append(
            {
                "run_id": r.run_id,
                "path": str(r.path),
                "status": r.status,
                "step": r.step,
                "max_train_steps": r.max_train_steps,
                "created": r.created,
                "learning_rate": r.config.get("learning_rate"),
                "rank": r.config.get("rank"),
                "prior_loss_weight": r.config.get("prior_loss_weight")
                if r.config.get("with_prior_preservation")
                else None,
                "base_model": r.config.get("base_model"),
                "final_loss": s.get("final_loss"),
                "smoothed_final_loss": s.get("smoothed_final_loss"),
                "adapter_dir": str(r.adapter_dir) if r.adapter_dir else None,
            }
        )
    return table
