"""Caption dropout: a seeded share of instance samples trains with the empty caption's embedding;
class samples keep the class prompt. Checked on the real cache and batches of the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import base_config

from trainer_core.components import load_components
from trainer_core.data import list_images, load_instance_examples
from trainer_core.events import no_emit
from trainer_core.loop import _build_cache, _make_batch, caption_dropped


def test_the_coin_is_seeded_and_fair():
    drops = [caption_dropped(slot, seed=0, probability=0.3) for slot in range(4000)]
    assert drops == [caption_dropped(slot, seed=0, probability=0.3) for slot in range(4000)]
    assert 0.27 < sum(drops) / len(drops) < 0.33
    assert drops != [caption_dropped(slot, seed=1, probability=0.3) for slot in range(4000)]
    assert not any(caption_dropped(slot, seed=0, probability=0.0) for slot in range(100))


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_caption_dropout_is_a_probability(tiny_model, photos, tmp_path, value):
    with pytest.raises(ValueError, match="^caption_dropout: "):
        base_config(tiny_model, photos, tmp_path, caption_dropout=value)


def test_dropped_samples_get_the_empty_caption(tiny_model, photos, class_dir, tmp_path):
    cfg = base_config(tiny_model, photos, tmp_path, caption_dropout=0.5)
    parts, _ = load_components(str(tiny_model))
    tok, te = parts["tokenizer"], parts["text_encoder"]
    examples = load_instance_examples(cfg.instance_dir, cfg.instance_prompt)
    cache = _build_cache(cfg, examples, list_images(class_dir), [tok], [te], parts["vae"], 64, "cpu", no_emit)
    slots = list(range(8))
    _, prompt_embeds, _, _ = _make_batch(
        cache, slots, cfg, torch.Generator().manual_seed(0), "cpu", torch.float32, None
    )

    def embed(prompt: str) -> torch.Tensor:
        ids = tok(
            [prompt], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return te(ids)[0][0]

    dropped = [caption_dropped(slot, cfg.seed, 0.5) for slot in slots]
    assert any(dropped) and not all(dropped)
    for row, drop in enumerate(dropped):  # instance samples first, then class samples
        want = embed("" if drop else cfg.instance_prompt)
        assert torch.allclose(prompt_embeds[row], want, atol=1e-5), row
        assert torch.allclose(prompt_embeds[len(slots) + row], embed(cfg.class_prompt), atol=1e-5)
