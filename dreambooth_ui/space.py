"""Where the app runs: a local machine or a Hugging Face Space, read from the environment once.

On a Space (`SPACE_ID` is set) the data folder goes on the persistent storage when the Space has it
(mounted at /data, or the folder named by DREAMBOOTH_STUDIO_PERSISTENT_DIR); without it the data is
ephemeral and the page says so. A Hub token comes only from the `HF_TOKEN` secret; it is kept out of
`repr` and never written anywhere by the app. ZeroGPU hardware is detected so training can be
refused with a sentence: its per-call GPU time limits cut a training run off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PERSISTENT_DIR = "/data"  # where Spaces mount persistent storage


@dataclass(frozen=True)
class Deployment:
    on_space: bool
    space_id: str | None
    data_dir: Path
    persistent: bool  # False: the data folder vanishes when the Space restarts
    zero_gpu: bool
    owner: str | None  # the Space's author (SPACE_AUTHOR_NAME)
    hub_token: str | None = field(default=None, repr=False)  # the HF_TOKEN secret; never printed

    @property
    def banner(self) -> str | None:
        """What the page must say about this deployment before anything else (None: nothing)."""
        notes = []
        if self.on_space and not self.persistent:
            keep = (
                "finished adapters are pushed to a private Hub repository of yours (HF_TOKEN is set)."
                if self.hub_token
                else "or set the HF_TOKEN secret to have finished adapters pushed to a private Hub repository."
            )
            notes.append(
                "⚠️ This Space has no persistent storage: photos, runs and adapters are deleted when it "
                f"restarts. Add persistent storage in the Space settings; {keep}"
            )
        if self.zero_gpu:
            notes.append(
                "⚠️ This Space runs on ZeroGPU: generation works, training does not (its GPU time limits)."
            )
        return "\n\n".join(notes) or None

    @property
    def training_refusal(self) -> str | None:
        if self.zero_gpu:
            return (
                "Training does not run on ZeroGPU hardware: its GPU time limit per call ends a training "
                "run early. Duplicate this Space on a dedicated GPU (e.g. an L4 or A10G) to train."
            )
        return None


def detect(env: Mapping[str, str] | None = None, data_dir: str | None = None) -> Deployment:
    """The deployment described by `env` (default: os.environ); `data_dir` is the --data-dir flag."""
    env = os.environ if env is None else env
    space_id = env.get("SPACE_ID") or None
    on_space = space_id is not None
    explicit = data_dir or env.get("DREAMBOOTH_STUDIO_DATA")
    mount = Path(env.get("DREAMBOOTH_STUDIO_PERSISTENT_DIR") or DEFAULT_PERSISTENT_DIR)
    has_mount = on_space and mount.is_dir() and os.access(mount, os.W_OK)
    if explicit:
        folder = Path(explicit)
    elif has_mount:
        folder = mount / "dreambooth-studio"
    else:
        folder = Path("data")
    # Locally everything is kept; on a Space only what lies on the mounted storage survives a restart.
    persistent = not on_space or (has_mount and folder.resolve().is_relative_to(mount.resolve()))
    return Deployment(
        on_space=on_space,
        space_id=space_id,
        data_dir=folder,
        persistent=persistent,
        zero_gpu=env.get("SPACES_ZERO_GPU") == "true",
        owner=env.get("SPACE_AUTHOR_NAME") or None,
        hub_token=env.get("HF_TOKEN") or None,
    )
