"""The prior-preservation DreamBooth LoRA loop (SD 1.5 and SDXL), on accelerate.

Read it top to bottom: `train()` loads the model, makes class images, caches VAE latents and prompt
embeddings once, attaches LoRA, then runs the steps. SDXL adds a second text encoder, a pooled
prompt embedding and per-image size conditioning (`add_time_ids`), all cached with the rest. Every
random draw of a step (which photos, noise, timesteps, latent sample) comes from a generator seeded
by (seed, micro-step, process), so a run stopped and resumed from a checkpoint takes exactly the
steps an unbroken run takes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import adapters, checkpoints, runs, tracking
from .class_images import class_cache_dir, generate_class_images
from .components import (
    add_lora,
    assemble_pipeline,
    default_resolution,
    load_components,
    load_vae,
    lora_parameters,
    resolve_base_model,
)
from .config import TrainConfig
from .data import Example, image_to_tensor, list_images, load_instance_examples, load_rgb
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


@dataclass
class TrainResult:
    status: str  # "finished" or "stopped"
    summary: dict[str, Any]
    adapter_dir: Path | None
    # The trained models (unwrapped, LoRA attached), for in-process callers and tests.
    unet: Any = field(default=None, repr=False)
    text_encoder: Any = field(default=None, repr=False)
    text_encoder_2: Any = field(default=None, repr=False)  # SDXL's second text encoder


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
    dropout_prompt_id: int | None = None  # the empty caption, with caption_dropout


def run_paths(output_dir: Path) -> dict[str, Path]:
    return {
        "config": output_dir / "config.json",
        "status": output_dir / "status.json",
        "metrics": output_dir / "metrics.jsonl",
        "samples": output_dir / "samples",
        "checkpoints": output_dir / "checkpoints",
        "adapter": output_dir / "adapter",
    }


def write_status(path: Path, status: str, step: int, total: int, message: str = "", **extra: Any) -> None:
    atomic_write_json(
        path,
        {
            "status": status,
            "step": step,
            "total_steps": total,
            "message": message,
            "updated": time.time(),
            **extra,
        },
    )


def train(config: TrainConfig, emit: Emit = no_emit, should_stop: ShouldStop = never_stop) -> TrainResult:
    """Train a DreamBooth LoRA as `config` says; report through `emit`; stop when `should_stop()`.

    Raises TrainingError (one sentence for the user) on bad input, NaN loss or unusable settings;
    the run folder, earlier checkpoints and photos are left as they were.
    """
    from accelerate import Accelerator

    out = Path(config.output_dir)
    paths = run_paths(out)
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("fp16 mixed precision needs a CUDA GPU; use bf16 or no mixed precision here.")
    if config.compile_unet and not torch.cuda.is_available():
        raise TrainingError("Compiling the UNet needs a CUDA GPU; turn compile_unet off on this machine.")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=tracking.resolve_report_to(config.report_to) or None,
        project_config=tracking.project_configuration(out),
    )
    main = accelerator.is_main_process
    if not main:
        emit = no_emit
    try:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            config.save(paths["config"])
            runs.mark_run_started(out)
            write_status(paths["status"], "running", 0, config.max_train_steps, "starting")
        tracking.start_trackers(accelerator, config)
        return _train(config, accelerator, paths, emit, should_stop)
    except StopRequested as e:
        if main:
            # Only raised before the first step (class images); later stops save and return.
            write_status(paths["status"], "stopped", 0, config.max_train_steps, str(e))
        emit(Finished("stopped", {"steps": 0, "message": str(e)}))
        return TrainResult("stopped", {"steps": 0, "message": str(e), "adapter_dir": None}, None)
    except TrainingError as e:
        if main:
            write_status(paths["status"], "failed", e.step or 0, config.max_train_steps, str(e))
        emit(Failed(str(e), e.step))
        raise
    except torch.cuda.OutOfMemoryError as e:
        msg = (
            "The GPU ran out of memory; lower the resolution or batch size, or turn on gradient "
            "checkpointing and 8-bit Adam, then resume from the last checkpoint."
        )
        if main:
            write_status(paths["status"], "failed", 0, config.max_train_steps, msg)
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


def _train(config: TrainConfig, accelerator, paths: dict[str, Path], emit: Emit, should_stop: ShouldStop):
    main = accelerator.is_main_process
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )

    # 1. Resume compatibility is checked before anything slow happens.
    resume_state = None
    if config.resume_from_checkpoint:
        ckpt_path = checkpoints.find_checkpoint(paths["checkpoints"], config.resume_from_checkpoint)
        resume_state = (ckpt_path, *checkpoints.load_checkpoint(ckpt_path))
        checkpoints.check_resume_compatible(resume_state[1], _resume_identity(config), ckpt_path)

    # 2. Base model parts, all frozen.
    emit(StageStarted("load", f"loading {config.base_model}"))
    # A built-in tiny model is built on first use; do that on the main process alone: under a
    # process group transformers writes weights only from rank 0, so another rank would save a
    # model folder without its text-encoder weights.
    with accelerator.main_process_first():
        resolve_base_model(config.base_model)
    parts, source = load_components(config.base_model, single_file_config=config.single_file_config)
    if config.pretrained_vae:
        parts["vae"] = load_vae(config.pretrained_vae)
    tokenizer, text_encoder, vae, unet = (
        parts["tokenizer"],
        parts["text_encoder"],
        parts["vae"],
        parts["unet"],
    )
    # SDXL: a second tokenizer and text encoder (None for SD 1.5).
    tokenizer_2, text_encoder_2 = parts.get("tokenizer_2"), parts.get("text_encoder_2")
    text_encoders = [te for te in (text_encoder, text_encoder_2) if te is not None]
    noise_scheduler = parts["scheduler"]
    if config.prediction_type:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    for m in (*text_encoders, vae, unet):
        m.requires_grad_(False)
        m.eval()
    resolution = config.resolution or default_resolution(unet, vae)
    examples = load_instance_examples(config.instance_dir, config.instance_prompt)

    # 3. Class images (generated by the base model before any LoRA is attached).
    class_paths: list[Path] = []
    if config.with_prior_preservation:
        class_paths = _prepare_class_images(config, parts, source, resolution, accelerator, emit, should_stop)

    # 4. Latents and prompt embeddings, computed once; then the VAE leaves the device. The VAE
    # runs in fp32 (loaded so, never cast): SDXL's overflows to NaN in fp16.
    cache = _build_cache(
        config,
        examples,
        class_paths,
        [tokenizer, tokenizer_2] if text_encoder_2 is not None else [tokenizer],
        text_encoders,
        vae,
        resolution,
        device,
        emit,
    )
    vae.to("cpu")
    if not config.train_text_encoder:
        for te in text_encoders:
            te.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # 5. LoRA on the UNet attention (and optionally the text encoder); LoRA params stay fp32.
    # peft draws lora_A from torch's global RNG: seed it, or one seed gives different runs.
    from accelerate.utils import set_seed

    set_seed(config.seed)
    add_lora(
        unet,
        text_encoder,
        rank=config.rank,
        alpha=config.lora_alpha,
        train_text_encoder=config.train_text_encoder,
        text_encoder_2=text_encoder_2,
        use_dora=config.use_dora,
    )
    # Frozen weights in the training dtype; casting is skipped in fp32 (diffusers warns on it).
    unet.to(device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    if config.train_text_encoder:
        for te in text_encoders:
            te.to(device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr

    trained = [unet, *text_encoders] if config.train_text_encoder else [unet]
    cast_training_params(trained, dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    if config.enable_xformers:
        _enable_xformers(unet)
    if config.compile_unet:
        # In place, block by block (diffusers' _repeated_blocks): one compiled graph serves every
        # transformer block, the module tree and state-dict names stay as they are for saving.
        unet.compile_repeated_blocks()

    params = lora_parameters(*trained)
    te_params = lora_parameters(*text_encoders) if config.train_text_encoder else []
    optimizer = make_optimizer(config, lora_parameters(unet), te_params)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    # The lr scheduler is stepped by hand once per optimizer step, so it is not prepared.
    if config.train_text_encoder:
        unet, *text_encoders, optimizer = accelerator.prepare(unet, *text_encoders, optimizer)
        text_encoder = text_encoders[0]
        text_encoder_2 = text_encoders[1] if len(text_encoders) > 1 else None
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    # The prepared (DDP-wrapped) models: accumulate() skips their gradient all-reduce between
    # micro-steps only when it is given these, not the bare modules.
    trained = [unet, *text_encoders] if config.train_text_encoder else [unet]

    global_step, seconds_before = 0, 0.0
    if resume_state is not None:
        ckpt_path, state, lora_state, optimizer_state, scheduler_state = resume_state
        _load_lora_state(
            accelerator.unwrap_model(unet),
            accelerator.unwrap_model(text_encoder),
            lora_state,
            text_encoder_2=accelerator.unwrap_model(text_encoder_2) if text_encoder_2 is not None else None,
        )
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
        global_step, seconds_before = int(state["step"]), float(state.get("seconds", 0.0))
        emit(StageStarted("train", f"resumed from {ckpt_path.name} at step {global_step}"))

    # 6. The steps.
    emit(StageStarted("train", f"training {config.max_train_steps} steps", total=config.max_train_steps))
    world, rank_ = accelerator.num_processes, accelerator.process_index
    batch = config.train_batch_size
    last: dict[str, float] = {}
    validate = functools.partial(
        _validate,
        config,
        accelerator,
        paths,
        unet=unet,
        text_encoder=text_encoder,
        vae=vae,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        resolution=resolution,
        emit=emit,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    t0 = time.perf_counter()
    stopped = False
    unet.train()
    if config.train_text_encoder:
        for te in text_encoders:
            te.train()
    if main:
        write_status(paths["status"], "running", global_step, config.max_train_steps, "training")
    status_written = time.monotonic()
    while global_step < config.max_train_steps:
        sums = {"loss": 0.0, "instance_loss": 0.0, "prior_loss": 0.0}
        for micro in range(config.gradient_accumulation_steps):
            # One generator per (micro-step, process): resumable and different on each GPU.
            micro_index = global_step * config.gradient_accumulation_steps + micro
            gen = torch.Generator().manual_seed(_mix(config.seed, micro_index, rank_))
            slots = [(micro_index * world + rank_) * batch + j for j in range(batch)]
            with accelerator.accumulate(*trained):
                latents, prompt_embeds, added_cond = _make_batch(
                    cache,
                    slots,
                    config,
                    gen,
                    device,
                    weight_dtype,
                    text_encoders if config.train_text_encoder else None,
                )
                # latents: (2B or B, 4, h, w); prompt_embeds: (2B or B, 77, dim); added_cond: SDXL's
                # pooled prompt (2B or B, projection) and size ids (2B or B, 6), None for SD 1.5
                noise = torch.randn(latents.shape, generator=gen).to(device)
                if config.noise_offset:
                    noise += config.noise_offset * torch.randn(
                        (latents.shape[0], latents.shape[1], 1, 1), generator=gen
                    ).to(device)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen
                ).to(device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                noise_pred = unet(
                    noisy_latents.to(weight_dtype), timesteps, prompt_embeds, added_cond_kwargs=added_cond
                ).sample
                # Per-sample MSE, optionally min-SNR weighted; instance and class halves apart.
                per_sample = F.mse_loss(noise_pred.float(), target.float(), reduction="none").mean(
                    dim=(1, 2, 3)
                )
                if config.snr_gamma is not None:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weights = torch.clamp(snr, max=config.snr_gamma) / snr
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        weights = torch.clamp(snr, max=config.snr_gamma) / (snr + 1)
                    per_sample = per_sample * weights
                if config.with_prior_preservation:
                    instance_loss, prior_loss = per_sample[:batch].mean(), per_sample[batch:].mean()
                    loss = instance_loss + config.prior_loss_weight * prior_loss
                else:
                    instance_loss, prior_loss = per_sample.mean(), torch.zeros((), device=device)
                    loss = instance_loss
                # A NaN/inf loss stops the run before it can reach the weights or a saved file.
                finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "min")
                if finite.item() < 1:
                    raise TrainingError(
                        f"The loss became NaN or infinite at step {global_step + 1}; lower the learning rate "
                        "(or use bf16 instead of fp16) and resume from the last checkpoint.",
                        step=global_step + 1,
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            stacked = torch.stack([loss.detach(), instance_loss.detach(), prior_loss.detach()]).float()
            stacked = accelerator.reduce(stacked, "mean")
            for key, value in zip(sums, stacked.tolist(), strict=True):
                sums[key] += value / config.gradient_accumulation_steps
        lr_now = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        global_step += 1
        last = sums
        seconds = seconds_before + time.perf_counter() - t0

        if global_step % config.logging_steps == 0 or global_step == config.max_train_steps:
            prior = sums["prior_loss"] if config.with_prior_preservation else None
            metrics = StepMetrics(
                global_step,
                config.max_train_steps,
                sums["loss"],
                sums["instance_loss"],
                prior,
                lr_now,
                round(seconds, 3),
            )
            if main:
                row = {
                    "step": global_step,
                    "loss": sums["loss"],
                    "instance_loss": sums["instance_loss"],
                    "prior_loss": prior,
                    "lr": lr_now,
                    "seconds": round(seconds, 3),
                }
                append_jsonl(paths["metrics"], row)
                tracking.log_step(accelerator, row)
            emit(metrics)
        stop_now = _agree_on_stop(accelerator, should_stop())
        if main and (stop_now or time.monotonic() - status_written > 2.0):
            write_status(paths["status"], "running", global_step, config.max_train_steps, "training")
            status_written = time.monotonic()
        # A stop, and the end, always leave a resumable checkpoint (so a run can be continued).
        if (
            stop_now
            or global_step == config.max_train_steps
            or (config.checkpointing_steps and global_step % config.checkpointing_steps == 0)
        ):
            _save_checkpoint(
                config,
                accelerator,
                paths,
                global_step,
                unet,
                text_encoder,
                optimizer,
                lr_scheduler,
                seconds,
                emit,
                text_encoder_2=text_encoder_2,
            )
        if (
            config.validation_steps
            and global_step % config.validation_steps == 0
            and global_step < config.max_train_steps
        ):
            validate(global_step)
        if stop_now:
            stopped = True
            break

    # 7. Final samples and the adapter.
    unet_model = accelerator.unwrap_model(unet)
    te_model = accelerator.unwrap_model(text_encoder)
    te2_model = accelerator.unwrap_model(text_encoder_2) if text_encoder_2 is not None else None
    seconds = seconds_before + time.perf_counter() - t0
    status = "stopped" if stopped else "finished"
    adapter_dir = None
    if global_step > 0:
        sample_dir = validate(global_step)
        if main:
            emit(StageStarted("save", "saving the adapter"))
            name = config.adapter_name or adapters.default_adapter_name(config.instance_prompt)
            adapter_dir = adapters.save_adapter(
                paths["adapter"],
                unet=unet_model,
                text_encoder=te_model if config.train_text_encoder else None,
                text_encoder_2=te2_model if config.train_text_encoder else None,
                name=name,
                metadata={
                    "base_model": config.base_model,
                    "instance_prompt": config.instance_prompt,
                    "token": config.identifier_token,
                    "class_prompt": config.class_prompt,
                    "with_prior_preservation": config.with_prior_preservation,
                    "steps": global_step,
                    "resolution": resolution,
                    "final_loss": last.get("loss"),
                    "final_instance_loss": last.get("instance_loss"),
                    "final_prior_loss": last.get("prior_loss") if config.with_prior_preservation else None,
                },
                config_json=config.to_json(),
                metrics_file=paths["metrics"],
                samples_dir=sample_dir,
            )
    accelerator.wait_for_everyone()
    summary = {
        "status": status,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "run_dir": str(paths["config"].parent),
        "steps": global_step,
        "final_loss": last.get("loss"),
        "final_instance_loss": last.get("instance_loss"),
        "final_prior_loss": last.get("prior_loss") if config.with_prior_preservation else None,
        "seconds": round(seconds, 3),
        "peak_rss_mb": _peak_rss_mb(),
    }
    if torch.cuda.is_available():
        summary["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if main:
        runs.finish_run(paths["config"].parent, summary, config.to_dict())
        write_status(
            paths["status"],
            status,
            global_step,
            config.max_train_steps,
            "stopped by request" if stopped else "done",
            summary=summary,
        )
    emit(Finished(status, summary))
    return TrainResult(
        status, summary, adapter_dir, unet=unet_model, text_encoder=te_model, text_encoder_2=te2_model
    )


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


def _resume_identity(config: TrainConfig) -> dict[str, Any]:
    return {
        "base_model": config.base_model,
        "rank": config.rank,
        "alpha": config.lora_alpha,
        "train_text_encoder": config.train_text_encoder,
    }


def _prepare_class_images(config, parts, source, resolution, accelerator, emit, should_stop) -> list[Path]:
    if config.class_data_dir:
        class_dir = Path(config.class_data_dir)
    else:
        class_dir = class_cache_dir(f"{source.kind}:{source.location}", config.class_prompt, resolution)
    if accelerator.is_main_process:

        def factory():
            pipe = assemble_pipeline(parts)
            return pipe.to(accelerator.device)

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
    accelerator.wait_for_everyone()
    found = list_images(class_dir)[: config.num_class_images]
    if len(found) < config.num_class_images:
        raise TrainingError(
            f"Only {len(found)} class images in {class_dir}, {config.num_class_images} needed."
        )
    return found


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
    text encoders, their embeddings; for SDXL also each image's size conditioning."""
    emit(StageStarted("cache", "encoding photos and prompts once", total=len(examples) + len(class_paths)))
    vae.to(device)
    vae_dtype = next(vae.parameters()).dtype
    flips = (False, True) if config.random_flip else (False,)
    sdxl = len(text_encoders) > 1

    def encode(paths: list[Path], done_before: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        dists, time_ids = [], []
        for i, p in enumerate(paths):
            image = load_rgb(p)
            pixels = torch.stack([image_to_tensor(image, resolution, flip=f) for f in flips])
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
            if sdxl:
                time_ids.append(torch.tensor([sdxl_time_ids(image.size, resolution, f) for f in flips]))
            emit(Progress("cache", done_before + i + 1, len(examples) + len(class_paths)))
        return dists, time_ids

    instance, instance_time_ids = encode([e.path for e in examples], 0)
    klass, class_time_ids = encode(class_paths, len(examples))
    prompts = sorted(
        {e.prompt for e in examples}
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
    if not config.train_text_encoder:
        for te in text_encoders:
            te.to(device)
        embeds, pooled = encode_prompts(text_encoders, [ids.to(device) for ids in input_ids])
        embeds = embeds.float().cpu()
        pooled = pooled.float().cpu() if pooled is not None else None
    return _Cache(
        instance_latent_dists=instance,
        class_latent_dists=klass,
        instance_prompt_ids=[prompts.index(e.prompt) for e in examples],
        class_prompt_id=prompts.index(config.class_prompt) if class_paths else None,
        prompts=prompts,
        prompt_embeds=embeds,
        prompt_input_ids=input_ids[0],
        scaling_factor=float(vae.config.scaling_factor),
        prompt_input_ids_2=input_ids[1] if sdxl else None,
        pooled_prompt_embeds=pooled,
        instance_time_ids=instance_time_ids if sdxl else None,
        class_time_ids=class_time_ids if sdxl else None,
        dropout_prompt_id=prompts.index("") if config.caption_dropout > 0 else None,
    )


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


def sdxl_time_ids(size: tuple[int, int], resolution: int, flip: bool) -> list[int]:
    """SDXL's size conditioning for one training image: original (height, width), the crop's
    top-left corner in the resized image, and the target size.

    The crop is the one `data.image_to_tensor` takes (short side resized to `resolution`, centred
    crop); a flipped image's crop is measured from the mirrored side.
    """
    w, h = size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    if flip:
        left = new_w - resolution - left
    return [h, w, top, left, resolution, resolution]


def _pick(n: int, slot: int, seed: int, salt: int) -> tuple[int, bool]:
    """Item for a sample slot: a fresh shuffled order each epoch (seeded), plus a flip coin."""
    epoch, pos = divmod(slot, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, salt, epoch)))
    flip = bool(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(_mix(seed, salt, slot))))
    return int(order[pos]), flip


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
    latents, prompt_ids, time_ids = [], [], []
    sources = [(cache.instance_latent_dists, cache.instance_prompt_ids, cache.instance_time_ids, 1)]
    if config.with_prior_preservation:
        sources.append((cache.class_latent_dists, None, cache.class_time_ids, 2))
    # Collate order matters: all instance samples first, then all class samples.
    for dists, ids, sizes, salt in sources:
        for slot in slots:
            index, flip = _pick(len(dists), slot, config.seed, salt)
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
    latents_t = torch.stack(latents).to(device)
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
        return latents_t, prompt_embeds, None
    added_cond = {
        "text_embeds": pooled,
        "time_ids": torch.stack(time_ids).to(device, dtype=weight_dtype),
    }
    return latents_t, prompt_embeds, added_cond


def _enable_xformers(unet) -> None:
    if not torch.cuda.is_available():
        raise TrainingError(
            "xformers attention needs a CUDA GPU; turn it off to use PyTorch's SDPA attention."
        )
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as e:
        raise TrainingError(f"xformers is not usable here ({e}); turn it off to use SDPA attention.") from e


def _lora_state_for_checkpoint(
    unet, text_encoder, with_te: bool, text_encoder_2=None
) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in adapters.peft_lora_state(unet).items()}
    if with_te:
        state.update({f"text_encoder.{k}": v for k, v in adapters.peft_lora_state(text_encoder).items()})
        if text_encoder_2 is not None:
            state.update(
                {f"text_encoder_2.{k}": v for k, v in adapters.peft_lora_state(text_encoder_2).items()}
            )
    return state


def _load_lora_state(unet, text_encoder, state: dict[str, torch.Tensor], text_encoder_2=None) -> None:
    from peft.utils import set_peft_model_state_dict

    # "text_encoder." does not match "text_encoder_2." keys: the dot ends the prefix.
    for prefix, model in (
        ("unet.", unet),
        ("text_encoder.", text_encoder),
        ("text_encoder_2.", text_encoder_2),
    ):
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        if model is None:
            raise TrainingError("The checkpoint has LoRA weights for a second text encoder this model lacks.")
        result = set_peft_model_state_dict(model, part)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise TrainingError(
                f"The checkpoint does not match this model ({len(unexpected)} unknown LoRA keys)."
            )


def _save_checkpoint(
    config,
    accelerator,
    paths,
    step,
    unet,
    text_encoder,
    optimizer,
    lr_scheduler,
    seconds,
    emit,
    text_encoder_2=None,
) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        emit(StageStarted("save", f"saving checkpoint {step}"))
        try:
            path = _write_checkpoint(
                config,
                accelerator,
                paths,
                step,
                unet,
                text_encoder,
                optimizer,
                lr_scheduler,
                seconds,
                text_encoder_2=text_encoder_2,
            )
        except OSError as e:
            raise TrainingError(
                f"Could not save checkpoint {step} ({e.strerror or e}); free disk space and resume: "
                "the previous checkpoint is kept.",
                step=step,
            ) from e
        emit(CheckpointSaved(step, str(path)))
    accelerator.wait_for_everyone()


def _write_checkpoint(
    config,
    accelerator,
    paths,
    step,
    unet,
    text_encoder,
    optimizer,
    lr_scheduler,
    seconds,
    text_encoder_2=None,
):
    return checkpoints.save_checkpoint(
        paths["checkpoints"],
        step,
        lora_state=_lora_state_for_checkpoint(
            accelerator.unwrap_model(unet),
            accelerator.unwrap_model(text_encoder),
            config.train_text_encoder,
            text_encoder_2=accelerator.unwrap_model(text_encoder_2) if text_encoder_2 is not None else None,
        ),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=lr_scheduler.state_dict(),
        state={**_resume_identity(config), "seconds": seconds, "max_train_steps": config.max_train_steps},
        total_limit=config.checkpoints_total_limit,
    )


@torch.no_grad()
def _validate(
    config,
    accelerator,
    paths,
    step,
    unet,
    text_encoder,
    vae,
    tokenizer,
    noise_scheduler,
    resolution,
    emit,
    text_encoder_2=None,
    tokenizer_2=None,
):
    """Validation images with and without the token, same seeds at every step so they compare."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process or config.num_validation_images == 0:
        return None
    from diffusers import DPMSolverMultistepScheduler

    emit(StageStarted("validate", f"validation images at step {step}"))
    unet_model = accelerator.unwrap_model(unet)
    te_models = [accelerator.unwrap_model(te) for te in (text_encoder, text_encoder_2) if te is not None]
    device = accelerator.device
    te_devices = [next(te.parameters()).device for te in te_models]
    vae.to(device)
    unet_model.eval()
    for te in te_models:
        te.to(device)
        te.eval()
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
    parts = dict(
        vae=vae, text_encoder=te_models[0], tokenizer=tokenizer, unet=unet_model, scheduler=scheduler
    )
    if text_encoder_2 is not None:
        parts.update(text_encoder_2=te_models[1], tokenizer_2=tokenizer_2)
    pipe = assemble_pipeline(parts)
    out_dir = paths["samples"] / f"step-{step:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt = config.effective_validation_prompt
    variants = [("with", prompt)]
    plain = config.prompt_without_token(prompt)
    if plain:
        variants.append(("without", plain))
    saved, images = [], {}
    # Under autocast the VAE would decode in half precision, where SDXL's overflows (black or NaN
    # images): the pipeline stops at latents and the fp32 VAE decodes them outside autocast.
    decode_fp32 = accelerator.mixed_precision != "no"
    for label, text in variants:
        for i in range(config.num_validation_images):
            with accelerator.autocast() if decode_fp32 else contextlib.nullcontext():
                image = pipe(
                    text,
                    num_inference_steps=config.validation_inference_steps,
                    height=resolution,
                    width=resolution,
                    generator=torch.Generator().manual_seed(config.seed + i),
                    output_type="latent" if decode_fp32 else "pil",
                ).images[0]
            if decode_fp32:
                latents = image[None].to(device, torch.float32) / vae.config.scaling_factor
                pixels = vae.decode(latents.to(next(vae.parameters()).dtype)).sample
                image = pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]
            target = out_dir / f"{label}-token-{i}.png"
            image.save(target)
            saved.append(str(target))
            images.setdefault(f"{label}_token", []).append(image)
    vae.to("cpu")
    unet_model.train()
    for te, te_device in zip(te_models, te_devices, strict=True):
        te.to(te_device)
        if config.train_text_encoder:
            te.train()
    tracking.log_samples(accelerator, step, images)
    emit(SamplesSaved(step, saved))
    return out_dir
