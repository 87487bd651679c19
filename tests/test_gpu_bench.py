"""bench/gpu_train.py on the CPU with the tiny models: every variant either measured or unavailable
with a reason, sane numbers in the JSON, and the goal verdicts only for a full-size CUDA run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_train  # noqa: E402  (torch-free at import)


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", DREAMBOOTH_STUDIO_HOME=str(tmp_path / "home"))
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--device", "cpu", "--shape", "small"]
    cmd += ["--steps", "2", "--warmup", "1", "--workdir", str(tmp_path / "work"), "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "goals (issue 8, on an H100):" in proc.stdout
    return json.loads(out.read_text())


def check_measured(row: dict, steps: int = 2) -> None:
    assert row["status"] == "ok", row
    assert len(row["step_ms"]) == 1 + steps and all(ms > 0 for ms in row["step_ms"])
    assert row["ms_per_step"] > 0 and row["measured_steps"] == steps
    assert 0 < row["final_loss"] < 10
    assert 0.05 < row["peak_rss_gb"] < 16


def check_setup(setup: dict, arch: str) -> None:
    assert setup["device_name"] == "cpu" and setup["model"]["build_s"] > 0
    for label in ("engine", "inference_dtype"):
        c = setup["class_images"][label]
        assert c["images"] >= 1 and c["images_per_s"] > 0 and c["steps"] == 25
        assert c["seconds_per_100"] == pytest.approx(100 / c["images_per_s"])
    switch = setup["adapter_switch"]
    if arch == "sd15":
        assert 0 < switch["switch_ms"] < switch["reload_ms"]
        assert switch["max_pixel_diff_vs_fresh"] <= 1
    else:
        assert "SD 1.5" in switch["unavailable"]


def test_cpu_smoke_sd15(tmp_path):
    """The default smoke: SD 1.5 only, one measured variant and the CUDA-only ones (no process)."""
    result = run_bench(
        tmp_path,
        *("--arch", "sd15", "--class-images", "1", "--class-batch", "1"),
        *("--variants", "bf16,fp16,bf16-xformers,bf16-compile"),
    )
    assert result["variants"] == ["bf16", "fp16", "bf16-xformers", "bf16-compile"]
    assert result["comparable_to_goals"] is False and result["versions"]["torch"]
    sd15 = result["archs"]["sd15"]
    assert sd15["resolution"] == 64 and sd15["naive_over_engine_fp32"] is None
    check_setup(sd15["setup"], "sd15")
    variants = sd15["variants"]
    assert list(variants) == result["variants"]
    check_measured(variants["bf16"])
    for name in ("fp16", "bf16-compile", "bf16-xformers"):
        assert variants[name]["status"] == "unavailable" and "CUDA" in variants[name]["reason"]
    assert "xformers" in variants["bf16-xformers"]["reason"]
    goals = {g["goal"]: g for g in result["goals"] if g["arch"] == "sd15"}
    assert len(goals) == 4 and all(g["pass"] is None for g in goals.values())
    assert goals["ms/step eager <= 40 ms"]["measured"] == variants["bf16"]["ms_per_step"]
    assert goals["ms/step compiled <= 20 ms"]["measured"] is None


@pytest.mark.slow
def test_cpu_smoke_both_architectures_all_variants(tmp_path):
    result = run_bench(tmp_path, "--arch", "sd15", "sdxl")
    assert result["variants"] == list(gpu_train.VARIANTS)
    for arch in ("sd15", "sdxl"):
        check_setup(result["archs"][arch]["setup"], arch)
        variants = result["archs"][arch]["variants"]
        for name in ("bf16", "fp32", "bf16-gradckpt", "bf16-fused-adamw"):
            check_measured(variants[name])
        for name in gpu_train.CUDA_ONLY:
            assert variants[name]["status"] == "unavailable" and variants[name]["reason"]
        # Gradient checkpointing recomputes, it does not change the result.
        assert variants["bf16-gradckpt"]["final_loss"] == pytest.approx(variants["bf16"]["final_loss"])
    check_measured(result["archs"]["sd15"]["variants"]["naive"])
    assert result["archs"]["sd15"]["naive_over_engine_fp32"] > 0
    assert result["archs"]["sdxl"]["naive_over_engine_fp32"] is None
    naive_sdxl = result["archs"]["sdxl"]["variants"]["naive"]
    assert naive_sdxl["status"] == "unavailable" and "SD 1.5 only" in naive_sdxl["reason"]


def test_goal_verdicts_pick_the_best_qualifying_variant():
    def ok(ms, vram):
        return {"status": "ok", "ms_per_step": ms, "peak_vram_train_gb": vram}

    archs = {
        "sd15": {
            "setup": {"class_images": {"engine": {"seconds_per_100": 39.0}}},
            "variants": {
                "bf16": ok(45.0, 5.0),
                "fp16": ok(38.0, 6.5),
                "bf16-compile": ok(21.0, 4.0),
                "bf16-gradckpt": ok(60.0, 3.0),
                "naive": ok(10.0, 1.0),  # never counts: it is the reference, not this engine
                "bf16-xformers": {"status": "oom", "reason": "exit 1"},
            },
        }
    }
    rows = {g["goal"]: g for g in gpu_train.goal_rows(archs, comparable=True)}
    assert (rows["ms/step eager <= 40 ms"]["by"], rows["ms/step eager <= 40 ms"]["pass"]) == ("fp16", True)
    assert rows["ms/step compiled <= 20 ms"]["measured"] == 21.0
    assert rows["ms/step compiled <= 20 ms"]["pass"] is False
    assert (rows["peak VRAM <= 6 GB"]["by"], rows["peak VRAM <= 6 GB"]["pass"]) == ("bf16-compile", True)
    assert rows["100 class images <= 40 s"]["pass"] is True
    assert all(g["pass"] is None for g in gpu_train.goal_rows(archs, comparable=False))


def test_xformers_and_cuda_only_variants_are_explained_without_a_process():
    problem = gpu_train.xformers_problem()
    reason = gpu_train.static_unavailable("bf16-xformers", "cpu")
    assert reason and "CUDA" in reason and (problem is None or problem in reason)
    assert gpu_train.static_unavailable("bf16-compile", "cuda") is None
    assert gpu_train.static_unavailable("fp16", "cpu") == "needs CUDA: the engine refuses it on the CPU"
    assert gpu_train.static_unavailable("bf16", "cpu") is None
