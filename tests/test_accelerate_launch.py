"""`accelerate launch --num_processes 2 -m trainer_core train` on the CPU: two real processes, one run.

Two accelerate traps shape this test (accelerate 1.15):
- `accelerate launch --cpu --num_processes 2` starts ONE process: with `--cpu` the launcher always
  uses its single-process path unless an MPI hostfile is given (`--mpirun_hostfile`).
- `--multi_gpu` starts two processes through torchrun, but on a machine without CUDA each one then
  sees no distributed backend and trains alone as world size 1 (both write the same run folder).
So the test launches with `--multi_gpu` and sets ACCELERATE_USE_CPU=1, which makes every process
join one gloo process group on the CPU (accelerate's MULTI_CPU mode). On a GPU machine, users run
`accelerate launch --num_processes N -m trainer_core train ...` without either.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_photos(folder: Path, n: int = 3) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        pixels = (rng.random((80, 96, 3)) * 80).astype("uint8")
        pixels[10 + 4 * i : 50 + 4 * i, 20 + 6 * i : 60 + 6 * i] = [210, 70 + 40 * i, 40]
        Image.fromarray(pixels).save(folder / f"photo-{i}.png")
    return folder


def _launch(tmp_path: Path, home: Path, steps: int = STEPS, popen: bool = False, extra: tuple = ()):
    photos = _write_photos(tmp_path / "photos")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DREAMBOOTH_STUDIO_HOME": str(home),
        "ACCELERATE_USE_CPU": "1",
        # A user's ~/.cache/huggingface/accelerate/default_config.yaml must not change the launch.
        "HF_HOME": str(tmp_path / "hf-home"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "trainer_core", "train",
        "--base-model", "tiny-sd15",
        "--instance-dir", str(photos),
        "--instance-prompt", "a photo of sks toy",
        "--class-prompt", "a photo of a toy",
        "--num-class-images", "4",
        "--class-generation-steps", "2",
        "--validation-inference-steps", "2",
        "--max-train-steps", str(steps),
        "--checkpointing-steps", "2",
        "--output-dir", str(tmp_path / "run"),
        *extra,
    ]  # fmt: skip
    if popen:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - t0


def _check_run(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"nothing on stdout\n{proc.stderr[-2000:]}"
    summary = json.loads(lines[-1])
    for key in ("adapter_dir", "steps", "final_loss", "seconds"):
        assert key in summary, f"{key} missing from the summary {summary}"
    assert summary["steps"] == STEPS
    assert summary["final_loss"] is not None and summary["final_loss"] == summary["final_loss"]  # not NaN
    # Exactly one process printed the summary and wrote metrics: two processes that failed to join
    # one group would each train alone and append their own lines to the same metrics.jsonl.
    assert sum(line.lstrip().startswith("{") for line in lines) == 1, proc.stdout
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == list(range(1, STEPS + 1))
    adapter = Path(summary["adapter_dir"])
    assert adapter == run_dir / "adapter"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_two_cpu_processes_train_one_adapter(tmp_path):
    # An empty cache: both ranks ask for tiny-sd15 at once; a file lock lets one build it while
    # the other waits (without it, one rank loaded a half-replaced folder and the run failed).
    proc, seconds = _launch(tmp_path, tmp_path / "studio-home")
    print(f"accelerate launch, 2 CPU processes, {STEPS} steps: {seconds:.1f} s wall")
    _check_run(proc, tmp_path / "run")


def test_two_processes_train_sdxl_with_text_encoder_lora(tmp_path):
    """SDXL conditions on text encoder 1's penultimate layer: a LoRA on its last layer got no
    gradient and DDP failed at step 2 ("Expected to have finished reduction ..."). No such LoRA now."""
    proc, seconds = _launch(
        tmp_path, tmp_path / "studio-home", extra=("--base-model", "tiny-sdxl", "--train-text-encoder")
    )
    print(f"accelerate launch, 2 CPU processes, SDXL + text-encoder LoRA, {STEPS} steps: {seconds:.1f} s")
    _check_run(proc, tmp_path / "run")


def test_a_stop_that_reaches_one_process_stops_both(tmp_path):
    """Ctrl-C delivered to rank 1 only: both ranks agree to stop at the same step, save, and exit."""
    import signal

    import psutil

    run = tmp_path / "run"
    launcher = _launch(tmp_path, tmp_path / "studio-home", steps=500, popen=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        ranks = {}
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and "trainer_core" in " ".join(child.cmdline()):
                ranks[rank] = child
        assert set(ranks) == {"0", "1"}, ranks
        ranks["1"].send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=120)  # a hang would time out here
    finally:
        if launcher.poll() is None:
            launcher.kill()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped", (status, stderr[-2000:])
    assert 0 < status["step"] < 500
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "checkpoints" / f"checkpoint-{status['step']}").is_dir()
