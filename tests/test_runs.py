"""Run history on real tiny-model runs: listing and summaries, the loss chart, TensorBoard events read
back with tensorboard's own reader, continuing a run for more steps, deleting one run, the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil

import numpy as np
import pytest
from conftest import base_config
from PIL import Image

from trainer_core import runs, tracking
from trainer_core.events import StageStarted, TrainingError
from trainer_core.loop import train

STEPS = 6
SECRET = "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123"


@pytest.fixture(scope="module")
def two_runs(tiny_model, photos, class_dir, tmp_path_factory):
    """Two finished runs with different learning rates; the first reports to TensorBoard (with a
    validation image), the second to no tracker. Named so that name order and age order differ."""
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", SECRET)  # a secret in the environment must not reach the trackers
    try:
        first = base_config(
            tiny_model,
            photos,
            root / "z-first",
            class_data_dir=str(class_dir),
            max_train_steps=STEPS,
            learning_rate=1e-3,
            num_validation_images=1,
        )
        train(first)
        second = dataclasses.replace(
            first,
            output_dir=str(root / "a-second"),
            learning_rate=2e-4,
            num_validation_images=0,
            report_to="none",
        )
        train(second)
    finally:
        mp.undo()
    (root / "photos-not-a-run").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    return root, first, second


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ema(values, weight):  # TensorBoard's debiased EMA, written out independently of runs.smooth
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def test_two_runs_are_listed_newest_first_with_correct_summaries(two_runs, caplog):
    root, first, second = two_runs
    with caplog.at_level(logging.WARNING, logger="trainer_core.runs"):
        listed = runs.list_runs(root)
    assert [r.run_id for r in listed] == ["a-second", "z-first"]
    assert "broken" in caplog.text, "the unreadable run is skipped with a log line"
    final_losses = []
    for info, cfg in zip(listed, (second, first), strict=True):
        rows = _rows(info.path)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert info.status == "finished" and info.step == STEPS and info.max_train_steps == STEPS
        assert info.config["learning_rate"] == cfg.learning_rate
        assert info.adapter_dir == info.path / "adapter"
        s = info.summary
        assert s["steps"] == STEPS and s["learning_rate"] == cfg.learning_rate
        for key in ("loss", "instance_loss", "prior_loss"):
            assert s[f"final_{key}"] == rows[-1][key]
            expected = _ema([r[key] for r in rows], 0.6)[-1]
            assert s[f"smoothed_final_{key}"] == pytest.approx(expected, rel=1e-12)
        assert s["final_loss"] == pytest.approx(s["final_instance_loss"] + s["final_prior_loss"], rel=1e-6)
        assert s["smoothed_final_loss"] != s["final_loss"]
        assert (
            s["duration_s"] > 0 and s["peak_memory_mb"] > 100 and s["peak_memory_kind"] == "process_peak_rss"
        )
        assert runs.read_run(info.path).to_dict() == info.to_dict()
        final_losses.append(s["final_loss"])
    assert final_losses[0] != final_losses[1], "different learning rates train differently"
    table = runs.runs_table(listed)
    assert [row["learning_rate"] for row in table] == [2e-4, 1e-3]


def test_smooth_is_tensorboards_debiased_ema():
    assert runs.smooth([1.0, 0.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3, 1 / 7])
    assert runs.smooth([3.0, 1.0], 0.0) == [3.0, 1.0]
    out = runs.smooth([2.0, float("nan"), 2.0])
    assert out[0] == 2.0 and np.isnan(out[1]) and out[2] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="^weight:"):
        runs.smooth([1.0], 1.0)


def test_loss_chart_has_a_point_per_logged_step(two_runs, tmp_path):
    root, *_ = two_runs
    run = root / "z-first"
    chart = run / "loss.png"
    image = Image.open(chart)
    assert image.size == (800, 450)
    drawn = json.loads(image.text["Description"])
    labels = {"total loss", "instance loss", "prior loss"}
    labels |= {f"{n} (smoothed 0.6)" for n in ("total", "instance", "prior")}
    assert set(drawn) == labels
    for line in drawn.values():
        assert line == {"points": STEPS, "first_step": 1, "last_step": STEPS}
    # The curves are drawn, not only declared: the total loss colour (matplotlib C0) is on the image.
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert (np.abs(pixels - [31, 119, 180]).sum(axis=1) < 30).sum() > 500

    # A step logged twice (a crash after step 4, resumed from checkpoint 3) is drawn once.
    rerun = tmp_path
    rows = [
        {"step": s, "loss": 1.0 / s, "instance_loss": 0.5, "prior_loss": None} for s in (1, 2, 3, 4, 4, 5)
    ]
    (rerun / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    drawn = json.loads(Image.open(runs.write_loss_chart(rerun)).text["Description"])
    assert set(drawn) == {"total loss", "total (smoothed 0.6)", "instance loss", "instance (smoothed 0.6)"}
    assert drawn["total loss"] == {"points": 5, "first_step": 1, "last_step": 5}


def test_tensorboard_events_hold_scalars_images_and_secret_free_hparams(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    root, first, _ = two_runs
    logs = root / "z-first" / "logs" / tracking.PROJECT
    acc = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    rows = _rows(root / "z-first")
    for tag, key in (
        ("loss/total", "loss"),
        ("loss/instance", "instance_loss"),
        ("loss/prior", "prior_loss"),
    ):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(1, STEPS + 1))
        np.testing.assert_allclose([e.value for e in events], [r[key] for r in rows], rtol=1e-6)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([r["lr"] for r in rows])
    for label in ("with", "without"):
        images = acc.Images(f"validation/{label}_token")
        assert [e.step for e in images] == [STEPS]
        logged = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
        saved = np.asarray(
            Image.open(root / "z-first" / "samples" / f"step-{STEPS:06d}" / f"{label}-token-0.png")
        )
        np.testing.assert_array_equal(logged, saved)

    hparams = {}
    for sub in logs.iterdir():
        if sub.is_dir():
            sub_acc = EventAccumulator(str(sub))
            sub_acc.Reload()
            try:
                contents = sub_acc.PluginTagToContent("hparams").values()
            except KeyError:  # accelerate's hparams.yml folder holds no events
                continue
            for content in contents:
                info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
                for key, value in info.hparams.items():
                    hparams[key] = getattr(value, value.WhichOneof("kind"))
    expected = {k: v for k, v in first.to_dict().items() if v is not None}
    assert set(hparams) == set(expected)
    assert (
        hparams["learning_rate"] == pytest.approx(1e-3)
        and hparams["instance_prompt"] == first.instance_prompt
    )
    every_byte = b"".join(p.read_bytes() for p in (root / "z-first" / "logs").rglob("*") if p.is_file())
    assert SECRET.encode() not in every_byte
    assert not (root / "a-second" / "logs").exists(), "report_to=none writes no tracker files"


def test_hyperparameters_leave_secrets_out():
    params = tracking.hyperparameters(
        {
            "learning_rate": 1e-4,
            "token": "sks",  # the trigger word, not a credential
            "hub_token": "abc",
            "wandb_api_key": "abc",
            "password": "abc",
            "base_model": f"https://user:{SECRET}@example.com/model.safetensors",
            "validation_prompt": f"a photo of {SECRET}",
            "class_prompt": None,
        }
    )
    assert params == {"learning_rate": 1e-4, "token": "sks"}


def test_continued_run_resumes_at_its_last_step(two_runs, tmp_path):
    root, *_ = two_runs
    run = tmp_path / "runs" / "continued"
    shutil.copytree(root / "z-first", run)
    cfg = runs.continue_config(run, extra_steps=3)
    assert cfg.max_train_steps == STEPS + 3 and cfg.resume_from_checkpoint == "latest"
    assert cfg.output_dir == str(run) and cfg.learning_rate == 1e-3
    events = []
    result = train(dataclasses.replace(cfg, num_validation_images=0), emit=events.append)
    assert result.summary["steps"] == STEPS + 3
    assert any(isinstance(e, StageStarted) and f"at step {STEPS}" in e.message for e in events)
    steps = [r["step"] for r in _rows(run)]  # raw lines: nothing repeated, nothing skipped
    assert steps == list(range(1, STEPS + 4))
    info = runs.read_run(run)
    assert info.step == info.max_train_steps == info.summary["steps"] == STEPS + 3
    assert info.summary["final_loss"] == _rows(run)[-1]["loss"]
    assert info.created == runs.read_run(root / "z-first").created, "continuing keeps the creation time"
    drawn = json.loads(Image.open(run / "loss.png").text["Description"])
    assert drawn["total loss"] == {"points": STEPS + 3, "first_step": 1, "last_step": STEPS + 3}
    assert (run / "checkpoints" / f"checkpoint-{STEPS + 3}").is_dir()
    with pytest.raises(ValueError, match="^extra_steps:"):
        runs.continue_config(run, 0)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ValueError, match="no checkpoint to continue from"):
        runs.continue_config(run, 5)


def test_relaunch_config_changes_only_what_is_asked(two_runs, tmp_path):
    root, first, _ = two_runs
    cfg = runs.relaunch_config(root / "z-first", tmp_path / "new", learning_rate=5e-4, rank=8)
    assert dataclasses.replace(first, output_dir=cfg.output_dir, learning_rate=5e-4, rank=8) == cfg
    assert cfg.output_dir == str(tmp_path / "new") and cfg.resume_from_checkpoint is None
    with pytest.raises(ValueError, match="^output_dir: a relaunch needs a new run folder"):
        runs.relaunch_config(root / "z-first", root / "z-first")
    with pytest.raises(ValueError, match="^output_dir: .* already holds a run"):
        runs.relaunch_config(root / "z-first", root / "a-second")
    with pytest.raises(ValueError, match="^no_such_field: unknown config key"):
        runs.relaunch_config(root / "z-first", tmp_path / "x", no_such_field=1)
    with pytest.raises(ValueError, match="^learning_rate:"):
        runs.relaunch_config(root / "z-first", tmp_path / "x", learning_rate=-1.0)
    assert runs.unique_run_dir(root, "z-first") == root / "z-first-2"


def test_delete_removes_only_that_run(two_runs, tmp_path):
    root, *_ = two_runs
    doomed = root / "to-delete"
    shutil.copytree(root / "a-second", doomed)
    before = {p: p.read_bytes() for p in (root / "z-first").rglob("*") if p.is_file()}
    assert "to-delete" in [r.run_id for r in runs.list_runs(root)]

    outside = tmp_path / "elsewhere"
    shutil.copytree(root / "a-second", outside)
    for bad in (
        outside,
        root,
        root / "photos-not-a-run",
        root / "z-first" / "adapter",
        root / "to-delete" / "..",
    ):
        with pytest.raises(ValueError, match="nothing was deleted"):
            runs.delete_run(bad, root)
    link = root / "link-to-outside"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="nothing was deleted"):
        runs.delete_run(link, root)
    link.unlink()

    runs.delete_run(doomed, root)
    assert not doomed.exists() and (outside / "config.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["a-second", "broken", "photos-not-a-run", "z-first"]
    assert {p: p.read_bytes() for p in (root / "z-first").rglob("*") if p.is_file()} == before
    assert [r.run_id for r in runs.list_runs(root)] == ["a-second", "z-first"]


def test_report_to_choices_and_unusable_trackers(tiny_model, photos, tmp_path, monkeypatch, caplog):
    assert tracking.resolve_report_to("none") == []
    assert tracking.resolve_report_to("tensorboard") == ["tensorboard"]
    with pytest.raises(ValueError, match="^report_to: unknown tracker 'mlflow'"):
        base_config(tiny_model, photos, tmp_path / "r", report_to="mlflow")
    with pytest.raises(ValueError, match="^report_to: 'all' and 'none' stand alone"):
        base_config(tiny_model, photos, tmp_path / "r", report_to="all,none")

    # W&B / Comet: a one-sentence error before anything is written when missing or not logged in.
    monkeypatch.setattr(tracking, "_installed", lambda name: name == "tensorboard")
    cfg = base_config(tiny_model, photos, tmp_path / "r", report_to="wandb")
    with pytest.raises(TrainingError, match=r"needs the wandb package: pip install wandb"):
        train(cfg)
    assert not (tmp_path / "r").exists()
    assert tracking.resolve_report_to("all") == ["tensorboard"]

    monkeypatch.setattr(tracking, "_installed", lambda name: True)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "COMET_API_KEY", "COMET_MODE", "COMET_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        TrainingError, match=r"Weights & Biases is installed but not set up: run `wandb login`"
    ):
        tracking.resolve_report_to("wandb")
    with pytest.raises(TrainingError, match=r"Comet is installed but not set up"):
        tracking.resolve_report_to("tensorboard,comet_ml")
    (tmp_path / "no-netrc").write_text("machine api.wandb.ai login user password abc\n")
    assert tracking.resolve_report_to("wandb") == ["wandb"]
    monkeypatch.setenv("COMET_MODE", "offline")
    assert tracking.resolve_report_to("all") == ["tensorboard", "wandb", "comet_ml"]

    # TensorBoard missing: no tracker and a log line, not an error.
    monkeypatch.setattr(tracking, "_installed", lambda name: False)
    with caplog.at_level(logging.INFO, logger="trainer_core.tracking"):
        assert tracking.resolve_report_to("tensorboard") == []
    assert "TensorBoard is not installed" in caplog.text


def test_runs_cli_lists_shows_and_deletes(two_runs, tmp_path, capsys):
    from trainer_core.cli import main

    root, *_ = two_runs
    shutil.copytree(root / "a-second", root / "cli-copy")
    assert main(["runs", "list", "--runs-dir", str(root)]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["run_id"] for r in listed][1:] == ["a-second", "z-first"]
    assert listed[-1]["learning_rate"] == 1e-3 and listed[-1]["final_loss"] is not None

    assert main(["runs", "list", "--runs-dir", str(tmp_path / "typo")]) == 1
    assert capsys.readouterr().err.startswith("error: runs_dir:")

    assert main(["runs", "show", str(root / "z-first")]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["summary"]["steps"] == STEPS and shown["metrics"][-1]["step"] == STEPS

    assert main(["runs", "delete", str(root / "z-first"), "--runs-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: run_dir:") and err.count("\n") == 1
    assert (root / "z-first" / "config.json").is_file()
    assert main(["runs", "delete", str(root / "cli-copy"), "--runs-dir", str(root)]) == 0
    assert json.loads(capsys.readouterr().out.strip())["deleted"] == str(root / "cli-copy")
    assert not (root / "cli-copy").exists()


def test_listing_runs_imports_neither_torch_nor_matplotlib(two_runs):
    import subprocess
    import sys
    from pathlib import Path

    root, *_ = two_runs
    code = (
        "import sys, trainer_core.runs as r; "
        f"assert len(r.list_runs({str(root)!r})) >= 2; "
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_curves_and_samples_for_comparing_runs(two_runs):
    root, *_ = two_runs
    a, b = root / "z-first", root / "a-second"
    table = runs.loss_curves([a, b], key="instance_loss")
    assert [(r["run"], r["step"]) for r in table] == [("z-first", s) for s in range(1, STEPS + 1)] + [
        ("a-second", s) for s in range(1, STEPS + 1)
    ]
    for run in (a, b):
        rows = _rows(run)
        mine = [r for r in table if r["run"] == run.name]
        assert [r["value"] for r in mine] == [r["instance_loss"] for r in rows]
        assert [r["smoothed"] for r in mine] == pytest.approx(_ema([r["instance_loss"] for r in rows], 0.6))
    with pytest.raises(ValueError, match="^key:"):
        runs.loss_curves([a], key="accuracy")
    assert runs.sample_steps(a) == {
        STEPS: [a / "samples" / f"step-{STEPS:06d}" / n for n in ("with-token-0.png", "without-token-0.png")]
    }
    assert runs.sample_steps(b) == {}, "the second run made no validation images"
