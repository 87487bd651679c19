"""Resumable training checkpoints: everything about them lives here.

A checkpoint folder `checkpoint-<step>` holds `lora.safetensors` (peft LoRA keys under a component
prefix: `unet.`, `text_encoder.`, `text_encoder_2.`), `optimizer.pt`, `scheduler.pt`, `scaler.pt`
(fp16 runs only), `embeddings.safetensors` (pivotal tuning only: the new token rows per text
encoder, `text_encoder` / `text_encoder_2`) and `state.json` (step, seconds, the resume identity,
the architecture; with pivotal tuning its tokens and trigger word). It is built in a temporary
folder and renamed only when complete, with `state.json` written last; old checkpoints are
removed only after the new one exists. So a crash or a full disk during a save
leaves the previous checkpoint as `latest`, and a damaged checkpoint is skipped on resume.

Importing this module does not import torch (the app's job list reads checkpoints without it).
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .events import TrainingError
from .fileio import atomic_directory

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
# What a checkpoint must share with the run that resumes it (one list: saving and checking read it).
RESUME_KEYS = (
    "base_model", "rank", "alpha", "train_text_encoder", "use_dora", "optimizer", "pivotal_tokens"
)  # fmt: skip
# What a checkpoint written before a key existed had (so older checkpoints still resume).
_RESUME_DEFAULTS = {"use_dora": False, "optimizer": "adamw", "pivotal_tokens": 0}
EMBEDDINGS_FILE = "embeddings.safetensors"
# The component prefixes of the LoRA keys in lora.safetensors. "text_encoder." does not match
# "text_encoder_2." keys: the dot ends the prefix.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FILES = ("lora.safetensors", "optimizer.pt", "scheduler.pt")


def resume_identity(config) -> dict[str, Any]:
    """The settings a checkpoint records and a resuming run must match (RESUME_KEYS)."""
    values = {
        "base_model": config.base_model,
        "rank": config.rank,
        "alpha": config.lora_alpha,
        "train_text_encoder": config.train_text_encoder,
        "use_dora": config.use_dora,
        "optimizer": config.optimizer,
        "pivotal_tokens": len(config.pivotal_tokens),  # 0 without pivotal tuning
    }
    assert tuple(values) == RESUME_KEYS
    return values


# ---------------------------------------------------------------------------------------------
# LoRA state in and out
# ---------------------------------------------------------------------------------------------


def lora_state(models: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`{component: model}` (models without LoRA left out or None) -> one prefixed state dict."""
    from .adapters import peft_lora_state

    state: dict[str, torch.Tensor] = {}
    for name, model in models.items():
        if model is not None:
            state.update({f"{name}.{k}": v for k, v in peft_lora_state(model).items()})
    return state


def split_components(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A prefixed state dict -> `{component: its peft keys}` (only components that have keys)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name not in COMPONENTS or not rest:
            raise TrainingError(f"The checkpoint has a LoRA key of no known component ({key}).")
        parts.setdefault(name, {})[rest] = value
    return parts


def load_lora_state(models: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's LoRA weights into `{component: model}` (LoRA already attached)."""
    from peft.utils import set_peft_model_state_dict

    for name, part in split_components(state).items():
        model = models.get(name)
        if model is None:
            raise TrainingError(f"The checkpoint has LoRA weights for a {name} this run does not train.")
        result = set_peft_model_state_dict(model, part)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise TrainingError(
                f"The checkpoint does not match this model ({len(unexpected)} unknown LoRA keys)."
            )


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    lora_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    state: dict[str, Any],
    total_limit: int | None,
    scaler_state: dict[str, Any] | None = None,
    embeddings_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically; rotate old ones after. `state` should carry the
    resume identity, `architecture` and `seconds`; `embeddings_state` is pivotal tuning's new token
    rows (`pivotal.rows_state`). A full disk raises OSError (ENOSPC)."""
    from safetensors.torch import save as safetensors_bytes

    from .adapters import check_finite

    check_finite(lora_state, "LoRA weights")
    if embeddings_state:
        check_finite(embeddings_state, "token embeddings")
    target = Path(checkpoints_dir) / f"checkpoint-{step}"
    # Serialised in memory, then written with plain file writes: a full disk is then an OSError
    # with its errno, not torch's RuntimeError("PytorchStreamWriter failed ...").
    with atomic_directory(target) as tmp:
        (tmp / "lora.safetensors").write_bytes(safetensors_bytes(lora_state))
        (tmp / "optimizer.pt").write_bytes(_torch_bytes(optimizer_state))
        (tmp / "scheduler.pt").write_bytes(_torch_bytes(scheduler_state))
        if scaler_state is not None:
            (tmp / "scaler.pt").write_bytes(_torch_bytes(scaler_state))
        if embeddings_state:
            (tmp / EMBEDDINGS_FILE).write_bytes(safetensors_bytes(embeddings_state))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
    if total_limit is not None:
        for _, old in list_checkpoints(checkpoints_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Find, open, list
# ---------------------------------------------------------------------------------------------


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with a readable state.json), oldest first. Stray names are ignored."""
    found = []
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return found
    for p in checkpoints_dir.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and read_state(p) is not None:
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def find_checkpoint(checkpoints_dir: Path, which: str) -> Path:
    if which == "latest":
        found = list_checkpoints(checkpoints_dir)
        if not found:
            raise TrainingError(f"There is no checkpoint to resume from in {checkpoints_dir}.")
        return found[-1][1]
    path = Path(which)
    if not path.is_absolute() and not path.exists():
        path = Path(checkpoints_dir) / which
    if read_state(path) is None:
        raise TrainingError(f"{which} is not a complete checkpoint folder (no state.json).")
    return path


@dataclass
class Checkpoint:
    """A checkpoint opened for resume, its files read and checked."""

    path: Path
    state: dict[str, Any]
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    embeddings: dict[str, torch.Tensor] | None = None  # pivotal tuning's new token rows

    @property
    def step(self) -> int:
        return int(self.state["step"])


class DamagedCheckpoint(TrainingError):
    """A checkpoint whose files cannot be read; the message names the file."""


def load_checkpoint(path: Path) -> Checkpoint:
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    if state is None or "step" not in state:
        raise DamagedCheckpoint(f"{path.name} is not a complete checkpoint folder (no state.json).")
    current = "lora.safetensors"
    try:
        lora = load_file(str(path / current))
        # Our own files, but still loaded without unpickling arbitrary objects.
        current = "optimizer.pt"
        optimizer = torch.load(path / current, weights_only=True)
        current = "scheduler.pt"
        scheduler = torch.load(path / current, weights_only=True)
        current = "scaler.pt"
        scaler = torch.load(path / current, weights_only=True) if (path / current).exists() else None
        current = EMBEDDINGS_FILE
        embeddings = load_file(str(path / current)) if (path / current).exists() else None
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip errors alike mean "damaged"
        raise DamagedCheckpoint(
            f"{path.name}/{current} is damaged or incomplete ({type(e).__name__}); delete that "
            "checkpoint folder or resume from another one."
        ) from e
    return Checkpoint(path, state, lora, optimizer, scheduler, scaler, embeddings)


def check_resume_compatible(state: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for key in RESUME_KEYS:
        saved = state.get(key, _RESUME_DEFAULTS.get(key))
        if saved != current.get(key):
            raise TrainingError(
                f"Cannot resume from {path.name}: it was trained with {key}={saved!r}, "
                f"this run has {key}={current.get(key)!r}; use the same setting or start a new run."
            )


def open_for_resume(checkpoints_dir: Path, which: str, identity: dict[str, Any]) -> Checkpoint:
    """Find, read and check the checkpoint to resume from.

    With `which="latest"`, a damaged newest checkpoint (a truncated file after a crash or a full
    disk) is skipped with a warning and the previous good one is used; a named checkpoint that is
    damaged is refused with a sentence naming the file.
    """
    if which != "latest":
        ckpt = load_checkpoint(find_checkpoint(checkpoints_dir, which))
    else:
        found = list_checkpoints(checkpoints_dir)
        if not found:
            raise TrainingError(f"There is no checkpoint to resume from in {checkpoints_dir}.")
        damaged: DamagedCheckpoint | None = None
        for _, path in reversed(found):
            try:
                ckpt = load_checkpoint(path)
                break
            except DamagedCheckpoint as e:
                log.warning("skipping a damaged checkpoint: %s", e)
                damaged = damaged or e
        else:
            raise damaged  # every checkpoint is damaged: name the newest's file
    check_resume_compatible(ckpt.state, identity, ckpt.path)
    return ckpt
