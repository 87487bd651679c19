"""The app's services, without Gradio: the data folder, the job runner, the adapter store and the
generator, and the plain typed operations that both the page and the HTTP API call.

Everything heavy (torch, diffusers) is imported inside the methods, so importing this module (and
building the page) stays light; the first generation or training loads the engine.

Data folder layout:

    <data_dir>/uploads/<batch>/     raw uploads while they are prepared (then deleted)
    <data_dir>/datasets/<name>/     prepared photo sets (squares, captions, report.json, originals/)
    <data_dir>/runs/<run_id>/       training runs (config, status, metrics, samples, checkpoints, adapter)
    <data_dir>/adapters/<name>/     the adapter gallery (finished runs are copied in; imports too)
    <data_dir>/outputs/             generated images
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer_core.config import SUBJECT_TYPES, TINY_MODELS, TrainConfig, preset_config
from trainer_core.fileio import atomic_write_json

from .jobs import JobBusy, JobRunner

log = logging.getLogger(__name__)

HUB_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "Stable Diffusion 1.5",
    "stabilityai/stable-diffusion-xl-base-1.0": "SDXL base 1.0",
}
CROP_MODES = ("auto", "face", "center", "none")
CAPTIONERS = ("template", "blip", "none")
_NAME = re.compile(r"[^A-Za-z0-9._-]+")
PUBLISHED = "published.json"  # in a run folder: the name its adapter got in the gallery


# TrainConfig fields a client (the page's settings, the API's `settings`) may set. The rest are the
# app's to set (instance_dir, output_dir, base_model and token have their own arguments) or reach
# beyond the run (report_to would use the server's tracker accounts).
CLIENT_FIELDS = frozenset({
    "adapter_name", "instance_prompt", "with_prior_preservation", "class_prompt", "num_class_images",
    "prior_loss_weight", "class_generation_steps", "class_generation_batch_size", "rank", "alpha",
    "train_text_encoder", "resolution", "random_flip", "max_train_steps", "train_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1",
    "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "use_8bit_adam", "fused_adam",
    "snr_gamma", "noise_offset", "prediction_type", "mixed_precision", "gradient_checkpointing",
    "enable_xformers", "compile_unet", "seed", "logging_steps", "validation_prompt", "validation_steps",
    "num_validation_images", "validation_inference_steps", "checkpointing_steps", "checkpoints_total_limit",
    "bucketing", "masked_loss",  # issue 16 (masked_loss needs masks: prep's `masks` option)
    "text_encoder_lr", "text_encoder_weight_decay", "optimizer", "prodigy_d_coef",
    "prodigy_safeguard_warmup", "prodigy_use_bias_correction", "use_dora", "caption_dropout",
    "pivotal_tuning", "num_new_tokens", "token_init", "token_embedding_lr",
    "eval_models", "num_eval_prompts", "num_eval_class_images", "best_metric", "best_clip_t_tolerance",
    "best_pres_tolerance",
    # paths: with logins, resolved inside the user's own folder (relative paths start there)
    "class_data_dir", "resume_from_checkpoint", "pretrained_vae", "single_file_config",
})  # fmt: skip
PATH_FIELDS = ("class_data_dir", "resume_from_checkpoint", "pretrained_vae", "single_file_config")
KNOWN_VAES = ("madebyollin/sdxl-vae-fp16-fix", "stabilityai/sd-vae-ft-mse")  # Hub ids always allowed
# Upper bounds on what one client request may ask for (the CLI has its own, looser, engine limits).
TRAIN_LIMITS = {
    "max_train_steps": 20_000, "resolution": 2048, "num_class_images": 2000, "rank": 256,
    "train_batch_size": 64, "gradient_accumulation_steps": 256, "class_generation_steps": 200,
    "class_generation_batch_size": 64, "validation_inference_steps": 200, "num_validation_images": 16,
    "checkpoints_total_limit": 100, "num_eval_prompts": 16, "num_eval_class_images": 16,
}  # fmt: skip
MAX_GENERATION_STEPS = 100
MAX_IMAGES = 4  # per generation request
MAX_SIDE_FACTOR = 2  # width and height at most twice the model's native size (SD 1.5: 1024, SDXL: 2048)
MAX_PROMPT_CHARS = 2000
MAX_PHOTOS = 200  # per prepare request (a set may grow over several)
MAX_SEED = 2**32 - 1
DISK_FULL = "The server's disk is full: free disk space, then try again."
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
OWNER_FILE = "owner.json"  # in a user's folder: the exact account name it belongs to


class UserError(Exception):
    """Something the person can fix; the message is one plain sentence."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS


def check_word(value: str, what: str) -> str:
    """A trigger token or class noun: printable text (no NUL or control characters)."""
    if not isinstance(value, str) or any(not c.isprintable() for c in value):
        raise UserError(f"The {what} may only contain printable characters, e.g. sks.")
    return value


def user_folder_name(user: str) -> str:
    """One folder per exact account name: a readable slug plus a short hash of the exact name
    (so `alice` and `alice_`, which read the same, never share a folder)."""
    digest = hashlib.sha256(user.encode("utf-8")).hexdigest()[:12]
    slug = _NAME.sub("-", user.strip()).strip(".-_")[:40] or "user"
    return f"{slug}-{digest}"


def _legacy_folder_name(user: str) -> str | None:
    """The folder name before one-to-one folders (safe_name of the account), None if it had none."""
    cleaned = _NAME.sub("-", user.strip()).strip(".-_")[:64] if "\x00" not in user else ""
    return cleaned or None


def safe_name(name: str, what: str = "name") -> str:
    """A folder name from user text; nothing that could leave its parent folder."""
    if not isinstance(name, str) or "\x00" in name:
        raise UserError(f"The {what} contains characters that cannot be used in a folder name.")
    cleaned = _NAME.sub("-", name.strip()).strip(".-_")[:64]
    if not cleaned:
        raise UserError(f"Give the {what} at least one letter or digit.")
    return cleaned


def base_model_choices(default: str) -> list[tuple[str, str]]:
    """(label, value) pairs for the base model picker; the default first when it is not listed."""
    # tiny-shapes is offered only once its weights are built (make pretrain-shapes).
    from trainer_core.tiny_shapes import weights_present

    choices = [
        (label, key) for key, (_, label) in TINY_MODELS.items() if key != "tiny-shapes" or weights_present()
    ]
    choices += [(f"{label} ({key})", key) for key, label in HUB_MODELS.items()]
    if default not in TINY_MODELS and default not in HUB_MODELS:
        choices.insert(0, (default, default))
    return choices


def base_model_note(base_model: str) -> str:
    """One line on whether `base_model` can be used here, without loading it."""
    from trainer_core.planning import check_base_model

    return check_base_model(base_model)


class Shared:
    """What all users of one app share: the GPU slot for training and the resident generator.

    Generation requests take turns in arrival order (a ticket queue), and each user has at most one
    in the queue, so one user's long requests cannot starve another's.
    """

    def __init__(self) -> None:
        self.gpu = threading.Lock()
        self._generator = None
        self._lock = threading.Lock()
        self._turns = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._queued: set[object] = set()

    @contextmanager
    def generation_turn(self, who: object):
        """Wait for `who`'s turn at the generator; UserError if `who` already has a request queued."""
        with self._turns:
            if who in self._queued:
                raise UserError("You are already generating; wait for that image before asking for another.")
            self._queued.add(who)
            ticket = self._next_ticket
            self._next_ticket += 1
            self._turns.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._turns:
                self._queued.discard(who)
                self._serving += 1
                self._turns.notify_all()

    def generation_queue(self) -> int:
        """Requests running or waiting at the generator."""
        with self._turns:
            return len(self._queued)

    def generator(self, device: str | None = None):
        with self._lock:
            if self._generator is None:
                from trainer_core.inference import Generator

                self._generator = Generator(device=device)
            return self._generator

    def free_generator(self) -> None:
        with self._lock:
            if self._generator is not None:
                self._generator.unload_all()


class Studio:
    def __init__(
        self,
        data_dir: str | Path,
        *,
        base_model: str = "tiny-sd15",
        train_fn=None,
        device: str | None = None,
        deployment=None,
        hub_client=None,
        shared: Shared | None = None,
        confined: bool = False,
        user: str | None = None,
    ) -> None:
        from .space import detect

        self.data_dir = Path(data_dir).resolve()
        # With logins, every path a client names must lie inside this user's folder, and only the
        # offered base models may be used; alone on your own machine, paths are taken as given.
        self.confined = confined
        self.user = user  # the account this folder belongs to (None: the single local user)
        # The one GPU: one training job at a time across all users, one resident generator.
        self.shared = shared or Shared()
        self.base_model = base_model
        self.device = device
        # Where the app runs (Space or not, ZeroGPU, the HF_TOKEN secret); local and token-free
        # unless given. `hub_client` replaces huggingface_hub.HfApi for the automatic push (tests).
        self.deployment = deployment or detect(env={}, data_dir=str(self.data_dir))
        self.hub_client = hub_client
        for sub in ("uploads", "datasets", "runs", "adapters", "outputs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.runner = JobRunner(
            self.data_dir / "runs",
            train_fn=train_fn,
            on_done=self._publish,
            before_start=self._free_generator,
            gpu_slot=self.shared.gpu,
        )
        self.recovered = self.runner.recover()
        self._store = None

    # -- folders ---------------------------------------------------------------------------------

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def store(self):
        if self._store is None:
            from trainer_core.store import AdapterStore

            self._store = AdapterStore(self.adapters_dir)
        return self._store

    @property
    def generator(self):
        return self.shared.generator(self.device)

    # -- base model ------------------------------------------------------------------------------

    def base_model_choices(self) -> list[tuple[str, str]]:
        return base_model_choices(self.base_model)

    def base_model_note(self, base_model: str) -> str:
        if self.confined and not _offered(base_model, self.base_model):
            return refused_base_model(self.base_model)
        return base_model_note(base_model)

    def client_base_model(self, base_model: str | None) -> str:
        """The base model a client named, if it may use it here (UserError naming the field if not)."""
        name = (base_model or "").strip() or self.base_model
        if self.confined and not _offered(name, self.base_model):
            raise UserError(refused_base_model(self.base_model))
        return name

    def client_path(self, field: str, value: Any) -> Any:
        """A path a client named in `field`: with logins it must exist inside this user's folder
        (after resolving symlinks; relative paths start there). Missing and not-yours read alike."""
        if not self.confined or value is None or value == "":
            return value
        if field == "resume_from_checkpoint" and value == "latest":
            return value
        if field == "pretrained_vae" and value in KNOWN_VAES:
            return value
        if field == "single_file_config" and value in HUB_MODELS:
            return value
        refusal = UserError(
            f"{field}: there is no {str(value)[:200]!r} among your own files; name a folder inside your "
            "data (e.g. datasets/<photo set>), relative to it."
        )
        if not isinstance(value, str) or "\x00" in value:
            raise refusal
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else self.data_dir / path).resolve()
        if not path.is_relative_to(self.data_dir) or not path.exists():
            raise refusal
        return str(path)

    # -- photos ----------------------------------------------------------------------------------

    def save_uploads(self, files: Sequence[str | Path]) -> list[Path]:
        """Copy uploads out of Gradio's cache into the data folder at once (that cache is temporary).

        The batch folder is removed after preparing: accepted photos are kept in the set's
        `originals/`, rejected files are not kept at all.
        """
        batch = self.data_dir / "uploads" / time.strftime("%Y%m%d-%H%M%S")
        while batch.exists():
            batch = batch.with_name(batch.name + "_")
        batch.mkdir(parents=True)
        saved = []
        try:
            for f in files:
                src = Path(f)
                if not src.is_file():
                    continue
                # Keep the user's file name (for the report) but never its directories; a name with
                # no letter or digit (an emoji, dashes) gets a plain one instead of failing the batch.
                # No number prefix here: preparing numbers the photos (`001-astro.png`, not
                # `001-000-astro.png`); two uploads of one name get `astro-2.png`.
                name = _NAME.sub("-", src.name.strip()).strip(".-_")[:64] or "upload"
                target = batch / name
                n = 2
                while target.exists():
                    target = batch / f"{Path(name).stem}-{n}{Path(name).suffix}"
                    n += 1
                shutil.copyfile(src, target)
                saved.append(target)
            if not saved:
                batch.rmdir()
        except OSError as e:
            shutil.rmtree(batch, ignore_errors=True)
            if is_disk_full(e):
                raise UserError(DISK_FULL) from e
            raise
        return saved

    def prepare_photos(
        self,
        files: Sequence[str | Path],
        dataset: str,
        *,
        token: str = "sks",
        class_noun: str = "person",
        crop: str = "auto",
        caption: str = "template",
        subject_type: str = "",
        resolution: int | None = None,
        base_model: str | None = None,
        emit=None,
    ) -> dict[str, Any]:
        """Check, crop and caption photos into datasets/<name>, at the base model's training resolution.
        With a `subject_type`, photos that do not fit it are flagged (a "person" photo with no face)."""
        from trainer_core.planning import native_resolution
        from trainer_core.prep import ORIGINALS_DIR, REPORT_NAME, PrepOptions, prepare_photos

        check_word(token, "trigger token")
        check_word(class_noun, "class noun")
        resolution = resolution or native_resolution(self.client_base_model(base_model or self.base_model))

        if not files:
            raise UserError("Add some photos first (5 to 20 of the subject work best).")
        if len(files) > MAX_PHOTOS:
            raise UserError(
                f"photos: at most {MAX_PHOTOS} per request, got {len(files)}; add the rest in another."
            )
        name = safe_name(dataset or f"{token}-{class_noun}", "photo set name")
        try:
            options = PrepOptions(
                resolution=resolution, crop=crop, caption=caption, token=token, class_noun=class_noun,
                subject_type=subject_type or "",
            )  # fmt: skip
        except ValueError as e:
            raise UserError(_sentence(str(e))) from e
        out = self.datasets_dir / name
        self._check_set_not_in_use(out)  # adding rebuilds the set and swaps it in whole
        uploads = self.save_uploads(files)
        inputs: list[Path] = list(uploads)
        if (out / REPORT_NAME).is_file():
            # Adding to an existing set: its kept originals go through again with the new photos,
            # so earlier photos are never dropped (the set is rebuilt beside and swapped in whole).
            inputs.insert(0, out / ORIGINALS_DIR)
        try:
            report = _engine_call(prepare_photos, inputs, out, options, **({"emit": emit} if emit else {}))
        finally:
            if uploads:
                shutil.rmtree(uploads[0].parent, ignore_errors=True)
        result = report_dict(report)
        result["dataset"] = name
        result["token"] = token
        result["class_noun"] = class_noun
        return result

    # The example photo set: the demo subject of the built-in tiny-shapes model (make demo's).
    EXAMPLE_SET = "orange-circle-example"

    def prepare_example_photos(self, emit=None) -> dict[str, Any]:
        """Five photos of one particular orange circle, drawn here (trainer_core.tiny_shapes), prepared
        as a photo set for tiny-shapes ("sks circle"): the first try needs no photos of one's own.
        Preparing it again returns the set as it is (any edits kept)."""
        import tempfile

        from trainer_core.tiny_shapes import MODEL_ID, draw_subject

        try:
            report = self.dataset_report(self.EXAMPLE_SET)
        except UserError:
            with tempfile.TemporaryDirectory() as tmp:
                paths = []
                for i in range(5):
                    paths.append(Path(tmp) / f"orange-circle-{i + 1}.png")
                    draw_subject(i).save(paths[-1])
                return self.prepare_photos(
                    paths, self.EXAMPLE_SET, token="sks", class_noun="circle", subject_type="object",
                    base_model=MODEL_ID, emit=emit,
                )  # fmt: skip
        return {**report, "token": "sks", "class_noun": "circle"}

    def list_datasets(self) -> list[str]:
        found = [p for p in self.datasets_dir.iterdir() if (p / "report.json").is_file()]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def dataset_report(self, dataset: str) -> dict[str, Any]:
        from trainer_core.prep import read_report

        folder = self.datasets_dir / safe_name(dataset, "photo set name")
        if not (folder / "report.json").is_file():
            raise UserError(f"There is no prepared photo set called {dataset!r}; prepare photos first.")
        result = report_dict(read_report(folder))
        result["dataset"] = folder.name
        return result

    def set_caption(self, dataset: str, output: str, caption: str) -> dict[str, Any]:
        from trainer_core.prep import set_caption

        return self._edit_set(dataset, set_caption, output, caption)

    def remove_photo(self, dataset: str, output: str) -> dict[str, Any]:
        """Take a photo out of a prepared set (its square, caption and kept original)."""
        from trainer_core.prep import remove_photo

        return self._edit_set(dataset, remove_photo, output)

    def recrop_photo(
        self,
        dataset: str,
        output: str,
        *,
        focus: tuple[float, float] | None = None,
        side: int | None = None,
        crop: str | None = None,
    ) -> dict[str, Any]:
        """Crop one photo again: a square around `focus` (x, y in the original's pixels, `side`
        across), or by a crop mode (`crop`: auto, face, center, none)."""
        from trainer_core.prep import recrop_around, recrop_auto

        if focus is not None:
            return self._edit_set(dataset, recrop_around, output, focus, side)
        return self._edit_set(dataset, recrop_auto, output, crop or "auto")

    def photo_original(self, dataset: str, output: str, max_side: int = 1024):
        """A prepared photo's original, decoded and scaled to at most `max_side` (a new image, never
        the uploaded file), the scale it was shrunk by, and its entry in the report."""
        from trainer_core.prep import read_original

        folder = self._dataset_folder(dataset)
        image, scale, entry = _engine_call(read_original, folder, output, max_side)
        return image, scale, {"output": entry.output, "square": str(folder / entry.output),
                              "crop_box": list(entry.crop_box), "source_size": list(entry.source_size),
                              "warnings": list(entry.warnings)}  # fmt: skip

    def _dataset_folder(self, dataset: str) -> Path:
        folder = self.datasets_dir / safe_name(dataset, "photo set name")
        if not (folder / "report.json").is_file():
            raise UserError(f"There is no prepared photo set called {dataset!r}; prepare photos first.")
        return folder

    def _check_set_not_in_use(self, folder: Path) -> None:
        if self.runner.training_on(folder):
            raise UserError(
                f"The photo set {folder.name} is being trained on right now; edit it when the run "
                "finishes, or stop the run first."
            )

    def _edit_set(self, dataset: str, fn, *args: Any) -> dict[str, Any]:
        folder = self._dataset_folder(dataset)
        self._check_set_not_in_use(folder)
        result = report_dict(_engine_call(fn, folder, *args))
        result["dataset"] = folder.name
        return result

    # -- training --------------------------------------------------------------------------------

    def plan_training(
        self,
        dataset: str,
        *,
        subject_type: str = "person",
        token: str = "sks",
        class_noun: str | None = None,
        base_model: str | None = None,
        **overrides: Any,
    ) -> TrainConfig:
        """The preset for the subject type and photo count, with the user's overrides applied.

        `overrides` are TrainConfig fields a client may set (CLIENT_FIELDS); any other key is
        refused with a sentence naming it, and sizes above TRAIN_LIMITS are refused too.
        """
        if subject_type not in SUBJECT_TYPES:
            raise UserError(f"Pick a subject type: {', '.join(SUBJECT_TYPES)}.")
        check_word(token, "trigger token")
        check_word(class_noun or "", "class noun")
        overrides = self.client_overrides(overrides)
        base = self.client_base_model(base_model)
        report = self.dataset_report(dataset)
        n = len(report["accepted"])
        if n == 0:
            raise UserError("This photo set has no usable photos; add photos and prepare them again.")
        try:
            config = preset_config(
                subject_type,
                n,
                token=token,
                class_noun=class_noun or None,
                instance_dir=str(self.datasets_dir / report["dataset"]),
                base_model=base,
                adapter_name=overrides.pop("adapter_name", None) or f"{token}-{class_noun or subject_type}",
                output_dir=str(self.runs_dir / "pending"),
                **overrides,
            )
        except (ValueError, TypeError) as e:
            raise UserError(_sentence(str(e))) from e
        for field, limit in TRAIN_LIMITS.items():
            value = getattr(config, field)
            if isinstance(value, int) and value > limit:
                raise UserError(f"{field}: at most {limit} here, got {value}.")
        return config

    def client_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The client's settings, allow-listed by name, with named paths resolved (UserError otherwise)."""
        import dataclasses

        types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
        out = {}
        for key, value in overrides.items():
            if not isinstance(key, str) or key not in types:
                raise UserError(
                    f"{str(key)[:80]}: unknown setting (settings take TrainConfig fields such as max_train_steps)."
                )
            if key not in CLIENT_FIELDS:
                raise UserError(f"{key}: set by the app, not by a client; leave it out of the settings.")
            if value is None:
                continue
            kind = types[key].split(" ")[0]  # "int", "float", "bool" or "str" (maybe "| None")
            accepted = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[kind]
            if not isinstance(value, accepted) or (kind != "bool" and isinstance(value, bool)):
                wanted = {
                    "bool": "true or false",
                    "int": "a whole number",
                    "float": "a number",
                    "str": "text",
                }[kind]
                raise UserError(f"{key}: expected {wanted}, got {str(value)[:80]!r}.")
            out[key] = self.client_path(key, value) if key in PATH_FIELDS else value
        return out

    def estimate_text(self, config: TrainConfig) -> str:
        from trainer_core.planning import estimate_training

        return estimate_training(config, self.runs_dir).text()

    def start_training(self, config: TrainConfig) -> dict[str, Any]:
        refusal = self.deployment.training_refusal
        if refusal:
            raise UserError(refusal)
        run_id = time.strftime("%Y%m%d-%H%M%S-") + safe_name(config.adapter_name or "run", "adapter name")
        if config.masked_loss:
            # The Photos tab prepares no masks: a set without them gets prep's own here, or masked
            # loss would train every photo whole. (A set that has them keeps them.)
            from trainer_core.prep import REPORT_NAME, add_masks

            if (Path(config.instance_dir) / REPORT_NAME).is_file():
                _engine_call(add_masks, config.instance_dir)
        try:
            self.runner.start(config, run_id)
        except JobBusy as e:
            raise UserError(str(e)) from e
        return self.training_status()

    def resume_training(self, run_id: str) -> dict[str, Any]:
        try:
            _engine_call(self.runner.resume, safe_name(run_id, "run id"))
        except JobBusy as e:
            raise UserError(str(e)) from e
        return self.training_status()

    def training_status(self) -> dict[str, Any]:
        """The job's snapshot plus `scores`: its run's scored validation rounds (scores.jsonl)."""
        from trainer_core.runs import read_scores

        snap = self.runner.snapshot()
        run_dir = snap.get("run_dir")
        snap["scores"] = read_scores(run_dir) if run_dir else []
        return snap

    def eval_note(self, eval_models: str | None) -> str:
        """One line: whether a run with `eval_models` will be scored, and why not (nothing loaded)."""
        from trainer_core.evaluate import eval_status

        return eval_status(eval_models or TrainConfig.eval_models)[1]

    def stop_training(self) -> dict[str, Any]:
        stopping = self.runner.stop()
        snap = self.training_status()
        if not stopping:
            snap["message"] = "No training is running."
        return snap

    def _free_generator(self) -> None:
        self.shared.free_generator()

    def _publish(self, run_dir: Path, result: Any) -> str | None:
        """Copy the finished (or stopped) run's adapter into the gallery; return its name there.

        The run remembers the name (published.json), so the Runs view can open it in Generate.
        """
        from trainer_core.events import TrainingError
        from trainer_core.fileio import atomic_write_json

        # A resumed run replaces the adapter its stop published: one adapter per run, not two.
        earlier = _published_name(run_dir)
        try:
            earlier = self.store.get(earlier).name if earlier else None
        except (ValueError, TrainingError):
            earlier = None  # deleted or renamed since: the resumed run gets a name of its own
        info = self.store.add(result.adapter_dir, name=earlier, replace=bool(earlier))
        published: dict[str, Any] = {"adapter": info.name}
        repo_id = self._auto_push(info.name)
        if repo_id:
            published["hub_repo"] = repo_id
        atomic_write_json(run_dir / PUBLISHED, published)
        return info.name

    def _auto_push(self, name: str) -> str | None:
        """On a Space with the HF_TOKEN secret: keep a finished adapter in a private Hub repository
        (the Space's disk may be wiped on restart). A failed push is logged; the adapter stays here."""
        d = self.deployment
        if not (d.on_space and d.hub_token and d.owner):
            return None
        # Another user's adapter goes under its own prefix: two users' "sks-dog" never share a repository.
        prefix = "" if self.user in (None, d.owner) else user_folder_name(self.user) + "-"
        repo_id = f"{d.owner}/{prefix}{name}"
        try:
            self.store.push_to_hub(name, repo_id, token=d.hub_token, private=True, client=self.hub_client)
        except Exception as e:  # noqa: BLE001 - the store's sentence has the token masked
            log.warning("automatic push of %s to %s failed: %s", name, repo_id, e)
            return None
        log.info("pushed adapter %s to the private Hub repository %s", name, repo_id)
        return repo_id

    # -- run history -----------------------------------------------------------------------------

    def list_runs(self) -> list[dict[str, Any]]:
        from trainer_core.runs import list_runs, runs_table

        return runs_table(list_runs(self.runs_dir))

    def _run_dir(self, run_id: str) -> Path:
        run_dir = self.runs_dir / safe_name(run_id, "run id")
        if not (run_dir / "config.json").is_file():
            raise UserError(f"There is no run called {run_id!r}.")
        return run_dir

    def compare_runs(self, run_ids: Sequence[str], loss: str = "loss") -> list[dict[str, Any]]:
        """One long table of the runs' losses (raw and smoothed), to overlay in one plot."""
        from trainer_core.runs import loss_curves

        return _engine_call(loss_curves, [self._run_dir(r) for r in run_ids], loss)

    def run_samples(self, run_ids: Sequence[str]) -> dict[int, list[tuple[str, Path]]]:
        """Validation images per step, across runs: {step: [(run id, image), ...]}."""
        from trainer_core.runs import sample_steps

        by_step: dict[int, list[tuple[str, Path]]] = {}
        for run_id in run_ids:
            for step, images in sample_steps(self._run_dir(run_id)).items():
                by_step.setdefault(step, []).extend((run_id, p) for p in images)
        return dict(sorted(by_step.items()))

    def run_scores(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Per run: {run, scores (read_scores rows), best (best_checkpoint_for_run, or None)}."""
        from trainer_core.evaluate import best_checkpoint_for_run
        from trainer_core.runs import read_scores

        out = []
        for run_id in run_ids:
            run_dir = self._run_dir(run_id)
            out.append(
                {
                    "run": run_dir.name,
                    "scores": read_scores(run_dir),
                    "best": best_checkpoint_for_run(run_dir),
                }
            )
        return out

    def run_checkpoints(self, run_id: str) -> tuple[list[int], int | None]:
        """A run's saved checkpoint steps and its best one (None when unscored)."""
        from trainer_core.checkpoints import list_checkpoints
        from trainer_core.evaluate import best_checkpoint_for_run

        run_dir = self._run_dir(run_id)
        best = best_checkpoint_for_run(run_dir)
        return [s for s, _ in list_checkpoints(run_dir / "checkpoints")], best["step"] if best else None

    def export_checkpoint(self, run_id: str, step: int | None) -> dict[str, Any]:
        """Checkpoint `step` of a run as a new adapter in the gallery (named `<adapter>-step<K>`)."""
        import tempfile

        from trainer_core.evaluate import export_checkpoint

        run_dir = self._run_dir(run_id)
        if step is None or step == "":
            raise UserError("Pick the step of a saved checkpoint to export.")
        self._check_not_training()  # the export loads the base model
        with tempfile.TemporaryDirectory(prefix="export-", dir=self.data_dir / "outputs") as tmp:
            folder = _engine_call(export_checkpoint, run_dir, int(step), Path(tmp) / "adapter")
            return adapter_dict(self._store_call(self.store.add, folder))

    def adapter_scores(self, name: str) -> dict[str, Any] | None:
        """The scores an exported adapter's adapter.json carries (its checkpoint's round), if any."""
        from trainer_core.adapters import read_adapter

        return read_adapter(self._adapter_info(name).path).get("scores") or None

    def run_adapter(self, run_id: str) -> str:
        """The gallery name of a run's adapter."""
        import json

        try:
            name = json.loads((self._run_dir(run_id) / PUBLISHED).read_text())["adapter"]
            self.store.get(name)
            return name
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"The run {run_id} has no adapter in the gallery (not finished, or deleted)."
            ) from e

    def delete_run(self, run_id: str) -> None:
        from trainer_core.runs import delete_run

        run_dir = self._run_dir(run_id)
        snap = self.runner.snapshot()
        if self.runner.running and snap.get("run_id") == run_dir.name:
            raise UserError("This run is training right now; stop it before deleting it.")
        _engine_call(delete_run, run_dir, self.runs_dir)

    # -- adapters and generation -----------------------------------------------------------------

    def list_adapters(self) -> list[dict[str, Any]]:
        return [adapter_dict(a) for a in self.store.list()]

    def _adapter_info(self, name: str):
        try:
            return self.store.get(name)
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise UserError(f"There is no adapter called {name!r} in the gallery.") from e

    def _check_not_training(self) -> None:
        if self.shared.gpu.locked():  # held exactly while some user's training runs
            raise UserError("Training is using the GPU right now; generate when it finishes, or stop it.")

    def generate_request(
        self,
        prompt: str,
        *,
        adapter: str | None = None,
        adapter_weight: float = 1.0,
        second_adapter: str | None = None,
        second_weight: float = 0.5,
        base_model: str | None = None,
        negative_prompt: str = "",
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
    ):
        from trainer_core.inference import GenerateRequest
        from trainer_core.planning import native_resolution

        adapters = []
        base = self.client_base_model(base_model) if base_model else None
        for name, weight in ((adapter, adapter_weight), (second_adapter, second_weight)):
            if name:
                info = self._adapter_info(name)
                adapters.append((str(info.path), float(weight)))
                base = base or info.base_model
        if not prompt or not prompt.strip():
            raise UserError("Write a prompt first, e.g. 'a photo of sks dog on a beach'.")
        base = base or self.base_model
        max_side = MAX_SIDE_FACTOR * native_resolution(base)
        bounds = (("steps", steps, MAX_GENERATION_STEPS), ("num_images", num_images, MAX_IMAGES),
                  ("width", width or 0, max_side), ("height", height or 0, max_side), ("seed", seed, MAX_SEED),
                  ("prompt", len(prompt), MAX_PROMPT_CHARS), ("negative_prompt", len(negative_prompt or ""), MAX_PROMPT_CHARS))  # fmt: skip
        for field, value, limit in bounds:
            if not isinstance(value, (int, float)) or value > limit:
                unit = " characters" if "prompt" in field else ""
                raise UserError(f"{field}: at most {limit}{unit} here, got {value}.")
        if seed < 0:
            raise UserError(f"seed: from 0 to {MAX_SEED}, got {seed}.")
        try:
            return GenerateRequest(
                base_model=base,
                prompt=prompt,
                negative_prompt=negative_prompt or "",
                steps=int(steps),
                guidance=float(guidance),
                width=int(width) if width else None,
                height=int(height) if height else None,
                seed=int(seed),
                num_images=int(num_images),
                adapters=tuple(adapters),
            )
        except ValueError as e:
            raise UserError(_sentence(str(e))) from e

    def generate(self, prompt: str, *, on_step=None, **kwargs: Any) -> list[Path]:
        """Images for the prompt (with the chosen adapters), saved under outputs/; their paths.
        `on_step(done, total)` hears each sampler step (the page's progress bar)."""
        self._check_not_training()
        request = self.generate_request(prompt, **kwargs)
        images = self._run_generator(lambda g: g.generate(request, on_step=on_step))
        return self._save_images(images, "gen")

    def compare_token(
        self, prompt: str, token: str, *, on_step=None, **kwargs: Any
    ) -> tuple[Path, list[tuple[str, Path]]]:
        """The same seed with and without the token: a labelled grid and the single images."""
        self._check_not_training()
        request = self.generate_request(prompt, **kwargs)
        grid, labelled = self._run_generator(lambda g: g.compare_token(request, token, on_step=on_step))
        paths = self._save_images([grid] + [im for _, im in labelled], "compare")
        return paths[0], [(label, p) for (label, _), p in zip(labelled, paths[1:], strict=True)]

    def _run_generator(self, fn):
        with self.shared.generation_turn(self):
            return _engine_call(fn, self.generator)

    def _save_images(self, images, prefix: str) -> list[Path]:
        out = self.data_dir / "outputs"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = []
        try:
            for i, image in enumerate(images):
                p = out / f"{prefix}-{stamp}-{time.monotonic_ns() % 10**6:06d}-{i}.png"
                paths.append(p)
                image.save(p)
        except OSError as e:
            for p in paths:
                p.unlink(missing_ok=True)
            if is_disk_full(e):
                raise UserError(DISK_FULL) from e
            raise
        return paths

    # -- gallery ---------------------------------------------------------------------------------

    def rename_adapter(self, name: str, new_name: str) -> dict[str, Any]:
        return adapter_dict(self._store_call(self.store.rename, name, safe_name(new_name, "new name")))

    def delete_adapter(self, name: str) -> None:
        self._store_call(self.store.delete, name)

    def restore_adapter(self, name: str) -> dict[str, Any]:
        return adapter_dict(self._store_call(self.store.restore, name))

    def deleted_adapters(self) -> list[dict[str, Any]]:
        return [adapter_dict(a) for a in self.store.trash()]

    def export_adapter(self, name: str) -> Path:
        return self._store_call(self.store.export_zip, name, self.data_dir / "outputs")

    def push_adapter(self, name: str, repo_id: str, token: str | None, private: bool = True) -> str:
        if not repo_id or "/" not in repo_id:
            raise UserError("Give the Hub repository as user/name, e.g. alice/sks-dog-lora.")
        return self._store_call(self.store.push_to_hub, name, repo_id, token=token or None, private=private)

    def _store_call(self, fn, *args: Any, **kwargs: Any):
        """A store operation; its errors (a failed Hub push's sentence too) become UserError."""
        try:
            return _engine_call(fn, *args, **kwargs)
        except (KeyError, FileNotFoundError) as e:
            raise UserError(f"There is no adapter called {args[0]!r} in the gallery.") from e
        except FileExistsError as e:
            raise UserError(_sentence(str(e))) from e


def _published_name(run_dir: Path) -> str | None:
    """The gallery name a run's adapter got when it last ended (stopped), if any."""
    import json

    try:
        return str(json.loads((run_dir / PUBLISHED).read_text())["adapter"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _folder_owner(folder: Path) -> str | None:
    try:
        return json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))["user"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _offered(base_model: str | None, default: str) -> bool:
    return (base_model or "").strip() in {value for _, value in base_model_choices(default)}


def refused_base_model(default: str) -> str:
    """The one answer to any base model a logged-in user may not name (no hint of what exists)."""
    offered = ", ".join(value for _, value in base_model_choices(default))
    return f"base_model: choose one of the base models this server offers ({offered})."


def _engine_call(fn, *args: Any, **kwargs: Any):
    """Call the engine; its one-sentence errors (TrainingError, ValueError) become UserError."""
    from trainer_core.events import TrainingError

    try:
        return fn(*args, **kwargs)
    except TrainingError as e:
        raise UserError(str(e)) from e
    except ValueError as e:
        raise UserError(_sentence(str(e))) from e


def _sentence(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else "Invalid input."
    if not re.match(r"[a-z_0-9]+: ", text):  # "learning_rate: ..." keeps the field's own spelling
        text = text[0].upper() + text[1:]
    return text + ("" if text.endswith((".", "!", "?")) else ".")


def report_dict(report) -> dict[str, Any]:
    return {
        "output_dir": str(report.output_dir),
        "accepted": [
            {
                "source": Path(a.source).name,
                "output": a.output,
                "caption": a.caption,
                "warnings": list(a.warnings),
                "crop_box": list(a.crop_box) if a.crop_box else None,
            }
            for a in report.accepted
        ],
        "rejected": [{"source": Path(r.source).name, "reason": r.reason} for r in report.rejected],
        # What the set was prepared as (a set chosen later, or after a reload, is trained as that).
        "subject": {
            "subject_type": report.options.subject_type,
            "token": report.options.token,
            "class_noun": report.options.class_noun,
        },
    }


def adapter_dict(info) -> dict[str, Any]:
    return {
        "name": info.name,
        "base_model": info.base_model,
        "architecture": info.architecture,
        "token": info.token,
        "instance_prompt": info.instance_prompt,
        "class_prompt": info.class_prompt,
        "rank": info.rank,
        "alpha": info.alpha,
        "steps": info.steps,
        "created": info.created,
        "final_loss": info.final_loss,
        "thumbnail": str(info.thumbnail) if info.thumbnail else None,
        "folder": str(info.path),
    }


class Studios:
    """One Studio per user under `<data>/users/<slug>-<hash>/` when login is required, else the
    single local Studio on `<data>/`. All share the GPU slot and the generator."""

    def __init__(self, data_dir: str | Path, *, policy=None, token_users=None, **studio_kwargs: Any) -> None:
        from .access import AccessPolicy

        self.data_dir = Path(data_dir).resolve()
        self.policy = policy or AccessPolicy(required=False, allowed=None, oauth=False)
        self.token_users = token_users
        self.shared = Shared()
        self._kwargs = studio_kwargs
        self._studios: dict[str | None, Studio] = {}
        self._lock = threading.Lock()
        # Restart recovery for every user now, not at their next visit: no run stays "running".
        if self.policy.required:
            self._recover_users()
        else:
            self.for_user(None)

    def user_dir(self, user: str) -> Path:
        return self.data_dir / "users" / user_folder_name(user)

    def for_user(self, user: str | None) -> Studio:
        with self._lock:
            if user not in self._studios:
                folder = self.data_dir if user is None else self._claim_folder(user)
                self._studios[user] = Studio(
                    folder, shared=self.shared, confined=user is not None, user=user, **self._kwargs
                )
            return self._studios[user]

    def _claim_folder(self, user: str) -> Path:
        """The user's folder: found, moved from its pre-hash name, or made; never another's."""
        if not isinstance(user, str) or not user or "\x00" in user:
            raise UserError("This account name cannot be used; log in with another account.")
        folder = self.user_dir(user)
        owner = _folder_owner(folder)
        if owner is not None and owner != user:  # a hash collision: refuse rather than share
            raise UserError("Your data folder is claimed by another account; ask the server's admin.")
        if not folder.exists():
            legacy = _legacy_folder_name(user)
            old = self.data_dir / "users" / legacy if legacy else None
            if (
                old is not None
                and old.is_dir()
                and _folder_owner(old) is None
                and self._legacy_owner(legacy) == user
            ):
                log.info("moving the data folder %s to %s", old.name, folder.name)
                os.replace(old, folder)
            folder.mkdir(parents=True, exist_ok=True)
        if owner is None:
            atomic_write_json(folder / OWNER_FILE, {"user": user})
        return folder

    def _legacy_owner(self, folder_name: str) -> str | None:
        """Who a folder named by the old slug belongs to: the account of exactly that name, else the
        one allowed account that mapped to it; None when that is not clear (the admin decides)."""
        allowed = self.policy.allowed
        if allowed is None or folder_name in allowed:
            return folder_name
        owners = [u for u in allowed if _legacy_folder_name(u) == folder_name]
        return owners[0] if len(owners) == 1 else None

    def _recover_users(self) -> None:
        users = self.data_dir / "users"
        for folder in sorted(p for p in users.iterdir() if p.is_dir()) if users.is_dir() else []:
            user = _folder_owner(folder) or self._legacy_owner(folder.name)
            studio = None
            if user is not None:
                try:
                    studio = self.for_user(user)  # moves a pre-hash folder into place
                except UserError:
                    studio = None
            orphan = studio is None or studio.data_dir != folder.resolve()
            if orphan and (folder / "runs").is_dir():
                log.warning("users/%s belongs to no known account; only its runs are recovered", folder.name)
                Studio(folder, shared=self.shared, confined=True, **self._kwargs)

    def get(self, request) -> Studio:
        """The Studio of the user behind a Gradio request; UserError when they may not use the app."""
        from .access import AccessDenied, request_user

        try:
            user = self.policy.check(request_user(request, self.token_users))
        except AccessDenied as e:
            raise UserError(str(e)) from e
        return self.for_user(user)

    @classmethod
    def wrap(cls, studio: Studio) -> Studios:
        """An app of one Studio (no login), e.g. one a script or a test built itself."""
        from .access import AccessPolicy

        obj = cls.__new__(cls)
        obj.data_dir = studio.data_dir
        obj.policy = AccessPolicy(required=False, allowed=None, oauth=False)
        obj.token_users = None
        obj.shared = studio.shared
        obj._kwargs = {"base_model": studio.base_model}
        obj._studios = {None: studio}
        obj._lock = threading.Lock()
        return obj

    # What the page shows before knowing the user (the same for everyone).
    @property
    def base_model(self) -> str:
        return self._kwargs.get("base_model", "tiny-sd15")

    def base_model_choices(self) -> list[tuple[str, str]]:
        return base_model_choices(self.base_model)

    def base_model_note(self, base_model: str) -> str:
        if self.policy.required and not _offered(base_model, self.base_model):
            return refused_base_model(self.base_model)
        return base_model_note(base_model)

    @property
    def defaults(self) -> Studios:
        return self

    @property
    def local(self) -> Studio:
        """The single Studio of an app without login (tests and scripts use it)."""
        return self.for_user(None)
