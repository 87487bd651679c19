"""The inference engine on the tiny SD 1.5 model, proven by pixels: seeds repeat, adapters and blends
differ, weight 0 is the base, swapping in the resident pipeline equals a fresh load, the LRU cap
unloads, checkpoints load as adapters, and wrong-architecture adapters are refused."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from lora_fixtures import PROMPT, lora_adapter, lora_checkpoint

from trainer_core.events import TrainingError
from trainer_core.inference import (
    GenerateRequest,
    Generator,
    load_pipeline,
    prompt_without_token,
)


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return dict(
        a=lora_adapter(tiny_model, tmp / "dog-a", 1),
        b=lora_adapter(tiny_model, tmp / "cat-b", 2, text_encoder=True),
        c=lora_adapter(tiny_model, tmp / "toy-c", 3),
        tmp=tmp,
    )


def req(tiny_model, adapters=(), **kw) -> GenerateRequest:
    values = dict(base_model=str(tiny_model), prompt=PROMPT, steps=3, seed=7)
    values.update(kw)
    return GenerateRequest(adapters=tuple((str(p), w) for p, w in adapters), **values)


def px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def fresh_image(tiny_model, adapter: Path | None, **kw) -> np.ndarray:
    """The reference: a newly loaded pipeline with only diffusers' own load_lora_weights."""
    from trainer_core.inference import generate

    pipe = load_pipeline(str(tiny_model), device="cpu")
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    r = req(tiny_model, **kw)
    return px(generate(pipe, r.prompt, seed=r.seed, steps=r.steps, guidance=r.guidance)[0])


@pytest.fixture(scope="module")
def gen():
    return Generator(device="cpu", max_loaded_adapters=8)


def test_same_seed_same_image_and_seed_matters(gen, tiny_model):
    first = px(gen.generate(req(tiny_model))[0])
    again = px(gen.generate(req(tiny_model))[0])
    other = px(gen.generate(req(tiny_model, seed=8))[0])
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 10
    assert first.shape == (64, 64, 3)  # the tiny model's native size


def test_adapters_differ_blend_differs_weight_zero_is_base(gen, tiny_model, made):
    base = px(gen.generate(req(tiny_model))[0])
    a = px(gen.generate(req(tiny_model, [(made["a"], 1.0)]))[0])
    b = px(gen.generate(req(tiny_model, [(made["b"], 1.0)]))[0])
    blend = px(gen.generate(req(tiny_model, [(made["a"], 0.5), (made["b"], 0.5)]))[0])
    zero = px(gen.generate(req(tiny_model, [(made["a"], 0.0)]))[0])
    base_again = px(gen.generate(req(tiny_model))[0])  # after adapters were active: disabled again
    for one, two in ((base, a), (base, b), (a, b), (blend, a), (blend, b), (blend, base)):
        assert np.abs(one - two).mean() > 2, "images that must differ are (nearly) the same"
    assert np.array_equal(zero, base), "weight 0 must give exactly the base image"
    assert np.array_equal(base_again, base)


def test_swapping_loaded_adapters_equals_fresh_pipeline(gen, tiny_model, made):
    # Load both, then swap back and forth in the one resident pipeline.
    images = {}
    for name in ("a", "b", "a", "b", "a"):
        images.setdefault(name, []).append(px(gen.generate(req(tiny_model, [(made[name], 1.0)]))[0]))
    assert {str(made["a"]), str(made["b"])} <= set(gen.loaded_adapters())
    for name in ("a", "b"):  # b carries a text-encoder LoRA too
        expected = fresh_image(tiny_model, made[name])
        for got in images[name]:
            assert np.array_equal(got, expected), f"adapter {name} after a swap differs from a fresh load"
    assert np.array_equal(px(gen.generate(req(tiny_model))[0]), fresh_image(tiny_model, None))


def test_lru_cap_unloads_least_recently_used(tiny_model, made):
    g = Generator(device="cpu", max_loaded_adapters=2)
    a, b, c = (str(made[k]) for k in "abc")
    g.generate(req(tiny_model, [(a, 1.0)], steps=1))
    g.generate(req(tiny_model, [(b, 1.0)], steps=1))
    g.generate(req(tiny_model, [(a, 1.0)], steps=1))  # a is now the most recently used
    g.generate(req(tiny_model, [(c, 1.0)], steps=1))  # evicts b
    assert g.loaded_adapters() == [a, c]
    (resident,) = g._pipelines.values()
    in_pipe = resident.pipe.get_list_adapters()
    assert len(in_pipe["unet"]) == 2 and not any("cat-b" in n for n in in_pipe["unet"])
    assert not in_pipe.get("text_encoder"), "b's text-encoder LoRA must be deleted with it"
    # b comes back on demand and still gives its own image.
    again = px(g.generate(req(tiny_model, [(b, 1.0)]))[0])
    assert np.array_equal(again, fresh_image(tiny_model, made["b"]))
    with pytest.raises(ValueError, match="adapters: at most 2"):
        g.generate(req(tiny_model, [(a, 1.0), (b, 1.0), (c, 1.0)]))
    assert g.unload_adapter(b) and not g.unload_adapter(b)
    assert g.loaded_adapters() == [c] and len(resident.pipe.get_list_adapters()["unet"]) == 1
    g.unload_all()
    assert g.loaded_adapters() == [] and g.loaded_base_models() == []


def test_retrained_folder_is_reloaded(tiny_model, made, tmp_path):
    g = Generator(device="cpu")
    folder = lora_adapter(tiny_model, tmp_path / "subject", 11)
    first = px(g.generate(req(tiny_model, [(folder, 1.0)]))[0])
    lora_adapter(tiny_model, folder, 12)  # same folder, new weights (a new training run)
    second = px(g.generate(req(tiny_model, [(folder, 1.0)]))[0])
    assert np.abs(first - second).mean() > 2
    assert np.array_equal(second, fresh_image(tiny_model, folder))


def test_architecture_mismatch_refused_with_one_sentence(gen, tiny_model, made, tmp_path):
    import shutil

    xl = tmp_path / "xl-adapter"
    shutil.copytree(made["a"], xl)
    info = json.loads((xl / "adapter.json").read_text())
    (xl / "adapter.json").write_text(json.dumps({**info, "architecture": "sdxl"}))
    with pytest.raises(TrainingError) as e:
        gen.generate(req(tiny_model, [(xl, 1.0)]))
    msg = str(e.value)
    assert "SDXL" in msg and "SD 1.5" in msg and msg.count(". ") == 0 and "\n" not in msg
    assert str(xl) not in gen.loaded_adapters()


def test_bad_adapter_paths_and_requests(gen, tiny_model, tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        gen.generate(req(tiny_model, [(tmp_path / "nope", 1.0)]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="not an adapter folder"):
        gen.generate(req(tiny_model, [(tmp_path / "empty", 1.0)]))
    for bad, field in (
        (dict(prompt="  "), "prompt"),
        (dict(width=60), "width"),
        (dict(steps=0), "steps"),
        (dict(scheduler="plms"), "scheduler"),
        (dict(num_images=0), "num_images"),
    ):
        with pytest.raises(ValueError, match=f"^{field}:"):
            req(tiny_model, **bad)
    with pytest.raises(ValueError, match="^adapters:"):
        req(tiny_model, [(tmp_path / "x", 1.0), (tmp_path / "x", 0.5)])


def test_schedulers_size_and_count(gen, tiny_model, made):
    images = {s: px(gen.generate(req(tiny_model, scheduler=s))[0]) for s in ("dpm++", "euler_a", "ddim")}
    assert np.abs(images["dpm++"] - images["ddim"]).mean() > 1
    two = gen.generate(req(tiny_model, num_images=2, width=64, height=32))
    assert len(two) == 2 and two[0].size == (64, 32) and np.abs(px(two[0]) - px(two[1])).mean() > 2


def test_compare_token_weights_checkpoints(gen, tiny_model, made, tmp_path):
    grid, cells = gen.compare_token(req(tiny_model, [(made["a"], 1.0)]), "sks")
    assert [label for label, _ in cells] == ["with sks", "without sks"]
    assert np.abs(px(cells[0][1]) - px(cells[1][1])).mean() > 1
    without = px(gen.generate(req(tiny_model, [(made["a"], 1.0)], prompt="a photo of dog"))[0])
    assert np.array_equal(px(cells[1][1]), without)
    assert grid.width >= 2 * 64 and grid.height > 64

    grid, cells = gen.compare_weights(req(tiny_model, [(made["a"], 1.0)]), (0.0, 0.5, 1.0))
    assert [label for label, _ in cells] == ["weight 0", "weight 0.5", "weight 1"]
    assert np.array_equal(px(cells[0][1]), px(gen.generate(req(tiny_model))[0]))
    assert np.array_equal(px(cells[2][1]), px(gen.generate(req(tiny_model, [(made["a"], 1.0)]))[0]))
    assert grid.width >= 3 * 64

    with pytest.raises(ValueError, match="^token:"):
        gen.compare_token(req(tiny_model), "zzz")
    assert prompt_without_token("a photo of sks, dog", "SKS") == "a photo of dog"


def test_checkpoints_load_as_adapters(gen, tiny_model, made, tmp_path):
    c1 = lora_checkpoint(tiny_model, tmp_path, 1, 10)  # the LoRA of adapter a
    c2 = lora_checkpoint(tiny_model, tmp_path, 3, 20)  # the LoRA of adapter c
    grid, cells = gen.compare_checkpoints(req(tiny_model), [c1, c2, made["c"]])
    assert [label for label, _ in cells] == ["step 10", "step 20", "toy-c"]
    # A checkpoint gives exactly its adapter's image: alpha/rank scaling survived the conversion.
    assert np.array_equal(px(cells[0][1]), fresh_image(tiny_model, made["a"]))
    assert np.array_equal(px(cells[1][1]), px(cells[2][1]))
    assert grid.width >= 3 * 64


def test_generator_is_thread_safe(tiny_model, made):
    g = Generator(device="cpu")
    expected = {k: px(g.generate(req(tiny_model, [(made[k], 1.0)], steps=2))[0]) for k in ("a", "c")}
    results, errors = [], []

    def worker(key):
        try:
            for _ in range(2):
                results.append((key, px(g.generate(req(tiny_model, [(made[key], 1.0)], steps=2))[0])))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("a", "c", "a", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert all(np.array_equal(image, expected[key]) for key, image in results)


def test_cli_generate_blends_adapters_like_the_generator(gen, tiny_model, made, tmp_path, capsys):
    from PIL import Image

    from trainer_core.cli import main

    a, b = str(made["a"]), str(made["b"])
    out = tmp_path / "blend.png"
    common = ["generate", "--base-model", str(tiny_model), "--prompt", PROMPT, "--steps", "3", "--seed", "7"]
    rc = main([*common, "--adapter", a, "--adapter", b, "--adapter-weights", "0.5,0.5", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and set(summary["adapters"]) == {a, b}
    expected = px(gen.generate(req(tiny_model, [(a, 0.5), (b, 0.5)]))[0])
    assert np.array_equal(px(Image.open(out)), expected)

    rc = main([*common, "--adapter", a, "--adapter-weights", "0.5,0.5", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: adapter_weights:")


def test_a_broken_adapter_fails_in_one_sentence_and_leaves_the_pipeline_usable(tiny_model, made, tmp_path):
    import shutil

    g = Generator(device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(made["a"], broken)
    weights = broken / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    g.generate(req(tiny_model, [(made["c"], 1.0)], steps=1))
    with pytest.raises(TrainingError, match="^Could not load the adapter dog-a from .*broken: "):
        g.generate(req(tiny_model, [(broken, 1.0)]))
    assert g.loaded_adapters() == [str(made["c"])]
    assert np.array_equal(
        px(g.generate(req(tiny_model, [(made["a"], 1.0)]))[0]), fresh_image(tiny_model, made["a"])
    )


def test_apply_adapters_on_an_own_pipeline_matches_the_generator(gen, tiny_model, made):
    from trainer_core.inference import apply_adapters, generate

    pipe = load_pipeline(str(tiny_model), device="cpu")
    names = apply_adapters(pipe, [made["a"], made["b"]], [0.5, 0.5])
    assert len(names) == 2
    r = req(tiny_model, [(made["a"], 0.5), (made["b"], 0.5)])
    own = px(generate(pipe, r.prompt, seed=r.seed, steps=r.steps)[0])
    assert np.array_equal(own, px(gen.generate(r)[0]))
    assert apply_adapters(pipe, []) == []  # back to the plain base
    assert np.array_equal(
        px(generate(pipe, r.prompt, seed=r.seed, steps=r.steps)[0]), fresh_image(tiny_model, None)
    )


def test_sampler_steps_are_reported_and_change_nothing(gen, tiny_model, made):
    """The per-step callback (what the page's progress bar follows): one call per sampler step, the
    same images as without it; a comparison counts its images' steps together."""
    calls = []
    images = gen.generate(req(tiny_model, [(made["a"], 1.0)], steps=4), on_step=lambda *a: calls.append(a))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert np.array_equal(px(images[0]), px(gen.generate(req(tiny_model, [(made["a"], 1.0)], steps=4))[0]))
    calls.clear()
    gen.compare_token(req(tiny_model, [(made["a"], 1.0)], steps=3), "sks", on_step=lambda *a: calls.append(a))
    assert calls == [(i, 6) for i in range(1, 7)]
