"""Photo preparation: uploads in, a training-ready folder out.

`prepare_photos` validates every file by content (never by its name), normalises it (EXIF
orientation, 16-bit levels, transparency on white, any mode to RGB), crops a square around the
face (or the busiest region, or the centre, or pads), resizes it to the training resolution, and
captions it. It writes the squares, a `.txt` caption beside each, the accepted originals under
`originals/` (so a crop can be redone later, and so aspect-ratio bucketing has the whole photo)
and `report.json`; a rejected file gets one plain reason, a doubtful one a warning. With `masks`
it also writes a feathered subject mask (face and shoulders, or the busiest region) beside each
square and each original, for `masked_loss` (`add_masks` writes them into a set prepared without).
The set can then be edited: `set_caption`, `recrop` (a box), `recrop_around` (a point), `recrop_auto`
(a crop mode) and `remove_photo`; after each, the checks that compare a photo with the rest of the
set (near-duplicates, blur, `outliers.py`) are redone.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import SUBJECT_TYPES
from .data import IMAGE_FORMATS, is_mask, mask_path, to_rgb
from .events import (
    Emit,
    Progress,
    ShouldStop,
    StageStarted,
    StopRequested,
    TrainingError,
    never_stop,
    no_emit,
)
from .fileio import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CROP_MODES = ("auto", "face", "center", "none")
CAPTION_MODES = ("blip", "template", "none")
REPORT_NAME = "report.json"
ORIGINALS_DIR = "originals"

MAX_PIXELS = 40_000_000  # well under Pillow's own bomb limit (89 MP), checked before decoding
TOO_SMALL_FRACTION = 4  # short side under resolution / 4: rejected
EXTREME_ASPECT = 2.0  # long side over twice the short side: warned (most of the photo is cut away)
DUPLICATE_MAX_BITS = 6  # perceptual hashes this close (of 64 bits): the same shot
BLUR_FRACTION = 0.1  # Laplacian variance under a tenth of the set's median: blurry (a soft but sharp
# photo such as scikit-image's chelsea.png measures 15% of the others; a 4-pixel blur, under 1%)
FACE_CROP_SCALE = 3.2  # square side / face size: head and shoulders
FACE_CENTRE_HEIGHT = 0.42  # the face's centre sits this far down the square (room for shoulders)
MASK_WORK_SIDE = 256  # subject masks are drawn at most this many pixels on the long side, then scaled up
MASK_FEATHER = 0.04  # of the photo's short side: the soft edge that grows out of the subject

_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
_EXTENSIONS |= {"HEIF": ".heic", "AVIF": ".avif"}
# Warnings that describe the crop; a manual recrop replaces them.
_CROP_WARNING_PREFIXES = ("upscaled", "no face found", "several faces")
# Warnings that compare a photo with the rest of the set; redone whenever the set changes.
_SET_WARNING_PREFIXES = ("near-duplicate of", "blurry:", "unlike the rest")
NO_FACE_WARNING = (
    "no face found in the crop: a photo of a person should show their face clearly; "
    "re-crop it around the face, or remove it or replace it"
)


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PrepOptions:
    resolution: int = _f(512, "Side of the square training images in pixels (a multiple of 8).")
    crop: str = _f(
        "auto",
        "auto: the face if one is found (not searched in a pet, object or style set), else the busiest "
        "region; face; center; none (pad to square).",
    )
    caption: str = _f(
        "template", "blip: describe each photo with BLIP; template: the same caption for all; none."
    )
    token: str = _f("sks", "The rare word that names the subject in captions and prompts.")
    class_noun: str = _f("person", "What the subject is (person, dog, toy...), used in captions.")
    caption_model: str = _f(
        "Salesforce/blip-image-captioning-base", "BLIP model id or folder for --caption blip."
    )
    masks: bool = _f(
        False,
        "Also write a subject mask (photo.mask.png, white = subject, feathered) for masked_loss: "
        "head and shoulders around the face, else the busiest region.",
    )
    caption_template: str = _f(
        "a photo of {token} {class_noun}",
        "Caption (and prefix of BLIP captions); {token} and {class_noun} are filled in.",
    )
    subject_type: str = _f(
        "",
        "person, pet, object or style: a person photo whose crop shows no face is flagged "
        "('' checks no faces). Every set of 5 or more is checked for photos unlike the rest.",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 64 or self.resolution % 8:
            raise ValueError(f"resolution: must be a multiple of 8 of at least 64, got {self.resolution}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop: must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if self.caption not in CAPTION_MODES:
            raise ValueError(f"caption: must be one of {', '.join(CAPTION_MODES)}, got {self.caption!r}")
        if not self.token.strip() or len(self.token.split()) != 1:
            raise ValueError(f"token: must be one word such as sks, got {self.token!r}")
        if not self.class_noun.strip():
            raise ValueError("class_noun: must not be empty (e.g. person, dog, toy)")
        if self.caption == "blip" and not self.caption_model.strip():
            raise ValueError("caption_model: a BLIP model id or folder is needed for caption=blip")
        try:
            filled = self.caption_template.format(token="\0", class_noun="\1")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"caption_template: only {{token}} and {{class_noun}} may be filled in, got {self.caption_template!r}"
            ) from e
        if "\0" not in filled:
            raise ValueError(f"caption_template: must contain {{token}}, got {self.caption_template!r}")
        if self.subject_type and self.subject_type not in SUBJECT_TYPES:
            raise ValueError(
                f"subject_type: must be one of {', '.join(SUBJECT_TYPES)} (or empty), got {self.subject_type!r}"
            )

    @property
    def template_caption(self) -> str:
        return self.caption_template.format(token=self.token, class_noun=self.class_noun)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrepOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class AcceptedPhoto:
    source: str  # the file as given
    output: str  # the square, relative to the output folder
    caption: str  # "" when captions are off (training then uses the instance prompt)
    warnings: tuple[str, ...]
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in EXIF-transposed source pixels
    original: str = ""  # copy of the source, relative to the output folder
    source_size: tuple[int, int] = (0, 0)  # (width, height) after the EXIF transpose
    face_box: tuple[int, int, int, int] | None = None  # the face the crop was centred on
    mask: str = ""  # the square's subject mask, relative to the output folder ("" when not made)
    # For the set checks after an edit (none in reports written before they were kept).
    phash: int | None = None  # perceptual hash of the whole photo
    sharpness: float | None = None  # of the crop's part of the photo, at the training scale


@dataclass(frozen=True)
class RejectedPhoto:
    source: str
    reason: str


@dataclass(frozen=True)
class PrepReport:
    accepted: tuple[AcceptedPhoto, ...]
    rejected: tuple[RejectedPhoto, ...]
    output_dir: str
    options: PrepOptions = PrepOptions()

    def to_json(self) -> dict[str, Any]:
        """The `report.json` object (paths of prepared files relative to the output folder)."""
        return {
            "accepted": [
                {
                    "source": a.source,
                    "output": a.output,
                    "caption": a.caption,
                    "warnings": list(a.warnings),
                    "crop_box": list(a.crop_box),
                    "original": a.original,
                    "source_size": list(a.source_size),
                    "face_box": list(a.face_box) if a.face_box else None,
                    "mask": a.mask,
                    "phash": f"{a.phash:016x}" if a.phash is not None else None,
                    "sharpness": a.sharpness,
                }
                for a in self.accepted
            ],
            "rejected": [{"source": r.source, "reason": r.reason} for r in self.rejected],
            "options": self.options.to_dict(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], output_dir: str | Path) -> PrepReport:
        accepted = tuple(
            AcceptedPhoto(
                source=a["source"],
                output=a["output"],
                caption=a.get("caption", ""),
                warnings=tuple(a.get("warnings", ())),
                crop_box=tuple(a.get("crop_box", (0, 0, 0, 0))),
                original=a.get("original", ""),
                source_size=tuple(a.get("source_size", (0, 0))),
                face_box=tuple(a["face_box"]) if a.get("face_box") else None,
                mask=a.get("mask", ""),
                phash=int(a["phash"], 16) if a.get("phash") else None,
                sharpness=a.get("sharpness"),
            )
            for a in obj.get("accepted", [])
        )
        rejected = tuple(RejectedPhoto(r["source"], r["reason"]) for r in obj.get("rejected", []))
        return cls(accepted, rejected, str(output_dir), PrepOptions.from_dict(obj.get("options", {})))

    def summary(self) -> str:
        return f"{len(self.accepted)} photo(s) accepted, {len(self.rejected)} rejected"


class _Rejected(Exception):
    pass


@dataclass
class _Prepared:
    """One accepted photo while the set is being built (the square kept for captions and checks)."""

    source: Path
    fmt: str
    index: int
    square: Image.Image
    crop_box: tuple[int, int, int, int]
    source_size: tuple[int, int]
    face_box: tuple[int, int, int, int] | None
    phash: int
    sharpness: float
    warnings: list[str]
    output: str = ""
    caption: str = ""
    given_as: str = ""  # the source as the user gave it (for a re-prep, the first prep's source)
    mask: Image.Image | None = None  # the subject mask ("L") at the source's size, with `masks`


# ---------------------------------------------------------------------------------------------
# The public entry points
# ---------------------------------------------------------------------------------------------


def prepare_photos(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    options: PrepOptions = PrepOptions(),
    *,
    emit: Emit = no_emit,
    should_stop: ShouldStop = never_stop,
) -> PrepReport:
    """Validate, normalise, crop and caption photos into `output_dir`; return (and write) the report.

    The folder is built beside its final place and swapped in whole, so a stop or a failure leaves
    an earlier prepared set there untouched. An existing folder is replaced only when it is a
    prepared set (it has a report.json) or empty; that set's `originals/` may be the input, to
    prepare it again with other options. Raises StopRequested when `should_stop()` says so.
    """
    out = Path(output_dir)
    _check_output_folder(out)
    files, missing = _collect_inputs(inputs, out)
    if not files and not missing:
        raise ValueError("input: no files found in the given paths")
    rejected = [RejectedPhoto(str(p), "the file or folder does not exist") for p in missing]
    # Prepared again from this set's originals/: keep the names the user gave the photos.
    earlier = _earlier_sources(out)
    total = len(files)
    emit(StageStarted("prep", f"checking and cropping {total} photo(s)", total=total))
    prepared: list[_Prepared] = []
    for i, path in enumerate(files):
        if should_stop():
            raise StopRequested
        try:
            prepared.append(_prepare_one(path, i, options, earlier.get(path.resolve())))
        except _Rejected as e:
            rejected.append(RejectedPhoto(earlier.get(path.resolve(), str(path)), str(e)))
        except MemoryError:
            rejected.append(RejectedPhoto(str(path), "too large to decode in the memory available"))
        except Exception as e:  # an image plugin's own error on a damaged file: one file, not the set
            log.warning("prep: %s could not be processed", path, exc_info=True)
            rejected.append(RejectedPhoto(str(path), f"cannot be read ({type(e).__name__}: {e})"))
        emit(Progress("prep", i + 1, total))

    members = [_Member(Path(p.given_as).name, p.phash, p.sharpness, p.square) for p in prepared]
    for item, extra in zip(prepared, _set_warnings(members), strict=True):
        item.warnings += extra
    _caption_all(prepared, options, emit, should_stop)

    try:
        report = _write_set(out, prepared, rejected, options)
    except OSError as e:
        raise TrainingError(
            f"Could not write the prepared photos to {out} ({e.strerror or e}); "
            "free disk space or choose another folder."
        ) from e
    log.info("prep: %s into %s", report.summary(), out)
    return report


def _write_set(
    out: Path, prepared: list[_Prepared], rejected: list[RejectedPhoto], options: PrepOptions
) -> PrepReport:
    """Squares, captions, originals and report.json, built beside `out` and swapped in whole."""
    accepted: list[AcceptedPhoto] = []
    with atomic_directory(out) as tmp:
        (tmp / ORIGINALS_DIR).mkdir()
        for item in prepared:
            item.square.save(tmp / item.output, format="PNG")
            original = f"{ORIGINALS_DIR}/{Path(item.output).stem}{_EXTENSIONS.get(item.fmt, '.img')}"
            shutil.copyfile(item.source, tmp / original)
            mask = ""
            if item.mask is not None:
                # One for the square (square training) and one for the original (bucketing).
                mask = mask_path(Path(item.output)).as_posix()
                render_mask(item.mask, item.crop_box, options.resolution).save(tmp / mask, format="PNG")
                item.mask.save(tmp / mask_path(Path(original)), format="PNG")
            if item.caption:
                (tmp / item.output).with_suffix(".txt").write_text(item.caption + "\n", encoding="utf-8")
            accepted.append(
                AcceptedPhoto(
                    source=item.given_as,
                    output=item.output,
                    caption=item.caption,
                    warnings=tuple(item.warnings),
                    crop_box=item.crop_box,
                    original=original,
                    source_size=item.source_size,
                    face_box=item.face_box,
                    mask=mask,
                    phash=item.phash,
                    sharpness=item.sharpness,
                )
            )
        report = PrepReport(tuple(accepted), tuple(rejected), str(out), options)
        atomic_write_json(tmp / REPORT_NAME, report.to_json())
    return report


def read_report(output_dir: str | Path) -> PrepReport:
    """The report of a prepared folder."""
    path = Path(output_dir) / REPORT_NAME
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{output_dir} has no {REPORT_NAME}; prepare the photos first.") from None
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path} cannot be read ({e}); prepare the photos again.") from e
    return PrepReport.from_json(obj, output_dir)


def set_caption(output_dir: str | Path, output: str, caption: str) -> PrepReport:
    """Replace one photo's caption (its `.txt` and the report); an empty caption removes the `.txt`."""
    report = read_report(output_dir)
    entry = _find(report, output)
    caption = " ".join(caption.split())
    txt = (Path(output_dir) / entry.output).with_suffix(".txt")
    if caption:
        atomic_write_text(txt, caption + "\n")
    else:
        txt.unlink(missing_ok=True)
    return _replace_entry(report, dataclasses.replace(entry, caption=caption))


def recrop(output_dir: str | Path, output: str, crop_box: tuple[int, int, int, int]) -> PrepReport:
    """Re-render one square from its original with the user's box (source pixels, may reach past
    the edges, which are padded white), and record the box. The box must be square."""
    report = read_report(output_dir)
    entry = _find(report, output)
    left, top, right, bottom = (int(round(v)) for v in crop_box)
    side = right - left
    if side < 8 or bottom - top < 8:
        raise ValueError(f"crop_box: must be at least 8 pixels wide and high, got {tuple(crop_box)}")
    if abs(side - (bottom - top)) > max(1, side // 100):
        raise ValueError(f"crop_box: must be square, got {side}x{bottom - top} pixels")
    rgb = _read_original(Path(output_dir), entry)
    w, h = rgb.size
    if right <= 0 or top + side <= 0 or left >= w or top >= h:
        raise ValueError(f"crop_box: {tuple(crop_box)} lies outside the {w}x{h} photo")
    return _apply_crop(report, entry, rgb, (left, top, right, top + side))


def recrop_around(
    output_dir: str | Path, output: str, focus: tuple[float, float], side: int | None = None
) -> PrepReport:
    """Crop one photo again as a square centred on `focus` (x, y in the original's pixels, e.g.
    where the person clicked), `side` pixels across (default: the current crop's), moved to stay
    inside the photo."""
    report = read_report(output_dir)
    entry = _find(report, output)
    rgb = _read_original(Path(output_dir), entry)
    current = entry.crop_box[2] - entry.crop_box[0]
    return _apply_crop(report, entry, rgb, square_around(focus, side or current, rgb.size))


def recrop_auto(output_dir: str | Path, output: str, crop: str) -> PrepReport:
    """Crop one photo again by one of CROP_MODES, as preparing does (auto, face, center, none)."""
    if crop not in CROP_MODES:
        raise ValueError(f"crop: must be one of {', '.join(CROP_MODES)}, got {crop!r}")
    report = read_report(output_dir)
    entry = _find(report, output)
    rgb = _read_original(Path(output_dir), entry)
    box, face, warnings = choose_crop_box(rgb, crop, report.options.subject_type)
    return _apply_crop(report, entry, rgb, box, face=face, crop_warnings=warnings)


def square_around(focus: tuple[float, float], side: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The square box `side` pixels across (at most the photo's short side) centred on `focus`,
    moved (not shrunk) to lie inside a photo of `size`."""
    w, h = size
    x, y = focus
    if not (0 <= x <= w and 0 <= y <= h):
        raise ValueError(f"focus: ({x}, {y}) lies outside the {w}x{h} photo")
    side = max(8, min(int(side), w, h))
    left = min(max(round(x - side / 2), 0), w - side)
    top = min(max(round(y - side / 2), 0), h - side)
    return (left, top, left + side, top + side)


def remove_photo(output_dir: str | Path, output: str) -> PrepReport:
    """Take one photo out of the set: its square, caption and masks, and its original too (so
    adding photos to the set, which prepares its originals again, does not bring it back). The
    other photos keep their names, crops and captions; the set checks are redone without it."""
    report = read_report(output_dir)
    entry = _find(report, output)
    folder = Path(output_dir)
    files = [entry.output, Path(entry.output).with_suffix(".txt").as_posix(), entry.mask, entry.original]
    if entry.mask and entry.original:
        files.append(mask_path(Path(entry.original)).as_posix())
    # The square first: training reads the folder, so once it is gone the photo is out of the set.
    # A failure part-way leaves the entry in the report, and removing it again finishes the job.
    for name in filter(None, files):
        path = (folder / name).resolve()
        if path.parent not in (folder.resolve(), (folder / ORIGINALS_DIR).resolve()):
            raise TrainingError(
                f"{REPORT_NAME} of {folder} names a file outside the set ({name}); prepare it again."
            )
        path.unlink(missing_ok=True)
    rest = dataclasses.replace(report, accepted=tuple(a for a in report.accepted if a.output != output))
    return _save(_with_set_warnings(rest))


def read_original(
    output_dir: str | Path, output: str, max_side: int | None = None
) -> tuple[Image.Image, float, AcceptedPhoto]:
    """A prepared photo's original as RGB (EXIF orientation applied, so in the pixels crop boxes
    use), shrunk to at most `max_side` on its long side; the factor it was shrunk by (1.0 when not)
    and its report entry."""
    report = read_report(output_dir)
    entry = _find(report, output)
    rgb = _read_original(Path(output_dir), entry)
    scale = min(1.0, max_side / max(rgb.size)) if max_side else 1.0
    if scale < 1.0:
        rgb = rgb.resize(
            (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.LANCZOS
        )
    return rgb, scale, entry


def _read_original(folder: Path, entry: AcceptedPhoto) -> Image.Image:
    try:
        with Image.open(folder / entry.original) as im:
            return to_rgb(im)
    except (OSError, UnidentifiedImageError) as e:
        raise TrainingError(
            f"The original of {entry.output} cannot be read ({e}); prepare the photos again."
        ) from e


def _apply_crop(
    report: PrepReport,
    entry: AcceptedPhoto,
    rgb: Image.Image,
    box: tuple[int, int, int, int],
    *,
    face: tuple[int, int, int, int] | None | bool = False,
    crop_warnings: Sequence[str] = (),
) -> PrepReport:
    """Write the square (and its mask) of `box`, redo the warnings about the crop, and the set's.
    `face`: the face the crop is centred on (False: keep the recorded one)."""
    folder = Path(report.output_dir)
    options = report.options
    square = render_square(rgb, box, options.resolution)
    buffer = io.BytesIO()
    square.save(buffer, format="PNG")
    atomic_write_bytes(folder / entry.output, buffer.getvalue())
    if entry.mask:
        _rerender_mask(folder, entry, box, options.resolution)
    warnings = [w for w in entry.warnings if not w.startswith(_CROP_WARNING_PREFIXES)]
    warnings += _crop_warnings(square, box, rgb.size, crop_warnings, options)
    new = dataclasses.replace(
        entry,
        crop_box=box,
        face_box=entry.face_box if face is False else face,
        warnings=tuple(warnings),
        sharpness=laplacian_variance(_visible_region(rgb, box, options.resolution)),
    )
    accepted = tuple(new if a.output == entry.output else a for a in report.accepted)
    return _save(_with_set_warnings(dataclasses.replace(report, accepted=accepted)))


# ---------------------------------------------------------------------------------------------
# Inputs and validation
# ---------------------------------------------------------------------------------------------


def _check_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_NAME).is_file():
        raise ValueError(
            f"output: {out} is not empty and holds no prepared photos; choose a new or empty folder"
        )


def _collect_inputs(inputs: Sequence[str | Path], out: Path) -> tuple[list[Path], list[Path]]:
    """Files to check, in a stable order: folders walked recursively, hidden entries skipped."""
    files: list[Path] = []
    missing: list[Path] = []
    out_resolved = out.resolve()
    for given in inputs:
        path = Path(given)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            # A caption beside a photo is not a photo: skip `x.txt` when `x.<anything>` is there.
            found = [p for p in found if not (p.suffix.lower() == ".txt" and _has_sibling_with_stem(p))]
        else:
            missing.append(path)
            continue
        for p in found:
            # The set's own originals may be prepared again (other crop or captions): they are
            # read before the new folder replaces the old one. Anything else inside would be lost.
            inside = out_resolved == p.resolve().parent or out_resolved in p.resolve().parents
            if inside and p.resolve().parent != out_resolved / ORIGINALS_DIR:
                raise ValueError(
                    f"input: {p} is inside the output folder {out}; choose another output folder"
                )
            if is_mask(p):  # a subject mask (ours in originals/, or kohya-style) is not a photo
                continue
            if p not in files:
                files.append(p)
    return files, missing


def _has_sibling_with_stem(txt: Path) -> bool:
    return any(s != txt and s.stem == txt.stem for s in txt.parent.iterdir())


def _describe_non_image(head: bytes) -> str:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text[:1024] or (text.startswith(b"<?xml") and b"svg" in text[:1024]):
        return "an SVG drawing, not a photo; export it as PNG or JPEG"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:1024]:
        return "a web page (HTML), not an image; save the image itself"
    try:
        if b"\0" not in head:  # binary headers (a damaged HEIC's ftyp box) are valid UTF-8 but hold NULs
            head.decode("utf-8")
            return "a text file, not an image"
    except UnicodeDecodeError:
        pass
    return "not a readable image (unknown or damaged content)"


def _open_checked(path: Path, options: PrepOptions) -> tuple[Image.Image, str, list[str]]:
    """Decode `path` fully after checking it is an allowed, sane image; return RGB, format, warnings."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise _Rejected(f"cannot be read ({e.strerror})") from None
    if size == 0:
        raise _Rejected("the file is empty (0 bytes)")
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            raise _Rejected(_describe_non_image(f.read(2048))) from None
    except Image.DecompressionBombError:
        raise _Rejected(
            f"too many pixels (over {MAX_PIXELS // 1_000_000} megapixels); downsize it first"
        ) from None
    except OSError as e:
        raise _Rejected(f"cannot be read ({e})") from None
    with im:
        fmt = im.format or "?"
        if fmt not in IMAGE_FORMATS:
            raise _Rejected(f"{fmt} files are not supported; use JPEG, PNG, WEBP, HEIC, BMP or TIFF")
        w, h = im.size
        # Before decoding: a small file can claim a huge canvas and eat the memory.
        if w * h > MAX_PIXELS:
            raise _Rejected(
                f"too many pixels ({w}x{h}, over {MAX_PIXELS // 1_000_000} megapixels); downsize it first"
            )
        warnings = []
        frames = getattr(im, "n_frames", 1)
        if frames > 1 and fmt != "MPO":  # MPO's second frame is a phone's depth/preview image
            warnings.append(f"animated ({frames} frames); the first frame is used")
        try:
            rgb = to_rgb(im)
        except (OSError, ValueError, SyntaxError) as e:
            reason = "truncated or damaged" if "truncated" in str(e) or isinstance(e, OSError) else "damaged"
            raise _Rejected(f"{reason} ({e}); re-export or copy it again") from None
    short = min(rgb.size)
    if short < options.resolution / TOO_SMALL_FRACTION:
        raise _Rejected(
            f"far too small ({rgb.width}x{rgb.height}); the short side needs at least "
            f"{options.resolution // TOO_SMALL_FRACTION} pixels, ideally {options.resolution}"
        )
    ratio = max(rgb.size) / short
    if ratio > EXTREME_ASPECT:
        warnings.append(f"very wide or tall ({ratio:.1f}:1); only a square part is used")
    return rgb, fmt, warnings


def _earlier_sources(out: Path) -> dict[Path, str]:
    """original file -> source as first given, from a prepared folder's report (none: empty)."""
    if not (out / REPORT_NAME).is_file():
        return {}
    try:
        report = read_report(out)
    except TrainingError:
        return {}
    return {(out / a.original).resolve(): a.source for a in report.accepted if a.original}


def _prepare_one(path: Path, index: int, options: PrepOptions, given_as: str | None = None) -> _Prepared:
    rgb, fmt, warnings = _open_checked(path, options)
    box, face, crop_warnings = choose_crop_box(rgb, options.crop, options.subject_type)
    square = render_square(rgb, box, options.resolution)
    warnings += _crop_warnings(square, box, rgb.size, crop_warnings, options)
    return _Prepared(
        source=path,
        fmt=fmt,
        index=index,
        square=square,
        crop_box=box,
        source_size=rgb.size,
        face_box=face,
        mask=subject_mask(rgb, face) if options.masks else None,
        phash=perceptual_hash(rgb),
        sharpness=laplacian_variance(_visible_region(rgb, box, options.resolution)),
        warnings=warnings,
        output=f"{index + 1:03d}-{_slug(Path(given_as).stem if given_as else path.stem)}.png",
        given_as=given_as or str(path),
    )


def _slug(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:40] or "photo"


def _visible_side(box: tuple[int, int, int, int], size: tuple[int, int]) -> int:
    """Pixels of the photo across the square (padding excluded), the detail actually kept."""
    left, top, right, bottom = box
    return max(0, min(min(right, size[0]) - max(left, 0), min(bottom, size[1]) - max(top, 0)))


def _upscale_warning(side: int, resolution: int) -> list[str]:
    if side >= resolution:
        return []
    return [f"upscaled: the crop is {side} pixels across, under the training resolution of {resolution}"]


def _crop_warnings(
    square: Image.Image,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    from_choice: Sequence[str],
    options: PrepOptions,
) -> list[str]:
    """Warnings about one crop: how it was chosen, upscaling, and for a person, a face in it."""
    warnings = list(from_choice) + _upscale_warning(_visible_side(box, size), options.resolution)
    if options.subject_type == "person":
        from .faces import has_face

        # Said once, in the person's terms: the face crop's own "no face found" goes.
        warnings = [w for w in warnings if not w.startswith("no face found")]
        if not has_face(square):
            warnings.append(NO_FACE_WARNING)
    return warnings


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------


def choose_crop_box(
    rgb: Image.Image, crop: str, subject_type: str = ""
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int] | None, list[str]]:
    """The square to keep (may reach past the edges only for `none`), the face it is centred on, warnings.
    `auto` looks for a face unless the subject type says the set is of no person."""
    w, h = rgb.size
    if crop == "none":
        side = max(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return (left, top, left + side, top + side), None, []
    if crop == "center":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return (left, top, left + side, top + side), None, []
    if crop == "auto" and subject_type not in ("", "person"):
        # The detector knows human faces only: in a pet, object or style set a false hit (in fur,
        # in sand) would crop a close-up of nothing.
        return saliency_crop_box(rgb), None, []
    from .faces import detect_faces

    faces = detect_faces(rgb)
    if faces:
        face = faces[0]
        warnings = []
        if len(faces) > 1 and faces[1].size >= 0.6 * face.size:
            warnings.append(f"several faces found ({len(faces)}); the crop is centred on the largest")
        return face_crop_box(face.box, (w, h)), face.box, warnings
    warnings = ["no face found; cropped around the busiest region instead"] if crop == "face" else []
    return saliency_crop_box(rgb), None, warnings


def face_crop_box(face: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Head and shoulders: a square about FACE_CROP_SCALE faces wide, the face in its upper half,
    moved (not shrunk) to stay inside the photo, and always holding the whole face."""
    w, h = size
    fl, ft, fr, fb = face
    face_side = max(fr - fl, fb - ft)
    side = min(round(face_side * FACE_CROP_SCALE), w, h)
    side = max(side, min(face_side, w, h))
    cx, cy = (fl + fr) / 2, (ft + fb) / 2
    left = round(cx - side / 2)
    top = round(cy - FACE_CENTRE_HEIGHT * side)
    # Keep the face inside when the square is tight, then keep the square inside the photo.
    left = min(max(left, fr - side), fl)
    top = min(max(top, fb - side), ft)
    left = min(max(left, 0), w - side)
    top = min(max(top, 0), h - side)
    return (left, top, left + side, top + side)


def saliency_crop_box(rgb: Image.Image) -> tuple[int, int, int, int]:
    """The full-height (or full-width) square with the most local detail (entropy), slightly
    preferring the centre: the subject is usually the busiest part, plain walls and sky are not."""
    from skimage.filters.rank import entropy
    from skimage.morphology import disk

    w, h = rgb.size
    side = min(w, h)
    if w == h:
        return (0, 0, w, h)
    scale = 128 / side
    small = rgb.convert("L").resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX
    )
    detail = entropy(np.array(small), disk(4)).astype(np.float64)  # (h', w') bits of local entropy
    profile = detail.sum(axis=0) if w > h else detail.sum(axis=1)  # along the long axis
    window = min(len(profile), round(side * scale))
    sums = np.convolve(profile, np.ones(window), mode="valid")  # one per square position
    positions = np.arange(len(sums))
    centre = (len(sums) - 1) / 2
    prior = 1.0 - 0.1 * np.abs(positions - centre) / max(centre, 1.0)  # ties go to the middle
    best = int(np.argmax(sums * prior))
    offset = min(round(best / scale), (max(w, h) - side))
    return (offset, 0, offset + side, side) if w > h else (0, offset, side, offset + side)


def render_square(rgb: Image.Image, box: tuple[int, int, int, int], resolution: int) -> Image.Image:
    """The box of the photo (white where it reaches past the edges) at resolution x resolution."""
    left, top, right, bottom = box
    w, h = rgb.size
    if left >= 0 and top >= 0 and right <= w and bottom <= h:
        region = rgb.crop(box)
    else:
        region = Image.new("RGB", (right - left, bottom - top), (255, 255, 255))
        inner = (max(left, 0), max(top, 0), min(right, w), min(bottom, h))
        region.paste(rgb.crop(inner), (inner[0] - left, inner[1] - top))
    return region.resize((resolution, resolution), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------
# Subject masks (masked_loss)
# ---------------------------------------------------------------------------------------------


def subject_mask(rgb: Image.Image, face: tuple[int, int, int, int] | None) -> Image.Image:
    """A feathered subject mask ("L", the photo's size, 255 = subject): head and shoulders around
    the face when there is one, else the busiest connected region (local entropy, as the crop's);
    all white when no region stands out. The subject itself is fully white: the feather only
    grows outwards from it."""
    from scipy import ndimage

    w, h = rgb.size
    scale = min(1.0, MASK_WORK_SIDE / max(w, h))
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    if face is not None:
        core = _head_and_shoulders([v * scale for v in face], (sw, sh))
    else:
        core = _busiest_region(rgb.convert("L").resize((sw, sh), Image.Resampling.BOX))
    if core is None:
        return Image.new("L", (w, h), 255)
    feather = max(1.0, MASK_FEATHER * min(sw, sh))
    grown = ndimage.binary_dilation(core, iterations=max(1, round(feather)))
    soft = np.maximum(ndimage.gaussian_filter(grown.astype(np.float64), feather / 2), core)
    small = Image.fromarray(np.round(soft * 255).astype(np.uint8), mode="L")
    # Scaled up with a nearest copy of the core on top, so no subject pixel drops below white.
    mask = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
    hard = np.asarray(Image.fromarray(core.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST))
    return Image.fromarray(np.maximum(mask, hard), mode="L")


def _head_and_shoulders(face: list[float], size: tuple[int, int]) -> np.ndarray:
    """Two ellipses around a face box: the head with its hair, and the neck and shoulders below."""
    fl, ft, fr, fb = face
    side = max(fr - fl, fb - ft)
    cx, cy = (fl + fr) / 2, (ft + fb) / 2
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]] + 0.5
    head = ((xs - cx) / (0.85 * side)) ** 2 + ((ys - cy - 0.2 * side) / (1.05 * side)) ** 2 <= 1
    shoulders = ((xs - cx) / (1.6 * side)) ** 2 + ((ys - cy - 2.1 * side) / (1.2 * side)) ** 2 <= 1
    return head | shoulders


def _busiest_region(grey: Image.Image) -> np.ndarray | None:
    """The largest connected region of high local detail (Otsu's threshold on the entropy), holes
    filled; None when it covers almost none or almost all of the photo (no clear subject)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.filters.rank import entropy
    from skimage.morphology import disk

    detail = ndimage.gaussian_filter(entropy(np.array(grey), disk(4)).astype(np.float64), 2)
    if detail.max() - detail.min() < 1e-6:
        return None
    labels, count = ndimage.label(detail > threshold_otsu(detail))
    if count == 0:
        return None
    sizes = ndimage.sum(np.ones_like(labels), labels, index=range(1, count + 1))
    region = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    share = region.mean()
    return region if 0.02 <= share <= 0.9 else None


def add_masks(output_dir: str | Path) -> int:
    """Write the subject masks of a set prepared without them (as `masks` would have: the same mask
    from each original and its recorded face, beside the original and cut to the square); returns
    how many were written. Photos that have a mask keep it. For masked_loss on a set prepared before
    masks were asked for (the app's photo preparation makes none)."""
    folder = Path(output_dir)
    report = read_report(folder)
    missing = [a for a in report.accepted if not a.mask and a.original]
    for entry in missing:
        try:
            with Image.open(folder / entry.original) as im:
                rgb = to_rgb(im)
        except (OSError, UnidentifiedImageError) as e:
            raise TrainingError(
                f"The original of {entry.output} cannot be read ({e}); prepare the photos again."
            ) from e
        mask = subject_mask(rgb, entry.face_box)
        for path, image in (
            (mask_path(Path(entry.original)), mask),
            (mask_path(Path(entry.output)), render_mask(mask, entry.crop_box, report.options.resolution)),
        ):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(folder / path, buffer.getvalue())
        report = _replace_entry(
            report, dataclasses.replace(entry, mask=mask_path(Path(entry.output)).as_posix())
        )
    if missing and not report.options.masks:
        report = dataclasses.replace(report, options=dataclasses.replace(report.options, masks=True))
        atomic_write_json(folder / REPORT_NAME, report.to_json())
    return len(missing)


def render_mask(mask: Image.Image, box: tuple[int, int, int, int], resolution: int) -> Image.Image:
    """The square's part of a source-sized mask, black where the box reaches past the photo (padding
    is no subject)."""
    left, top, right, bottom = box
    region = Image.new("L", (right - left, bottom - top), 0)
    inner = (max(left, 0), max(top, 0), min(right, mask.width), min(bottom, mask.height))
    region.paste(mask.crop(inner), (inner[0] - left, inner[1] - top))
    return region.resize((resolution, resolution), Image.Resampling.BILINEAR)


def _rerender_mask(folder: Path, entry: AcceptedPhoto, box, resolution: int) -> None:
    """After a recrop: the square's mask cut again from the original's."""
    source = folder / mask_path(Path(entry.original))
    try:
        with Image.open(source) as im:
            mask = im.convert("L")
    except (OSError, UnidentifiedImageError) as e:
        raise TrainingError(
            f"The mask of {entry.output} cannot be read ({e}); prepare the photos again."
        ) from e
    buffer = io.BytesIO()
    render_mask(mask, box, resolution).save(buffer, format="PNG")
    atomic_write_bytes(folder / entry.mask, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Dataset checks
# ---------------------------------------------------------------------------------------------


def perceptual_hash(rgb: Image.Image) -> int:
    """64-bit DCT hash (pHash): low frequencies of a 32x32 grey copy against their median.
    Re-encoding, resizing and small edits change few bits; a different photo changes about half."""
    from scipy.fft import dctn

    grey = np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term is left out of the median: it is the brightness
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def laplacian_variance(image: Image.Image) -> float:
    """Sharpness: variance of the Laplacian of the grey image (a blurred photo has few edges)."""
    from scipy.ndimage import laplace

    return float(laplace(np.asarray(image.convert("L"), dtype=np.float64)).var())


def _visible_region(rgb: Image.Image, box: tuple[int, int, int, int], resolution: int) -> Image.Image:
    """The photo's part of the square, downscaled to the training scale but never upscaled (that
    has its own warning): the photo's own sharpness, with no white padding to dilute it."""
    left, top, right, bottom = box
    inner = (max(left, 0), max(top, 0), min(right, rgb.width), min(bottom, rgb.height))
    scale = min(1.0, resolution / (right - left))
    size = (max(1, round((inner[2] - inner[0]) * scale)), max(1, round((inner[3] - inner[1]) * scale)))
    return rgb.crop(inner).resize(size, Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class _Member:
    """One photo as the set checks see it."""

    name: str  # as the person knows it (the file they uploaded)
    phash: int | None
    sharpness: float | None
    square: Image.Image  # what training sees


def _set_warnings(members: Sequence[_Member]) -> list[list[str]]:
    """Per photo, the warnings that need the whole set: a near-duplicate of an earlier photo, much
    blurrier than the set, unlike the rest (outliers.py)."""
    from .outliers import find_outliers

    warnings: list[list[str]] = [[] for _ in members]
    for i, item in enumerate(members):
        for other in members[:i]:
            if item.phash is None or other.phash is None:
                continue
            distance = hamming(item.phash, other.phash)
            if distance <= DUPLICATE_MAX_BITS:
                warnings[i].append(
                    f"near-duplicate of {other.name} ({distance} of 64 hash bits differ); one of them adds little"
                )
                break
    sharpness = [m.sharpness for m in members if m.sharpness is not None]
    if len(sharpness) >= 3:
        median = statistics.median(sharpness)
        for item, found in zip(members, warnings, strict=True):
            if item.sharpness is not None and item.sharpness < BLUR_FRACTION * median:
                found.append(
                    f"blurry: {item.sharpness / median:.0%} of the set's median sharpness; a sharper photo trains better"
                )
    for outlier, found in zip(find_outliers([m.square for m in members]), warnings, strict=True):
        if outlier is not None:
            found.append(outlier.warning)
    return warnings


def _with_set_warnings(report: PrepReport) -> PrepReport:
    """The report with every photo's set warnings redone from the squares on disk (after an edit)."""
    folder = Path(report.output_dir)
    members, accepted = [], []
    for entry in report.accepted:
        try:
            with Image.open(folder / entry.output) as im:
                square = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise TrainingError(f"{entry.output} cannot be read ({e}); prepare the photos again.") from e
        if entry.phash is None or entry.sharpness is None:  # a report from before these were kept
            rgb = _read_original(folder, entry)
            entry = dataclasses.replace(
                entry,
                phash=perceptual_hash(rgb),
                sharpness=laplacian_variance(_visible_region(rgb, entry.crop_box, report.options.resolution)),
            )
        members.append(_Member(Path(entry.source).name, entry.phash, entry.sharpness, square))
        accepted.append(entry)
    fresh = _set_warnings(members)
    accepted = [
        dataclasses.replace(
            entry, warnings=(*(w for w in entry.warnings if not w.startswith(_SET_WARNING_PREFIXES)), *extra)
        )
        for entry, extra in zip(accepted, fresh, strict=True)
    ]
    return dataclasses.replace(report, accepted=tuple(accepted))


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _caption_all(
    prepared: list[_Prepared], options: PrepOptions, emit: Emit, should_stop: ShouldStop
) -> None:
    if options.caption == "none" or not prepared:
        return
    template = options.template_caption
    for item in prepared:
        item.caption = template
    if options.caption == "template":
        return
    from .captions import CaptionerUnavailable, compose_caption, load_captioner

    emit(
        StageStarted(
            "caption",
            f"captioning {len(prepared)} photo(s) with {options.caption_model}",
            total=len(prepared),
        )
    )

    def on_batch(done: int) -> None:
        emit(Progress("caption", done, len(prepared)))
        if should_stop():
            raise StopRequested

    try:
        captioner = load_captioner(options.caption_model)
        descriptions = captioner.caption([p.square for p in prepared], on_batch=on_batch)
    except StopRequested:
        raise
    except CaptionerUnavailable as e:
        _caption_fallback(prepared, str(e))
        return
    except Exception as e:  # a captioner failure must never lose the prepared photos
        log.exception("captioning failed")
        _caption_fallback(prepared, f"the captioner failed ({type(e).__name__}: {e})")
        return
    for item, description in zip(prepared, descriptions, strict=True):
        item.caption = compose_caption(template, description)


def _caption_fallback(prepared: list[_Prepared], why: str) -> None:
    log.warning("captions: %s; using the template caption", why)
    for item in prepared:
        item.warnings.append(f"template caption used: {why}")


# ---------------------------------------------------------------------------------------------
# Report edits
# ---------------------------------------------------------------------------------------------


def _find(report: PrepReport, output: str) -> AcceptedPhoto:
    for entry in report.accepted:
        if entry.output == output:
            return entry
    raise ValueError(f"output: no prepared photo named {output!r} in {report.output_dir}")


def _replace_entry(report: PrepReport, new: AcceptedPhoto) -> PrepReport:
    accepted = tuple(new if a.output == new.output else a for a in report.accepted)
    return _save(dataclasses.replace(report, accepted=accepted))


def _save(report: PrepReport) -> PrepReport:
    atomic_write_json(Path(report.output_dir) / REPORT_NAME, report.to_json())
    return report
