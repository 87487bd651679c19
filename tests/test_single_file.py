"""A base model from ONE A1111-style .safetensors checkpoint (CompVis/LDM key names), read by
`from_single_file`: the tiny model written as such a file loads back with every weight equal to the
diffusers folder's, trains, and offline without --single-file-config fails fast with one sentence."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import base_config
from safetensors.torch import load_file, save_file
from single_file_writer import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, write_single_file

from trainer_core.components import load_components
from trainer_core.events import TrainingError

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    path = tmp_path_factory.mktemp("single-file") / "tiny-sd15.safetensors"
    names = write_single_file(tiny_model, path)
    return path, names


@pytest.fixture(scope="module")
def reference(tiny_model) -> dict:
    parts, _ = load_components(str(tiny_model))
    return parts


def _mismatches(parts: dict, reference: dict) -> dict[str, list[str]]:
    """Per component, the weights that are missing, still on the meta device, or not bit-equal."""
    out: dict[str, list[str]] = {}
    for c in COMPONENTS:
        got, want = parts[c].state_dict(), reference[c].state_dict()
        bad = [
            k
            for k, v in want.items()
            if k not in got
            or got[k].device.type == "meta"
            or got[k].shape != v.shape
            or not torch.equal(got[k], v)
        ]
        bad += [k for k in got if k not in want]
        if bad:
            out[c] = bad
    return out


def test_file_holds_every_weight_once_under_ldm_names(single_file, reference):
    path, names = single_file
    tensors = load_file(str(path))
    counts = {c: len(reference[c].state_dict()) for c in COMPONENTS}
    assert {c: len(names[c]) for c in COMPONENTS} == counts
    assert len(tensors) == sum(counts.values())  # nothing extra, nothing merged
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX}
    for c, prefix in prefixes.items():
        assert sum(k.startswith(prefix) for k in tensors) == counts[c]
    # the original layout, not diffusers names under a prefix
    assert not any(
        part in k for k in tensors for part in ("down_blocks", "up_blocks", "mid_block", "resnets")
    )
    for key in (
        "model.diffusion_model.input_blocks.2.0.op.weight",  # downsample after block 0
        "model.diffusion_model.input_blocks.5.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsample of the attention-free block
        "model.diffusion_model.output_blocks.3.2.conv.weight",  # upsample after an attention
        "model.diffusion_model.time_embed.2.weight",
        "first_stage_model.decoder.up.0.block.1.conv2.weight",
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in tensors, key
    # LDM's VAE attention projections are 1x1 convolutions
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert tensors["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4


def test_single_file_loads_the_same_weights(single_file, reference, tiny_model):
    path, _ = single_file
    parts, source = load_components(str(path), single_file_config=str(tiny_model))
    assert source.kind == "single_file" and source.location == str(path.resolve())
    assert _mismatches(parts, reference) == {}
    public = {k: v for k, v in parts["unet"].config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in reference["unet"].config.items() if not k.startswith("_")}
    assert parts["vae"].config.scaling_factor == reference["vae"].config.scaling_factor
    assert parts["tokenizer"].get_vocab() == reference["tokenizer"].get_vocab()
    assert type(parts["scheduler"]).__name__ == "DDPMScheduler"
    assert parts["scheduler"].config.num_train_timesteps == 1000


def test_a_mis_mapped_key_is_caught(single_file, reference, tiny_model, tmp_path):
    """Negative control for the test above: a swapped pair of same-shape weights loads but is
    reported by the equality check; a weight that is missing from the file fails the load."""
    path, _ = single_file
    tensors = load_file(str(path))
    q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    k = q.replace("to_q", "to_k")
    swapped = dict(tensors, **{q: tensors[k], k: tensors[q]})
    save_file(swapped, str(tmp_path / "swapped.safetensors"))
    parts, _ = load_components(str(tmp_path / "swapped.safetensors"), single_file_config=str(tiny_model))
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert _mismatches(parts, reference) == {"unet": [f"{prefix}.to_q.weight", f"{prefix}.to_k.weight"]}

    dropped = dict(tensors)
    del dropped["first_stage_model.decoder.up.1.block.0.conv1.weight"]
    save_file(dropped, str(tmp_path / "dropped.safetensors"))
    with pytest.raises(TrainingError):
        load_components(str(tmp_path / "dropped.safetensors"), single_file_config=str(tiny_model))


def test_training_from_a_single_file(single_file, reference, tiny_model, photos, class_dir, tmp_path):
    from trainer_core.loop import train

    path, _ = single_file
    cfg = base_config(
        path,
        photos,
        tmp_path / "run",
        single_file_config=str(tiny_model),
        class_data_dir=str(class_dir),
        max_train_steps=2,
    )
    result = train(cfg)
    assert result.status == "finished" and result.summary["steps"] == 2
    folder = result.adapter_dir
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    info = json.loads((folder / "adapter.json").read_text())
    assert info["base_model"] == str(path) and info["steps"] == 2
    # the LoRA moved; under it are the base weights read from the file, untouched
    trained = result.unet.state_dict()
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained.items())
    base = reference["unet"].state_dict()
    bases = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert bases.keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in bases.items())


def test_single_file_without_config_offline_fails_fast(single_file):
    path, _ = single_file
    t = time.perf_counter()
    with pytest.raises(TrainingError) as e:
        load_components(str(path))
    assert time.perf_counter() - t < 30
    msg = str(e.value)
    assert "--single-file-config" in msg and path.name in msg and "\n" not in msg
