"""The prior-preservation DreamBooth LoRA loop (SD 1.5 and SDXL), on accelerate.

Read it top to bottom: `train()` opens the run, `_train` is its table of contents (resume check ->
load -> class images -> cache -> attach LoRA -> restore -> fit -> finish), and each stage is a named
function below it. `fit` runs the steps; `train_step` is one optimizer step and `compute_loss` the
DreamBooth loss (instance + prior_loss_weight x class), a pure function tested on its own.

SDXL adds a second text encoder, a pooled prompt embedding and per-image size conditioning
(`add_time_ids`), all cached with the rest. Pivotal tuning (pivotal.py) adds new tokens for the
trigger word before the cache; their embeddings train with the LoRA, so the text encoders run in
every step as with a text-encoder LoRA. Every random draw of a step (which photos, noise,
timesteps, latent sample) comes from a generator seeded by (seed, micro-step, process), so a run
stopped and resumed from a checkpoint takes exactly the steps an unbroken run takes.

The step never waits for the device: losses and the NaN flag stay on it and are read in one host
sync every `sync_interval` steps (every step on the CPU, where a sync is free) and always before a
checkpoint, a validation round, the end or a stop, so no NaN ever reaches a saved file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import adapters, checkpoints, evaluate, pivotal, runs, tracking
from .buckets import batches_per_epoch, make_buckets, nearest_bucket, plan_epoch
from .class_images import class_cache_dir, class_image_dtype, decode_latents, generate_class_images
from .components import (
    add_lora,
    architecture,
    assemble_pipeline,
    default_resolution,
    dora_magnitudes,
    load_components,
    load_vae,
    lora_parameters,
    resolve_base_model,
)
from .config import TrainConfig
from .data import (
    Example,
    crop_box_for,
    image_size,
    image_to_tensor,
    list_images,
    load_instance_examples,
    load_mask,
    load_rgb,
    mask_to_tensor,
    uncropped_sources,
)
from .events import (
    CheckpointSaved,
    Emit,
    Failed,
    Finished,
    Progress,
    SamplesSaved,
    ShouldStop,
    StageStarted,
    StepMetrics,
    StopRequested,
    TrainingError,
    never_stop,
    no_emit,
)
from .fileio import append_jsonl, atomic_write_json
from .optim import make_optimizer

log = logging.getLogger(__name__)

# Steps between host syncs on a GPU (losses and the NaN flag are read in one batch).
CUDA_SYNC_INTERVAL = 10


@dataclass
class TrainResult:
    status: str  # "finished" or "stopped"
    summary: dict[str, Any]
    adapter_dir: Path | None
    # The trained models (unwrapped, LoRA attached), for in-process callers and tests.
    unet: Any = field(default=None, repr=False)
    text_encoder: Any = field(default=None, repr=False)
    text_encoder_2: Any = field(default=None, repr=False)  # SDXL's second text encoder
    tokenizer: Any = field(default=None, repr=False)  # with pivotal tuning's new tokens
    tokenizer_2: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes (see README, "What a run writes")."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"


@dataclass
class Models:
    """The base model's parts (bare modules; SD 1.5 and SDXL alike) and the training noise schedule."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # a copy for training: a prediction_type override never reaches sampling
    parts: dict[str, Any]  # as loaded, for pipelines (class images, validation)
    text_encoder_2: Any = None  # SDXL
    tokenizer_2: Any = None

    @property
    def text_encoders(self) -> list:
        return [te for te in (self.text_encoder, self.text_encoder_2) if te is not None]

    @property
    def tokenizers(self) -> list:
        return [tok for tok in (self.tokenizer, self.tokenizer_2) if tok is not None]

    def lora_models(self, train_text_encoder: bool) -> dict[str, Any]:
        """`{component: model}` of the models that carry a trained LoRA."""
        out = {"unet": self.unet}
        if train_text_encoder:
            out.update(text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2)
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Trainer:
    """What the optimizer steps: the prepared (DDP-wrapped under several processes) trained models."""

    unet: Any
    text_encoders: list  # the trained text encoders, prepared; [] when they are frozen
    optimizer: Any
    lr_scheduler: Any
    params: list
    weight_dtype: torch.dtype

    @property
    def modules(self) -> list:
        return [self.unet, *self.text_encoders]


@dataclass
class TrainState:
    step: int = 0
    seconds_before: float = 0.0  # wall time of earlier segments (resume)
    started: float = field(default_factory=time.perf_counter)
    last: dict[str, float] = field(default_factory=dict)  # the last logged losses
    stopped: bool = False

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


@dataclass
class _Cache:
    """Everything the steps need, computed once before the first step."""

    instance_latent_dists: list[torch.Tensor]  # each (2, 4, h, w): mean and std, per flip variant
    class_latent_dists: list[torch.Tensor]
    instance_prompt_ids: list[int]  # index into prompts
    class_prompt_id: int | None
    prompts: list[str]
    prompt_embeds: torch.Tensor | None  # (num_prompts, 77, dim) when the text encoder is frozen
    prompt_input_ids: torch.Tensor  # (num_prompts, 77)
    scaling_factor: float  # the VAE's latent scale
    # SDXL only
    prompt_input_ids_2: torch.Tensor | None = None  # (num_prompts, 77), the second tokenizer's
    pooled_prompt_embeds: torch.Tensor | None = None  # (num_prompts, projection) when frozen
    instance_time_ids: list[torch.Tensor] | None = None  # each (flips, 6): size, crop, target
    class_time_ids: list[torch.Tensor] | None = None
    # masked_loss only: each photo's mask at the latent size, (flips, 1, h, w), ones without a mask file
    instance_masks: list[torch.Tensor] | None = None
    # bucketing only: each photo's bucket (w, h), and per bucket in use the class images' latent
    # distributions and (SDXL) size ids, fitted to that bucket
    instance_buckets: list[tuple[int, int]] | None = None
    class_by_bucket: dict[tuple[int, int], tuple[list, list]] | None = None
    dropout_prompt_id: int | None = None  # the empty caption, with caption_dropout


def write_status(path: Path, status: str, step: int, total: int, message: str = "", **extra: Any) -> None:
    value = {
        "status": status,
        "step": step,
        "total_steps": total,
        "message": message,
        "updated": time.time(),
        **extra,
    }
    try:
        atomic_write_json(path, value)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # A full disk has no room for the temporary file of an atomic write; overwriting the old
        # status in place reuses its space, so the run is not left reading "running" forever.
        path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def train(config: TrainConfig, emit: Emit = no_emit, should_stop: ShouldStop = never_stop) -> TrainResult:
    """Train a DreamBooth LoRA as `config` says; report through `emit`; stop when `should_stop()`.

    Raises TrainingError (one sentence for the user) on bad input, NaN loss or unusable settings;
    the run folder, earlier checkpoints and photos are left as they were.
    """
    from accelerate import Accelerator

    paths = RunPaths(Path(config.output_dir))
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("fp16 mixed precision needs a CUDA GPU; use bf16 or no mixed precision here.")
    if config.compile_unet and not torch.cuda.is_available():
        raise TrainingError("Compiling the UNet needs a CUDA GPU; turn compile_unet off on this machine.")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=tracking.resolve_report_to(config.report_to) or None,
        project_config=tracking.project_configuration(paths.root),
    )
    main = accelerator.is_main_process
    if not main:
        emit = no_emit
    try:
        if main:
            paths.root.mkdir(parents=True, exist_ok=True)
            config.save(paths.config)
            runs.mark_run_started(paths.root)
            write_status(paths.status, "running", 0, config.max_train_steps, "starting")
        tracking.start_trackers(accelerator, config)
        return _train(config, accelerator, paths, emit, should_stop)
    except StopRequested as e:
        if main:
            # Only raised before the first step (class images); later stops save and return.
            write_status(paths.status, "stopped", 0, config.max_train_steps, str(e))
        emit(Finished("stopped", {"steps": 0, "message": str(e)}))
        return TrainResult("stopped", {"steps": 0, "message": str(e), "adapter_dir": None}, None)
    except TrainingError as e:
        if main:
            with contextlib.suppress(OSError):  # the error itself may be a full disk
                write_status(paths.status, "failed", e.step or 0, config.max_train_steps, str(e))
        emit(Failed(str(e), e.step))
        raise
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        msg = f"The disk is full ({e.strerror}); free disk space and resume from the last checkpoint."
        if main:
            with contextlib.suppress(OSError):
                write_status(paths.status, "failed", 0, config.max_train_steps, msg)
        emit(Failed(msg))
        raise TrainingError(msg) from e
    except torch.cuda.OutOfMemoryError as e:
        msg = (
            "The GPU ran out of memory; lower the resolution or batch size, or turn on gradient "
            "checkpointing and 8-bit Adam, then resume from the last checkpoint."
        )
        if main:
            write_status(paths.status, "failed", 0, config.max_train_steps, msg)
        emit(Failed(msg))
        raise TrainingError(msg) from e
    finally:
        accelerator.end_training()
        _release_accelerator_state()


def _release_accelerator_state() -> None:
    """Forget this run's mixed precision and accumulation settings.

    accelerate keeps them in process-wide singletons, so without this a second run in the same
    process (the app's job runner, the tests) with another precision fails. The process group
    (PartialState) is kept: under `accelerate launch` it belongs to the launcher.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _train(config: TrainConfig, accelerator, paths: RunPaths, emit: Emit, should_stop: ShouldStop):
    # Resume compatibility is checked (and the checkpoint read) before anything slow happens.
    resume = None
    if config.resume_from_checkpoint:
        resume = checkpoints.open_for_resume(
            paths.checkpoints, config.resume_from_checkpoint, checkpoints.resume_identity(config)
        )
    models, source = load_models(config, accelerator, emit)
    resolution = config.resolution or default_resolution(models.unet, models.vae)
    examples = load_instance_examples(config.instance_dir, config.instance_prompt)
    class_paths: list[Path] = []
    if config.with_prior_preservation:
        class_paths = prepare_class_images(config, models, source, resolution, accelerator, emit, should_stop)
    if config.pivotal_tuning:  # after the class images: the base model makes those, untouched
        pivotal.add_tokens(
            models.tokenizers,
            models.text_encoders,
            config.pivotal_tokens,
            config.pivotal_init_word,
            config.seed,
        )
    cache = _build_cache(
        config,
        examples,
        class_paths,
        models.tokenizers,
        models.text_encoders,
        models.vae,
        resolution,
        accelerator.device,
        emit,
    )
    offload_frozen(config, models)
    trainer = attach_lora(config, models, accelerator)
    state = restore(config, accelerator, models, trainer, resume, emit)
    fit(config, accelerator, paths, models, trainer, cache, state, resolution, emit, should_stop)
    return finish(config, accelerator, paths, models, state, resolution, emit)


# ---------------------------------------------------------------------------------------------
# Stages before the first step
# ---------------------------------------------------------------------------------------------


def load_models(config: TrainConfig, accelerator, emit: Emit):
    """The base model's parts, all frozen, and where they came from."""
    from diffusers import DDPMScheduler

    emit(StageStarted("load", f"loading {config.base_model}"))
    # A built-in tiny model is built on first use; do that on the main process alone: under a
    # process group transformers writes weights only from rank 0, so another rank would save a
    # model folder without its text-encoder weights.
    with accelerator.main_process_first():
        resolve_base_model(config.base_model)
    parts, source = load_components(config.base_model, single_file_config=config.single_file_config)
    if config.pretrained_vae:
        parts["vae"] = load_vae(config.pretrained_vae)
    override = {"prediction_type": config.prediction_type} if config.prediction_type else {}
    models = Models(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        noise_scheduler=DDPMScheduler.from_config(parts["scheduler"].config, **override),
        parts=parts,
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
    )
    for m in (*models.text_encoders, models.vae, models.unet):
        m.requires_grad_(False)
        m.eval()
    return models, source


def prepare_class_images(
    config, models: Models, source, resolution, accelerator, emit, should_stop
) -> list[Path]:
    """Class images made by the base model (before any LoRA is attached), in half precision on a
    GPU; from `class_data_dir` or the shared cache, whose key names everything that shapes them."""
    device = accelerator.device
    dtype = class_image_dtype(device, accelerator.mixed_precision)
    if config.class_data_dir:
        class_dir = Path(config.class_data_dir)
    else:
        class_dir = class_cache_dir(
            f"{source.kind}:{source.location}",
            config.class_prompt,
            resolution,
            vae=config.pretrained_vae,
            steps=config.class_generation_steps,
            dtype=str(dtype).removeprefix("torch."),
        )
    if accelerator.is_main_process:

        def factory():
            pipe = assemble_pipeline(models.parts).to(device)
            # The VAE stays fp32 (SDXL's overflows in half); decode_latents decodes in fp32.
            for m in (models.unet, *models.text_encoders):
                m.to(dtype=dtype)
            return pipe

        try:
            generate_class_images(
                factory,
                config.class_prompt,
                class_dir,
                config.num_class_images,
                resolution=resolution,
                seed=config.seed,
                num_inference_steps=config.class_generation_steps,
                batch_size=config.class_generation_batch_size,
                emit=emit,
                should_stop=should_stop,
            )
        finally:
            for m in (models.unet, *models.text_encoders):
                m.to(dtype=torch.float32)
    accelerator.wait_for_everyone()
    found = list_images(class_dir)[: config.num_class_images]
    if len(found) < config.num_class_images:
        raise TrainingError(
            f"Only {len(found)} class images in {class_dir}, {config.num_class_images} needed."
        )
    return found


def offload_frozen(config: TrainConfig, models: Models) -> None:
    """The VAE (and frozen text encoders) are done once the cache is built: off the device."""
    models.vae.to("cpu")
    if not config.trains_text_encoder:
        for te in models.text_encoders:
            te.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attach_lora(config: TrainConfig, models: Models, accelerator) -> Trainer:
    """LoRA on the UNet attention (and optionally the text encoders), LoRA params in fp32 over
    frozen weights in the training dtype; the optimizer, the lr schedule, accelerate's prepare."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # peft draws lora_A from torch's global RNG: seed it, or one seed gives different runs.
    set_seed(config.seed)
    add_lora(
        models.unet,
        models.text_encoder,
        rank=config.rank,
        alpha=config.lora_alpha,
        train_text_encoder=config.train_text_encoder,
        text_encoder_2=models.text_encoder_2,
        use_dora=config.use_dora,
    )
    # Pivotal tuning trains rows of the text encoders' embedding tables (with or without their LoRA).
    token_rows = pivotal.train_rows(models.text_encoders) if config.pivotal_tuning else []
    trained = [models.unet, *(models.text_encoders if config.trains_text_encoder else [])]
    # Frozen weights in the training dtype; casting is skipped in fp32 (diffusers warns on it).
    for m in trained:
        m.to(device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    cast_training_params(trained, dtype=torch.float32)
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for te in trained[1:]:
            te.gradient_checkpointing_enable()
    if config.enable_xformers:
        _enable_xformers(models.unet)
    if config.compile_unet:
        # In place, block by block (diffusers' _repeated_blocks): one compiled graph serves every
        # transformer block, the module tree and state-dict names stay as they are for saving.
        models.unet.compile_repeated_blocks()

    params = lora_parameters(*trained)
    rows = {id(p) for p in token_rows}
    optimizer = make_optimizer(
        config,
        lora_parameters(models.unet),
        [p for p in lora_parameters(*trained[1:]) if id(p) not in rows],
        no_decay=dora_magnitudes(*trained),
        token_embeddings=token_rows,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    # The lr scheduler is stepped by hand once per optimizer step, so it is not prepared. The
    # prepared (DDP-wrapped) models go to accumulate(): it skips their gradient all-reduce between
    # micro-steps only when given these, not the bare modules.
    prepared = accelerator.prepare(*trained, optimizer)
    *modules, optimizer = prepared
    return Trainer(modules[0], modules[1:], optimizer, lr_scheduler, params, weight_dtype)


# The parameter-group entries a run's config sets; on resume this run's values win.
_GROUP_SETTINGS = ("name", "lr", "initial_lr", "weight_decay", "betas", "eps", "d_coef")


def restore(
    config: TrainConfig, accelerator, models: Models, trainer: Trainer, ckpt, emit: Emit
) -> TrainState:
    """A fresh state, or the checkpoint's LoRA, optimizer, scheduler and scaler state.

    The saved optimizer and scheduler carry the old run's learning rate and weight decay; this run's
    settings win (so "lower the learning rate and resume" does what it says), and the lr column of
    metrics.jsonl records the rate each step used.
    """
    if ckpt is None:
        return TrainState()
    checkpoints.load_lora_state(models.lora_models(config.train_text_encoder), ckpt.lora)
    if config.pivotal_tuning or ckpt.embeddings:
        pivotal.load_rows_state(models.text_encoders, ckpt.embeddings or {})
    optimizer, lr_scheduler = trainer.optimizer, trainer.lr_scheduler
    # Only the settings: the rest of a group is the optimizer's own running state (Prodigy keeps its
    # step-size estimate d and step count k there), which must come from the checkpoint.
    fresh = [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt.optimizer)
    except (ValueError, KeyError) as e:  # other parameter groups (made by an older version)
        raise TrainingError(
            f"Cannot resume from {ckpt.path.name}: its optimizer state does not fit this run's "
            "parameter groups (it was made by an older version or other settings); start a new run."
        ) from e
    lr_scheduler.load_state_dict(ckpt.scheduler)
    for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
        group.update(hyper)
    lr_scheduler.base_lrs = [hyper["initial_lr"] for hyper in fresh]
    for group, base, factor in zip(
        optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if ckpt.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt.scaler)
    state = TrainState(step=ckpt.step, seconds_before=float(ckpt.state.get("seconds", 0.0)))
    note = ""
    old_lr = ckpt.state.get("learning_rate")
    if old_lr is not None and old_lr != config.learning_rate:
        note = f"; learning rate {old_lr:g} -> {config.learning_rate:g}"
    emit(StageStarted("train", f"resumed from {ckpt.path.name} at step {state.step}{note}"))
    return state


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------


def sync_interval(config: TrainConfig, device) -> int:
    """Steps between host syncs: every step on the CPU (free there), else a batch of steps."""
    return 1 if torch.device(device).type == "cpu" else max(config.logging_steps, CUDA_SYNC_INTERVAL)


def fit(
    config,
    accelerator,
    paths: RunPaths,
    models: Models,
    trainer: Trainer,
    cache,
    state: TrainState,
    resolution: int,
    emit: Emit,
    should_stop: ShouldStop,
) -> None:
    """Optimizer steps until max_train_steps or a stop; checkpoints and validation rounds on the way."""
    main = accelerator.is_main_process
    total = config.max_train_steps
    emit(StageStarted("train", f"training {total} steps", total=total))
    every = sync_interval(config, accelerator.device)
    pending: list[tuple[int, float, float, torch.Tensor]] = []  # (step, lr, seconds, device losses)
    state.started = time.perf_counter()
    for m in trainer.modules:
        m.train()
    if main:
        write_status(paths.status, "running", state.step, total, "training")
    status_written = time.monotonic()
    stop_asked = False
    while state.step < total:
        lr_now = trainer.lr_scheduler.get_last_lr()[0]
        losses = train_step(config, accelerator, models, trainer, cache, state.step)
        state.step += 1
        pending.append((state.step, lr_now, round(state.seconds, 3), losses))
        checkpoint_now = checkpoint_due(config, state.step)
        validate_now = validation_due(config, state.step)
        stop_asked = stop_asked or should_stop()
        sync_now = state.step % every == 0 or checkpoint_now or validate_now or state.step == total
        if accelerator.num_processes == 1:
            sync_now = sync_now or stop_asked
        if not sync_now:
            continue
        log_steps(config, accelerator, paths, state, pending, emit)
        pending.clear()
        stop_now = _agree_on_stop(accelerator, stop_asked)
        if main and (stop_now or time.monotonic() - status_written > 2.0):
            write_status(paths.status, "running", state.step, total, "training")
            status_written = time.monotonic()
        # A stop, and the end, always leave a resumable checkpoint (so a run can be continued).
        if stop_now or checkpoint_now or state.step == total:
            save_checkpoint(config, accelerator, paths, models, trainer, state, emit)
        if validate_now and state.step < total:
            validate(config, accelerator, paths, models, state.step, resolution, emit)
        if stop_now:
            state.stopped = True
            return


def checkpoint_due(config: TrainConfig, step: int) -> bool:
    return bool(config.checkpointing_steps) and step % config.checkpointing_steps == 0


def validation_due(config: TrainConfig, step: int) -> bool:
    return bool(config.validation_steps) and step % config.validation_steps == 0


def train_step(config, accelerator, models: Models, trainer: Trainer, cache, step: int) -> torch.Tensor:
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    Returns (loss, instance_loss, prior_loss, finite) averaged over the micro-batches and processes,
    still on the device (no host sync here).
    """
    world, rank_ = accelerator.num_processes, accelerator.process_index
    accum, batch = config.gradient_accumulation_steps, config.train_batch_size
    device, noise_scheduler = accelerator.device, models.noise_scheduler
    total = torch.zeros(4, device=device)
    for micro in range(accum):
        # One generator per (micro-step, process): resumable and different on each GPU.
        micro_index = step * accum + micro
        gen = torch.Generator().manual_seed(_mix(config.seed, micro_index, rank_))
        slots = [(micro_index * world + rank_) * batch + j for j in range(batch)]
        with accelerator.accumulate(*trainer.modules):
            latents, prompt_embeds, added_cond, mask = _make_batch(
                cache,
                slots,
                config,
                gen,
                device,
                trainer.weight_dtype,
                trainer.text_encoders if config.trains_text_encoder else None,
            )
            # latents: (2B or B, 4, h, w); prompt_embeds: (2B or B, 77, dim); added_cond: SDXL's
            # pooled prompt (2B or B, projection) and size ids (2B or B, 6), None for SD 1.5;
            # mask: (B, 1, h, w) for the instance half with masked_loss, else None
            noise = torch.randn(latents.shape, generator=gen).to(device)
            if config.noise_offset:
                noise += config.noise_offset * torch.randn(
                    (latents.shape[0], latents.shape[1], 1, 1), generator=gen
                ).to(device)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen
            ).to(device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
            target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
            noise_pred = trainer.unet(
                noisy_latents.to(trainer.weight_dtype), timesteps, prompt_embeds, added_cond_kwargs=added_cond
            ).sample
            weights = None
            if config.snr_gamma is not None:
                weights = snr_weights(noise_scheduler, timesteps, config.snr_gamma)
            loss, instance_loss, prior_loss = compute_loss(
                noise_pred,
                target,
                instance_count=batch if config.with_prior_preservation else latents.shape[0],
                prior_loss_weight=config.prior_loss_weight if config.with_prior_preservation else 0.0,
                weights=weights,
                mask=mask,
            )
            # A NaN/inf loss is flagged on the device; the run stops at the next host sync, which
            # comes before any checkpoint or adapter is written.
            finite = torch.isfinite(loss.detach())
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainer.params, config.max_grad_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        stacked = torch.stack([loss.detach(), instance_loss.detach(), prior_loss.detach(), finite.float()])
        total += stacked.float() / accum
    step_lr_scheduler(accelerator, trainer.lr_scheduler)
    # One all-reduce, on the device: "finite" is the fraction of finite micro-losses, 1.0 when all were.
    return accelerator.reduce(total, "mean")


def compute_loss(
    noise_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    instance_count: int,
    prior_loss_weight: float,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DreamBooth loss: (total, instance, prior).

    The batch is laid out instance samples first, then class samples (`_make_batch`'s collate
    order): rows [:instance_count] are the instance half, the rest the class half (none without
    prior preservation). Each sample's MSE over (C, H, W) is weighted by `weights` (min-SNR) when
    given; each half is averaged; total = instance + prior_loss_weight * prior.

    `mask` (instance_count, 1, H, W) in [0, 1] weights each instance sample's per-pixel error (the
    class half is never masked) and is normalised by its own sum, so a small subject weighs as much
    as a large one; a masked-out cell gets exactly zero gradient, an all-zero mask zero loss.
    """
    error = F.mse_loss(noise_pred.float(), target.float(), reduction="none")  # (N, C, H, W)
    per_sample = error.mean(dim=(1, 2, 3))
    if mask is not None:
        weight = mask.float().expand(-1, error.shape[1], -1, -1)  # (instance_count, C, H, W)
        masked = (error[:instance_count] * weight).sum(dim=(1, 2, 3))
        masked = masked / weight.sum(dim=(1, 2, 3)).clamp_min(1e-6)
        per_sample = torch.cat([masked, per_sample[instance_count:]])
    if weights is not None:
        per_sample = per_sample * weights
    instance_loss = per_sample[:instance_count].mean()
    if per_sample.shape[0] > instance_count:
        prior_loss = per_sample[instance_count:].mean()
    else:
        prior_loss = torch.zeros((), device=per_sample.device)
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as diffusers' training scripts compute them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def step_lr_scheduler(accelerator, lr_scheduler) -> None:
    """Advance the lr schedule, unless fp16's grad scaler skipped the optimizer step (inf/NaN
    gradients): then no update happened and the schedule must not move either."""
    if not accelerator.optimizer_step_was_skipped:
        lr_scheduler.step()


def log_steps(config, accelerator, paths: RunPaths, state: TrainState, pending: list, emit: Emit) -> None:
    """The host sync: read the pending steps' losses, stop on a non-finite one, log the rest."""
    if not pending:
        return
    values = torch.stack([losses for *_, losses in pending]).cpu().tolist()
    for (step, lr, seconds, _), (loss, instance_loss, prior_loss, finite) in zip(
        pending, values, strict=True
    ):
        if finite < 1.0:
            raise TrainingError(
                f"The loss became NaN or infinite at step {step}; lower the learning rate "
                "(or use bf16 instead of fp16) and resume from the last checkpoint.",
                step=step,
            )
        state.last = {"loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss}
        if step % config.logging_steps and step != config.max_train_steps:
            continue
        prior = prior_loss if config.with_prior_preservation else None
        if accelerator.is_main_process:
            row = {
                "step": step,
                "loss": loss,
                "instance_loss": instance_loss,
                "prior_loss": prior,
                "lr": lr,
                "seconds": seconds,
            }
            append_jsonl(paths.metrics, row)
            tracking.log_step(accelerator, row)
        emit(StepMetrics(step, config.max_train_steps, loss, instance_loss, prior, lr, seconds))


# ---------------------------------------------------------------------------------------------
# Checkpoints, validation, the end
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    config, accelerator, paths: RunPaths, models: Models, trainer: Trainer, state: TrainState, emit: Emit
) -> None:
    """A resumable checkpoint (main process; the others wait); a full disk is one sentence."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        step = state.step
        emit(StageStarted("save", f"saving checkpoint {step}"))
        scaler = accelerator.scaler
        try:
            path = checkpoints.save_checkpoint(
                paths.checkpoints,
                step,
                lora_state=checkpoints.lora_state(models.lora_models(config.train_text_encoder)),
                embeddings_state=pivotal.rows_state(models.text_encoders) if config.pivotal_tuning else None,
                optimizer_state=trainer.optimizer.state_dict(),
                scheduler_state=trainer.lr_scheduler.state_dict(),
                scaler_state=scaler.state_dict() if scaler is not None else None,
                state={
                    **checkpoints.resume_identity(config),
                    "architecture": architecture(models.parts),
                    "learning_rate": config.learning_rate,
                    "seconds": state.seconds,
                    "max_train_steps": config.max_train_steps,
                    **_pivotal_state(config),
                },
                total_limit=config.checkpoints_total_limit,
            )
        except OSError as e:
            raise TrainingError(
                f"Could not save checkpoint {step} ({e.strerror or e}); free disk space and resume: "
                "the previous checkpoint is kept.",
                step=step,
            ) from e
        emit(CheckpointSaved(step, str(path)))
    accelerator.wait_for_everyone()


@torch.no_grad()
def validate(config, accelerator, paths: RunPaths, models: Models, step: int, resolution: int, emit: Emit):
    """Validation images with and without the token, same seeds at every step so they compare."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process or config.num_validation_images == 0:
        return None
    from diffusers import DPMSolverMultistepScheduler

    emit(StageStarted("validate", f"validation images at step {step}"))
    device = accelerator.device
    te_devices = [next(te.parameters()).device for te in models.text_encoders]
    models.vae.to(device)
    models.unet.eval()
    for te in models.text_encoders:
        te.to(device)
        te.eval()
    parts = {**models.parts, "unet": models.unet, "vae": models.vae}
    # Sampling uses the base model's own schedule config, never the training copy's override.
    scheduler = DPMSolverMultistepScheduler.from_config(models.parts["scheduler"].config)
    pipe = assemble_pipeline(parts, scheduler=scheduler)
    out_dir = paths.samples / f"step-{step:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt = config.effective_validation_prompt
    variants = [("with", config.with_pivotal_tokens(prompt))]
    plain = config.prompt_without_token(prompt)
    if plain:
        variants.append(("without", plain))
    saved, images = [], {}
    # Under autocast the VAE would decode in half precision, where SDXL's overflows (black or NaN
    # images): the pipeline stops at latents and the fp32 VAE decodes them outside autocast.
    half = accelerator.mixed_precision != "no"
    for label, text in variants:
        for i in range(config.num_validation_images):
            with accelerator.autocast() if half else contextlib.nullcontext():
                image = pipe(
                    text,
                    num_inference_steps=config.validation_inference_steps,
                    height=resolution,
                    width=resolution,
                    generator=torch.Generator().manual_seed(config.seed + i),
                    output_type="latent" if half else "pil",
                ).images[0]
            if half:
                image = decode_latents(pipe, image[None])[0]
            target = out_dir / f"{label}-token-{i}.png"
            image.save(target)
            saved.append(str(target))
            images.setdefault(f"{label}_token", []).append(image)
    # Scores of this round (off unless eval_models finds its models); own generators, forked RNG.
    scores = evaluate.score_round(
        config,
        step,
        pipe,
        paths.root,
        resolution=resolution,
        emit=emit,
        autocast=accelerator.autocast if half else None,
    )
    tracking.log_scores(accelerator, scores)
    models.vae.to("cpu")
    models.unet.train()
    for te, te_device in zip(models.text_encoders, te_devices, strict=True):
        te.to(te_device)
        if config.trains_text_encoder:
            te.train()
    tracking.log_samples(accelerator, step, images)
    emit(SamplesSaved(step, saved))
    return out_dir


def finish(
    config, accelerator, paths: RunPaths, models: Models, state: TrainState, resolution: int, emit: Emit
) -> TrainResult:
    """Final samples, the adapter folder, the run summary and status."""
    main = accelerator.is_main_process
    status = "stopped" if state.stopped else "finished"
    seconds = state.seconds
    adapter_dir = None
    if state.step > 0:
        sample_dir = validate(config, accelerator, paths, models, state.step, resolution, emit)
        if main:
            emit(StageStarted("save", "saving the adapter"))
            adapter_dir = _save_adapter(config, paths, models, state, resolution, sample_dir)
    accelerator.wait_for_everyone()
    final = {
        "final_loss": state.last.get("loss"),
        "final_instance_loss": state.last.get("instance_loss"),
        "final_prior_loss": state.last.get("prior_loss") if config.with_prior_preservation else None,
    }
    summary = {
        "status": status,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "run_dir": str(paths.root),
        "steps": state.step,
        **final,
        "seconds": round(seconds, 3),
        "peak_rss_mb": _peak_rss_mb(),
    }
    if torch.cuda.is_available():
        summary["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if main:
        runs.finish_run(paths.root, summary, config.to_dict())
        message = "stopped by request" if state.stopped else "done"
        write_status(paths.status, status, state.step, config.max_train_steps, message, summary=summary)
    emit(Finished(status, summary))
    return TrainResult(
        status,
        summary,
        adapter_dir,
        unet=models.unet,
        text_encoder=models.text_encoder,
        text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer,
        tokenizer_2=models.tokenizer_2,
    )


def _pivotal_state(config) -> dict[str, Any]:
    """What a checkpoint records of pivotal tuning (for loading it as an adapter): the tokens and
    the trigger word they stand for."""
    if not config.pivotal_tuning:
        return {}
    return {"pivotal": {"tokens": list(config.pivotal_tokens), "trigger": config.identifier_token}}


def _save_adapter(config, paths: RunPaths, models: Models, state: TrainState, resolution, sample_dir) -> Path:
    name = config.adapter_name or adapters.default_adapter_name(config.instance_prompt)
    lora = models.lora_models(config.train_text_encoder)
    try:
        return adapters.save_adapter(
            paths.adapter,
            unet=models.unet,
            text_encoder=lora.get("text_encoder"),
            text_encoder_2=lora.get("text_encoder_2"),
            name=name,
            metadata={
                "base_model": config.base_model,
                "instance_prompt": config.instance_prompt,
                "token": config.identifier_token,
                "class_prompt": config.class_prompt,
                "with_prior_preservation": config.with_prior_preservation,
                "steps": state.step,
                "resolution": resolution,
                "final_loss": state.last.get("loss"),
                "final_instance_loss": state.last.get("instance_loss"),
                "final_prior_loss": state.last.get("prior_loss") if config.with_prior_preservation else None,
            },
            config_json=config.to_json(),
            metrics_file=paths.metrics,
            samples_dir=sample_dir,
            token_embeddings=pivotal.rows_state(models.text_encoders) if config.pivotal_tuning else None,
            pivotal_tokens=config.pivotal_tokens,
        )
    except OSError as e:
        raise TrainingError(
            f"Could not save the adapter ({e.strerror or e}); free disk space and resume: the last "
            "checkpoint is kept.",
            step=state.step,
        ) from e


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------


def _agree_on_stop(accelerator, local: bool) -> bool:
    """One stop decision for all processes: if any was asked to stop, all stop at this step.

    Otherwise a process that stops waits at the checkpoint barrier while the others start the
    next step, and the run hangs.
    """
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item() > 0)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, KiB on Linux


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (stable across runs and processes)."""
    h = 0x9E3779B97F4A7C15
    for n in numbers:
        h = ((h ^ (n & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@torch.no_grad()
def _build_cache(
    config,
    examples: list[Example],
    class_paths: list[Path],
    tokenizers: list,
    text_encoders: list,
    vae,
    resolution: int,
    device,
    emit,
) -> _Cache:
    """VAE latent distributions of every image (and flip), the prompts' token ids and, with frozen
    text encoders, their embeddings; for SDXL also each image's size conditioning.

    With bucketing each photo (its uncropped original when the folder was prepared) is encoded at
    its own bucket, and the class images once per bucket in use, so a batch pairs like with like.
    """
    square = (resolution, resolution)
    instance_paths = [e.path for e in examples]
    if config.bucketing:
        instance_paths = uncropped_sources(instance_paths)
        instance_targets = [nearest_bucket(image_size(p), make_buckets(resolution)) for p in instance_paths]
        class_targets = sorted(set(instance_targets)) if class_paths else []
    else:
        instance_targets, class_targets = [square] * len(examples), [square] if class_paths else []
    total = len(examples) + len(class_paths) * len(class_targets)
    emit(StageStarted("cache", "encoding photos and prompts once", total=total))
    vae.to(device)
    sdxl = len(text_encoders) > 1
    encode = functools.partial(_encode_images, config, vae, device, sdxl, emit=emit, total=total)

    # The class half is never masked (it keeps the model's idea of the whole class image).
    instance, instance_time_ids, instance_masks = encode(
        instance_paths, instance_targets, 0, masked=config.masked_loss
    )
    class_by_size = {}
    for k, target in enumerate(class_targets):
        dists, time_ids, _ = encode(
            class_paths, [target] * len(class_paths), len(examples) + k * len(class_paths)
        )
        class_by_size[target] = (dists, time_ids)
    klass, class_time_ids = class_by_size.get(square, ([], []))
    # With pivotal tuning the photos' prompts name the subject by its new tokens ("<s0><s1>").
    instance_prompts = [config.with_pivotal_tokens(e.prompt) for e in examples]
    prompts = sorted(
        set(instance_prompts)
        | ({config.class_prompt} if class_paths else set())
        | ({""} if config.caption_dropout > 0 else set())
    )
    input_ids = [
        tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tok in tokenizers
    ]
    embeds = pooled = None
    if not config.trains_text_encoder:
        for te in text_encoders:
            te.to(device)
        embeds, pooled = encode_prompts(text_encoders, [ids.to(device) for ids in input_ids])
        embeds = embeds.float().cpu()
        pooled = pooled.float().cpu() if pooled is not None else None
    return _Cache(
        instance_latent_dists=instance,
        class_latent_dists=klass,
        instance_prompt_ids=[prompts.index(p) for p in instance_prompts],
        class_prompt_id=prompts.index(config.class_prompt) if class_paths else None,
        prompts=prompts,
        prompt_embeds=embeds,
        prompt_input_ids=input_ids[0],
        scaling_factor=float(vae.config.scaling_factor),
        prompt_input_ids_2=input_ids[1] if sdxl else None,
        pooled_prompt_embeds=pooled,
        instance_time_ids=instance_time_ids if sdxl else None,
        class_time_ids=class_time_ids if sdxl else None,
        instance_masks=instance_masks if config.masked_loss else None,
        instance_buckets=instance_targets if config.bucketing else None,
        class_by_bucket=class_by_size if config.bucketing else None,
        dropout_prompt_id=prompts.index("") if config.caption_dropout > 0 else None,
    )


def _encode_images(
    config, vae, device, sdxl: bool, paths, targets, done_before: int, *, masked=False, emit, total
):
    """Latent distributions (flips, 2, 4, h, w) of each image fitted to its target (w, h); with
    `masked` its mask at the latent size (flips, 1, h, w); for SDXL its size ids (flips, 6)."""
    vae_dtype = next(vae.parameters()).dtype
    flips = (False, True) if config.random_flip else (False,)
    dists, time_ids, masks = [], [], []
    for i, (p, target) in enumerate(zip(paths, targets, strict=True)):
        image = load_rgb(p)
        pixels = torch.stack([image_to_tensor(image, target, flip=f) for f in flips])
        dist = vae.encode(pixels.to(device, dtype=vae_dtype)).latent_dist
        latent_params = torch.stack([dist.mean, dist.std], dim=1).float().cpu()  # (flips, 2, 4, h, w)
        if not torch.isfinite(latent_params).all():
            fix = (
                "use --pretrained-vae with an fp16-fix VAE or keep the VAE in fp32"
                if vae_dtype != torch.float32
                else "re-export the image, or try another VAE with --pretrained-vae"
            )
            raise TrainingError(f"The VAE produced NaN or infinite latents for {p.name}; {fix}.")
        dists.append(latent_params)
        if masked:
            mask, latent_hw = load_mask(p, image.size), latent_params.shape[-2:]
            masks.append(
                torch.stack([mask_to_tensor(mask, image.size, target, latent_hw, flip=f) for f in flips])
            )
            if not masks[-1].any():
                log.warning("the mask of %s is black where the photo is trained: it teaches nothing", p.name)
        if sdxl:
            time_ids.append(torch.tensor([sdxl_time_ids(image.size, target, f) for f in flips]))
        emit(Progress("cache", done_before + i + 1, total))
    return dists, time_ids, masks


def encode_prompts(text_encoders: list, input_ids: list[torch.Tensor]):
    """Prompt embeddings as the pipelines compute them, so training and sampling condition alike.

    SD 1.5: the text encoder's last hidden state, (n, 77, dim), and no pooled embedding.
    SDXL: the penultimate hidden states of both encoders side by side, (n, 77, dim1 + dim2), and
    the second encoder's projected pooled embedding, (n, projection), as
    StableDiffusionXLPipeline.encode_prompt does.
    """
    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[0])[0], None
    hidden = []
    for te, ids in zip(text_encoders, input_ids, strict=True):
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds


def sdxl_time_ids(size: tuple[int, int], resolution: int | tuple[int, int], flip: bool) -> list[int]:
    """SDXL's size conditioning for one training image: original (height, width), the crop's
    top-left corner in the resized image, and the target (height, width).

    The crop is the one `data.image_to_tensor` takes (resized to cover the target, a square side
    or a (width, height) bucket, centred crop); a flipped image's crop is measured from the
    mirrored side.
    """
    w, h = size
    tw, th = (resolution, resolution) if isinstance(resolution, int) else resolution
    (new_w, _), left, top = crop_box_for(size, (tw, th))
    if flip:
        left = new_w - tw - left
    return [h, w, top, left, th, tw]


def _pick(n: int, slot: int, seed: int, salt: int) -> tuple[int, bool]:
    """Item for a sample slot: a fresh shuffled order each epoch (seeded), plus a flip coin."""
    epoch, pos = divmod(slot, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, salt, epoch)))
    flip = bool(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(_mix(seed, salt, slot))))
    return int(order[pos]), flip


def _bucketed_batch(item_buckets: list, slots: list[int], seed: int) -> tuple[int, ...]:
    """The photos of the batch whose slots are `slots` (consecutive, one batch): one bucket's."""
    batch_size = len(slots)
    number = slots[0] // batch_size
    epoch, position = divmod(number, batches_per_epoch(tuple(item_buckets), batch_size))
    return plan_epoch(tuple(item_buckets), batch_size, _mix(seed, 4, epoch))[position]


def caption_dropped(slot: int, seed: int, probability: float) -> bool:
    """Whether the instance sample in this slot trains with the empty caption (seeded coin)."""
    if probability <= 0:
        return False
    coin = torch.rand(1, generator=torch.Generator().manual_seed(_mix(seed, 3, slot)))
    return bool(coin.item() < probability)


def _make_batch(cache: _Cache, slots: list[int], config, gen, device, weight_dtype, text_encoders):
    """Latents, prompt embeddings and (SDXL) added conditioning for one micro-batch.

    `text_encoders` is None when they are frozen (cached embeddings are used), else the trained ones.
    """
    latents, prompt_ids, time_ids, masks = [], [], [], []
    sources = [(cache.instance_latent_dists, cache.instance_prompt_ids, cache.instance_time_ids, 1)]
    class_dists, class_sizes = cache.class_latent_dists, cache.class_time_ids
    planned = None  # bucketing: this batch's photos, all of one bucket
    if cache.instance_buckets is not None:
        planned = _bucketed_batch(cache.instance_buckets, slots, config.seed)
        if config.with_prior_preservation:
            class_dists, class_sizes = cache.class_by_bucket[cache.instance_buckets[planned[0]]]
    if config.with_prior_preservation:
        sources.append((class_dists, None, class_sizes or None, 2))
    # Collate order matters: all instance samples first, then all class samples.
    for dists, ids, sizes, salt in sources:
        for j, slot in enumerate(slots):
            index, flip = _pick(len(dists), slot, config.seed, salt)
            if salt == 1 and planned is not None:
                index = planned[j]
            variant = 1 if (flip and config.random_flip) else 0
            params = dists[index][variant]  # (2, 4, h, w)
            mean, std = params[0], params[1]
            sample = mean + std * torch.randn(mean.shape, generator=gen)
            latents.append(sample * cache.scaling_factor)
            if ids is None:
                prompt_ids.append(cache.class_prompt_id)
            elif caption_dropped(slot, config.seed, config.caption_dropout):
                prompt_ids.append(cache.dropout_prompt_id)
            else:
                prompt_ids.append(ids[index])
            if sizes is not None:
                time_ids.append(sizes[index][variant])
            if salt == 1 and cache.instance_masks is not None:
                masks.append(cache.instance_masks[index][variant])
    latents_t = torch.stack(latents).to(device)
    # (B, 1, h, w) for the instance half only, or None
    mask_t = torch.stack(masks).to(device) if masks else None
    if text_encoders is None:
        prompt_embeds = cache.prompt_embeds[prompt_ids].to(device, dtype=weight_dtype)
        pooled = cache.pooled_prompt_embeds
        pooled = pooled[prompt_ids].to(device, dtype=weight_dtype) if pooled is not None else None
    else:
        input_ids = [cache.prompt_input_ids, cache.prompt_input_ids_2][: len(text_encoders)]
        prompt_embeds, pooled = encode_prompts(
            text_encoders, [ids[prompt_ids].to(device) for ids in input_ids]
        )
    if cache.instance_time_ids is None:
        return latents_t, prompt_embeds, None, mask_t
    added_cond = {
        "text_embeds": pooled,
        "time_ids": torch.stack(time_ids).to(device, dtype=weight_dtype),
    }
    return latents_t, prompt_embeds, added_cond, mask_t


def _enable_xformers(unet) -> None:
    if not torch.cuda.is_available():
        raise TrainingError(
            "xformers attention needs a CUDA GPU; turn it off to use PyTorch's SDPA attention."
        )
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as e:
        raise TrainingError(f"xformers is not usable here ({e}); turn it off to use SDPA attention.") from e
