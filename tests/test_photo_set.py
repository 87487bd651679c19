"""Editing a prepared photo set and flagging the photos that do not fit it (issue 15, item 4).

Remove a photo (its square, caption, masks and original go; nothing else of the set), crop one
again around a point or by a crop mode, a "person" photo with no face flagged, and the outlier
check (outliers.py) on real-looking synthetic sets: one dog in many scenes, and a coffee mug.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from photo_sets import dog_photo, mug_photo, write_dog_set
from PIL import Image
from skimage import data as skdata

from trainer_core.data import list_images
from trainer_core.outliers import colour_signature, common_shares, find_outliers
from trainer_core.prep import (
    NO_FACE_WARNING,
    PrepOptions,
    prepare_photos,
    read_report,
    recrop,
    recrop_around,
    recrop_auto,
    remove_photo,
    render_square,
    set_caption,
    square_around,
)


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def _hopper() -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as im:
        return im.convert("RGB")


def _warned(report, start: str) -> list[str]:
    return [Path(a.source).name for a in report.accepted if any(w.startswith(start) for w in a.warnings)]


# --- remove ----------------------------------------------------------------------------------------


@pytest.fixture()
def three(tmp_path) -> Path:
    """coffee, the same coffee again (a near-duplicate), rocket; with masks."""
    src = tmp_path / "in"
    src.mkdir()
    _photo("coffee").save(src / "a-coffee.png")
    _photo("coffee").resize((480, 320)).save(src / "b-coffee-again.jpg", quality=70)
    _photo("rocket").save(src / "c-rocket.png")
    prepare_photos([src], tmp_path / "set", PrepOptions(resolution=128, crop="center", masks=True))
    return tmp_path / "set"


def test_remove_takes_the_photo_out_and_keeps_the_rest(three, tmp_path):
    before = read_report(three)
    assert [a.output for a in before.accepted] == [
        "001-a-coffee.png",
        "002-b-coffee-again.png",
        "003-c-rocket.png",
    ]
    assert _warned(before, "near-duplicate of a-coffee.png") == ["b-coffee-again.jpg"]
    set_caption(three, "003-c-rocket.png", "a photo of sks person at the launch")
    recrop(three, "003-c-rocket.png", (100, 0, 500, 400))
    kept = read_report(three).accepted[2]
    rocket_pixels = (three / "003-c-rocket.png").read_bytes()

    report = remove_photo(three, "001-a-coffee.png")

    assert [a.output for a in report.accepted] == ["002-b-coffee-again.png", "003-c-rocket.png"]
    assert read_report(three) == report
    gone = ["001-a-coffee.png", "001-a-coffee.txt", "001-a-coffee.mask.png", "originals/001-a-coffee.png",
            "originals/001-a-coffee.mask.png"]  # fmt: skip
    assert [name for name in gone if (three / name).exists()] == []
    assert [p.name for p in list_images(three)] == ["002-b-coffee-again.png", "003-c-rocket.png"]
    # Nothing else lost: the rocket's caption, crop, square and mask are as they were.
    rocket = report.accepted[1]
    assert rocket == kept
    assert (three / "003-c-rocket.png").read_bytes() == rocket_pixels
    assert (three / "003-c-rocket.txt").read_text() == "a photo of sks person at the launch\n"
    assert (three / rocket.mask).is_file() and (three / "originals/003-c-rocket.png").is_file()
    # The set checks are redone: its pair gone, the second coffee is no near-duplicate any more.
    assert _warned(report, "near-duplicate") == []
    # Adding photos prepares the set's originals again: the removed photo does not come back.
    again = prepare_photos([three / "originals"], three, PrepOptions(resolution=128, crop="center"))
    assert [Path(a.source).name for a in again.accepted] == ["b-coffee-again.jpg", "c-rocket.png"]
    with pytest.raises(ValueError, match="output: no prepared photo named '001-a-coffee.png'"):
        remove_photo(three, "001-a-coffee.png")


# --- crop again ------------------------------------------------------------------------------------


def test_square_around_a_point_stays_inside_the_photo():
    assert square_around((500, 300), 200, (1000, 600)) == (400, 200, 600, 400)
    assert square_around((10, 590), 200, (1000, 600)) == (0, 400, 200, 600), "moved, not shrunk"
    assert square_around((500, 300), 5000, (1000, 600)) == (200, 0, 800, 600), "at most the short side"
    with pytest.raises(ValueError, match=r"focus: \(1200, 10\) lies outside the 1000x600 photo"):
        square_around((1200, 10), 100, (1000, 600))


def test_recrop_around_a_point_and_by_a_mode(tmp_path):
    canvas = Image.new("RGB", (1600, 560), (110, 110, 110))
    canvas.paste(_photo("astronaut"), (1600 - 512, 48))
    canvas.save(tmp_path / "astronaut-wide.jpg", quality=92)
    out = tmp_path / "set"
    report = prepare_photos(
        [tmp_path / "astronaut-wide.jpg"], out, PrepOptions(resolution=128, crop="center")
    )
    name = report.accepted[0].output
    assert report.accepted[0].crop_box == (520, 0, 1080, 560)

    report = recrop_around(out, name, (1300, 200), side=300)
    entry = report.accepted[0]
    assert entry.crop_box == (1150, 50, 1450, 350)
    with Image.open(tmp_path / "astronaut-wide.jpg") as im:
        photo = im.convert("RGB")
    square = np.asarray(Image.open(out / name), dtype=np.int16)
    assert np.abs(square - np.asarray(render_square(photo, entry.crop_box, 128), dtype=np.int16)).max() == 0
    # No side given: the current crop's size, centred on the new point.
    assert recrop_around(out, name, (200, 280)).accepted[0].crop_box == (50, 130, 350, 430)

    assert recrop_auto(out, name, "center").accepted[0].crop_box == (520, 0, 1080, 560)
    assert recrop_auto(out, name, "none").accepted[0].crop_box == (0, -520, 1600, 1080)
    face = recrop_auto(out, name, "face").accepted[0]
    assert face.face_box is not None and face.crop_box[0] >= 1088 - 100, "around her face, at the right"
    with pytest.raises(ValueError, match="crop: must be one of"):
        recrop_auto(out, name, "sideways")


# --- a person photo with no face ---------------------------------------------------------------------


def test_person_photos_with_no_face_are_flagged(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _photo("astronaut").save(src / "astronaut.png")
    _hopper().save(src / "hopper.jpg", quality=92)
    _photo("coffee").save(src / "coffee.png")  # the crop's detector "finds" a face in it
    _photo("chelsea").save(src / "cat.png")
    _photo("camera").save(src / "cameraman.png")  # a man, but his face is turned away behind the camera
    person = prepare_photos([src], tmp_path / "person", PrepOptions(resolution=256, subject_type="person"))
    assert (
        _warned(person, "no face found")
        == ["astronaut.png", "cameraman.png", "cat.png", "coffee.png", "hopper.jpg"][1:4]
    )
    coffee = next(a for a in person.accepted if a.source.endswith("coffee.png"))
    assert NO_FACE_WARNING in coffee.warnings and "remove it or replace it" in NO_FACE_WARNING
    # Said once: no second "no face found" from the crop rule.
    assert sum(w.startswith("no face found") for w in coffee.warnings) == 1

    # A person photo cropped onto the suit is flagged; cropped back around the face, no longer.
    astronaut = next(a for a in person.accepted if a.source.endswith("astronaut.png"))
    report = recrop(tmp_path / "person", astronaut.output, (0, 312, 200, 512))
    assert _warned(report, "no face found") == ["astronaut.png", "cameraman.png", "cat.png", "coffee.png"]
    report = recrop_auto(tmp_path / "person", astronaut.output, "face")
    assert "astronaut.png" not in _warned(report, "no face found")

    # Other subject types expect no face.
    pet = prepare_photos([src], tmp_path / "pet", PrepOptions(resolution=256, subject_type="pet"))
    assert _warned(pet, "no face found") == []
    with pytest.raises(ValueError, match="subject_type: must be one of person, pet, object, style"):
        PrepOptions(subject_type="robot")


def test_auto_crop_does_not_look_for_faces_in_a_pet_set(tmp_path):
    """The detector knows human faces; in fur or sand its false hits crop a close-up of nothing."""
    dog_photo(5053).save(tmp_path / "dog.png")  # the cascade "finds" a face in it
    unknown = prepare_photos([tmp_path / "dog.png"], tmp_path / "a", PrepOptions(resolution=128))
    pet = prepare_photos(
        [tmp_path / "dog.png"], tmp_path / "b", PrepOptions(resolution=128, subject_type="pet")
    )
    assert unknown.accepted[0].face_box is not None, "the false hit this guards against"
    assert pet.accepted[0].face_box is None
    left, top, right, bottom = pet.accepted[0].crop_box
    assert (top, bottom, right - left) == (0, 480, 480), "the full-height square with the most detail"


# --- unlike the rest of the set -----------------------------------------------------------------------


def _squares(n_dogs: int, seed: int, mug: bool) -> list[Image.Image]:
    from trainer_core.prep import saliency_crop_box

    photos = [dog_photo(seed * 1000 + i) for i in range(n_dogs)] + ([mug_photo(seed)] if mug else [])
    return [render_square(p, saliency_crop_box(p), 128) for p in photos]


@pytest.mark.parametrize(("n_dogs", "seed"), [(4, 1), (7, 2), (11, 3), (19, 4)])
def test_the_mug_among_dogs_is_flagged_and_no_dog_is(n_dogs, seed):
    squares = _squares(n_dogs, seed, mug=True)
    found = find_outliers(squares)
    shares = common_shares(np.stack([colour_signature(s) for s in squares]))
    print(f"{n_dogs} dogs: dogs' shares {np.round(shares[:-1], 2).tolist()}, the mug's {shares[-1]:.2f}")
    assert [i for i, f in enumerate(found) if f] == [n_dogs], np.round(shares, 2)
    assert "remove it or replace it" in found[-1].warning
    # Without the mug, no photo of the dog is flagged.
    assert not any(find_outliers(squares[:-1])), np.round(shares, 2)


def test_outliers_need_five_photos():
    squares = _squares(3, 5, mug=True)
    assert find_outliers(squares) == [None] * 4


def test_prepare_flags_the_mug_and_removing_it_clears_the_set(tmp_path):
    paths = write_dog_set(tmp_path / "in", 5, seed=6, with_mug=True)
    out = tmp_path / "set"
    report = prepare_photos(paths, out, PrepOptions(resolution=128, subject_type="pet"))
    assert _warned(report, "unlike the rest") == ["mug.jpg"]
    mug = report.accepted[-1]
    report = remove_photo(out, mug.output)
    assert len(report.accepted) == 5 and _warned(report, "unlike the rest") == []
