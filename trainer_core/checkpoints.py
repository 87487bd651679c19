"""Resumable training checkpoints: LoRA weights, optimizer and lr-scheduler state, and the step.

A checkpoint is built in a temporary folder and renamed to `checkpoint-<step>` only when complete,
with `state.json` written last; old checkpoints are removed only after the new one exists. So a
crash or a full disk during a save leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .adapters import check_finite
from .events import TrainingError
from .fileio import atomic_directory

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
# What a checkpoint must share with the run that resumes it.
RESUME_KEYS = ("base_model", "rank", "alpha", "train_text_encoder")


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with a readable state.json), oldest first. Stray names are ignored."""
    found = []
    if not checkpoints_dir.is_dir():
        return found
    for p in checkpoints_dir.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and read_state(p) is not None:
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None


def find_checkpoint(checkpoints_dir: Path, which: str) -> Path:
    if which == "latest":
        found = list_checkpoints(checkpoints_dir)
        if not found:
            raise TrainingError(f"There is no checkpoint to resume from in {checkpoints_dir}.")
        return found[-1][1]
    path = Path(which)
    if not path.is_absolute() and not path.exists():
        path = checkpoints_dir / which
    if read_state(path) is None:
        raise TrainingError(f"{which} is not a complete checkpoint folder (no state.json).")
    return path


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    lora_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    state: dict[str, Any],
    total_limit: int | None,
) -> Path:
    from safetensors.torch import save_file

    check_finite(lora_state, "LoRA weights")
    target = checkpoints_dir / f"checkpoint-{step}"
    with atomic_directory(target) as tmp:
        save_file(lora_state, str(tmp / "lora.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
    if total_limit is not None:
        for _, old in list_checkpoints(checkpoints_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict, dict]:
    from safetensors.torch import load_file

    state = read_state(path)
    if state is None:
        raise TrainingError(f"{path} is not a complete checkpoint folder (no state.json).")
    lora = load_file(str(path / "lora.safetensors"))
    # Our own files, but still loaded without unpickling arbitrary objects.
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    scheduler_state = torch.load(path / "scheduler.pt", weights_only=True)
    return state, lora, optimizer_state, scheduler_state


def check_resume_compatible(state: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for key in RESUME_KEYS:
        if state.get(key) != current.get(key):
            raise TrainingError(
                f"Cannot resume from {path.name}: it was trained with {key}={state.get(key)!r}, "
                f"this run has {key}={current.get(key)!r}; use the same setting or start a new run."
            )
