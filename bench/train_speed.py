"""Training speed benchmark: this engine against a naive DreamBooth LoRA loop, in one run.

Both ways train the same small SD 1.5-shaped random model (saved as a diffusers folder) with prior
preservation on the same photos and class images. The naive loop encodes the VAE latents and the
prompts at every step, as the reference diffusers script does by default; the engine caches them
once. Each way runs in its own subprocess so its peak RSS is its own; this parent imports no torch
and prints seconds per step, whole-run wall time, peak RSS and the naive/engine ratios.

    python bench/train_speed.py            # the documented config (see docs/BENCHMARKS.md)
    python bench/train_speed.py --quick    # a tiny config for a smoke test, well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # trainer_core, when run as a script

from trainer_core.shapes import SMALL_SD15, TINY_SD15, SD15Shape  # noqa: E402  (torch-free)

WAYS = ("engine", "naive")
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of a dog"


BENCH_SHAPE = SMALL_SD15  # SD 1.5's layout at about a fifth of its widths, 256 px


@dataclass(frozen=True)
class Spec:
    """Everything both ways share: model shape, data sizes and training settings."""

    shape: SD15Shape = BENCH_SHAPE
    instance_images: int = 6
    class_images: int = 12
    steps: int = 60
    warmup_steps: int = 5
    rank: int = 4
    learning_rate: float = 1e-4
    prior_loss_weight: float = 1.0
    seed: int = 0

    @property
    def resolution(self) -> int:
        return self.shape.resolution


QUICK = Spec(shape=TINY_SD15, instance_images=2, class_images=2, steps=8, warmup_steps=2)


# ---------------------------------------------------------------------------------------------
# Fixtures: the model folder and the images (built once per work folder, outside any timing)
# ---------------------------------------------------------------------------------------------


def model_dir(workdir: Path) -> Path:
    return workdir / "model"


def build_model(spec: Spec, out: Path) -> None:
    """A random SD 1.5-architecture model of the spec's shape, saved as a diffusers folder."""
    from trainer_core.components import build_sd15, save_sd15

    save_sd15(build_sd15(spec.shape, spec.seed), out, tiny=False)


def synthetic_picture(size: int, seed: int):
    """A smooth colour field with a few blobs and a little noise: random-ish, compressible, valid."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size, 3))
    for c in range(3):
        a, b, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.3)]
        image[..., c] = 0.5 + 0.5 * np.sin(a * x * 6.3 + b * y * 6.3 + phase)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    image += rng.normal(0, 0.03, image.shape)
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))


def prepare(workdir: Path, spec: Spec) -> None:
    """Model folder, instance photos (a bit larger than the resolution) and pre-made class images."""
    model = model_dir(workdir)
    if not (model / "model_index.json").exists():
        build_model(spec, model)
    for name, count, size, seed0 in (
        ("instance", spec.instance_images, spec.resolution * 5 // 4, 100),
        ("class", spec.class_images, spec.resolution, 200),
    ):
        folder = workdir / name
        folder.mkdir(exist_ok=True)
        for i in range(count):
            path = folder / f"{name}-{i:02d}.png"
            if not path.exists():
                synthetic_picture(size, seed0 + i).save(path)


# ---------------------------------------------------------------------------------------------
# Way 1: this engine
# ---------------------------------------------------------------------------------------------


def run_engine(workdir: Path, spec: Spec) -> dict:
    """trainer_core.loop.train as a user runs it; final validation is cut to one sampler step."""
    from trainer_core.config import TrainConfig
    from trainer_core.events import StageStarted, StepMetrics
    from trainer_core.loop import train

    out = workdir / "engine-run"
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(
        instance_dir=str(workdir / "instance"),
        instance_prompt=INSTANCE_PROMPT,
        output_dir=str(out),
        base_model=str(model_dir(workdir)),
        with_prior_preservation=True,
        class_prompt=CLASS_PROMPT,
        class_data_dir=str(workdir / "class"),
        num_class_images=spec.class_images,
        prior_loss_weight=spec.prior_loss_weight,
        resolution=spec.resolution,
        max_train_steps=spec.steps,
        train_batch_size=1,
        rank=spec.rank,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=1,
        validation_inference_steps=1,
    )
    stages: list[tuple[str, float]] = []
    cumulative: list[float] = []  # StepMetrics.seconds: wall time since the steps began
    cpu_marks: list[float] = []  # process CPU time at each step's end, from the start of the steps
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()

    def emit(event) -> None:
        if isinstance(event, StageStarted):
            stages.append((event.stage, time.perf_counter() - start))
            if event.stage == "train":
                cpu_marks[:] = [time.process_time()]
        elif isinstance(event, StepMetrics):
            cumulative.append(event.seconds)
            cpu_marks.append(time.process_time())
            losses.append(event.loss)

    train(config, emit=emit)
    wall = time.perf_counter() - start
    return dict(
        wall_s=wall,
        cpu_s=time.process_time() - cpu_start,
        step_s=differences([0.0, *cumulative]),
        step_cpu_s=differences(cpu_marks),
        losses=losses,
        stages=stage_durations(stages, wall),
    )


def differences(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def stage_durations(starts: list[tuple[str, float]], end: float) -> dict[str, float]:
    """Seconds per stage from (stage, start time) pairs; a repeated stage adds up."""
    durations: dict[str, float] = {}
    ends = [t for _, t in starts[1:]] + [end]
    for (name, begin), finish in zip(starts, ends, strict=True):
        durations[name] = durations.get(name, 0.0) + finish - begin
    return durations


# ---------------------------------------------------------------------------------------------
# Way 2: the naive loop (the reference script's default path)
# ---------------------------------------------------------------------------------------------


def run_naive(workdir: Path, spec: Spec) -> dict:
    """Per step: read and transform both images, VAE-encode them, run the text encoder, train."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from trainer_core.components import add_lora, load_components, lora_parameters
    from trainer_core.data import image_to_tensor, list_images, load_rgb

    start, cpu_start = time.perf_counter(), time.process_time()
    accelerator = Accelerator()
    device = accelerator.device
    parts, _ = load_components(str(model_dir(workdir)))
    tokenizer, text_encoder, vae, unet = (
        parts["tokenizer"],
        parts["text_encoder"],
        parts["vae"],
        parts["unet"],
    )
    scheduler = parts["scheduler"]
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    vae.eval()
    text_encoder.eval()
    add_lora(unet, text_encoder, rank=spec.rank, alpha=float(spec.rank), train_text_encoder=False)
    params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(
        params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    vae.to(device)  # VAE and text encoder stay resident for the whole run
    text_encoder.to(device)
    instance = list_images(workdir / "instance")
    klass = list_images(workdir / "class")[: spec.class_images]
    gen = torch.Generator().manual_seed(spec.seed)
    order = {"instance": [], "class": []}
    stages = {"load": time.perf_counter() - start}

    def next_path(kind: str, paths: list[Path]) -> Path:
        if not order[kind]:  # a fresh shuffle each epoch, like a shuffling DataLoader
            order[kind] = torch.randperm(len(paths), generator=gen).tolist()
        return paths[order[kind].pop()]

    step_times, step_cpu, losses = [], [], []
    unet.train()
    for _ in range(spec.steps):
        t0, cpu0 = time.perf_counter(), time.process_time()
        pixels = torch.stack(
            [
                image_to_tensor(load_rgb(next_path("instance", instance)), spec.resolution),
                image_to_tensor(load_rgb(next_path("class", klass)), spec.resolution),
            ]
        )
        input_ids = tokenizer(
            [INSTANCE_PROMPT, CLASS_PROMPT],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            latents = vae.encode(pixels.to(device)).latent_dist.sample(gen) * vae.config.scaling_factor
            prompt_embeds = text_encoder(input_ids.to(device))[0]
        noise = torch.randn(latents.shape, generator=gen).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,), generator=gen).to(device)
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, prompt_embeds).sample
        instance_loss = F.mse_loss(pred[:1].float(), noise[:1].float())
        prior_loss = F.mse_loss(pred[1:].float(), noise[1:].float())
        loss = instance_loss + spec.prior_loss_weight * prior_loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_times.append(time.perf_counter() - t0)
        step_cpu.append(time.process_time() - cpu0)
    stages["train"] = sum(step_times)
    t_save = time.perf_counter()
    save_naive_lora(accelerator.unwrap_model(unet), workdir / "naive-run")
    stages["save"] = time.perf_counter() - t_save
    return dict(
        wall_s=time.perf_counter() - start,
        cpu_s=time.process_time() - cpu_start,
        step_s=step_times,
        step_cpu_s=step_cpu,
        losses=losses,
        stages=stages,
    )


def save_naive_lora(unet, out: Path) -> None:
    """Save the LoRA the way the reference script does at the end of training."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    shutil.rmtree(out, ignore_errors=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)


# ---------------------------------------------------------------------------------------------
# Worker (one way per process) and parent
# ---------------------------------------------------------------------------------------------


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def import_libraries() -> None:
    """Import the libraries before either measurement starts (diffusers imports on first use)."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import trainer_core.loop  # noqa: F401


def worker(task: str, workdir: Path, threads: int) -> None:
    """Run one task in this process and write its result (with this process's peak RSS) as JSON."""
    import resource

    import torch

    if threads:
        torch.set_num_threads(threads)
    import_libraries()
    spec = load_spec(workdir)
    if task == "prepare":
        prepare(workdir, spec)
        return
    baseline = current_rss_mb()
    result = {"engine": run_engine, "naive": run_naive}[task](workdir, spec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    result["peak_rss_mb"] = peak / (2**20 if sys.platform == "darwin" else 2**10)
    result["rss_after_imports_mb"] = baseline
    result["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        result["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (workdir / f"result-{task}.json").write_text(json.dumps(result))


def load_spec(workdir: Path) -> Spec:
    data = json.loads((workdir / "spec.json").read_text())
    shape = SD15Shape(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("shape").items()})
    return Spec(shape=shape, **data)


def spawn(task: str, workdir: Path, threads: int) -> None:
    """Run a task in a fresh interpreter (so peak RSS is per way); its output goes to a log file."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DREAMBOOTH_STUDIO_HOME", str(workdir / "home"))
    log_path = workdir / f"{task}.log"
    with log_path.open("w") as log:
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                task,
                "--workdir",
                str(workdir),
                "--threads",
                str(threads),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-15:]
        sys.exit(f"train_speed: the {task} run failed (exit {proc.returncode}):\n" + "\n".join(tail))


def summarize(result: dict, warmup: int) -> dict:
    def steady(values: list[float]) -> float:
        return statistics.median(values[warmup:] or values)

    last = result["losses"][-10:]
    return {
        "s_per_step": steady(result["step_s"]),
        "cpu_s_per_step": steady(result["step_cpu_s"]),
        "wall_s": result["wall_s"],
        "cpu_s": result["cpu_s"],
        "threads": result["threads"],
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_after_imports_mb": result["rss_after_imports_mb"],
        "peak_vram_mb": result.get("peak_vram_mb"),
        "steps": len(result["step_s"]),
        "mean_loss_last10": sum(last) / len(last),
        "stages_s": {k: round(v, 2) for k, v in result["stages"].items()},
    }


# (key, heading, format) of the table's columns
COLUMNS = (
    ("s_per_step", "s/step", ".3f"),
    ("cpu_s_per_step", "CPU s/step", ".3f"),
    ("wall_s", "wall s", ".1f"),
    ("cpu_s", "CPU s", ".1f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
)


def report(spec: Spec, rows: dict[str, dict], repeats: int = 1) -> dict:
    """Print the table, the ratios and the goals; return everything as one JSON-able dict."""
    engine, naive = rows["engine"], rows["naive"]
    ratios = {key: naive[key] / engine[key] for key, _, _ in COLUMNS}
    print(
        f"\nUNet {spec.shape.unet_channels}, VAE {spec.shape.vae_channels}, text encoder {spec.shape.text_layers}x"
        f"{spec.shape.text_hidden}, {spec.resolution} px, {spec.instance_images} instance + {spec.class_images} "
        f"class images, {spec.steps} steps, {engine['threads']} torch threads "
        f"(per step: median after {spec.warmup_steps} warm-up steps"
        f"{f'; each way its fastest of {repeats} runs' if repeats > 1 else ''})\n"
    )
    print(f"{'way':<14}" + "".join(f"{head:>13}" for _, head, _ in COLUMNS))
    for way in WAYS:
        print(f"{way:<14}" + "".join(f"{rows[way][key]:>13{fmt}}" for key, _, fmt in COLUMNS))
    print(f"{'naive/engine':<14}" + "".join(f"{ratios[key]:>12.2f}x" for key, _, _ in COLUMNS))
    if engine["peak_vram_mb"] is not None:
        print(f"  peak VRAM MB: engine {engine['peak_vram_mb']:.0f}, naive {naive['peak_vram_mb']:.0f}")
    for way in WAYS:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in rows[way]["stages_s"].items())
        print(
            f"  {way} stages (s): {stages}; mean loss of the last 10 steps "
            f"{rows[way]['mean_loss_last10']:.4f}"
        )
    goals = {
        "faster_per_run_1_5x": ratios["wall_s"] >= 1.5,
        "no_more_peak_rss": engine["peak_rss_mb"] <= naive["peak_rss_mb"],
    }
    print(
        f"goal >= 1.5x faster per run: {'met' if goals['faster_per_run_1_5x'] else 'NOT met'}; "
        f"goal no more peak RSS: {'met' if goals['no_more_peak_rss'] else 'NOT met'}"
    )
    return {"spec": asdict(spec), "results": rows, "ratios_naive_over_engine": ratios, "goals": goals}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model at 64 px, 8 steps: a smoke test")
    p.add_argument("--steps", type=int, help="training steps per way (default 60, quick 8)")
    p.add_argument("--resolution", type=int, help="training resolution in pixels (default 256, quick 64)")
    p.add_argument("--warmup", type=int, help="steps left out of the s/step median (default 5, quick 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads in each way (default 1, the steadiest on a shared CPU; 0: torch's "
        "default, one per core)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each way N times, alternating, and report each way's fastest run",
    )
    p.add_argument("--workdir", type=Path, help="keep the model, images and runs here (default: a temp dir)")
    p.add_argument(
        "--json", action="store_true", help="print the results as one JSON object on the last line"
    )
    p.add_argument("--worker", choices=("prepare", *WAYS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_spec(args: argparse.Namespace) -> Spec:
    spec = QUICK if args.quick else Spec()
    if args.steps is not None:
        spec = replace(spec, steps=args.steps)
    if args.resolution is not None:
        if args.resolution < 64 or args.resolution % 8:
            sys.exit("train_speed: --resolution must be a multiple of 8, at least 64")
        spec = replace(spec, shape=replace(spec.shape, resolution=args.resolution))
    if args.warmup is not None:
        spec = replace(spec, warmup_steps=args.warmup)
    if min(spec.steps, args.repeats) < 1 or min(spec.warmup_steps, args.threads) < 0:
        sys.exit("train_speed: --steps and --repeats must be >= 1, --warmup and --threads >= 0")
    return spec


def run_ways(spec: Spec, workdir: Path, threads: int, repeats: int) -> dict[str, list[dict]]:
    """Each way `repeats` times, alternating which goes first so slow drift hits both alike."""
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for r in range(repeats):
        for way in WAYS if r % 2 == 0 else WAYS[::-1]:
            print(f"training {spec.steps} steps: {way} (run {r + 1} of {repeats})", flush=True)
            spawn(way, workdir, threads)
            result = json.loads((workdir / f"result-{way}.json").read_text())
            runs[way].append(summarize(result, spec.warmup_steps))
    return runs


def fixture_fields(spec: Spec) -> dict:
    """The spec's fields that the model folder and the images depend on."""
    return {
        k: v
        for k, v in asdict(spec).items()
        if k not in ("steps", "warmup_steps", "rank", "learning_rate", "prior_loss_weight")
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.workdir, args.threads)
        return
    spec = make_spec(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-speed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "spec.json"
    if spec_file.exists() and fixture_fields(load_spec(workdir)) != fixture_fields(spec):
        for name in ("model", "instance", "class"):  # another model or data shape: rebuild them
            shutil.rmtree(workdir / name, ignore_errors=True)
    spec_file.write_text(json.dumps(asdict(spec)))
    try:
        print(f"preparing the model and images in {workdir}", flush=True)
        spawn("prepare", workdir, args.threads)
        runs = run_ways(spec, workdir, args.threads, args.repeats)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    # The fastest run of each way stands for it (the others were slowed by something else).
    rows = {way: min(runs[way], key=lambda row: row["wall_s"]) for way in WAYS}
    summary = report(spec, rows, args.repeats)
    summary["all_runs"] = runs
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
