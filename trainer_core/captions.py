"""Captions for prepared photos: a BLIP captioner (transformers), loaded once and run in batches.

A model id or a local folder goes through the same `from_pretrained` path. The local cache is
tried first; without network a Hub id fails at once (no minutes of retries) with
`CaptionerUnavailable`, and the prep stage falls back to the template caption with a warning.
`save_tiny_blip` writes a tiny random BLIP of the real architecture, for tests and offline trials.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from .events import first_line

log = logging.getLogger(__name__)

BATCH_SIZE = 8
MAX_NEW_TOKENS = 30
# Words BLIP models trained on web captions emit for "a (man|woman) ..." with no meaning.
_BLIP_NOISE = re.compile(r"\b(arafed|araffe|arafe|araf|arafly|there is|there are)\b\s*")


class CaptionerUnavailable(Exception):
    """The captioning model could not be loaded or run; the message is one plain clause."""


class BlipCaptioner:
    """BLIP image captioning (`BlipForConditionalGeneration`) on the best device there is."""

    def __init__(self, model_id: str) -> None:
        import torch

        self.model_id = model_id
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.processor, self.model = _load_blip(model_id, dtype)
        self.model.to(self.device).eval()

    def caption(
        self, images: Sequence[Image.Image], on_batch: Callable[[int], None] | None = None
    ) -> list[str]:
        """One cleaned caption per image; `on_batch(done)` after each batch (progress, stop checks)."""
        import torch

        captions: list[str] = []
        for start in range(0, len(images), BATCH_SIZE):
            batch = [im.convert("RGB") for im in images[start : start + BATCH_SIZE]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device, self.model.dtype)
            with torch.no_grad():
                ids = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            captions += [
                clean_caption(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)
            ]
            if on_batch is not None:
                on_batch(len(captions))
        return captions


@functools.lru_cache(maxsize=1)
def load_captioner(model_id: str) -> BlipCaptioner:
    """The captioner for `model_id`, kept for the next prep (one model resident at a time).

    Raises CaptionerUnavailable; failures are not cached, so a later call tries again.
    """
    return BlipCaptioner(model_id)


def _load_blip(model_id: str, dtype):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from .components import _hub_offline, _hub_reachable

    def load(local_only: bool):
        processor = BlipProcessor.from_pretrained(model_id, local_files_only=local_only)
        model = BlipForConditionalGeneration.from_pretrained(
            model_id, dtype=dtype, local_files_only=local_only
        )
        return processor, model

    try:
        return load(local_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad model
        if Path(model_id).exists():
            raise CaptionerUnavailable(
                f"cannot load the captioning model in {model_id} ({first_line(e)})"
            ) from e
        # huggingface_hub would retry for minutes without network: a short connect decides.
        if _hub_offline() or not _hub_reachable():
            raise CaptionerUnavailable(
                f"the captioning model {model_id} is not in the local cache and the Hub cannot be reached"
            ) from e
    try:
        return load(local_only=False)
    except Exception as e:
        raise CaptionerUnavailable(
            f"cannot download the captioning model {model_id} ({first_line(e)})"
        ) from e


def clean_caption(text: str) -> str:
    """BLIP's text as a clause to follow the subject: lower case, one line, no known filler words."""
    text = _BLIP_NOISE.sub("", " ".join(text.lower().split()))
    return text.strip(" .,")


def compose_caption(subject: str, description: str) -> str:
    """'a photo of sks person' + 'a woman smiling in a garden' -> 'a photo of sks person, a woman ...'."""
    description = description.strip()
    for prefix in ("a photo of ", "a picture of ", "an image of "):
        if description.startswith(prefix):
            description = description[len(prefix) :]
    return f"{subject}, {description}" if description else subject


def save_tiny_blip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP captioner (real architecture, BERT tokenizer from a local vocabulary).

    Saved as an ordinary model folder, so it loads through `from_pretrained` like a Hub id. It
    produces word salad: it exists to run the real captioning code offline in seconds.
    """
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = [
        *("a", "an", "the", "photo", "of", "man", "woman", "person", "dog", "cat", "sitting", "standing"),
        *("smiling", "in", "on", "with", "at", "garden", "sofa", "street", "beach", "red", "blue", "green"),
        *("white", "black", "hat", "shirt", "near", "tree", "wall", "window"),
    ]
    # BERT's special tokens, and BLIP's [DEC] that starts every generated caption.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", ",", "."] + words
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab_file), bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    ids = {t: i for i, t in enumerate(vocab)}
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            bos_token_id=ids["[DEC]"],
            pad_token_id=ids["[PAD]"],
            sep_token_id=ids["[SEP]"],
            eos_token_id=ids["[SEP]"],
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
