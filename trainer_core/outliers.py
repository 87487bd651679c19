"""Photos unlike the rest of their set: a coffee mug among photos of a dog.

Photos of one subject share its colours (the dog's fur, a person's skin and hair, a product's
paint) while their backgrounds change. So each square gets a colour signature: the histogram
(hue x saturation x value, smoothed by half a bin so a change of light does not move a colour into
another bin) of its centre, where the crop put the subject, less the histogram of its border, where
the background is. The colours a set has in common are the bin-wise median of the signatures: a
colour counts when at least half of the photos hold it. A photo's *share* is how much of that
common mass it holds (0 to 1). A photo is flagged when its share lies far below the others': under
their median - k x MAD and under a fraction of their median, both taken leave-one-out so the odd
photo never lowers the bar it is measured against (which matters in a set of five). Plain numbers,
no model: deterministic, and fast on 20 photos.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

MIN_PHOTOS = 5  # fewer: no "rest of the set" to speak of
SIDE = 64  # squares are compared at this size
BINS = (12, 4, 4)  # hue, saturation, value
CENTRE_SIGMA = 0.3  # of the side: the weight of a pixel falls off away from the centre
BORDER = 1 / 8  # of the side: the frame whose colours are taken for background
BORDER_WEIGHT = 1.0  # how much of the border's histogram is taken off the centre's
SMOOTHING = 0.5  # bins
K_MAD = 2.0
MAD_FLOOR = 0.1  # of the median: in a set of near-identical shots the MAD alone would be ~0
# A flagged share is also under this fraction of the others' median. Measured on synthetic sets
# (tests/photo_sets.py: 4-19 photos of a dog in a park, a room, on a beach, in snow, plus a mug):
# the mug's share is mostly under 0.05 of the others' median, a dog's rarely under 0.4.
MAX_RATIO = 0.3


@dataclass(frozen=True)
class Outlier:
    share: float  # of the set's common colours, in this photo
    typical: float  # the median share of the other photos

    @property
    def warning(self) -> str:
        return (
            f"unlike the rest of the set: it holds {self.share:.0%} of the colours your other photos "
            f"have in common (they hold {self.typical:.0%} as a rule); if it does not show your "
            "subject, remove it or replace it"
        )


def colour_signature(square: Image.Image) -> np.ndarray:
    """The centre's colour histogram less the border's (sums to 1): the subject's colours."""
    from scipy import ndimage

    hsv = np.asarray(square.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BOX).convert("HSV"))
    bins = np.asarray(BINS)
    index = np.minimum(hsv.astype(np.int64) * bins // 256, bins - 1)  # (SIDE, SIDE, 3): a bin per channel
    flat = np.ravel_multi_index(index.reshape(-1, 3).T, BINS)
    centre_weights, border_weights = _weights()

    def histogram(weights: np.ndarray) -> np.ndarray:
        hist = np.bincount(flat, weights=weights.ravel(), minlength=int(bins.prod())).reshape(BINS)
        # Hue wraps around (red is both ends); saturation and value do not.
        return ndimage.gaussian_filter(hist, SMOOTHING, mode=("wrap", "nearest", "nearest"))

    centre = histogram(centre_weights)
    subject = np.clip(centre - BORDER_WEIGHT * histogram(border_weights), 0, None)
    if subject.sum() < 0.05:  # the subject fills the frame (or there is none): the centre it is
        subject = centre
    return (subject / subject.sum()).ravel()


@functools.cache
def _weights() -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of the SIDE x SIDE square: the centre's weight (a Gaussian), the border's (the frame)."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    centre = np.exp(-((xs - SIDE / 2) ** 2 + (ys - SIDE / 2) ** 2) / (2 * (CENTRE_SIGMA * SIDE) ** 2))
    frame = np.ones((SIDE, SIDE))
    inner = round(SIDE * BORDER)
    frame[inner:-inner, inner:-inner] = 0
    return centre / centre.sum(), frame / frame.sum()


def common_shares(signatures: np.ndarray) -> np.ndarray:
    """Each photo's share of the colours the *other* photos have in common, (n,) in [0, 1]."""
    shares = np.empty(len(signatures))
    for i, signature in enumerate(signatures):
        common = np.median(np.delete(signatures, i, axis=0), axis=0)
        shares[i] = np.minimum(signature, common).sum() / max(common.sum(), 1e-12)
    return shares


def find_outliers(squares: Sequence[Image.Image]) -> list[Outlier | None]:
    """Per square, an Outlier when it is unlike the rest of the set, else None (all None under MIN_PHOTOS)."""
    if len(squares) < MIN_PHOTOS:
        return [None] * len(squares)
    shares = common_shares(np.stack([colour_signature(s) for s in squares]))
    found: list[Outlier | None] = []
    for i, share in enumerate(shares):
        others = np.delete(shares, i)
        median = float(np.median(others))
        mad = max(1.4826 * float(np.median(np.abs(others - median))), MAD_FLOOR * median)
        odd = share < median - K_MAD * mad and share < MAX_RATIO * median
        found.append(Outlier(float(share), median) if odd else None)
    return found
