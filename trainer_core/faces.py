"""Face detection for the prep stage's face-aware crop, fully offline.

The detector is scikit-image's LBP cascade (`lbpcascade_frontalface_opencv.xml`, OpenCV's own
frontal-face model shipped inside the scikit-image wheel), so nothing is downloaded at run time.
OpenCV 5 dropped its cascade classifier and ships no YuNet weights; mediapipe 1.2.2 ships no face
model at all (its Tasks API wants a downloaded .tflite) and pulls in opencv-contrib-python.
The cascade finds frontal and near-frontal faces; profiles and tiny faces go to the non-face crop.
`has_face` asks for more agreement than the crop does: it decides whether a "person" photo shows
a face at all, where a false hit would let a coffee cup into the set without a word.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Faces are searched on a copy of at most this many pixels (about 580x430 for a 4:3 photo): the
# exhaustive cascade's cost grows with the pixel count, and a face smaller than a few percent of
# the short side is no crop anchor anyway.
DETECT_MAX_PIXELS = 250_000
MIN_FACE_FRACTION = 0.06  # of the detection image's short side
# Windows that must agree on a face. The crop takes 4 (a missed face costs a worse crop); `has_face`
# takes 6: on scikit-image's photos 4 also "finds" faces in coffee.png, clock.png,
# immunohistochemistry.png and cell.png, 6 in none of their squares, while the astronaut's and
# Grace Hopper's faces are still found blurred, darkened, mirrored, tilted 10 degrees or at 256 px.
CROP_MIN_NEIGHBORS = 4
PRESENCE_MIN_NEIGHBORS = 6


@dataclass(frozen=True)
class FaceBox:
    """A detected face in the pixels of the image given to `detect_faces` (left, top, size)."""

    left: int
    top: int
    size: int  # the cascade's boxes are square

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.size, self.top + self.size)


@functools.cache
def _cascade():
    from skimage import data
    from skimage.feature import Cascade

    return Cascade(data.lbp_frontal_face_cascade_filename())


def detect_faces(image: Image.Image, min_neighbors: int = CROP_MIN_NEIGHBORS) -> list[FaceBox]:
    """Faces in an RGB image, largest first, in that image's pixel coordinates."""
    w, h = image.size
    scale = min(1.0, (DETECT_MAX_PIXELS / (w * h)) ** 0.5)
    small = (
        image if scale == 1.0 else image.resize((round(w * scale), round(h * scale)), Image.Resampling.BOX)
    )
    pixels = np.asarray(small.convert("RGB"))
    short = min(small.size)
    min_face = max(24, round(short * MIN_FACE_FRACTION))
    # min_neighbor_number (windows agreeing on one face) is the cascade's guard against false hits.
    found = _cascade().detect_multi_scale(
        img=pixels,
        scale_factor=1.2,
        step_ratio=1,  # exhaustive: a coarser step (1.3) missed the face in scikit-image's camera.png
        min_size=(min_face, min_face),
        max_size=(short, short),
        min_neighbor_number=min_neighbors,
    )
    faces = [
        FaceBox(round(d["c"] / scale), round(d["r"] / scale), round(max(d["width"], d["height"]) / scale))
        for d in found
    ]
    # The cascade can report one face twice at neighbouring scales: keep the larger of overlapping boxes.
    kept: list[FaceBox] = []
    for face in sorted(faces, key=lambda f: f.size, reverse=True):
        if all(_overlap(face, k) < 0.3 for k in kept):
            kept.append(face)
    return kept


def _overlap(small: FaceBox, big: FaceBox) -> float:
    """Share of `small`'s area that lies inside `big`."""
    width = min(small.left + small.size, big.left + big.size) - max(small.left, big.left)
    height = min(small.top + small.size, big.top + big.size) - max(small.top, big.top)
    return max(0, width) * max(0, height) / (small.size * small.size)


def has_face(image: Image.Image) -> bool:
    """Whether the image clearly shows a (frontal or near-frontal) face."""
    return bool(detect_faces(image, PRESENCE_MIN_NEIGHBORS))
