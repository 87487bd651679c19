"""Events: the only channel from the engine to its callers (CLI, UI, tests).

The engine calls `emit(event)` with one of the plain dataclasses below and polls `should_stop()`
at safe points. Neither callable may raise into the engine's math; both default to no-ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageStarted:
    stage: str  # "load", "class_images", "cache", "train", "validate", "save"
    message: str = ""
    total: int | None = None


@dataclass(frozen=True)
class Progress:
    stage: str
    current: int
    total: int


@dataclass(frozen=True)
class StepMetrics:
    step: int
    total_steps: int
    loss: float
    instance_loss: float
    prior_loss: float | None
    lr: float
    seconds: float  # wall time since training steps began


@dataclass(frozen=True)
class SamplesSaved:
    step: int
    paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class Finished:
    status: str  # "finished" or "stopped"
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    message: str
    step: int | None = None


Event = StageStarted | Progress | StepMetrics | SamplesSaved | CheckpointSaved | Finished | Failed
Emit = Callable[[Event], None]
ShouldStop = Callable[[], bool]


def no_emit(_event: Event) -> None:
    return None


def never_stop() -> bool:
    return False


class StopRequested(Exception):
    """Raised inside the engine when `should_stop()` said yes at a point with nothing to save."""


class TrainingError(Exception):
    """A failure the user can act on; its message is one plain sentence for them."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


def first_line(err: BaseException) -> str:
    """An exception's first line (or its type name), for a one-sentence message to the user."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__
