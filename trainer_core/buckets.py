"""Aspect-ratio bucketing (kohya's `--enable_bucket`): photos keep their framing.

Buckets hold about resolution² pixels, each side a multiple of BUCKET_STEP (a multiple of 8 in
latents) between half and twice the resolution. Each photo goes to the bucket nearest its aspect
ratio and is resized to cover it and centre-cropped (`data.fit_to_size`); with buckets one step
apart, a photo between 1:2 and 2:1 loses less than one step on either side (past that the buckets
thin out and more is cut, as in kohya's). Each batch is drawn from
one bucket: per epoch, each bucket's photos are shuffled and cut into batches (the last one topped
up from the same bucket, so every batch has the training batch size), and the batches are shuffled.
"""

from __future__ import annotations

import functools
import math

import torch

BUCKET_STEP = 64  # pixels; 8 latent cells

Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, step: int = BUCKET_STEP) -> list[Bucket]:
    """Every (width, height) of about resolution² pixels, sides in steps of `step`, sorted."""
    area = resolution * resolution
    low = max(step, resolution // 2 // step * step)
    high = max(low, 2 * resolution // step * step)
    found = {(max(low, resolution // step * step),) * 2}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            found |= {(width, height), (height, width)}
    return sorted(found)


def nearest_bucket(size: tuple[int, int], buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (w, h) (on a log scale; ties: the larger)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1], b))


def batches_per_epoch(item_buckets: tuple[Bucket, ...], batch_size: int) -> int:
    counts: dict[Bucket, int] = {}
    for b in item_buckets:
        counts[b] = counts.get(b, 0) + 1
    return sum(math.ceil(n / batch_size) for n in counts.values())


@functools.lru_cache(maxsize=8)
def plan_epoch(item_buckets: tuple[Bucket, ...], batch_size: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """One epoch's batches of item indexes, each from one bucket, in a seeded order."""
    batches: list[tuple[int, ...]] = []
    for k, bucket in enumerate(sorted(set(item_buckets))):
        members = [i for i, b in enumerate(item_buckets) if b == bucket]
        g = torch.Generator().manual_seed((seed + k + 1) % 2**63)
        order = [members[int(j)] for j in torch.randperm(len(members), generator=g)]
        for start in range(0, len(order), batch_size):
            # The last batch is topped up from the start of the same bucket's order.
            batches.append(tuple(order[(start + j) % len(order)] for j in range(batch_size)))
    g = torch.Generator().manual_seed(seed % 2**63)
    return tuple(batches[int(j)] for j in torch.randperm(len(batches), generator=g))
