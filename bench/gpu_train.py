"""Real-size training speed and memory: this engine's variants, the naive loop, class images, switching.

For each architecture (SD 1.5 at 512 px, SDXL at 1024 px) a model with random weights is built from
the real widths (`trainer_core.shapes`) on the device and saved once as a diffusers folder, so every
run loads it through the engine's normal path; random weights cost exactly what real ones cost. Then
each variant trains a prior-preservation LoRA (rank 4, 1 instance + 1 class image per step) with
`trainer_core.loop.train` in a fresh process (clean peak memory; a crash or OOM is recorded, not
fatal), and the parent prints ms/step (median after warm-up), peak VRAM (CUDA) or peak RSS (CPU),
class images/s (25 DPM-Solver++ steps, batched, through `class_images.generate_class_images`) and
the adapter switch time (`bench/adapter_switch.py`, SD 1.5), next to the goals of issue 8.

    python bench/gpu_train.py --device cuda --arch sd15 --json sd15.json   # on an H100 (see BENCHMARKS.md)
    python bench/gpu_train.py --device cpu --shape small --steps 2 --warmup 1   # CPU smoke test
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # trainer_core and the sibling benchmarks, as a script

from train_speed import CLASS_PROMPT, INSTANCE_PROMPT, Spec, prepare  # noqa: E402  (torch-free)

from trainer_core.shapes import TINY_SD15, TINY_SDXL, SD15Shape, SDXLShape  # noqa: E402

SHAPES = {
    ("sd15", "full"): SD15Shape(),
    ("sdxl", "full"): SDXLShape(),
    ("sd15", "small"): TINY_SD15,
    ("sdxl", "small"): TINY_SDXL,
}
# adapter_switch.py's name for the same SD 1.5 shape (it reuses this harness's model folder)
SWITCH_SHAPES = {"full": "sd15", "small": "tiny"}

# Engine variants: TrainConfig changes against the default TrainConfig (SDPA attention, plain AdamW,
# eager, no checkpointing). "naive" is bench/train_speed.py's per-step loop (fp32, SD 1.5 only).
VARIANTS: dict[str, dict] = {
    "bf16": dict(mixed_precision="bf16"),
    "fp16": dict(mixed_precision="fp16"),
    "fp32": dict(mixed_precision="no"),
    "bf16-gradckpt": dict(mixed_precision="bf16", gradient_checkpointing=True),
    "bf16-xformers": dict(mixed_precision="bf16", enable_xformers=True),
    "bf16-compile": dict(mixed_precision="bf16", compile_unet=True),
    "bf16-fused-adamw": dict(mixed_precision="bf16", fused_adam=True),
    "naive": {},
}
CUDA_ONLY = {"fp16", "bf16-xformers", "bf16-compile"}

GB = 1e9
# Issue 8's goals on an H100: (arch, name, measured key, limit, unit, which variants qualify)
GOALS = (
    ("sd15", "ms/step eager", "ms_per_step", 40, "ms", "eager"),
    ("sd15", "ms/step compiled", "ms_per_step", 20, "ms", "compiled"),
    ("sd15", "peak VRAM", "peak_vram_train_gb", 6, "GB", "no-ckpt"),
    ("sd15", "100 class images", "seconds_per_100", 40, "s", "class"),
    ("sdxl", "ms/step", "ms_per_step", 120, "ms", "any"),
    ("sdxl", "peak VRAM without checkpointing", "peak_vram_train_gb", 18, "GB", "no-ckpt"),
    ("sdxl", "peak VRAM with checkpointing", "peak_vram_train_gb", 12, "GB", "ckpt"),
)


# ---------------------------------------------------------------------------------------------
# Worker side (one task per fresh process)
# ---------------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    import logging
    import warnings

    import diffusers
    import transformers

    logging.basicConfig(level=logging.WARNING)
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def make_spec(job: dict) -> Spec:
    """train_speed's Spec for this job: its naive loop and its image writer take one."""
    shape = SHAPES[(job["arch"], job["shape"])]
    return Spec(
        shape=shape,
        instance_images=job["instance_images"],
        class_images=job["class_images"],
        steps=job["warmup"] + job["steps"],
        warmup_steps=job["warmup"],
        rank=job["rank"],
    )


def build_model_on_device(job: dict, workdir: Path) -> dict:
    """The architecture's random model, initialised on the device, saved once as a diffusers folder."""
    import torch

    from trainer_core.components import build_sd15, build_sdxl, save_model

    out = workdir / "model"
    if (out / "model_index.json").exists():
        return {"build_s": 0.0, "reused": True}
    t0 = time.perf_counter()
    build = build_sdxl if job["arch"] == "sdxl" else build_sd15
    with torch.device(job["device"]):
        parts = build(SHAPES[(job["arch"], job["shape"])], seed=0)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if hasattr(m, "parameters")}
    save_model(parts, out, tiny=False)
    return {"build_s": time.perf_counter() - t0, "reused": False, "parameters": params}


def sync_fn(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def time_class_images(job: dict, workdir: Path, pipe, label: str) -> dict:
    """Images/s of generate_class_images (the engine's generator) with `pipe`, after one warm-up batch."""
    from trainer_core.class_images import generate_class_images

    sync = sync_fn(job["device"])
    resolution = SHAPES[(job["arch"], job["shape"])].resolution
    kwargs = dict(resolution=resolution, num_inference_steps=25, batch_size=job["class_batch"])
    for folder in ("warmup", label):
        shutil.rmtree(workdir / f"class-gen-{folder}", ignore_errors=True)
    generate_class_images(
        lambda: pipe, CLASS_PROMPT, workdir / "class-gen-warmup", job["class_batch"], **kwargs
    )
    sync()
    t0 = time.perf_counter()
    made = generate_class_images(
        lambda: pipe, CLASS_PROMPT, workdir / f"class-gen-{label}", job["class_gen_images"], **kwargs
    )
    sync()
    seconds = time.perf_counter() - t0
    return {
        "images": len(made),
        "seconds": seconds,
        "images_per_s": len(made) / seconds,
        "seconds_per_100": 100 * seconds / len(made),
        "batch_size": job["class_batch"],
        "steps": 25,
        "dtype": str(pipe.unet.dtype),
    }


def task_setup(job: dict, workdir: Path) -> dict:
    """Model folder, photos and class images; class-image speed; the adapter switch (SD 1.5)."""
    import torch

    from trainer_core.components import assemble_pipeline, load_components
    from trainer_core.inference import load_pipeline

    if job["device"].startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_train: --device cuda, but torch sees no CUDA GPU here")
    result = {
        "device_name": torch.cuda.get_device_name() if job["device"].startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    result["model"] = build_model_on_device(job, workdir)
    prepare(workdir, make_spec(job))  # photos and class images (the model folder exists, so kept)
    if job["device"].startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the class-image peak below excludes the build

    # Class images as the engine makes them (its parts as loaded, fp32), then with the inference
    # pipeline's dtype (fp16 on CUDA) for comparison.
    parts, _ = load_components(str(workdir / "model"))
    pipe = assemble_pipeline(parts).to(job["device"])
    result["class_images"] = {"engine": time_class_images(job, workdir, pipe, "engine")}
    del pipe, parts
    pipe = load_pipeline(str(workdir / "model"), device=job["device"])
    result["class_images"]["inference_dtype"] = time_class_images(job, workdir, pipe, "inference")
    del pipe
    if job["device"].startswith("cuda"):
        result["class_images"]["peak_vram_gb"] = torch.cuda.max_memory_allocated() / GB
        torch.cuda.empty_cache()

    if job["arch"] == "sd15":
        import adapter_switch

        switch = adapter_switch.run(
            argparse.Namespace(
                shape=SWITCH_SHAPES[job["shape"]],
                repeats=job["switch_repeats"],
                rank=job["rank"],
                device=job["device"],
                threads=job["threads"] or torch.get_num_threads(),
                gen_steps=0,
                workdir=workdir,
            )
        )
        result["adapter_switch"] = {
            "switch_ms": 1000 * switch["ways"]["switch"]["median_s"],
            "cold_switch_ms": 1000 * switch["ways"]["cold switch"]["median_s"],
            "reload_ms": 1000 * switch["ways"]["reload"]["median_s"],
            "max_pixel_diff_vs_fresh": switch["max_pixel_diff_vs_fresh"],
        }
    else:
        result["adapter_switch"] = {"unavailable": "bench/adapter_switch.py builds SD 1.5 models only"}
    return result


def task_engine(job: dict, workdir: Path, variant: str) -> dict:
    """One prior-preservation LoRA run through trainer_core.loop.train with the variant's settings."""
    import torch

    from trainer_core.config import TrainConfig
    from trainer_core.events import StageStarted, StepMetrics, TrainingError
    from trainer_core.loop import train

    cuda = job["device"].startswith("cuda")
    sync = sync_fn(job["device"])
    spec = make_spec(job)
    out = workdir / "runs" / variant
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(
        instance_dir=str(workdir / "instance"),
        instance_prompt=INSTANCE_PROMPT,
        output_dir=str(out),
        base_model=str(workdir / "model"),
        with_prior_preservation=True,
        class_prompt=CLASS_PROMPT,
        class_data_dir=str(workdir / "class"),
        num_class_images=spec.class_images,
        resolution=spec.resolution,
        max_train_steps=spec.steps,
        train_batch_size=1,
        rank=spec.rank,
        seed=0,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=0,
        report_to="none",
        **VARIANTS[variant],
    )
    marks: list[float] = []  # wall clock at the start of the steps, then after each step (synced)
    peak_train: list[float] = []

    def emit(event) -> None:
        if isinstance(event, StageStarted) and event.stage == "train":
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            marks[:] = [time.perf_counter()]
        elif isinstance(event, StepMetrics):
            sync()
            marks.append(time.perf_counter())
            if cuda and event.step == event.total:
                peak_train[:] = [
                    torch.cuda.max_memory_allocated() / GB,
                    torch.cuda.max_memory_reserved() / GB,
                ]

    t0 = time.perf_counter()
    try:
        result = train(config, emit=emit)
    except TrainingError as e:
        return {"status": "refused", "reason": str(e)}
    step_s = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    return {
        "status": "ok",
        "step_ms": [1000 * s for s in step_s],
        "final_loss": result.summary["final_loss"],
        "wall_s": time.perf_counter() - t0,
        "peak_vram_train_gb": peak_train[0] if peak_train else None,
        "peak_vram_reserved_train_gb": peak_train[1] if peak_train else None,
    }


def task_naive(job: dict, workdir: Path) -> dict:
    """bench/train_speed.py's naive loop (VAE and text encoder every step, fp32) on this model."""
    from train_speed import run_naive

    if job["arch"] != "sd15":
        return {"status": "unavailable", "reason": "bench/train_speed.py's naive loop is SD 1.5 only"}
    result = run_naive(workdir, make_spec(job))  # each step ends in loss.item(), a device sync
    return {
        "status": "ok",
        "step_ms": [1000 * s for s in result["step_s"]],
        "final_loss": result["losses"][-1],
        "wall_s": result["wall_s"],
    }


def worker(task: str, job_file: Path) -> None:
    import resource

    import torch

    job = json.loads(job_file.read_text())
    workdir = job_file.parent
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    quiet_libraries()
    if task == "setup":
        result = task_setup(job, workdir)
    elif task == "naive":
        result = task_naive(job, workdir)
    else:
        result = task_engine(job, workdir, task)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    result["peak_rss_gb"] = peak * (1 if sys.platform == "darwin" else 1024) / GB
    if job["device"].startswith("cuda"):
        result["peak_vram_run_gb"] = torch.cuda.max_memory_allocated() / GB
    (workdir / f"result-{task}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Parent side (imports no torch)
# ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "xformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def xformers_problem() -> str | None:
    """Why xformers cannot be used with this torch, or None when it is installed for it."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    torch_version = importlib.metadata.version("torch").split("+")[0]
    for req in importlib.metadata.requires("xformers") or []:
        if req.replace(" ", "").startswith("torch=="):
            pinned = req.replace(" ", "").split("==")[1].split(";")[0]
            if pinned != torch_version:
                return f"the installed xformers wheel needs torch {pinned}, this environment pins {torch_version}"
    return None


def static_unavailable(variant: str, device: str) -> str | None:
    """A reason not to start a variant's process at all, or None."""
    if variant == "bf16-xformers" and (problem := xformers_problem()):
        return problem + ("" if device.startswith("cuda") else "; it also needs CUDA")
    if variant in CUDA_ONLY and not device.startswith("cuda"):
        return "needs CUDA: the engine refuses it on the CPU"
    return None


def spawn(task: str, job_file: Path, timeout: float | None) -> tuple[int, str]:
    """Run one task in a fresh interpreter; its output goes to a log file. Returns (exit code, log tail)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DREAMBOOTH_STUDIO_HOME", str(job_file.parent / "home"))
    log_path = job_file.parent / f"{task}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--job", str(job_file)]
    with log_path.open("w") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return rc, "\n".join(lines[-6:])


def failure(rc: int, tail: str) -> dict:
    if "OutOfMemoryError" in tail or "out of memory" in tail:
        status = "oom"
    else:
        status = "timeout" if rc == 124 else "failed"
    return {"status": status, "reason": f"exit {rc}: {tail.splitlines()[-1] if tail else 'no output'}"}


def summarize(row: dict, warmup: int) -> dict:
    """Median ms/step after warm-up (all steps when there are no more)."""
    if row.get("status") == "ok":
        steady = row["step_ms"][warmup:] or row["step_ms"]
        row["ms_per_step"] = statistics.median(steady)
        row["measured_steps"] = len(steady)
    return row


def run_arch(arch: str, args: argparse.Namespace, root: Path) -> dict:
    workdir = root / f"{arch}-{args.shape}"
    workdir.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[(arch, args.shape)]
    full = args.shape == "full"
    job = {
        "arch": arch,
        "shape": args.shape,
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "rank": 4,
        "threads": args.threads,
        "instance_images": 4 if full else 2,
        "class_images": 4 if full else 2,
        "class_gen_images": args.class_images or ((100 if arch == "sd15" else 16) if full else 2),
        "class_batch": args.class_batch,
        "switch_repeats": 5 if full else 2,
    }
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(job))
    print(
        f"[{arch}] building the {args.shape} model on {args.device}, class images, adapter switch", flush=True
    )
    rc, tail = spawn("setup", job_file, args.timeout)
    if rc != 0:
        return {"arch": arch, "setup": failure(rc, tail), "variants": {}}
    setup = json.loads((workdir / "result-setup.json").read_text())
    variants: dict[str, dict] = {}
    for variant in args.variants:
        reason = static_unavailable(variant, args.device)
        if variant == "naive" and arch != "sd15":
            reason = "bench/train_speed.py's naive loop is SD 1.5 only"
        if reason:
            variants[variant] = {"status": "unavailable", "reason": reason}
            continue
        print(f"[{arch}] {variant}: {args.warmup} + {args.steps} steps", flush=True)
        (workdir / f"result-{variant}.json").unlink(missing_ok=True)
        rc, tail = spawn(variant, job_file, args.timeout)
        row = json.loads((workdir / f"result-{variant}.json").read_text()) if rc == 0 else failure(rc, tail)
        variants[variant] = summarize(row, args.warmup)
    naive, fp32 = variants.get("naive", {}), variants.get("fp32", {})
    ratio = None
    if naive.get("status") == fp32.get("status") == "ok":  # the same precision: only the loop differs
        ratio = naive["ms_per_step"] / fp32["ms_per_step"]
    return {
        "arch": arch,
        "naive_over_engine_fp32": ratio,
        "resolution": shape.resolution,
        "shape": args.shape,
        "job": job,
        "setup": setup,
        "variants": variants,
    }


def goal_rows(archs: dict[str, dict], comparable: bool) -> list[dict]:
    """Each goal with the best qualifying measured value and pass/fail (None when not comparable)."""
    rows = []
    for arch, name, key, limit, unit, which in GOALS:
        if arch not in archs:
            continue
        result = archs[arch]
        candidates: list[tuple[float, str]] = []
        if which == "class":
            engine = result["setup"].get("class_images", {}).get("engine")
            if engine:
                candidates.append((engine[key], "engine class images"))
        for variant, row in result["variants"].items():
            if row.get("status") != "ok" or row.get(key) is None or variant == "naive":
                continue
            if (
                (which == "eager" and variant == "bf16-compile")
                or (which == "compiled" and variant != "bf16-compile")
                or (which == "no-ckpt" and "gradckpt" in variant)
                or (which == "ckpt" and "gradckpt" not in variant)
                or which == "class"
            ):
                continue
            candidates.append((row[key], variant))
        best = min(candidates) if candidates else None
        rows.append(
            {
                "arch": arch,
                "goal": f"{name} <= {limit} {unit}",
                "measured": best[0] if best else None,
                "unit": unit,
                "by": best[1] if best else None,
                "pass": (best[0] <= limit) if (best and comparable) else None,
            }
        )
    return rows


def report(summary: dict) -> None:
    memory = "peak VRAM GB (steps / run)" if summary["device"].startswith("cuda") else "peak RSS GB"
    for arch, result in summary["archs"].items():
        setup = result["setup"]
        if "status" in setup:
            print(f"\n[{arch}] setup {setup['status']}: {setup['reason']}")
            continue
        print(
            f"\n[{arch}] {result['shape']} model at {result['resolution']} px on {setup['device_name']}, "
            f"LoRA rank 4, 1 instance + 1 class image per step, median after {summary['warmup']} warm-up steps"
        )
        print(f"{'variant':<18}{'ms/step':>10}{memory:>28}{'final loss':>12}  status")
        for variant, row in result["variants"].items():
            if row.get("status") == "ok":
                if summary["device"].startswith("cuda"):
                    vram = row.get("peak_vram_train_gb")  # the naive loop has only the run's peak
                    mem = f"{'-' if vram is None else f'{vram:.2f}'} / {row.get('peak_vram_run_gb', 0):.2f}"
                else:
                    mem = f"{row['peak_rss_gb']:.2f}"
                print(f"{variant:<18}{row['ms_per_step']:>10.1f}{mem:>28}{row['final_loss']:>12.4f}  ok")
            else:
                print(f"{variant:<18}{'-':>10}{'-':>28}{'-':>12}  {row['status']}: {row['reason']}")
        if result.get("naive_over_engine_fp32"):
            print(f"  naive loop / engine, both fp32: {result['naive_over_engine_fp32']:.2f}x per step")
        for label, c in setup["class_images"].items():
            if isinstance(c, dict):
                print(
                    f"  class images ({label}, {c['dtype']}, batch {c['batch_size']}, 25 steps): "
                    f"{c['images_per_s']:.2f} images/s, {c['seconds_per_100']:.1f} s per 100"
                )
        switch = setup["adapter_switch"]
        if "unavailable" in switch:
            print(f"  adapter switch: unavailable ({switch['unavailable']})")
        else:
            print(
                f"  adapter switch (Generator): {switch['switch_ms']:.1f} ms switch, "
                f"{switch['cold_switch_ms']:.1f} ms from disk, {switch['reload_ms']:.0f} ms full reload"
            )
    print("\ngoals (issue 8, on an H100):")
    for g in summary["goals"]:
        verdict = {True: "PASS", False: "FAIL", None: "not comparable (needs --device cuda --shape full)"}
        value = "not measured" if g["measured"] is None else f"{g['measured']:.2f} {g['unit']} ({g['by']})"
        print(f"  {g['arch']:<5} {g['goal']:<46} {value:<40} {verdict[g['pass']]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    p.add_argument("--arch", nargs="+", choices=("sd15", "sdxl"), default=["sd15", "sdxl"])
    p.add_argument(
        "--shape",
        choices=("full", "small"),
        default="full",
        help="full: the real widths (SD 1.5 512 px, SDXL 1024 px); small: the tiny test models at 64 px",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list of {', '.join(VARIANTS)} (default: all)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (default 5)")
    p.add_argument(
        "--class-images",
        type=int,
        help="class images to time (default: 100 for SD 1.5, 16 for SDXL; 2 with --shape small)",
    )
    p.add_argument("--class-batch", type=int, default=4, help="class images per batch (default 4)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per process (0: torch's default)"
    )
    p.add_argument(
        "--timeout", type=float, help="seconds one variant may take before it is recorded as failed"
    )
    p.add_argument("--workdir", type=Path, help="keep models and runs here (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.steps < 1 or args.warmup < 0 or args.class_batch < 1 or (args.class_images or 1) < 1:
        p.error("--steps, --class-images and --class-batch must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.job)
        return
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-train-"))
    started = time.time()
    try:
        archs = {arch: run_arch(arch, args, root) for arch in args.arch}
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    comparable = args.device == "cuda" and args.shape == "full"
    summary = {
        "device": args.device,
        "shape": args.shape,
        "steps": args.steps,
        "warmup": args.warmup,
        "variants": args.variants,
        "command": "python bench/gpu_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": versions(),
        "comparable_to_goals": comparable,
        "seconds": time.time() - started,
        "archs": archs,
        "goals": goal_rows(archs, comparable),
    }
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
