"""The automation API: plain typed functions registered with `gr.api`, independent of the page layout.

`gradio_client` calls them by api_name (see docs/api.md and examples/api_client.py):
prepare_photos, start_training, training_status, stop_training, list_adapters, generate. Errors reach
the client as one sentence (a gr.Error), like in the page. Every call acts for the logged-in user,
on that user's folder only; the bounds on sizes are in each endpoint's docstring.
"""

# No `from __future__ import annotations` here: gr.api reads these annotations at runtime.

import functools
import logging
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from .studio import (
    DISK_FULL,
    MAX_GENERATION_STEPS,
    MAX_PROMPT_CHARS,
    MAX_SIDE_FACTOR,
    TRAIN_LIMITS,
    Studios,
    UserError,
    is_disk_full,
)

log = logging.getLogger(__name__)


def friendly(fn):
    """Show the person one sentence for any failure; keep the traceback in the log only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except OSError as e:
            if not is_disk_full(e):
                log.exception("%s failed", fn.__name__)
                raise gr.Error(
                    f"Something went wrong ({type(e).__name__}); the details are in the app's log.",
                    print_exception=False,
                ) from None
            log.warning("%s: the disk is full (%s)", fn.__name__, e)
            raise gr.Error(DISK_FULL, print_exception=False) from None
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", fn.__name__)
            raise gr.Error(
                f"Something went wrong ({type(e).__name__}); the details are in the app's log.",
                print_exception=False,
            ) from None

    return wrapper


def _path_of(item: Any) -> str:
    if isinstance(item, dict):
        return item.get("path") or ""
    return getattr(item, "path", None) or str(item)


_LIMITS = ", ".join(f"{k} <= {v}" for k, v in TRAIN_LIMITS.items())
ENDPOINTS: list = []  # the registered functions (their docstrings state the bounds)


def register(studios: Studios) -> None:
    """Register the API endpoints on the Blocks being built. Each call acts for the logged-in user
    (gradio_client: `Client(url, auth=(user, password))`, or `token=` on a Space).

    Bounds on what a client sends: generate's width and height at most twice the model's native
    size, steps <= 100, prompt <= 2000 characters; start_training's settings are TrainConfig fields
    a user may set, with max_train_steps, resolution, num_class_images and more bounded, and
    learning_rate in (0, 1]. Paths in settings name files inside the caller's own folder only.
    """

    def prepare_photos(
        request: gr.Request,
        photos: list[FileData],
        token: str = "sks",
        class_noun: str = "person",
        crop: str = "auto",
        caption: str = "template",
        dataset: str = "",
        base_model: str = "",
        subject_type: str = "",
    ) -> dict:
        """Validate, crop and caption photos into a named photo set (added to it if it exists), at the
        base model's training resolution; returns the preparation report. With a subject_type
        (person, pet, object, style), a person photo with no face is flagged in its warnings."""
        return studios.get(request).prepare_photos(
            [_path_of(p) for p in photos or []],
            dataset,
            token=token,
            class_noun=class_noun,
            crop=crop,
            caption=caption,
            subject_type=subject_type,
            base_model=base_model or None,
        )

    def start_training(
        request: gr.Request,
        dataset: str,
        subject_type: str = "person",
        token: str = "sks",
        class_noun: str = "",
        base_model: str = "",
        adapter_name: str = "",
        settings: dict | None = None,
    ) -> dict:
        """Start training a LoRA on a prepared photo set with the subject type's preset.

        `settings` overrides TrainConfig fields by name (e.g. {"max_train_steps": 200}); only the
        fields a user may set are accepted (not instance_dir, output_dir, base_model, token or
        report_to), each other key is refused by name. Bounds: {limits}; learning_rate in (0, 1].
        With logins, class_data_dir, resume_from_checkpoint, pretrained_vae and single_file_config
        must name something inside your own data folder (relative paths start there).
        Returns the job snapshot; a second start while one runs is refused.
        """
        if settings is not None and not isinstance(settings, dict):
            raise UserError('settings: give an object of TrainConfig fields, e.g. {"max_train_steps": 200}.')
        studio = studios.get(request)
        config = studio.plan_training(
            dataset,
            subject_type=subject_type,
            token=token,
            class_noun=class_noun or None,
            base_model=base_model or None,
            adapter_name=adapter_name or None,
            **(settings or {}),
        )
        return studio.start_training(config)

    def training_status(request: gr.Request) -> dict:
        """The current (or last) job: state, stage, step, losses so far, samples, adapter name."""
        return studios.get(request).training_status()

    def stop_training(request: gr.Request) -> dict:
        """Ask the running job to stop; it saves a checkpoint and a usable adapter first."""
        return studios.get(request).stop_training()

    def list_adapters(request: gr.Request) -> list[dict]:
        """Every adapter in the gallery with its metadata, newest first."""
        return studios.get(request).list_adapters()

    def generate(
        request: gr.Request,
        prompt: str,
        adapter: str = "",
        adapter_weight: float = 1.0,
        negative_prompt: str = "",
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        width: int = 0,
        height: int = 0,
        base_model: str = "",
    ) -> FileData:
        """One image for the prompt, with the named adapter (or the plain base model).

        Bounds: width and height (0: the model's own size) at most {side}x the model's native size
        (SD 1.5: 1024, SDXL: 2048), steps 1 to {steps}, prompts up to {chars} characters. Each
        user has one generation at a time; users take turns in arrival order.
        """
        paths = studios.get(request).generate(
            prompt,
            adapter=adapter or None,
            adapter_weight=adapter_weight,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            seed=seed,
            width=width or None,
            height=height or None,
            base_model=base_model or None,
        )
        return FileData(path=str(paths[0]))

    start_training.__doc__ = start_training.__doc__.replace("{limits}", _LIMITS)
    generate.__doc__ = (
        generate.__doc__.replace("{side}", str(MAX_SIDE_FACTOR))
        .replace("{steps}", str(MAX_GENERATION_STEPS))
        .replace("{chars}", str(MAX_PROMPT_CHARS))
    )
    ENDPOINTS[:] = [prepare_photos, start_training, training_status, stop_training, list_adapters, generate]
    for fn in ENDPOINTS:
        gr.api(friendly(fn), api_name=fn.__name__)
