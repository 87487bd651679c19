"""The CLI end to end, as a user runs it: make-tiny-model -> train with prior preservation -> generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_photos
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, check=True, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer_core", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = tmp / "model"
    made = cli("make-tiny-model", model)
    assert json.loads(made.stdout.strip().splitlines()[-1])["model_dir"] == str(model)
    photos = write_photos(tmp / "photos", n=3)
    proc = cli(
        "train",
        "--base-model",
        model,
        "--instance-dir",
        photos,
        "--instance-prompt",
        "a photo of sks dog",
        "--output-dir",
        tmp / "run",
        "--class-prompt",
        "a photo of a dog",
        "--num-class-images",
        4,
        "--prior-loss-weight",
        1.0,
        "--max-train-steps",
        20,
        "--rank",
        4,
        "--learning-rate",
        1e-3,
        "--seed",
        0,
        "--checkpointing-steps",
        10,
    )
    return dict(tmp=tmp, model=model, summary=json.loads(proc.stdout.strip().splitlines()[-1]), proc=proc)


def test_train_prints_json_summary_last(cli_run):
    summary = cli_run["summary"]
    assert summary["steps"] == 20 and summary["status"] == "finished"
    assert summary["final_loss"] > 0 and summary["seconds"] > 0
    adapter = Path(summary["adapter_dir"])
    for name in (
        "pytorch_lora_weights.safetensors",
        "sks-dog.safetensors",
        "adapter.json",
        "config.json",
        "metrics.jsonl",
        "README.md",
    ):
        assert (adapter / name).is_file(), name
    assert any((adapter / "samples").iterdir())
    assert "train" in cli_run["proc"].stderr  # progress went to stderr
    # class images were generated into the shared cache, which a second subject reuses
    caches = list((Path(os.environ["DREAMBOOTH_STUDIO_HOME"]) / "class_images").glob("a-photo-of-a-dog-64-*"))
    # (Other tests cache "a photo of a dog" for other models too: one entry per model, any order.)
    assert any(len(list(c.glob("class-*.png"))) >= 4 for c in caches), caches


def test_generate_with_and_without_adapter(cli_run):
    tmp, model, adapter = cli_run["tmp"], cli_run["model"], cli_run["summary"]["adapter_dir"]
    common = ["--base-model", model, "--prompt", "a photo of sks dog", "--steps", 4, "--seed", 5]
    cli("generate", *common, "--out", tmp / "base.png")
    cli("generate", *common, "--adapter", adapter, "--out", tmp / "lora.png")
    cli("generate", *common, "--adapter", adapter, "--out", tmp / "lora-again.png")
    base, lora, again = (
        np.asarray(Image.open(tmp / n), dtype=np.int16) for n in ("base.png", "lora.png", "lora-again.png")
    )
    assert np.abs(base - lora).max() > 2, "the adapter must change the image"
    assert np.array_equal(lora, again), "the same seed repeats exactly"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--instance-dir", "x", "--output-dir", "y"], "instance_prompt"),
        (
            [
                "train",
                "--instance-dir",
                "x",
                "--instance-prompt",
                "a sks",
                "--output-dir",
                "y",
                "--rank",
                "0",
            ],
            "rank",
        ),
        (["train", "--bogus"], "unrecognized arguments"),
        (
            [
                "train",
                "--instance-dir",
                "/nonexistent",
                "--instance-prompt",
                "a sks",
                "--output-dir",
                "/tmp/o",
                "--base-model",
                "/nonexistent/model",
            ],
            "does not exist",
        ),
        (["generate", "--base-model", "someone/not-cached", "--prompt", "x", "--out", "/tmp/x.png"], "Hub"),
        (["generate", "--base-model", "tiny-sd15", "--prompt", "x", "--out", "/tmp/x.jpg"], ".png"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(args, fragment):
    proc = cli(*args, check=False, timeout=120)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_edit_photo_removes_recrops_and_captions(tmp_path):
    """The photo editor's edits from the command line: a caption, a crop mode, a box, a focus point,
    and a removal; a wrong photo name or two edits at once is one sentence, the set unchanged."""
    from trainer_core.cli import main
    from trainer_core.prep import read_report

    photos = write_photos(tmp_path / "photos", n=3)
    out = tmp_path / "set"
    assert main(["prep", "--input", str(photos), "--output", str(out), "--resolution", "64"]) == 0
    first, second = (a.output for a in read_report(out).accepted[:2])

    def edit(*args):
        return main(["edit-photo", str(out), *args])

    assert edit(first, "--caption", "a photo of sks dog on grass") == 0
    assert read_report(out).accepted[0].caption == "a photo of sks dog on grass"
    assert (out / first).with_suffix(".txt").read_text().strip() == "a photo of sks dog on grass"
    assert edit(first, "--crop", "center") == 0
    width, height = Image.open(tmp_path / "photos" / read_report(out).accepted[0].source.split("/")[-1]).size
    side = min(width, height)
    assert list(read_report(out).accepted[0].crop_box) == [(width - side) // 2, (height - side) // 2,
                                                           (width - side) // 2 + side, (height - side) // 2 + side]  # fmt: skip
    assert edit(first, "--box", "0,0,40,40") == 0
    assert list(read_report(out).accepted[0].crop_box) == [0, 0, 40, 40]
    assert edit(first, "--focus", "30,30", "--side", "20") == 0
    assert list(read_report(out).accepted[0].crop_box) == [20, 20, 40, 40]
    assert edit(second, "--remove") == 0
    assert [a.output for a in read_report(out).accepted] == [first, read_report(out).accepted[1].output]
    assert not (out / second).exists() and len(read_report(out).accepted) == 2
    before = (out / "report.json").read_text()
    assert edit("nope.png", "--remove") == 1
    assert edit(first, "--remove", "--caption", "x") == 2
    assert edit(first, "--box", "1,2,3") == 2
    assert (out / "report.json").read_text() == before
