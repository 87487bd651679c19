"""Training photos are read by content: non-images are skipped, broken images and empty folders
stop the run with a sentence naming the problem, and odd modes are normalised to RGB."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from conftest import base_config
from PIL import Image

from trainer_core.data import image_to_tensor, list_images, load_instance_examples, load_rgb
from trainer_core.events import TrainingError
from trainer_core.loop import train


def test_non_images_are_skipped_and_captions_used(photos, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "notes.jpg").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "photo-0.txt").write_text("a photo of sks dog on a sofa\n")
    examples = load_instance_examples(folder, "a photo of sks dog")
    assert [e.path.name for e in examples] == sorted(p.name for p in photos.glob("*.jpg"))
    assert examples[0].prompt == "a photo of sks dog on a sofa"
    assert examples[1].prompt == "a photo of sks dog"


def test_empty_folder_is_a_sentence(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(TrainingError, match="No usable photos"):
        load_instance_examples(tmp_path, "a photo of sks dog")


def test_truncated_photo_stops_the_run_naming_the_file(tiny_model, photos, class_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    data = (folder / "photo-1.jpg").read_bytes()
    (folder / "photo-1.jpg").write_bytes(data[: len(data) // 2])
    assert len(list_images(folder)) == 4  # the header still decodes: only a full load finds it
    cfg = base_config(tiny_model, folder, tmp_path / "run", class_data_dir=str(class_dir), max_train_steps=2)
    with pytest.raises(TrainingError, match="photo-1.jpg cannot be read"):
        train(cfg)
    assert (folder / "photo-1.jpg").exists(), "the user's file is left alone"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_odd_modes_become_rgb(mode, tmp_path):
    if mode == "I;16":
        image = Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    else:
        image = Image.new("RGB", (64, 48), (200, 30, 30)).convert(mode)
    path = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg"
    image.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    if mode == "I;16":  # levels scaled, not clipped: a ramp to 61420 of 65535 stays a ramp
        pixels = np.asarray(rgb)[..., 0]
        assert pixels.max() == round(61420 / 257) and pixels.min() == 0
        assert (pixels == 255).mean() < 0.01
    tensor = image_to_tensor(rgb, 32)
    assert tuple(tensor.shape) == (3, 32, 32) and -1 <= tensor.min() <= tensor.max() <= 1


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    assert load_rgb(tmp_path / "r.jpg").size == (40, 60)
