"""Aspect-ratio bucketing: photos keep their framing (within one bucket step), every batch is one
bucket, class images are cropped to the batch's bucket, SDXL's size ids describe the real bucket and
crop, and a bucketed SD 1.5 run on mixed landscape/portrait photos trains an adapter that reloads."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import Probe, base_config
from lora_fixtures import assert_same_weights, stop_after
from PIL import Image

from trainer_core.buckets import BUCKET_STEP, batches_per_epoch, make_buckets, nearest_bucket, plan_epoch
from trainer_core.data import crop_box_for, load_instance_examples
from trainer_core.loop import _bucketed_batch, _build_cache, _make_batch, sdxl_time_ids, train

SIZES = {"wide": (160, 80), "tall": (80, 160), "square": (96, 96), "wide-2": (150, 72)}


def _mixed_photos(folder):
    """Landscape, portrait and square 'subject' photos (a coloured block on noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        a = (rng.random((h, w, 3)) * 80).astype("uint8")
        a[h // 4 : h // 2, w // 4 : w // 2] = [220, 60 + 40 * i, 40]
        Image.fromarray(a).save(folder / f"{name}.png")
    return folder


def test_buckets_keep_the_aspect_within_one_step():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for w, h in buckets:
        assert w % BUCKET_STEP == 0 and h % BUCKET_STEP == 0
        assert (512 - BUCKET_STEP) ** 2 <= w * h <= 512**2 * 1.01 or min(w, h) == 256
    # From 1:2 to 2:1 (phone shots are 9:16 to 16:9); past that the buckets thin out (as kohya's).
    for aspect in np.linspace(1 / 2, 2, 60):
        size = (round(1200 * aspect), 1200)
        w, h = nearest_bucket(size, buckets)
        # The bucket is the photo's own shape at that area, rounded: within one step on each side.
        ideal_w, ideal_h = math.sqrt(w * h * aspect), math.sqrt(w * h / aspect)
        assert abs(w - ideal_w) < BUCKET_STEP and abs(h - ideal_h) < BUCKET_STEP, (size, (w, h))
        (new_w, new_h), _, _ = crop_box_for(size, (w, h))
        assert 1 - (w * h) / (new_w * new_h) < 0.15, "cover-resize then centre crop cuts little away"
    square = nearest_bucket((1000, 1000), buckets)
    assert square == (512, 512)


def test_every_batch_is_one_bucket_and_every_photo_comes_each_epoch():
    item_buckets = tuple([(128, 128)] * 3 + [(192, 64)] * 5 + [(64, 192)] * 1)
    for batch_size in (1, 2, 4):
        per_epoch = batches_per_epoch(item_buckets, batch_size)
        assert per_epoch == math.ceil(3 / batch_size) + math.ceil(5 / batch_size) + 1
        for epoch_seed in (0, 7):
            batches = plan_epoch(item_buckets, batch_size, epoch_seed)
            assert len(batches) == per_epoch
            for batch in batches:
                assert len(batch) == batch_size and len({item_buckets[i] for i in batch}) == 1
            assert set(itertools.chain(*batches)) == set(range(len(item_buckets)))
        # The loop's view: consecutive slots of one batch, across epoch boundaries too.
        for number in range(3 * per_epoch):
            slots = list(range(number * batch_size, (number + 1) * batch_size))
            assert len({item_buckets[i] for i in _bucketed_batch(list(item_buckets), slots, seed=5)}) == 1


def _cache(model_dir, folder, tmp_path, resolution, **overrides):
    from trainer_core.components import load_components

    cfg = base_config(model_dir, folder, tmp_path / "run", bucketing=True, **overrides)
    parts, _ = load_components(str(model_dir))
    sdxl = "text_encoder_2" in parts and parts["text_encoder_2"] is not None
    names = ["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    from trainer_core.data import list_images

    class_paths = list_images(cfg.class_data_dir) if cfg.class_data_dir else []
    cache = _build_cache(
        cfg,
        load_instance_examples(folder, cfg.instance_prompt),
        class_paths,
        [parts[n] for n in names],
        [parts[n] for n in encoders],
        parts["vae"],
        resolution,
        "cpu",
        lambda e: None,
    )
    return cfg, cache


def test_a_prepared_set_is_bucketed_from_its_originals(tiny_model, class_dir, tmp_path):
    from trainer_core.prep import PrepOptions, prepare_photos

    prepared = tmp_path / "prepared"
    options = PrepOptions(resolution=64, crop="center", masks=True)
    prepare_photos([_mixed_photos(tmp_path / "raw")], prepared, options)
    # The originals' masks: the left half of each photo is the subject.
    for mask_file in (prepared / "originals").glob("*.mask.png"):
        with Image.open(mask_file) as im:
            w, h = im.size
        half = np.zeros((h, w), dtype=np.uint8)
        half[:, : w // 2] = 255
        Image.fromarray(half).save(mask_file)
    cfg, cache = _cache(
        tiny_model,
        prepared,
        tmp_path,
        128,
        class_data_dir=str(class_dir),
        train_batch_size=2,
        masked_loss=True,
    )
    examples = load_instance_examples(prepared, cfg.instance_prompt)
    buckets = make_buckets(128)
    names = [e.path.stem.split("-", 1)[1] for e in examples]
    for example, bucket, dist in zip(
        examples, cache.instance_buckets, cache.instance_latent_dists, strict=True
    ):
        name = example.path.stem.split("-", 1)[1]
        assert bucket == nearest_bucket(SIZES[name], buckets), "the original's aspect, not the square's"
        assert tuple(dist.shape[-2:]) == (bucket[1] // 8, bucket[0] // 8)
    # With masked_loss too: each mask is the original's, cut to the same bucket as its photo.
    for dist, mask in zip(cache.instance_latent_dists, cache.instance_masks, strict=True):
        assert mask.shape[-2:] == dist.shape[-2:]
    wide_mask = cache.instance_masks[names.index("wide")][0]  # (1, 8, 24): 160x80 -> 192x96 -> 192x64
    assert torch.all(wide_mask[..., :11] == 1) and torch.all(wide_mask[..., 13:] == 0)
    assert cache.instance_buckets[names.index("wide")] == (192, 64)
    assert cache.instance_buckets[names.index("tall")] == (64, 192)
    # Class latents exist for each bucket in use, cropped to it.
    assert set(cache.class_by_bucket) == set(cache.instance_buckets)
    for (w, h), (dists, _) in cache.class_by_bucket.items():
        assert len(dists) == 4 and all(tuple(d.shape[-2:]) == (h // 8, w // 8) for d in dists)
    for step in range(8):
        slots = [step * 2, step * 2 + 1]
        latents, _, _, mask = _make_batch(
            cache, slots, cfg, torch.Generator().manual_seed(step), "cpu", torch.float32, None
        )
        bucket = cache.instance_buckets[_bucketed_batch(cache.instance_buckets, slots, cfg.seed)[0]]
        assert latents.shape == (4, 4, bucket[1] // 8, bucket[0] // 8)  # 2 instance + 2 class, one bucket
        assert mask.shape == (2, 1, bucket[1] // 8, bucket[0] // 8)


def test_sdxl_time_ids_are_the_bucket_and_its_crop(tiny_sdxl, tmp_path):
    folder = _mixed_photos(tmp_path / "raw")
    cfg, cache = _cache(tiny_sdxl, folder, tmp_path, 128, with_prior_preservation=False, random_flip=True)
    examples = load_instance_examples(folder, cfg.instance_prompt)
    for example, bucket, ids in zip(examples, cache.instance_buckets, cache.instance_time_ids, strict=True):
        w, h = SIZES[example.path.stem]
        (new_w, new_h), left, top = crop_box_for((w, h), bucket)
        assert ids.tolist() == [
            [h, w, top, left, bucket[1], bucket[0]],
            [h, w, top, new_w - bucket[0] - left, bucket[1], bucket[0]],
        ]
        assert ids.tolist()[0] == sdxl_time_ids((w, h), bucket, False)
    wide = [e.path.stem for e in examples].index("wide")
    # 160x80 -> 192x96 (covers 192x64) -> 16 rows cut off the top: top 16, left 0
    assert cache.instance_time_ids[wide][0].tolist() == [80, 160, 16, 0, 64, 192]
    for step in range(4):
        slots = [step]
        _, _, added, _ = _make_batch(
            cache, slots, cfg, torch.Generator().manual_seed(step), "cpu", torch.float32, None
        )
        index = _bucketed_batch(cache.instance_buckets, slots, cfg.seed)[0]
        assert added["time_ids"][0].tolist() in [t.tolist() for t in cache.instance_time_ids[index]]


def test_bucketed_sd15_run_finishes_and_its_adapter_reloads(tiny_model, class_dir, tmp_path):
    from trainer_core.inference import load_pipeline

    folder = _mixed_photos(tmp_path / "raw")
    cfg = base_config(
        tiny_model,
        folder,
        tmp_path / "run",
        class_data_dir=str(class_dir),
        bucketing=True,
        resolution=128,
        max_train_steps=6,
        train_batch_size=2,
    )
    result = train(cfg)
    assert result.status == "finished" and result.summary["steps"] == 6
    assert math.isfinite(result.summary["final_loss"])
    probe = Probe(tiny_model, folder, cfg.instance_prompt)
    trained = probe.predict(result.unet)
    assert (trained - probe.predict(probe.parts["unet"])).abs().max() > 1e-4, "training changed the UNet"
    pipe = load_pipeline(str(tiny_model), device="cpu")
    pipe.load_lora_weights(str(result.adapter_dir))
    assert (probe.predict(pipe.unet) - trained).abs().max().item() < 1e-4


@pytest.mark.slow  # three short runs at 128 px: about a minute of CPU
def test_stopped_and_resumed_bucketed_run_equals_a_straight_run(tiny_model, class_dir, tmp_path):
    """The bucket plan (which bucket, which photos, which class crops per batch) survives a stop:
    stopped at step 2 and resumed, a bucketed run ends with the straight run's weights, as the
    square-crop run does (tests/test_checkpoints.py). The plan is a pure function of (seed, slot), so
    there is no sampler state to save; a sampler that kept its place in memory fails this test."""
    import dataclasses

    folder = _mixed_photos(tmp_path / "raw")
    cfg = base_config(
        tiny_model,
        folder,
        tmp_path / "straight",
        class_data_dir=str(class_dir),
        bucketing=True,
        resolution=128,
        max_train_steps=4,
        train_batch_size=2,
        random_flip=True,
    )
    straight = train(cfg)
    split = dataclasses.replace(cfg, output_dir=str(tmp_path / "split"))
    assert train(split, should_stop=stop_after(2)).summary["steps"] == 2
    resumed = train(dataclasses.replace(split, resume_from_checkpoint="latest"))
    assert resumed.status == "finished" and resumed.summary["steps"] == 4
    assert_same_weights(straight.adapter_dir, resumed.adapter_dir)
