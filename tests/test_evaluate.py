"""Scores of validation rounds and checkpoints (trainer_core/evaluate.py) on the tiny models: the
similarities are the models' own cosines, the best-checkpoint rule picks by its statement, a short
run writes scores for every round without changing its weights, and an exported checkpoint is that
checkpoint's LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import base_config
from PIL import Image

from trainer_core import evaluate
from trainer_core.evaluate import BestRule, best_checkpoint


@pytest.fixture(scope="module")
def tiny_eval():
    models, why = evaluate.load_eval_models("tiny")
    assert models is not None, why
    return models


def _noise_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


def test_scores_are_the_tiny_models_own_cosines(tiny_eval):
    """Identical images score 1, unrelated ones lower, each equal to a cosine computed by hand from
    the models' outputs (DINO: the CLS token of the last layer; CLIP: the projected embeddings)."""
    m = tiny_eval
    photo, other, klass = _noise_image(0), Image.new("RGB", (64, 64), (200, 30, 30)), _noise_image(7)
    text = "a dog in the snow"

    def dino(image):
        pixels = m.dino_processor(images=[image], return_tensors="pt")["pixel_values"]
        return m.dino(pixel_values=pixels).last_hidden_state[0, 0]

    def clip_image(image):
        pixels = m.clip_processor(images=[image], return_tensors="pt")["pixel_values"]
        return m.clip.get_image_features(pixel_values=pixels).pooler_output[0]

    with torch.no_grad():
        ids = m.clip_tokenizer([text], return_tensors="pt").input_ids
        clip_text = m.clip.get_text_features(input_ids=ids).pooler_output[0]
        same = evaluate.score_images(m, [photo], [text], [klass], [photo])
        unrelated = evaluate.score_images(m, [other], [text], [klass], [photo])
        d_photo, d_other, d_class = dino(photo), dino(other), dino(klass)
        c_photo, c_other = clip_image(photo), clip_image(other)

    assert same["dino"] == pytest.approx(1.0, abs=1e-5) and same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert unrelated["dino"] == pytest.approx(_cos(d_other, d_photo), abs=1e-5)
    assert unrelated["clip_i"] == pytest.approx(_cos(c_other, c_photo), abs=1e-5)
    assert unrelated["dino"] < same["dino"] - 0.02 and unrelated["clip_i"] < same["clip_i"] - 0.02
    assert same["clip_t"] == pytest.approx(_cos(c_photo, clip_text), abs=1e-5)
    assert unrelated["clip_t"] == pytest.approx(_cos(c_other, clip_text), abs=1e-5)
    assert same["pres"] == pytest.approx(_cos(d_class, d_photo), abs=1e-5)
    # Means over every (generated, photo) pair, with the count.
    both = evaluate.score_images(m, [photo, other], [text, text], [], [photo, klass])
    pairs = [(a, b) for a in (d_photo, d_other) for b in (d_photo, d_class)]
    assert both["dino"] == pytest.approx(sum(_cos(a, b) for a, b in pairs) / 4, abs=1e-5)
    assert both["dino_n"] == 4 and both["clip_t_n"] == 2 and both["pres"] is None and both["pres_n"] == 0


SCORES = [
    {"step": 100, "dino": 0.50, "clip_i": 0.70, "clip_t": 0.300, "pres": 0.40},
    {"step": 200, "dino": 0.60, "clip_i": 0.72, "clip_t": 0.290, "pres": 0.42},
    {"step": 300, "dino": 0.70, "clip_i": 0.74, "clip_t": 0.250, "pres": 0.42},  # CLIP-T fell 17%
    {"step": 400, "dino": 0.75, "clip_i": 0.71, "clip_t": 0.300, "pres": 0.50},  # PRES rose 25%
    {"step": 500, "dino": 0.65, "clip_i": 0.73, "clip_t": 0.280, "pres": 0.43},
    {"step": 600, "dino": float("nan"), "clip_i": float("inf"), "clip_t": 0.3, "pres": 0.4},  # unusable
]


def test_best_checkpoint_rule_on_a_hand_written_table():
    best = best_checkpoint(SCORES)
    assert best["step"] == 500 and best["value"] == 0.65 and best["metric"] == "dino"
    assert "step 100" in best["reason"]
    assert best_checkpoint(SCORES, steps=[100, 200, 300, 400])["step"] == 200
    assert best_checkpoint(SCORES, BestRule(clip_t_tolerance=0.2))["step"] == 300
    assert best_checkpoint(SCORES, BestRule(clip_t_tolerance=0.2, pres_tolerance=0.3))["step"] == 400
    assert best_checkpoint(SCORES, BestRule(metric="clip_i"))["step"] == 500
    assert best_checkpoint(SCORES, BestRule(metric="clip_i", pres_tolerance=0.0))["step"] == 100
    assert best_checkpoint([]) is None
    assert best_checkpoint(SCORES, steps=[600]) is None
    # Rows rescored without PRES (no class prompt) are judged on the bounds they have.
    no_pres = [{**r, "pres": None} for r in SCORES]
    assert best_checkpoint(no_pres)["step"] == 400


def test_best_checkpoint_of_a_run_is_a_saved_one_and_needs_no_torch(tmp_path):
    """The page's call: the rule from the run's config, candidates among checkpoints on disk, and
    torch never imported."""
    import subprocess
    import sys

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"best_clip_t_tolerance": 0.2}))
    (run / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SCORES))
    for step in (100, 300, 500):
        (run / "checkpoints" / f"checkpoint-{step}").mkdir()
        if step != 500:  # checkpoint-500 is incomplete: no state.json
            (run / "checkpoints" / f"checkpoint-{step}" / "state.json").write_text("{}")
    code = (
        "import sys, json; from trainer_core import evaluate\n"
        f"best = evaluate.best_checkpoint_for_run({str(run)!r})\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps(best))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    best = json.loads(out)
    assert best["step"] == 300 and best["path"] == str(run / "checkpoints" / "checkpoint-300")
    assert best["rule"] == {"metric": "dino", "clip_t_tolerance": 0.2, "pres_tolerance": 0.1}


def test_rule_comes_from_the_run_config(tiny_model, photos, tmp_path):
    cfg = base_config(tiny_model, photos, tmp_path, best_metric="clip_i", best_pres_tolerance=0.0)
    assert BestRule.from_config(cfg) == BestRule("clip_i", 0.1, 0.0)
    assert BestRule.from_config(cfg.to_dict()) == BestRule("clip_i", 0.1, 0.0)
    assert BestRule.from_config({}) == BestRule()
    with pytest.raises(ValueError, match="^eval_models:"):
        base_config(tiny_model, photos, tmp_path, eval_models="big")
    with pytest.raises(ValueError, match="^best_clip_t_tolerance:"):
        base_config(tiny_model, photos, tmp_path, best_clip_t_tolerance=1.5)


def test_round_prompts_follow_the_paper():
    from trainer_core.config import TrainConfig

    cfg = TrainConfig(
        instance_prompt="a photo of sks dog", class_prompt="a photo of a dog", num_eval_prompts=2
    )
    p = evaluate.round_prompts(cfg)
    assert p.scene == ["a sks dog in the jungle", "a sks dog in the snow"]
    assert p.scene_plain == ["a dog in the jungle", "a dog in the snow"]
    assert p.class_prompt == "a photo of a dog"
    plain = TrainConfig(instance_prompt="a photo of sks dog", token="sks", num_eval_class_images=1)
    assert evaluate.round_prompts(plain).class_prompt == "a photo of dog"


def test_auto_is_off_with_a_reason_when_the_models_are_not_cached(monkeypatch):
    monkeypatch.setattr(evaluate, "CLIP_MODEL", "dreambooth-studio-tests/no-such-clip")
    models, why = evaluate.load_eval_models("auto")
    assert models is None
    assert why.startswith("Scores are off:") and "no-such-clip" in why and "\n" not in why
    assert evaluate.load_eval_models("none") == (None, "Scores are off (eval_models is none).")
    on, line = evaluate.eval_status("auto")  # the page's line, without loading anything
    assert not on and line.startswith("Scores are off:") and "no-such-clip" in line
    assert evaluate.eval_status("tiny")[0] and not evaluate.eval_status("none")[0]


def test_scoring_leaves_the_global_random_stream_alone(tiny_model, photos, tmp_path, monkeypatch):
    """The first round builds and loads the tiny models, then renders and scores: the global RNG
    (which peft's LoRA init and anything unseeded in training draw from) is as it was."""
    from trainer_core.components import assemble_pipeline, load_components

    parts, _ = load_components(str(tiny_model))
    pipe = assemble_pipeline(parts)
    cfg = base_config(tiny_model, photos, tmp_path, eval_models="tiny", num_eval_prompts=1)
    monkeypatch.setenv("DREAMBOOTH_STUDIO_HOME", str(tmp_path / "home"))  # the tiny models are built too
    evaluate.release_eval_models()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    row = evaluate.score_round(cfg, 1, pipe, tmp_path, write=False)
    evaluate.release_eval_models()
    assert torch.equal(state, torch.get_rng_state())
    assert (tmp_path / "home" / "models" / "tiny-eval" / "clip" / "config.json").is_file()
    assert row["step"] == 1 and not (tmp_path / evaluate.SCORES_FILE).exists()


# ---------------------------------------------------------------------------------------------
# A short run with --eval-models tiny, then the CLI on it
# ---------------------------------------------------------------------------------------------


def _train(tiny_model, photos, class_dir, out, eval_models):
    from trainer_core.loop import train

    cfg = base_config(
        tiny_model,
        photos,
        out,
        class_data_dir=str(class_dir),
        max_train_steps=2,
        validation_steps=1,
        checkpointing_steps=1,
        checkpoints_total_limit=None,
        num_validation_images=1,
        validation_inference_steps=1,
        eval_models=eval_models,
        num_eval_prompts=2,
        num_eval_class_images=1,
        report_to="none",
    )
    return train(cfg)


@pytest.fixture(scope="module")
def runs_with_scores(tiny_model, photos, class_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    return {name: _train(tiny_model, photos, class_dir, root / name, spec) for name, spec in
            (("a", "tiny"), ("b", "tiny"), ("off", "none"))}  # fmt: skip


def _rows(run):
    path = run.adapter_dir.parent / evaluate.SCORES_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_short_run_scores_every_round(runs_with_scores):
    rows = _rows(runs_with_scores["a"])
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("dino", "clip_i", "clip_t", "pres"):
            assert math.isfinite(r[key]) and -1.0 <= r[key] <= 1.0, (key, r)
        assert r["dino_n"] == 2 * 4 and r["clip_i_n"] == 2 * 4 and r["clip_t_n"] == 2 and r["pres_n"] == 4
        assert r["source"] == "validation" and r["eval_models"] == "tiny"
    run_dir = runs_with_scores["a"].adapter_dir.parent
    assert sorted(p.name for p in (run_dir / "eval" / "step-000001").iterdir()) == [
        "class-0.png",
        "scene-0.png",
        "scene-1.png",
    ]
    # Same seed, same scores.
    for x, y in zip(rows, _rows(runs_with_scores["b"]), strict=True):
        assert {k: y[k] for k in evaluate.METRICS} == pytest.approx(
            {k: x[k] for k in evaluate.METRICS}, abs=1e-6
        )


def test_scoring_does_not_change_the_trained_weights(runs_with_scores):
    from safetensors.torch import load_file

    assert _rows(runs_with_scores["off"]) == []
    a = load_file(str(runs_with_scores["a"].adapter_dir / "pytorch_lora_weights.safetensors"))
    off = load_file(str(runs_with_scores["off"].adapter_dir / "pytorch_lora_weights.safetensors"))
    assert a.keys() == off.keys()
    for key in a:
        assert torch.equal(a[key], off[key]), key


def _cli(capsys, *argv):
    from trainer_core.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_export_and_runs_show_on_a_finished_run(runs_with_scores, tiny_model, tmp_path, capsys):
    run_dir = runs_with_scores["a"].adapter_dir.parent
    during = {r["step"]: r for r in _rows(runs_with_scores["a"])}
    code, out, err = _cli(capsys, "evaluate", str(run_dir), "--eval-models", "tiny")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["scored_steps"] == [1, 2] and result["best_checkpoint"]["step"] in (1, 2)
    after = {r["step"]: r for r in _rows(runs_with_scores["a"])}
    # A checkpoint's LoRA loaded into a fresh pipeline scores as the in-training model did.
    for step in (1, 2):
        assert after[step]["source"] == "checkpoint"
        for key in evaluate.METRICS:
            assert after[step][key] == pytest.approx(during[step][key], abs=1e-3), (step, key)

    code, out, err = _cli(capsys, "runs", "show", str(run_dir))
    shown = json.loads(out)
    assert code == 0 and [r["step"] for r in shown["scores"]] == [1, 2]
    assert shown["best_checkpoint"]["step"] == result["best_checkpoint"]["step"]

    code, out, err = _cli(
        capsys, "export-checkpoint", str(run_dir), "--step", "9", "--out", str(tmp_path / "x")
    )
    assert code == 1 and "no checkpoint at step 9 (saved steps: 1, 2)" in err
    code, out, err = _cli(capsys, "evaluate", str(run_dir), "--eval-models", "none")
    assert code == 1 and err.startswith("error: Scores are off") and len(err.strip().splitlines()) == 1


def test_exported_checkpoint_reloads_as_that_checkpoints_lora(tiny_model, photos, tmp_path, capsys):
    """Two checkpoints of different LoRAs: the export of step 2 is step 2's LoRA, numerically and in
    effect (alpha != rank, so a wrong scale shows in the UNet output)."""
    from lora_fixtures import lora_checkpoint, perturbed_lora
    from safetensors.torch import load_file

    from trainer_core.adapters import peft_lora_state
    from trainer_core.components import assemble_pipeline, load_components

    run = tmp_path / "run"
    run.mkdir()
    base_config(tiny_model, photos, run).save(run / "config.json")
    ckpt = lora_checkpoint(tiny_model, run, seed=1, step=2)
    lora_checkpoint(tiny_model, run, seed=2, step=4)
    code, out, err = _cli(
        capsys, "export-checkpoint", str(run), "--step", "2", "--out", str(tmp_path / "exp")
    )
    assert code == 0, err
    folder = tmp_path / "exp"
    assert json.loads(out)["adapter_dir"] == str(folder)
    info = json.loads((folder / "adapter.json").read_text())
    assert info["steps"] == 2 and info["alpha"] == 8.0 and info["rank"] == 4
    assert (folder / "sks-dog-step2.safetensors").is_file() and (folder / "README.md").is_file()

    parts, _ = load_components(str(tiny_model))
    pipe = assemble_pipeline(parts)
    pipe.load_lora_weights(str(folder))
    reloaded = peft_lora_state(pipe.unet, "default_0")
    saved = {k.removeprefix("unet."): v for k, v in load_file(str(ckpt / "lora.safetensors")).items()}
    assert reloaded.keys() == saved.keys()
    assert max(float((reloaded[k] - saved[k]).abs().max()) for k in saved) < 1e-4

    reference, _ = perturbed_lora(tiny_model, seed=1)
    g = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size
    latents = torch.randn((1, 4, size, size), generator=g)
    embeds = torch.randn((1, 77, pipe.unet.config.cross_attention_dim), generator=g)
    with torch.no_grad():
        want = reference(latents, 500, embeds).sample
        got = pipe.unet(latents, 500, embeds).sample
    assert float((want - got).abs().max()) < 1e-4

    code, out, err = _cli(capsys, "export-checkpoint", str(run), "--step", "4", "--out", str(folder))
    assert code == 1 and "already exists" in err
