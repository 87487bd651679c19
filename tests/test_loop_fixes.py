"""Defects of the loop found against diffusers' DreamBooth LoRA scripts, each pinned by a test that
failed before its fix: SDXL text-encoder LoRA on a layer whose output is never used, a
prediction_type override leaking into class images, a resume that ignored a new learning rate, the
lr schedule moving on fp16-skipped steps, a host sync every step, class images in fp32 on a GPU,
checkpoints without their architecture, a full disk and a damaged checkpoint."""

from __future__ import annotations

import dataclasses
import errno
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import base_config

from trainer_core import checkpoints, loop
from trainer_core.events import CheckpointSaved, TrainingError
from trainer_core.loop import train

# -- 1. SDXL text-encoder LoRA only where the conditioning reads ------------------------------


def test_sdxl_text_encoder_lora_gets_a_gradient_everywhere(tiny_sdxl):
    """SDXL reads text encoder 1's penultimate hidden state: a LoRA on its last layer would never
    get a gradient (and DDP without find_unused_parameters fails at step 2 on such weights)."""
    from trainer_core.components import add_lora, load_components

    parts, _ = load_components(str(tiny_sdxl))
    te1, te2 = parts["text_encoder"], parts["text_encoder_2"]
    add_lora(parts["unet"], te1, rank=4, alpha=4.0, train_text_encoder=True, text_encoder_2=te2)
    last = te1.config.num_hidden_layers - 1
    assert not any(f"layers.{last}." in n for n, _ in te1.named_parameters() if "lora_" in n)
    assert any(f"layers.{last}." in n for n, _ in te2.named_parameters() if "lora_" in n)
    g = torch.Generator().manual_seed(0)
    for te in (te1, te2):  # lora_B starts at zero: perturb it so lora_A gets gradients too
        for name, p in te.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.1
    ids = [
        tok(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        for tok in (parts["tokenizer"], parts["tokenizer_2"])
    ]
    embeds, pooled = loop.encode_prompts([te1, te2], ids)
    (embeds.pow(2).mean() + pooled.pow(2).mean()).backward()
    no_grad = [
        n
        for te in (te1, te2)
        for n, p in te.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().max() == 0)
    ]
    assert not no_grad, no_grad


# -- 2. prediction_type stays out of class images; the cache key names what shapes them -------


def test_prediction_type_override_does_not_reach_class_images(tiny_model, photos, tmp_path):
    from trainer_core.class_images import class_cache_dir, generate_class_images
    from trainer_core.components import assemble_pipeline, load_components
    from trainer_core.data import list_images

    prompt = "a photo of a zebra"
    cfg = base_config(
        tiny_model,
        photos,
        tmp_path / "run",
        instance_prompt="a photo of sks zebra",
        class_prompt=prompt,
        num_class_images=2,
        class_generation_steps=2,
        prediction_type="v_prediction",
        max_train_steps=1,
    )
    train(cfg)
    cached = class_cache_dir(f"local:{Path(tiny_model).resolve()}", prompt, 64, steps=2)
    reference = generate_class_images(
        lambda: assemble_pipeline(load_components(str(tiny_model))[0]),
        prompt,
        tmp_path / "reference",
        2,
        resolution=64,
        num_inference_steps=2,
    )
    made = list_images(cached)
    assert len(made) == 2
    for a, b in zip(made, reference, strict=True):
        assert np.array_equal(np.asarray(_rgb(a)), np.asarray(_rgb(b))), "sampled with the override"


def _rgb(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_class_cache_key_names_vae_steps_and_dtype():
    from trainer_core.class_images import class_cache_dir

    base = class_cache_dir("local:/m", "a photo of a dog", 512)
    assert base == class_cache_dir("local:/m", "a photo of a dog", 512, vae=None, steps=25, dtype="float32")
    others = {
        class_cache_dir("local:/m", "a photo of a dog", 512, vae="madebyollin/sdxl-vae-fp16-fix"),
        class_cache_dir("local:/m", "a photo of a dog", 512, steps=50),
        class_cache_dir("local:/m", "a photo of a dog", 512, dtype="float16"),
    }
    assert base not in others and len(others) == 3


# -- 3. a resume applies this run's learning rate -----------------------------------------------


def test_resume_applies_the_new_learning_rate(tiny_model, photos, class_dir, tmp_path):
    cfg = base_config(
        tiny_model,
        photos,
        tmp_path / "run",
        class_data_dir=str(class_dir),
        max_train_steps=3,
        learning_rate=1e-3,
        lr_scheduler="linear",
    )
    train(cfg)
    events = []
    resumed = dataclasses.replace(cfg, max_train_steps=6, learning_rate=1e-4, resume_from_checkpoint="latest")
    train(resumed, emit=events.append)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows}
    # linear decay over 6 steps from the new peak 1e-4: step k uses 1e-4 * (1 - (k - 1) / 6)
    for step in (4, 5, 6):
        assert lr[step] == pytest.approx(1e-4 * (1 - (step - 1) / 6), rel=1e-6), (step, lr)
    assert any("learning rate 0.001 -> 0.0001" in getattr(e, "message", "") for e in events)
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    assert state["learning_rate"] == 1e-4


# -- 4. fp16: the schedule does not move on a skipped step; the scaler is checkpointed --------


def test_lr_schedule_waits_when_the_grad_scaler_skipped_the_step():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    optimizer.step()
    loop.step_lr_scheduler(SimpleNamespace(optimizer_step_was_skipped=True), scheduler)
    assert scheduler.last_epoch == 0
    loop.step_lr_scheduler(SimpleNamespace(optimizer_step_was_skipped=False), scheduler)
    assert scheduler.last_epoch == 1


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler_state = scaler.state_dict()
    path = checkpoints.save_checkpoint(
        tmp_path,
        5,
        lora_state={"unet.a.lora_A.weight": torch.ones(2, 2)},
        optimizer_state={"state": {}, "param_groups": []},
        scheduler_state={"last_epoch": 5},
        scaler_state=scaler_state,
        state={"base_model": "m"},
        total_limit=None,
    )
    ckpt = checkpoints.load_checkpoint(path)
    assert ckpt.scaler == scaler_state and ckpt.step == 5
    no_scaler = checkpoints.save_checkpoint(
        tmp_path,
        6,
        lora_state={"unet.a.lora_A.weight": torch.ones(2, 2)},
        optimizer_state={},
        scheduler_state={},
        state={},
        total_limit=None,
    )
    assert checkpoints.load_checkpoint(no_scaler).scaler is None


# -- 5. no host sync per step -------------------------------------------------------------------


def test_losses_are_read_in_batches_not_every_step(tiny_model, photos, class_dir, tmp_path, monkeypatch):
    """`.item()` / `.tolist()` in the loop block until the GPU catches up. With a sync interval of
    4, eight steps may sync twice (steps 4 and 8), yet every step is logged and checked for NaN."""
    syncs = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            import sys

            if sys._getframe(1).f_code.co_filename == loop.__file__:
                syncs.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(loop, "sync_interval", lambda config, device: 4)
    cfg = base_config(tiny_model, photos, tmp_path / "run", class_data_dir=str(class_dir), max_train_steps=8)
    result = train(cfg)
    monkeypatch.undo()
    assert len(syncs) <= 2, syncs
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert result.summary["final_loss"] == pytest.approx(rows[-1]["loss"])


# -- 6. class images in the run's half precision on a GPU, decoded by the fp32 VAE ----------------


def test_class_images_use_half_precision_on_cuda_only():
    from trainer_core.class_images import class_image_dtype

    assert class_image_dtype("cuda", "bf16") == torch.bfloat16
    assert class_image_dtype("cuda", "fp16") == torch.float16
    assert class_image_dtype("cuda", "no") == torch.float16
    assert class_image_dtype("cpu", "bf16") == torch.float32


def test_half_precision_unet_with_fp32_vae_makes_the_same_images(tiny_model, tmp_path):
    """The half path (UNet and text encoder in bf16, VAE in fp32 decoding the latents) run on
    the CPU: images close to the fp32 ones, not garbage and not an error."""
    from trainer_core.class_images import generate_class_images
    from trainer_core.components import assemble_pipeline, load_components

    def pipe(dtype):
        parts, _ = load_components(str(tiny_model))
        parts["unet"].to(dtype=dtype)
        parts["text_encoder"].to(dtype=dtype)
        return assemble_pipeline(parts)

    kw = dict(resolution=64, num_inference_steps=3)
    full = generate_class_images(lambda: pipe(torch.float32), "a photo of a dog", tmp_path / "fp32", 2, **kw)
    half = generate_class_images(lambda: pipe(torch.bfloat16), "a photo of a dog", tmp_path / "bf16", 2, **kw)
    for a, b in zip(full, half, strict=True):
        diff = np.abs(np.asarray(_rgb(a), dtype=np.float32) - np.asarray(_rgb(b), dtype=np.float32))
        assert diff.mean() < 8.0, diff.mean()


# -- checkpoints: architecture recorded; a full disk; a damaged file ----------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model, photos, class_dir, tmp_path_factory):
    cfg = base_config(
        tiny_model,
        photos,
        tmp_path_factory.mktemp("ckpt") / "run",
        class_data_dir=str(class_dir),
        max_train_steps=4,
        checkpointing_steps=2,
    )
    train(cfg)
    return cfg


def test_checkpoint_records_its_architecture(two_checkpoints):
    from trainer_core.inference import check_architecture, describe_adapter

    ckpt = Path(two_checkpoints.output_dir) / "checkpoints" / "checkpoint-2"
    assert checkpoints.read_state(ckpt)["architecture"] == "sd15"
    source = describe_adapter(ckpt)
    assert source.architecture == "sd15"
    with pytest.raises(TrainingError, match="SD"):
        check_architecture(source, "sdxl", "an SDXL base")


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints.output_dir, run)
    weights = run / "checkpoints" / "checkpoint-4" / "lora.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as a crash mid-write would leave it
    cfg = dataclasses.replace(two_checkpoints, output_dir=str(run), max_train_steps=6)
    with pytest.raises(TrainingError, match=r"checkpoint-4/lora\.safetensors is damaged"):
        train(dataclasses.replace(cfg, resume_from_checkpoint="checkpoint-4"))
    events = []
    result = train(dataclasses.replace(cfg, resume_from_checkpoint="latest"), emit=events.append)
    assert result.status == "finished" and result.summary["steps"] == 6
    assert any("resumed from checkpoint-2 at step 2" in getattr(e, "message", "") for e in events)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root can mount one here); without that right, a patched write raising ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    yield mount, done.returncode == 0
    if done.returncode == 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_checkpointing_is_one_sentence_and_resumable(
    tiny_model, photos, class_dir, small_disk, monkeypatch
):
    disk, real = small_disk
    filler = disk / "filler"
    cfg = base_config(
        tiny_model,
        photos,
        disk / "run",
        class_data_dir=str(class_dir),
        max_train_steps=6,
        checkpointing_steps=2,
        report_to="none",
    )
    full = {"on": False}

    def fill(event):
        if isinstance(event, CheckpointSaved) and event.step == 2:
            full["on"] = True
            if real:
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()
                    except OSError as e:
                        assert e.errno == errno.ENOSPC

    if not real:
        real_write = Path.write_bytes

        def write_bytes(self, data):
            if full["on"] and "checkpoint-" in str(self):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(TrainingError, match="No space left on device.*free disk space") as e:
        train(cfg, emit=fill)
    assert e.value.step == 4
    ckpts = disk / "run" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["checkpoint-2"], "no half-written folder is left"
    status = json.loads((disk / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "free disk space" in status["message"]
    full["on"] = False
    filler.unlink(missing_ok=True)
    resumed = train(dataclasses.replace(cfg, resume_from_checkpoint="latest"))
    assert resumed.summary["steps"] == 6
