"""Photo preparation, on real photos (scikit-image's astronaut, cat, coffee, camera, rocket) and on
one generated file per rejection reason and normalisation rule; BLIP captions from a tiny random
BLIP through the real `generate`; per-image captions reaching the training loop's UNet calls."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data as skdata

from trainer_core.data import list_images, load_instance_examples
from trainer_core.events import Progress, StopRequested
from trainer_core.prep import (
    PrepOptions,
    choose_crop_box,
    prepare_photos,
    read_report,
    recrop,
    render_square,
    set_caption,
)

REPO = Path(__file__).resolve().parents[1]
FAST = PrepOptions(resolution=128, crop="center")  # no face search: the rules below are not about crops


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def _inside(inner, outer) -> bool:
    return inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _overlap_fraction(region, box) -> float:
    """Share of `region`'s area inside `box`."""
    w = min(region[2], box[2]) - max(region[0], box[0])
    h = min(region[3], box[3]) - max(region[1], box[1])
    return max(0, w) * max(0, h) / ((region[2] - region[0]) * (region[3] - region[1]))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims a huge canvas (a decompression bomb), with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# --- crops on real photos -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_astronaut(tmp_path_factory) -> tuple[Path, tuple[int, int, int, int]]:
    """The astronaut pasted at the right edge of a wide grey canvas; her face's region in canvas pixels."""
    folder = tmp_path_factory.mktemp("astronaut")
    canvas = Image.new("RGB", (1600, 560), (110, 110, 110))
    x0, y0 = 1600 - 512, 48
    canvas.paste(_photo("astronaut"), (x0, y0))
    canvas.save(folder / "astronaut-wide.jpg", quality=92)
    # Hand-measured in astronaut.png: hair to chin, ear to ear.
    return folder / "astronaut-wide.jpg", (x0 + 160, y0 + 30, x0 + 290, y0 + 210)


def test_face_crop_keeps_the_whole_face_where_a_centre_crop_loses_it(wide_astronaut, tmp_path):
    photo, face_region = wide_astronaut
    report = prepare_photos([photo], tmp_path / "out", PrepOptions(crop="face"))
    (entry,) = report.accepted
    assert entry.face_box is not None
    assert _overlap_fraction(entry.face_box, face_region) > 0.8, "the detector found her face"
    assert _inside(entry.face_box, entry.crop_box)
    assert not any(w.startswith("no face") for w in entry.warnings)
    left, top, right, bottom = entry.crop_box
    assert right - left == bottom - top and left >= 0 and top >= 0 and right <= 1600 and bottom <= 560
    # Head and shoulders: the face is a fair part of the square, not a speck or a close-up.
    assert 0.2 < (entry.face_box[2] - entry.face_box[0]) / (right - left) < 0.45

    with Image.open(photo) as im:
        rgb = im.convert("RGB")
    centre_box, _, _ = choose_crop_box(rgb, "center")
    assert _overlap_fraction(entry.face_box, centre_box) == 0.0, "a centre crop would lose the face"
    # The square on disk is exactly that box of the photo at the training resolution.
    out = np.asarray(Image.open(tmp_path / "out" / entry.output), dtype=np.int16)
    assert out.shape == (512, 512, 3)
    expected = np.asarray(render_square(rgb, entry.crop_box, 512), dtype=np.int16)
    assert np.abs(out - expected).max() == 0


def test_cat_is_cropped_by_the_non_face_path(tmp_path):
    canvas = Image.new("RGB", (1400, 300), (235, 235, 235))
    canvas.paste(_photo("chelsea"), (0, 0))  # 451x300 at the left edge
    canvas.save(tmp_path / "cat-wide.png")
    cat_region = (0, 0, 451, 300)

    face_mode = prepare_photos([tmp_path / "cat-wide.png"], tmp_path / "face", PrepOptions(crop="face"))
    (entry,) = face_mode.accepted
    assert entry.face_box is None
    assert any(w.startswith("no face found") for w in entry.warnings)
    assert (
        _overlap_fraction(cat_region, entry.crop_box) > 0.6
    )  # the 300 px square holds 2/3 of the 451 px cat
    assert _overlap_fraction(entry.crop_box, cat_region) == 1.0, "none of the plain background"
    centre_box, _, _ = choose_crop_box(canvas, "center")
    assert _overlap_fraction(cat_region, centre_box) == 0.0

    auto_mode = prepare_photos([tmp_path / "cat-wide.png"], tmp_path / "auto", PrepOptions(crop="auto"))
    assert auto_mode.accepted[0].crop_box == entry.crop_box
    assert not any(w.startswith("no face") for w in auto_mode.accepted[0].warnings), "auto: no face is normal"


def test_pad_mode_keeps_the_whole_photo_on_white(tmp_path):
    Image.new("RGB", (300, 150), (10, 120, 200)).save(tmp_path / "wide.png")
    report = prepare_photos(
        [tmp_path / "wide.png"], tmp_path / "out", PrepOptions(resolution=128, crop="none")
    )
    (entry,) = report.accepted
    assert entry.crop_box == (0, -75, 300, 225)
    out = np.asarray(Image.open(tmp_path / "out" / entry.output))
    assert tuple(out[2, 64]) == (255, 255, 255) and tuple(out[64, 64]) == (10, 120, 200)


# --- validation by content ------------------------------------------------------------------------


def test_each_rejection_reason(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("my holiday notes\n")
    (src / "page.png").write_text("<!DOCTYPE html><html><body>Image not found</body></html>")
    (src / "logo.jpg").write_text('<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>')
    good = np.asarray(_photo("coffee"))
    Image.fromarray(good).save(src / "full.jpg", quality=90)
    data = (src / "full.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (src / "full.jpg").unlink()
    (src / "bomb.png").write_bytes(_png_claiming(8000, 6000))  # 48 MP: over our cap, under Pillow's
    (src / "huge-bomb.png").write_bytes(_png_claiming(20000, 20000))  # over Pillow's own limit too
    Image.fromarray(good).resize((30, 20)).save(src / "tiny.png")
    Image.fromarray(good).save(src / "anim.gif")
    Image.fromarray(good).save(src / "full.heic", format="HEIF")
    heic = (src / "full.heic").read_bytes()
    (src / "damaged.heic").write_bytes(heic[:64] + bytes(len(heic)))  # a real header, then zeros
    (src / "full.heic").unlink()
    report = prepare_photos([src, tmp_path / "missing.jpg"], tmp_path / "out", PrepOptions(crop="center"))
    assert report.accepted == ()
    reasons = {Path(r.source).name: r.reason for r in report.rejected}
    assert reasons == {
        "empty.jpg": "the file is empty (0 bytes)",
        "notes.jpg": "a text file, not an image",
        "page.png": "a web page (HTML), not an image; save the image itself",
        "logo.jpg": "an SVG drawing, not a photo; export it as PNG or JPEG",
        "truncated.jpg": reasons["truncated.jpg"],
        "bomb.png": "too many pixels (8000x6000, over 40 megapixels); downsize it first",
        "huge-bomb.png": "too many pixels (over 40 megapixels); downsize it first",
        "tiny.png": reasons["tiny.png"],
        "anim.gif": "GIF files are not supported; use JPEG, PNG, WEBP, HEIC, BMP or TIFF",
        "missing.jpg": "the file or folder does not exist",
        "damaged.heic": "not a readable image (unknown or damaged content)",
    }
    assert reasons["truncated.jpg"].startswith("truncated or damaged")
    assert reasons["tiny.png"].startswith("far too small (30x20); the short side needs at least 128 pixels")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rejected"][0].keys() == {
        "source",
        "reason",
    }


def test_hidden_files_skipped_folders_walked_and_formats_read_by_content(tmp_path):
    src = tmp_path / "in"
    (src / "trip" / ".ipynb_checkpoints").mkdir(parents=True)
    photo = _photo("coffee").resize((300, 200))
    photo.save(src / "trip" / "IMG_1.HEIC", format="HEIF")  # an iPhone photo (pillow-heif)
    photo.save(src / "trip" / "photo.txt", format="PNG")  # a PNG whatever its name says
    photo.save(src / "trip" / "still.avif", format="AVIF")
    photo.save(src / "trip" / ".ipynb_checkpoints" / "copy.png")
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "trip" / "IMG_1.txt").write_text("a caption beside a photo is not a photo")
    report = prepare_photos([src], tmp_path / "out", FAST)
    assert report.rejected == ()
    names = sorted(Path(a.source).name for a in report.accepted)
    assert names == ["IMG_1.HEIC", "photo.txt", "still.avif"]
    originals = sorted(p.name for p in (tmp_path / "out" / "originals").iterdir())
    assert originals == ["001-IMG_1.heic", "002-photo.png", "003-still.avif"], "named by content"


def test_warnings(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    coffee = _photo("coffee")
    coffee.save(src / "a-coffee.png")
    coffee.resize((480, 320)).save(src / "b-coffee-again.jpg", quality=60)  # re-encoded, resized
    _photo("camera").save(src / "c-camera.png")
    _photo("astronaut").save(src / "d-astronaut.png")
    _photo("rocket").filter(ImageFilter.GaussianBlur(4)).save(src / "e-rocket-blurred.jpg", quality=95)
    _photo("chelsea").resize((200, 133)).save(src / "f-small-cat.png")
    _photo("astronaut").resize((600, 200)).save(src / "g-wide.png")
    rng = np.random.default_rng(0)
    frames = []
    for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250)):  # textured frames with a coloured centre
        a = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
        a[100:200, 100:200] = colour
        frames.append(Image.fromarray(a))
    frames[0].save(src / "h-anim.png", save_all=True, append_images=frames[1:], duration=100)
    report = prepare_photos([src], tmp_path / "out", PrepOptions(resolution=256, crop="center"))
    assert report.rejected == ()
    warnings = {Path(a.source).name: a.warnings for a in report.accepted}

    def has(name: str, start: str) -> bool:
        return any(w.startswith(start) for w in warnings[name])

    assert has("b-coffee-again.jpg", "near-duplicate of a-coffee.png")
    assert not has("c-camera.png", "near-duplicate") and not has("d-astronaut.png", "near-duplicate")
    assert has("e-rocket-blurred.jpg", "blurry")
    assert [n for n in warnings if has(n, "blurry")] == ["e-rocket-blurred.jpg"], "the sharp ones are not"
    assert has("f-small-cat.png", "upscaled: the crop is 133 pixels across")
    assert not has("a-coffee.png", "upscaled")
    assert has("g-wide.png", "very wide or tall (3.0:1)")
    assert has("h-anim.png", "animated (3 frames); the first frame is used")
    anim = next(a for a in report.accepted if a.source.endswith("h-anim.png"))
    assert np.asarray(Image.open(tmp_path / "out" / anim.output))[128, 128].tolist() == [250, 0, 0]


# --- normalisation ----------------------------------------------------------------------------------


def _prep_one(tmp_path, write, options=FAST) -> np.ndarray:
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    path = write(src)
    report = prepare_photos([path], tmp_path / "out", options)
    assert report.rejected == (), report.rejected
    return np.asarray(Image.open(tmp_path / "out" / report.accepted[0].output), dtype=np.int16), report


def test_exif_orientation_applied(tmp_path):
    def write(src):
        a = np.zeros((200, 300, 3), np.uint8)  # stored landscape: red left half, blue right half
        a[:, :150] = (220, 20, 20)
        a[:, 150:] = (20, 20, 220)
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 clockwise to display": red ends up on top
        Image.fromarray(a).save(src / "phone.jpg", exif=exif, quality=95)
        return src / "phone.jpg"

    out, report = _prep_one(tmp_path, write, PrepOptions(resolution=128, crop="none"))
    assert report.accepted[0].source_size == (200, 300)
    assert np.abs(out[20, 64] - (220, 20, 20)).max() < 12 and np.abs(out[108, 64] - (20, 20, 220)).max() < 12


def _png_16bit_rgb(rgb: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one): rows of big-endian uint16, filter byte 0."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = rgb.shape
    rows = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_16bit_levels_scaled_not_clipped(kind, tmp_path):
    ramp = np.tile(np.linspace(0, 60000, 256).astype(np.uint16), (256, 1))

    def write(src):
        if kind == "grey":
            Image.fromarray(ramp).save(src / "scan16.png")  # mode I;16
        else:
            (src / "scan16.png").write_bytes(_png_16bit_rgb(np.stack([ramp] * 3, axis=-1)))
        return src / "scan16.png"

    out, _ = _prep_one(tmp_path, write)
    row = out[64, :, 0]
    assert row[0] <= 2 and abs(row[-1] - 60000 * 255 / 65535) <= 3  # 233, not clipped to 255
    assert (np.diff(row) >= -1).all() and len(np.unique(row)) > 100, "a ramp stays a ramp"


def test_transparency_on_white(tmp_path):
    def write(src):
        im = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # transparent black: must not turn black
        im.paste((200, 30, 30, 255), (50, 50, 150, 150))
        im.save(src / "cutout.png")
        return src / "cutout.png"

    out, _ = _prep_one(tmp_path, write)
    assert out[2, 2].tolist() == [255, 255, 255] and out[64, 64].tolist() == [200, 30, 30]


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "LA"])
def test_other_modes_become_rgb(mode, tmp_path):
    def write(src):
        im = Image.new("RGB", (160, 160), (200, 40, 40)).convert(mode)
        path = src / ("x.jpg" if mode == "CMYK" else "x.png")
        im.save(path)
        return path

    out, _ = _prep_one(tmp_path, write)
    with Image.open(tmp_path / "in" / ("x.jpg" if mode == "CMYK" else "x.png")) as im:
        assert im.mode == mode
        expected = np.asarray(im.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))  # what the file holds
    assert out.shape == (128, 128, 3) and np.abs(out.mean(axis=(0, 1)) - expected).max() < 2
    if mode in ("CMYK", "P"):  # colour modes keep the colour (P is dithered, so on average)
        assert np.abs(expected - (200, 40, 40)).max() < 12


# --- the prepared folder, its report and edits --------------------------------------------------------


@pytest.fixture()
def prepared(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    _photo("coffee").save(src / "coffee.jpg", quality=92)
    _photo("rocket").save(src / "rocket.png")
    prepare_photos([src], tmp_path / "set", FAST)
    return tmp_path / "set"


def test_report_json_and_training_view(prepared):
    report = read_report(prepared)
    raw = json.loads((prepared / "report.json").read_text())
    assert {"source", "output", "caption", "warnings"} <= raw["accepted"][0].keys()
    assert raw["accepted"][0]["caption"] == "a photo of sks person"
    assert [a.output for a in report.accepted] == ["001-coffee.png", "002-rocket.png"]
    assert (prepared / "001-coffee.txt").read_text() == "a photo of sks person\n"
    # Training sees the squares only, never the originals kept for recrops.
    assert [p.name for p in list_images(prepared)] == ["001-coffee.png", "002-rocket.png"]
    assert (prepared / "originals" / "001-coffee.jpg").is_file()
    examples = load_instance_examples(prepared, "unused prompt")
    assert [e.prompt for e in examples] == ["a photo of sks person"] * 2


def test_set_caption_and_recrop(prepared):
    report = set_caption(prepared, "002-rocket.png", "  a photo of sks person,\n at a launch ")
    assert report.accepted[1].caption == "a photo of sks person, at a launch"
    assert (prepared / "002-rocket.txt").read_text() == "a photo of sks person, at a launch\n"
    assert read_report(prepared) == report
    set_caption(prepared, "001-coffee.png", "")
    assert not (prepared / "001-coffee.txt").exists()

    before = np.asarray(Image.open(prepared / "001-coffee.png"), dtype=np.int16)
    report = recrop(prepared, "001-coffee.png", (0, 0, 200, 200))
    entry = report.accepted[0]
    assert entry.crop_box == (0, 0, 200, 200) and read_report(prepared) == report
    after = np.asarray(Image.open(prepared / "001-coffee.png"), dtype=np.int16)
    expected = np.asarray(render_square(_photo("coffee"), (0, 0, 200, 200), 128), dtype=np.int16)
    assert np.abs(after - expected).mean() < 3  # from the JPEG original, not the square or the array
    assert np.abs(after - before).mean() > 10
    with pytest.raises(ValueError, match="crop_box: must be square"):
        recrop(prepared, "001-coffee.png", (0, 0, 200, 100))
    with pytest.raises(ValueError, match="crop_box: .* lies outside"):
        recrop(prepared, "001-coffee.png", (700, 0, 800, 100))
    with pytest.raises(ValueError, match="output: no prepared photo named 'nope.png'"):
        set_caption(prepared, "nope.png", "x")


def test_output_folder_safety_and_stop(prepared, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    with pytest.raises(ValueError, match="output: .* is not empty and holds no prepared photos"):
        prepare_photos([tmp_path / "in"], tmp_path / "mine", FAST)
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "precious"
    with pytest.raises(ValueError, match="input: .* is inside the output folder"):
        prepare_photos([prepared], prepared, FAST)

    report_before = (prepared / "report.json").read_text()
    seen = []

    def stop_after_one():
        return len(seen) >= 1

    with pytest.raises(StopRequested):
        prepare_photos([tmp_path / "in"], prepared, FAST, emit=seen.append, should_stop=stop_after_one)
    assert (prepared / "report.json").read_text() == report_before, "a stopped prep changes nothing"
    assert seen == [seen[0]] and seen[0].stage == "prep"

    events = []
    report = prepare_photos([tmp_path / "in" / "rocket.png"], prepared, FAST, emit=events.append)
    assert [a.output for a in report.accepted] == ["001-rocket.png"], "a prepared folder is replaced"
    assert sorted(p.name for p in prepared.iterdir()) == [
        "001-rocket.png",
        "001-rocket.txt",
        "originals",
        "report.json",
    ]
    assert [e for e in events if isinstance(e, Progress)] == [Progress("prep", 1, 1)]


def test_prepared_again_from_its_own_originals(prepared, tmp_path):
    """Another crop for the whole set: the originals/ of the set are its input, names kept."""
    first = read_report(prepared)
    again = prepare_photos([prepared / "originals"], prepared, PrepOptions(resolution=128, crop="none"))
    assert [a.output for a in again.accepted] == [a.output for a in first.accepted]
    assert [a.source for a in again.accepted] == [a.source for a in first.accepted]
    assert [a.crop_box for a in again.accepted] == [(0, -100, 600, 500), (0, -107, 640, 533)]
    assert sorted(p.name for p in (prepared / "originals").iterdir()) == ["001-coffee.jpg", "002-rocket.png"]
    square = np.asarray(Image.open(prepared / "001-coffee.png"))
    assert square[1, 64].tolist() == [255, 255, 255], "padded now, from the kept original"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(resolution=500), "resolution"),
        (dict(crop="smart"), "crop"),
        (dict(caption="gpt"), "caption"),
        (dict(token="two words"), "token"),
        (dict(class_noun=" "), "class_noun"),
        (dict(caption_template="a photo of a {thing}"), "caption_template"),
        (dict(caption_template="a photo of a person"), "caption_template"),
    ],
)
def test_options_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        PrepOptions(**kwargs)


# --- captions -----------------------------------------------------------------------------------------


def test_blip_captions_from_a_tiny_blip_through_generate(tmp_path):
    from trainer_core.captions import load_captioner, save_tiny_blip

    model_dir = save_tiny_blip(tmp_path / "tiny-blip")
    src = tmp_path / "in"
    src.mkdir()
    for name in ("coffee", "camera", "rocket"):
        _photo(name).save(src / f"{name}.png")
    options = dataclasses_replace(
        FAST, caption="blip", caption_model=str(model_dir), token="zwx", class_noun="cup"
    )
    events = []
    report = prepare_photos([src], tmp_path / "out", options, emit=events.append)
    captions = [a.caption for a in report.accepted]
    # The captioner's own output for the same squares: prep composed its captions from these.
    squares = [Image.open(tmp_path / "out" / a.output) for a in report.accepted]
    described = load_captioner(str(model_dir)).caption(squares)
    for caption, description in zip(captions, described, strict=True):
        assert description, "the tiny BLIP generated words"
        assert caption == f"a photo of zwx cup, {description}"
        assert "zwx" in caption
    assert not any("template caption" in w for a in report.accepted for w in a.warnings)
    assert (tmp_path / "out" / report.accepted[0].output).with_suffix(".txt").read_text().strip() == captions[
        0
    ]
    assert Progress("caption", 3, 3) in events


def test_blip_offline_falls_back_to_the_template_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _photo("coffee").save(tmp_path / "coffee.png")
    broken = tmp_path / "broken-blip"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for model in ("Salesforce/blip-image-captioning-base", str(broken)):
        start = time.perf_counter()
        report = prepare_photos(
            [tmp_path / "coffee.png"],
            tmp_path / f"out-{len(model)}",
            dataclasses_replace(FAST, caption="blip", caption_model=model),
        )
        seconds = time.perf_counter() - start
        (entry,) = report.accepted
        assert entry.caption == "a photo of sks person"
        assert any(w.startswith("template caption used:") for w in entry.warnings), entry.warnings
        assert seconds < 30, f"offline fallback took {seconds:.1f} s"


def dataclasses_replace(options, **changes):
    import dataclasses

    return dataclasses.replace(options, **changes)


# --- training uses per-image captions --------------------------------------------------------------


def test_training_uses_each_photos_caption(tiny_model, tmp_path):
    """The UNet calls of a real training run get each photo's own caption embedding, never the
    instance prompt's, and both captions are used."""
    import torch
    from conftest import base_config
    from diffusers import UNet2DConditionModel

    from trainer_core.components import load_components
    from trainer_core.loop import train

    src = tmp_path / "in"
    src.mkdir()
    _photo("coffee").save(src / "coffee.png")
    _photo("rocket").save(src / "rocket.png")
    prepare_photos([src], tmp_path / "set", PrepOptions(resolution=64, crop="center"))
    set_caption(tmp_path / "set", "001-coffee.png", "a photo of sks person holding a cup")
    set_caption(tmp_path / "set", "002-rocket.png", "a photo of sks person at a rocket launch")

    parts, _ = load_components(str(tiny_model))
    tok, te = parts["tokenizer"], parts["text_encoder"]
    prompts = [
        "a photo of sks person holding a cup",
        "a photo of sks person at a rocket launch",
        "unused prompt",
    ]
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = te(ids.input_ids)[0]  # (3, 77, dim)

    seen = []

    def record(module, args):
        if isinstance(module, UNet2DConditionModel) and module.training:
            seen.append(args[2].detach().clone())  # unet(noisy_latents, timesteps, prompt_embeds)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        cfg = base_config(
            tiny_model,
            tmp_path / "set",
            tmp_path / "run",
            instance_prompt="unused prompt",
            with_prior_preservation=False,
            class_prompt=None,
            max_train_steps=6,
            resolution=64,
        )
        train(cfg)
    finally:
        handle.remove()
    assert len(seen) == 6
    used = set()
    for embeds in seen:  # (batch 1, 77, dim)
        distances = [(embeds[0] - e).abs().max().item() for e in expected]
        best = int(np.argmin(distances))
        assert distances[best] < 1e-5, distances
        used.add(best)
    assert used == {0, 1}, "both photos' captions reached the UNet; the instance prompt never did"
    assert (expected[0] - expected[1]).abs().max().item() > 1e-2


# --- command line -------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer_core", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prep(tmp_path):
    _photo("coffee").save(tmp_path / "coffee.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    done = _cli(
        "prep",
        "--input",
        str(tmp_path / "coffee.png"),
        str(tmp_path / "notes.txt"),
        "--output",
        str(tmp_path / "out"),
        "--resolution",
        "128",
        "--crop",
        "center",
        "--token",
        "zwx",
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["accepted"] == 1 and summary["rejected"] == 1
    assert "rejected" in done.stderr and "a text file, not an image" in done.stderr
    assert (tmp_path / "out" / "001-coffee.txt").read_text() == "a photo of zwx person\n"

    failed = _cli("prep", "--input", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "none"))
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last == "error: no photo was accepted (notes.txt: a text file, not an image)."
    assert "Traceback" not in failed.stderr

    bad = _cli("prep", "--input", str(tmp_path), "--output", str(tmp_path / "x"), "--crop", "smart")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    bad = _cli("prep", "--input", str(tmp_path), "--output", str(tmp_path / "x"), "--resolution", "100")
    assert (
        bad.returncode == 1
        and bad.stderr.strip() == "error: resolution: must be a multiple of 8 of at least 64, got 100"
    )


def test_importing_prep_does_not_import_torch():
    """The app imports the prep API at start-up; torch and transformers load only for BLIP."""
    code = (
        "import sys, trainer_core.prep, trainer_core.faces, trainer_core.captions, trainer_core.data;"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
