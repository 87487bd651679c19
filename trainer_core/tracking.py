"""Experiment trackers through accelerate: TensorBoard (default, written into the run folder), W&B, Comet.

`resolve_report_to` turns the `report_to` setting into accelerate's `log_with` before anything slow
happens: TensorBoard is used only when importable (else none, with a log line); W&B and Comet only
when installed and configured (else one sentence saying what to do). The config goes to the trackers
as hyperparameters with anything secret-looking removed; step metrics and validation images follow.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import re
from pathlib import Path
from typing import Any

from .events import TrainingError

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "comet_ml")
REPORT_TO_CHOICES = (*TRACKERS, "all", "none")
# The project name trackers group runs under; TensorBoard writes to <run>/logs/<PROJECT>/.
PROJECT = "dreambooth-studio"
LOGS_DIR = "logs"

# Config keys that could hold a credential, and values that look like one. `token` is the subject's
# trigger word (e.g. "sks"), not a credential: only names ending in _token (hub_token) are dropped.
_SECRET_KEY = re.compile(r"(secret|password|passwd|api_?key|credential|auth|_token$)", re.I)
_SECRET_VALUE = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}|\b(sk|ghp|gho|xox[bp])[-_][A-Za-z0-9_-]{16,}|://[^/\s:@]+:[^/\s@]+@"
)


def parse_report_to(value: str) -> list[str]:
    """The tracker names in a `report_to` value ("tensorboard", "wandb,comet_ml", "all", "none")."""
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if not names:
        raise ValueError("report_to: give tensorboard, wandb, comet_ml, all or none")
    for name in names:
        if name not in REPORT_TO_CHOICES:
            raise ValueError(f"report_to: unknown tracker {name!r}; use {', '.join(REPORT_TO_CHOICES)}")
    if len(names) > 1 and ({"all", "none"} & set(names)):
        raise ValueError("report_to: 'all' and 'none' stand alone, not in a list")
    return names


def resolve_report_to(value: str) -> list[str]:
    """accelerate's `log_with` for `report_to`; raises TrainingError for an unusable W&B or Comet."""
    names = parse_report_to(value)
    if names == ["none"]:
        return []
    if names == ["all"]:
        found = [n for n in TRACKERS if _installed(n) and _configured(n)]
        log.info("report_to=all: using %s", ", ".join(found) or "no tracker (none is installed and set up)")
        return found
    resolved = []
    for name in names:
        if name == "tensorboard":
            if _installed(name):
                resolved.append(name)
            else:
                log.info(
                    "TensorBoard is not installed, so no TensorBoard logs are written (pip install tensorboard)."
                )
            continue
        label, package = {"wandb": ("Weights & Biases", "wandb"), "comet_ml": ("Comet", "comet_ml")}[name]
        if not _installed(name):
            raise TrainingError(
                f"--report-to {name} needs the {package} package: pip install {package}, "
                "or use --report-to tensorboard or none."
            )
        if not _configured(name):
            how = (
                "run `wandb login` (or set WANDB_API_KEY, or WANDB_MODE=offline)"
                if name == "wandb"
                else "set COMET_API_KEY (or write ~/.comet.config, or set COMET_MODE=offline)"
            )
            raise TrainingError(
                f"{label} is installed but not set up: {how}, or use --report-to tensorboard."
            )
        resolved.append(name)
    return resolved


def _installed(name: str) -> bool:
    if name == "tensorboard":
        # accelerate writes through torch.utils.tensorboard, which needs the tensorboard package.
        return importlib.util.find_spec("tensorboard") is not None
    return importlib.util.find_spec(name) is not None


def _configured(name: str) -> bool:
    """Whether W&B / Comet can start without asking a question (a key, a login, or offline mode)."""
    env = os.environ
    if name == "tensorboard":
        return True
    if name == "wandb":
        if env.get("WANDB_API_KEY") or env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
            return True
        return _netrc_has("api.wandb.ai")
    if name == "comet_ml":
        if env.get("COMET_API_KEY") or env.get("COMET_MODE", "").lower() in ("offline", "disabled"):
            return True
        for path in (env.get("COMET_CONFIG"), Path.home() / ".comet.config", Path(".comet.config")):
            if path and Path(path).is_file() and "api_key" in Path(path).read_text(errors="ignore"):
                return True
    return False


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def project_configuration(run_dir: Path):
    """Where accelerate's local trackers write: <run>/logs/ (TensorBoard adds <PROJECT>/)."""
    from accelerate.utils import ProjectConfiguration

    return ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / LOGS_DIR))


def hyperparameters(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The config as tracker hyperparameters: scalars only, unset values and anything secret left out."""
    params = {}
    for key, value in sorted(config_dict.items()):
        if value is None or _SECRET_KEY.search(key):
            continue
        if isinstance(value, str) and _SECRET_VALUE.search(value):
            continue
        if isinstance(value, bool | int | float | str):
            params[key] = value
    return params


def start_trackers(accelerator, config) -> None:
    """init_trackers with the run's name and its config as hyperparameters (call on every process)."""
    if not accelerator.log_with:
        return
    run_dir = Path(config.output_dir)
    init_kwargs = {"wandb": {"name": run_dir.name, "dir": str(run_dir)}}
    try:
        accelerator.init_trackers(PROJECT, config=hyperparameters(config.to_dict()), init_kwargs=init_kwargs)
    except Exception as e:  # a tracker's own failure (login, network) must read as one sentence
        names = ", ".join(str(t) for t in accelerator.log_with)
        raise TrainingError(
            f"Could not start the {names} tracker ({' '.join(str(e).split())[:200]}); "
            "fix it or use --report-to none."
        ) from e
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "comet_ml":
                tracker.tracker.set_name(run_dir.name)


def log_step(accelerator, row: dict[str, Any]) -> None:
    """One metrics.jsonl row to the trackers, as loss/total, loss/instance, loss/prior and lr scalars."""
    if not accelerator.trackers:
        return
    values = {
        "loss/total": row["loss"],
        "loss/instance": row["instance_loss"],
        "lr": row["lr"],
    }
    if row.get("prior_loss") is not None:
        values["loss/prior"] = row["prior_loss"]
    accelerator.log(values, step=row["step"])


def log_samples(accelerator, step: int, images: dict[str, list]) -> None:
    """Validation images (PIL, keyed by "with_token" / "without_token") to every tracker that takes them."""
    if not accelerator.is_main_process or not images:
        return
    import numpy as np

    for tracker in accelerator.trackers:
        for label, pil_images in images.items():
            tag = f"validation/{label}"
            if tracker.name == "tensorboard":
                batch = np.stack([np.asarray(im.convert("RGB")) for im in pil_images])  # (n, h, w, 3)
                tracker.log_images({tag: batch}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({tag: pil_images}, step=step)
            elif tracker.name == "comet_ml":
                for i, im in enumerate(pil_images):
                    tracker.tracker.log_image(im, name=f"{tag}-{i}", step=step)


def log_scores(accelerator, row: dict[str, Any] | None) -> None:
    """One scores.jsonl row to the trackers, as eval/dino, eval/clip_i, eval/clip_t, eval/pres scalars."""
    if row is None or not accelerator.trackers:
        return
    values = {f"eval/{k}": row[k] for k in ("dino", "clip_i", "clip_t", "pres") if row.get(k) is not None}
    accelerator.log(values, step=row["step"])
