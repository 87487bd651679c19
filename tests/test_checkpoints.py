"""Checkpoints, resume, stop, rotation, interrupted saves and NaN: nothing earlier is ever lost."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import base_config
from lora_fixtures import assert_same_weights, stop_after
from safetensors.torch import load_file

from trainer_core import checkpoints
from trainer_core.events import TrainingError
from trainer_core.loop import train


def test_stop_and_resume_equals_straight_run(tiny_model, photos, class_dir, tmp_path):
    cfg = base_config(
        tiny_model,
        photos,
        tmp_path / "straight",
        class_data_dir=str(class_dir),
        max_train_steps=8,
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        checkpointing_steps=0,
    )
    straight = train(cfg)

    split_cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "split"))
    first = train(split_cfg, should_stop=stop_after(4))
    assert first.status == "stopped" and first.summary["steps"] == 4
    assert (tmp_path / "split" / "adapter" / "pytorch_lora_weights.safetensors").is_file(), (
        "stop saves an adapter"
    )
    assert json.loads((tmp_path / "split" / "status.json").read_text())["status"] == "stopped"
    second = train(dataclasses.replace(split_cfg, resume_from_checkpoint="latest"))
    assert second.status == "finished" and second.summary["steps"] == 8

    assert_same_weights(straight.adapter_dir, second.adapter_dir)
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_rotation_keeps_newest_and_stray_names_are_ignored(tiny_model, photos, class_dir, tmp_path):
    cfg = base_config(
        tiny_model,
        photos,
        tmp_path / "run",
        class_data_dir=str(class_dir),
        max_train_steps=8,
        checkpointing_steps=2,
        checkpoints_total_limit=2,
    )
    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    (ckpts / "checkpoint-99").mkdir()  # incomplete: no state.json
    (ckpts / "notes.txt").write_text("x")
    (ckpts / "checkpoint-latest").mkdir()
    assert checkpoints.find_checkpoint(ckpts, "latest").name == "checkpoint-8"


def test_resume_with_other_rank_or_base_is_refused(tiny_model, photos, class_dir, tmp_path):
    cfg = base_config(
        tiny_model,
        photos,
        tmp_path / "run",
        class_data_dir=str(class_dir),
        max_train_steps=2,
        checkpointing_steps=2,
    )
    train(cfg)
    with pytest.raises(TrainingError, match="rank"):
        train(dataclasses.replace(cfg, rank=8, max_train_steps=4, resume_from_checkpoint="latest"))
    with pytest.raises(TrainingError, match="base_model"):
        train(
            dataclasses.replace(
                cfg, base_model="tiny-sd15", max_train_steps=4, resume_from_checkpoint="latest"
            )
        )
    assert checkpoints.find_checkpoint(tmp_path / "run" / "checkpoints", "latest").name == "checkpoint-2"


def test_nan_loss_stops_the_run_and_nothing_nan_is_saved(
    tiny_model, photos, class_dir, tmp_path, monkeypatch
):
    from diffusers import UNet2DConditionModel

    real_forward = UNet2DConditionModel.forward
    calls = {"n": 0}

    def forward_with_nan(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third training step
                out.sample = out.sample * float("nan")
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward_with_nan)
    cfg = base_config(
        tiny_model,
        photos,
        tmp_path / "run",
        class_data_dir=str(class_dir),
        max_train_steps=6,
        checkpointing_steps=2,
    )
    events = []
    with pytest.raises(TrainingError, match="NaN or infinite at step 3") as e:
        train(cfg, emit=events.append)
    assert e.value.step == 3
    assert type(events[-1]).__name__ == "Failed" and "step 3" in events[-1].message
    run = tmp_path / "run"
    assert not (run / "adapter").exists()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] == 3
    saved = list(run.rglob("*.safetensors"))
    assert saved, "the step-2 checkpoint exists"
    for path in saved:
        for key, tensor in load_file(str(path)).items():
            assert torch.isfinite(tensor).all(), (path, key)
