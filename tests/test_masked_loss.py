"""Masked loss (kohya `--masked_loss`, OneTrainer): each instance sample's per-pixel error weighted by
its subject mask at the latent size, normalised by the mask's sum; the class half never masked.

What is exact and what is not: a masked-out latent cell gets exactly zero gradient, and a photo whose
mask is all black teaches nothing, whatever its pixels. Pixels outside a *partial* mask still reach
the loss through context (the VAE encoder and the UNet both see the whole image), as in kohya and
OneTrainer: only the error there is ignored, not the pixels' influence on the subject's prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import base_config, write_photos
from PIL import Image
from safetensors.torch import load_file

from trainer_core.data import list_images, mask_path
from trainer_core.loop import compute_loss, train


def _batch(seed: int = 0, instance: int = 2, klass: int = 2):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(instance + klass, 4, 8, 8, generator=g)
    pred = (target + torch.randn(target.shape, generator=g)).requires_grad_(True)
    return pred, target


def _half_mask(instance: int = 2) -> torch.Tensor:
    mask = torch.zeros(instance, 1, 8, 8)
    mask[..., :, :3] = 1.0  # the left three latent columns are the subject
    return mask


def test_masked_out_cells_get_exactly_zero_gradient():
    pred, target = _batch()
    total, _, _ = compute_loss(pred, target, instance_count=2, prior_loss_weight=1.0, mask=_half_mask())
    total.backward()
    instance_grad = pred.grad[:2]
    assert torch.count_nonzero(instance_grad[..., 3:]) == 0, "masked-out cells must not be trained"
    assert torch.count_nonzero(instance_grad[..., :3]) == instance_grad[..., :3].numel()
    # The class half is never masked: every cell of it gets a gradient.
    assert torch.count_nonzero(pred.grad[2:]) == pred.grad[2:].numel()


def test_mask_is_normalised_by_its_sum_and_all_ones_is_plain_mse():
    pred, target = _batch(seed=1)
    _, instance, prior = compute_loss(
        pred, target, instance_count=2, prior_loss_weight=1.0, mask=_half_mask()
    )
    error = (pred - target) ** 2
    # The mean error over the subject's cells only: a small subject is not under-weighted.
    assert instance.item() == pytest.approx(error[:2, :, :, :3].mean().item(), rel=1e-6)
    assert prior.item() == pytest.approx(error[2:].mean().item(), rel=1e-6)
    plain = compute_loss(pred, target, instance_count=2, prior_loss_weight=1.0)
    ones = compute_loss(pred, target, instance_count=2, prior_loss_weight=1.0, mask=torch.ones(2, 1, 8, 8))
    for a, b in zip(plain, ones, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_an_all_black_mask_gives_zero_loss_and_gradient():
    pred, target = _batch(seed=2, klass=0)
    total, instance, _ = compute_loss(
        pred, target, instance_count=2, prior_loss_weight=1.0, mask=torch.zeros(2, 1, 8, 8)
    )
    total.backward()
    assert instance.item() == 0.0 and torch.count_nonzero(pred.grad) == 0


# --- end to end on the tiny SD 1.5 -----------------------------------------------------------------


def _masked_set(folder, subject_rgb=(220, 60, 40), seed=0):
    """Two photos with masks: photo-0's mask is all black (nothing to learn from it), photo-1's
    covers its left half. `subject_rgb` and `seed` change photo-0's pixels only."""
    write_photos(folder, n=2, size=(64, 64), seed=7)
    rng = np.random.default_rng(seed)
    array = (rng.random((64, 64, 3)) * 255).astype("uint8")
    array[10:40, 10:40] = subject_rgb
    Image.fromarray(array).save(folder / "photo-0.jpg", quality=95)
    Image.new("L", (64, 64), 0).save(mask_path(folder / "photo-0.jpg"))
    half = np.zeros((64, 64), dtype=np.uint8)
    half[:, :32] = 255
    Image.fromarray(half).save(mask_path(folder / "photo-1.jpg"))
    return folder


def _lora(tiny_model, photos, out, class_dir, masked):
    cfg = base_config(
        tiny_model, photos, out, class_data_dir=str(class_dir), max_train_steps=4, masked_loss=masked
    )
    result = train(cfg)
    assert result.status == "finished"
    return load_file(result.adapter_dir / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("masked", [True, False])
def test_a_masked_out_photo_does_not_change_the_lora(tiny_model, class_dir, tmp_path, masked):
    a = _masked_set(tmp_path / "a")
    b = _masked_set(tmp_path / "b", subject_rgb=(20, 200, 240), seed=5)
    assert list_images(a) == [a / "photo-0.jpg", a / "photo-1.jpg"], "masks are not photos"
    lora_a = _lora(tiny_model, a, tmp_path / "run-a", class_dir, masked)
    lora_b = _lora(tiny_model, b, tmp_path / "run-b", class_dir, masked)
    assert lora_a.keys() == lora_b.keys()
    diff = max((lora_a[k] - lora_b[k]).abs().max().item() for k in lora_a)
    if masked:
        assert diff == 0.0, "photo-0 is masked out entirely: its pixels must not reach the LoRA"
    else:
        assert diff > 1e-6, "without masked_loss photo-0 is trained on"


def test_cached_masks_follow_the_crop_and_flip(tiny_model, tmp_path):
    from trainer_core.components import load_components
    from trainer_core.data import load_instance_examples
    from trainer_core.loop import _build_cache

    folder = write_photos(tmp_path / "p", n=1, size=(96, 64))
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, :16] = 255  # the left 16 columns: cut away by the centre crop of a 96x64 photo
    mask[:, 16:40] = 255  # 8 pixel columns of the square (16..40 -> 0..24): three latent columns
    Image.fromarray(mask).save(mask_path(folder / "photo-0.jpg"))
    write_photos(folder, n=2, size=(96, 64))  # photo-1 has no mask: all ones
    cfg = base_config(
        tiny_model,
        folder,
        tmp_path / "run",
        with_prior_preservation=False,
        masked_loss=True,
        random_flip=True,
    )
    parts, _ = load_components(str(tiny_model))
    cache = _build_cache(
        cfg,
        load_instance_examples(folder, cfg.instance_prompt),
        [],
        [parts["tokenizer"]],
        [parts["text_encoder"]],
        parts["vae"],
        64,
        "cpu",
        lambda e: None,
    )
    plain, flipped = cache.instance_masks[0]  # each (1, 8, 8)
    assert plain.shape == (1, 8, 8)
    assert torch.all(plain[..., :3] == 1) and torch.all(plain[..., 3:] == 0)
    assert torch.equal(flipped, plain.flip(-1))
    assert torch.all(cache.instance_masks[1] == 1)


def test_masked_loss_and_masks_are_cli_flags(tmp_path):
    from trainer_core.cli import _config_from_args, build_parser

    parser = build_parser()
    required = ["--instance-dir", "x", "--instance-prompt", "a sks", "--output-dir", "y"]
    assert _config_from_args(parser.parse_args(["train", *required, "--masked-loss"])).masked_loss is True
    assert _config_from_args(parser.parse_args(["train", *required])).masked_loss is False
    prep = parser.parse_args(["prep", "--input", "x", "--output", "y", "--masks"])
    assert prep.masks is True


# --- prep writes the masks ---------------------------------------------------------------------------


def _skimage_photo(name: str) -> Image.Image:
    from skimage import data as skdata

    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def _read_l(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def test_prep_masks_cover_the_face_and_not_the_background(tmp_path):
    from trainer_core.prep import PrepOptions, prepare_photos, read_report, recrop, render_mask

    canvas = Image.new("RGB", (1600, 560), (110, 110, 110))
    canvas.paste(_skimage_photo("astronaut"), (1600 - 512, 48))
    canvas.save(tmp_path / "astronaut-wide.jpg", quality=92)
    out = tmp_path / "prepared"
    report = prepare_photos([tmp_path / "astronaut-wide.jpg"], out, PrepOptions(resolution=256, masks=True))
    (entry,) = report.accepted
    assert entry.face_box is not None and entry.mask == "001-astronaut-wide.mask.png"
    assert list_images(out) == [out / entry.output], "the mask is no training photo"
    # The original's mask (for bucketing): the photo's size, white over the face, black far away.
    full = _read_l(out / mask_path(out / entry.original).relative_to(out))
    assert full.shape == (560, 1600)
    fl, ft, fr, fb = entry.face_box
    assert full[ft:fb, fl:fr].min() == 255
    assert full[:, :900].max() == 0
    # The square's mask is the same mask cut by the square's crop box.
    square = _read_l(out / entry.mask)
    assert square.shape == (256, 256)
    expected = np.asarray(render_mask(Image.fromarray(full), entry.crop_box, 256))
    assert np.array_equal(square, expected)
    cl, ct, cr, _ = entry.crop_box
    s = 256 / (cr - cl)
    inner = square[
        round((ft - ct) * s) + 2 : round((fb - ct) * s) - 2,
        round((fl - cl) * s) + 2 : round((fr - cl) * s) - 2,
    ]
    assert inner.min() >= 250
    # A recrop cuts the square's mask again; preparing again from originals/ skips the masks.
    box = (900, 0, 1460, 560)
    recrop(out, entry.output, box)
    expected = np.asarray(render_mask(Image.fromarray(full), box, 256))
    assert np.array_equal(_read_l(out / entry.mask), expected)
    again = prepare_photos([out / "originals"], out, PrepOptions(resolution=256, masks=True))
    assert len(again.accepted) == 1 and not again.rejected
    assert read_report(out).accepted[0].mask == entry.mask


def test_prep_masks_the_busiest_region_without_a_face(tmp_path):
    from trainer_core.prep import PrepOptions, prepare_photos

    canvas = Image.new("RGB", (1400, 300), (235, 235, 235))
    canvas.paste(_skimage_photo("chelsea"), (0, 0))  # the cat: 451x300 at the left edge
    canvas.save(tmp_path / "cat-wide.png")
    report = prepare_photos(
        [tmp_path / "cat-wide.png"], tmp_path / "out", PrepOptions(resolution=128, masks=True)
    )
    (entry,) = report.accepted
    assert entry.face_box is None
    full = _read_l(tmp_path / "out" / "originals" / "001-cat-wide.mask.png") / 255.0
    assert full[:, :451].mean() > 0.8, "most of the cat is subject"
    assert full[:, 700:].max() == 0, "the plain background is not"


def test_masks_added_to_a_prepared_set_equal_prep_s_own(tmp_path):
    """A set prepared without masks (the page's photo preparation has no mask option) gets the very
    masks `prep --masks` writes (face and busiest-region alike) when masked loss is asked for later."""
    from trainer_core.prep import PrepOptions, add_masks, prepare_photos, read_report

    canvas = Image.new("RGB", (1600, 560), (110, 110, 110))
    canvas.paste(_skimage_photo("astronaut"), (1600 - 512, 48))
    canvas.save(tmp_path / "astronaut-wide.jpg", quality=92)
    cat = Image.new("RGB", (1400, 300), (235, 235, 235))
    cat.paste(_skimage_photo("chelsea"), (0, 0))
    cat.save(tmp_path / "cat-wide.png")
    inputs = [tmp_path / "astronaut-wide.jpg", tmp_path / "cat-wide.png"]
    with_masks, plain = tmp_path / "with", tmp_path / "plain"
    prepare_photos(inputs, with_masks, PrepOptions(resolution=128, masks=True))
    prepare_photos(inputs, plain, PrepOptions(resolution=128))
    assert all(not a.mask for a in read_report(plain).accepted)
    assert add_masks(plain) == 2
    expected, got = read_report(with_masks), read_report(plain)
    assert got.options.masks
    for a, b in zip(expected.accepted, got.accepted, strict=True):
        assert a.mask == b.mask and b.mask
        assert np.array_equal(_read_l(with_masks / a.mask), _read_l(plain / b.mask))
        original_mask = mask_path(Path(a.original))
        assert np.array_equal(_read_l(with_masks / original_mask), _read_l(plain / original_mask))
    assert add_masks(plain) == 0, "masks already there are kept"
