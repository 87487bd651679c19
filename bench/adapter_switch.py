"""Adapter switch benchmark: hot-swapping an adapter in the resident pipeline vs reloading, in one run.

Two adapters (real adapter folders written by `save_adapter`, LoRA rank 4 on the UNet attention,
seeded non-zero weights) on one SD 1.5-architecture random model saved as a diffusers folder. Timed,
alternating between the two adapters, each a median over `--repeats`:

  reload       a new `Generator` loads the base model and the adapter (`prepare`), as a gallery that
               rebuilds its pipeline per subject does; its pipeline is dropped afterwards
  cold switch  the resident pipeline loads the adapter from disk (it was unloaded before, untimed):
               `load_lora_weights` + `set_adapters`, what a subject's first use costs
  switch       both adapters already loaded: `set_adapters` only (what the app does afterwards)

No sampling is timed (`--gen-steps N` adds one image for scale). After timing, a small image with
each adapter from the resident pipeline is checked against a freshly loaded one. At most two
copies of the model are in memory at once (the resident one and the one being reloaded).

    python bench/adapter_switch.py                    # small model, CPU (see docs/BENCHMARKS.md)
    python bench/adapter_switch.py --shape sd15       # real SD 1.5 size (for a GPU)
    python bench/adapter_switch.py --shape tiny --repeats 3   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # trainer_core, when run as a script

from trainer_core.shapes import SMALL_SD15, TINY_SD15, SD15Shape  # noqa: E402  (torch-free)

SHAPES = {
    "tiny": TINY_SD15,
    "small": SMALL_SD15,  # bench/train_speed.py's model: SD 1.5's layout at a fifth of its widths, 256 px
    "sd15": SD15Shape(),  # the real SD 1.5 widths (UNet 860 M parameters), 512 px
}
PROMPT = "a photo of sks dog"
GOAL = 0.05  # a switch should cost at most 5% of a reload


def build_fixtures(shape: SD15Shape, workdir: Path, rank: int) -> tuple[Path, list[Path]]:
    """The model folder and two adapter folders (built once, outside any timing)."""
    import torch

    from trainer_core import adapters, components

    model = workdir / "model"
    if not (model / "model_index.json").exists():
        components.save_sd15(components.build_sd15(shape, seed=0), model, tiny=False)
    folders = []
    for seed, name in ((1, "subject-a"), (2, "subject-b")):
        out = workdir / name
        folders.append(out)
        if (out / adapters.LORA_WEIGHT_NAME).exists():
            continue
        parts, _ = components.load_components(str(model))
        unet = parts["unet"]
        torch.manual_seed(seed)
        components.add_lora(unet, parts["text_encoder"], rank=rank, alpha=rank, train_text_encoder=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in unet.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        adapters.save_adapter(
            out,
            unet=unet,
            name=name,
            metadata={"base_model": str(model), "instance_prompt": PROMPT, "token": "sks", "steps": 0},
            config_json="{}",
        )
    return model, folders


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def summarise(samples: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "n": len(samples),
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from trainer_core.inference import GenerateRequest, Generator

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    shape = SHAPES[args.shape]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="adapter-switch-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, folders = build_fixtures(shape, workdir, args.rank)
    build_s = time.perf_counter() - t0

    check_px = min(shape.resolution, 128)  # the correctness images: small, so a CPU manages real size

    def request(i: int, steps: int = 1, size: int | None = None) -> GenerateRequest:
        return GenerateRequest(
            base_model=str(model),
            prompt=PROMPT,
            steps=steps,
            seed=3,
            width=size,
            height=size,
            adapters=((str(folders[i % 2]), 1.0),),
        )

    def reload_once(i: int) -> None:
        g = Generator(device=device)
        g.prepare(request(i))
        g.unload_all()

    resident = Generator(device=device, max_loaded_adapters=8)
    resident.prepare(request(0))  # base model loaded, both adapters seen once, outside timing
    resident.prepare(request(1))
    reload_once(0)  # warm the file cache

    times: dict[str, list[float]] = {"reload": [], "cold switch": [], "switch": []}
    for i in range(args.repeats):
        # Interleaved, so a slow moment of a shared machine hits all three alike.
        times["reload"].append(timed(lambda i=i: reload_once(i), sync))
        resident.unload_adapter(folders[i % 2])
        times["cold switch"].append(timed(lambda i=i: resident.prepare(request(i)), sync))
        times["switch"].append(timed(lambda i=i: resident.prepare(request(i + 1)), sync))

    result = {
        "shape": args.shape,
        "device": device,
        "dtype": str(resident.dtype),
        "rank": args.rank,
        "repeats": args.repeats,
        "threads": args.threads,
        "build_fixtures_s": round(build_s, 1),
        "ways": {k: summarise(v) for k, v in times.items()},
    }
    reload_median = result["ways"]["reload"]["median_s"]
    for way in ("switch", "cold switch"):
        result["ways"][way]["fraction_of_reload"] = result["ways"][way]["median_s"] / reload_median

    # Correctness: after all that swapping, the resident pipeline gives each adapter's image exactly
    # as a freshly loaded pipeline does.
    import numpy as np

    diffs = []
    for i in (0, 1):
        fresh = Generator(device=device)
        expected = np.asarray(fresh.generate(request(i, 2, check_px))[0], dtype=np.int16)
        fresh.unload_all()
        got = np.asarray(resident.generate(request(i, 2, check_px))[0], dtype=np.int16)
        diffs.append(int(np.abs(got - expected).max()))
    a, b = (np.asarray(resident.generate(request(i, 2, check_px))[0], dtype=np.int16) for i in (0, 1))
    result["max_pixel_diff_vs_fresh"] = max(diffs)
    result["check_px"] = check_px
    result["adapters_differ_mean_px"] = round(float(np.abs(a - b).mean()), 2)
    if args.gen_steps:
        gen = [timed(lambda: resident.generate(request(0, steps=args.gen_steps)), sync) for _ in range(3)]
        result["generate_one_image_s"] = statistics.median(gen)
        result["generate_steps"] = args.gen_steps
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def report(result: dict) -> str:
    lines = [
        f"model {result['shape']} on {result['device']} ({result['dtype']}), LoRA rank {result['rank']}, "
        f"{result['repeats']} repeats, {result['threads']} torch thread(s)",
        f"{'way':<14}{'median s':>12}{'min s':>12}{'max s':>12}{'of reload':>12}",
    ]
    for way, s in result["ways"].items():
        frac = f"{100 * s['fraction_of_reload']:.2f}%" if "fraction_of_reload" in s else "100%"
        lines.append(f"{way:<14}{s['median_s']:>12.4f}{s['min_s']:>12.4f}{s['max_s']:>12.4f}{frac:>12}")
    switch = result["ways"]["switch"]
    lines.append(
        f"reload / switch = {result['ways']['reload']['median_s'] / switch['median_s']:.0f}x; "
        f"goal switch <= {100 * GOAL:.0f}% of reload: {'met' if switch['fraction_of_reload'] <= GOAL else 'NOT met'}"
    )
    lines.append(
        f"resident-pipeline images ({result['check_px']} px) vs a fresh load: max pixel difference "
        f"{result['max_pixel_diff_vs_fresh']} "
        f"(the two adapters differ by {result['adapters_differ_mean_px']} on average)"
    )
    if "generate_one_image_s" in result:
        lines.append(f"one {result['generate_steps']}-step image: {result['generate_one_image_s']:.3f} s")
    if "gpu" in result:
        lines.append(f"GPU {result['gpu']}, peak {result['peak_vram_mb']} MiB")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model size (default small)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per way (default 7)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of the two adapters (default 4)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared CPU)"
    )
    p.add_argument("--gen-steps", type=int, default=0, help="also time one image with this many steps")
    p.add_argument("--workdir", type=Path, help="keep the model and adapters here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
