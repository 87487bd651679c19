"""Pivotal tuning on tiny SD 1.5 and tiny SDXL, proven by numbers: the new tokens' embeddings train
and every other row of every embedding table stays bit-identical; the saved embeddings file has the
A1111/ComfyUI layout and reloads through diffusers' own `load_textual_inversion`, changing the text
encoders' output for the new tokens only; a fresh Generator reproduces the trained model's image from
the trigger word and leaves the pipeline as it was when the adapter is swapped out; a resumed run
restores the embeddings. Real models, nothing mocked."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import base_config
from lora_fixtures import assert_same_weights, stop_after
from safetensors.torch import load_file

from trainer_core import components
from trainer_core.config import TrainConfig
from trainer_core.inference import GenerateRequest, Generator, generate, load_pipeline, make_scheduler
from trainer_core.loop import train

TOKENS = ["<s0>", "<s1>"]
OTHER_PROMPTS = ["a photo of a dog", "a photo of sks dog", "sks", "s0 s1 dog"]


def _pivotal_config(model_dir, photos, out, **kw) -> TrainConfig:
    values = dict(
        with_prior_preservation=False,
        class_prompt="a photo of a dog",
        max_train_steps=4,
        pivotal_tuning=True,
        token_embedding_lr=1e-2,
    )
    values.update(kw)
    return base_config(model_dir, photos, out, **values)


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_sdxl, photos, tmp_path_factory):
    """A pivotal SD 1.5 run (embeddings only in the text encoder) and a pivotal SDXL run with a
    text-encoder LoRA too (both encoders: LoRA and new rows)."""
    out = {}
    cfg = _pivotal_config(tiny_model, photos, tmp_path_factory.mktemp("pivotal-sd15"))
    out["sd15"] = (tiny_model, cfg, train(cfg))
    cfg = _pivotal_config(tiny_sdxl, photos, tmp_path_factory.mktemp("pivotal-sdxl"), train_text_encoder=True)
    out["sdxl"] = (tiny_sdxl, cfg, train(cfg))
    return out


def _pairs(holder) -> list[tuple]:
    """(text encoder, tokenizer) pairs of a pipeline or of a parts dict."""
    get = holder.get if isinstance(holder, dict) else lambda k: getattr(holder, k, None)
    pairs = [(get("text_encoder"), get("tokenizer"))]
    if get("text_encoder_2") is not None:
        pairs.append((get("text_encoder_2"), get("tokenizer_2")))
    return pairs


@torch.no_grad()
def _encode(text_encoder, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Every output the pipelines read: the last and penultimate hidden states (and the pooled one)."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    text_encoder.eval()
    out = text_encoder(ids, output_hidden_states=True)
    return [out.hidden_states[-1], out.hidden_states[-2], out[1] if len(out) > 1 else out[0]]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_only_the_new_rows_train(runs, arch):
    model_dir, cfg, result = runs[arch]
    assert result.status == "finished"
    base, _ = components.load_components(str(model_dir))
    trained = [result.text_encoder, result.text_encoder_2][: len(_pairs(base))]
    for te, (base_te, base_tok) in zip(trained, _pairs(base), strict=True):
        table = te.get_input_embeddings().weight
        base_table = base_te.get_input_embeddings().weight
        assert table.shape[0] == base_table.shape[0] + 2
        assert torch.equal(table[: base_table.shape[0]], base_table), "every other row is bit-identical"
        rows = te.get_input_embeddings().pivotal_rows
        dog = base_tok("dog", add_special_tokens=False).input_ids  # token_init "class": the class noun
        init = base_table[[dog[0], dog[1 % len(dog)]]]
        assert rows.shape == init.shape and (rows - init).abs().max() > 1e-4, "the new rows trained"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_embeddings_reload_through_diffusers_and_change_only_the_new_tokens(runs, arch):
    model_dir, cfg, result = runs[arch]
    info = json.loads((result.adapter_dir / "adapter.json").read_text())
    assert info["pivotal_tokens"] == TOKENS and info["token"] == "sks"
    emb = load_file(str(result.adapter_dir / info["files"]["embeddings"]))
    keys = {"sd15": ["emb_params"], "sdxl": ["clip_l", "clip_g"]}[arch]  # what A1111 / ComfyUI read
    assert sorted(emb) == sorted(keys)

    pipe = load_pipeline(str(model_dir), device="cpu")
    if cfg.train_text_encoder:
        pipe.load_lora_weights(str(result.adapter_dir))
    before = [_encode(te, tok, OTHER_PROMPTS) for te, tok in _pairs(pipe)]
    for key, (te, tok) in zip(keys, _pairs(pipe), strict=True):
        assert emb[key].shape == (2, te.config.hidden_size)
        pipe.load_textual_inversion(emb[key], token=TOKENS, text_encoder=te, tokenizer=tok)
    trained = [result.text_encoder, result.text_encoder_2]
    for (te, tok), old, trained_te in zip(_pairs(pipe), before, trained, strict=False):
        # Other prompts encode bit-identically.
        for a, b in zip(_encode(te, tok, OTHER_PROMPTS), old, strict=True):
            assert torch.equal(a, b)
        # The new tokens encode as in the trained model, and unlike the plain trigger word.
        prompt = ["a photo of <s0><s1> dog"]
        loaded, reference = _encode(te, tok, prompt), _encode(trained_te, tok, prompt)
        for a, b in zip(loaded, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert (loaded[0] - _encode(te, tok, ["a photo of sks dog"])[0]).abs().max() > 1e-3


def _trained_image(model_dir, result, request: GenerateRequest) -> np.ndarray:
    """The reference: the trained models in memory (LoRA attached, new rows in place), prompted with
    the new tokens as training wrote them."""
    parts, _ = components.load_components(str(model_dir))
    parts.update(unet=result.unet, text_encoder=result.text_encoder, tokenizer=result.tokenizer)
    if result.text_encoder_2 is not None:
        parts.update(text_encoder_2=result.text_encoder_2, tokenizer_2=result.tokenizer_2)
    pipe = components.assemble_pipeline(parts, make_scheduler(request.scheduler, parts["scheduler"].config))
    for m in (result.unet, result.text_encoder, result.text_encoder_2):
        if m is not None:
            m.eval()
    prompt = request.prompt.replace("sks", "<s0><s1>")
    return np.asarray(generate(pipe, prompt, seed=request.seed, steps=request.steps)[0], dtype=np.int16)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_a_fresh_generator_reproduces_the_trained_image_and_unloads_the_tokens(runs, arch, tmp_path):
    model_dir, cfg, result = runs[arch]
    gen = Generator(device="cpu")
    request = GenerateRequest(
        base_model=str(model_dir), prompt="a photo of sks dog", steps=3, seed=5,
        adapters=((str(result.adapter_dir), 1.0),),
    )  # fmt: skip
    image = np.asarray(gen.generate(request)[0], dtype=np.int16)
    assert np.abs(image - _trained_image(model_dir, result, request)).max() <= 2
    # Without the embeddings the same LoRA and prompt give another image: they were applied.
    pipe = load_pipeline(str(model_dir), device="cpu")
    pipe.load_lora_weights(str(result.adapter_dir))
    plain_lora = np.asarray(generate(pipe, request.prompt, seed=5, steps=3)[0], dtype=np.int16)
    assert np.abs(image - plain_lora).max() > 2

    # The run's last checkpoint loads as the same adapter (embeddings included).
    checkpoint = sorted((result.adapter_dir.parent / "checkpoints").iterdir())[-1]
    from_checkpoint = gen.generate(dataclasses.replace(request, adapters=((str(checkpoint), 1.0),)))[0]
    assert np.abs(np.asarray(from_checkpoint, dtype=np.int16) - image).max() <= 2

    # Two pivotal adapters blend (each gets tokens of its own), and swapped out, the tokenizers and
    # text encoders are as they were: same size, other prompts encode bit-identically.
    resident = next(iter(gen._pipelines.values()))
    twin = tmp_path / "twin"
    shutil.copytree(result.adapter_dir, twin)
    gen.generate(dataclasses.replace(request, adapters=((str(result.adapter_dir), 0.5), (str(twin), 0.5))))
    assert len(resident.embeddings) == 2
    gen.generate(dataclasses.replace(request, adapters=()))
    assert resident.embeddings == {}
    fresh = load_pipeline(str(model_dir), device="cpu")
    for (te, tok), (fresh_te, fresh_tok) in zip(_pairs(resident.pipe), _pairs(fresh), strict=True):
        assert len(tok) == len(fresh_tok)
        assert te.get_input_embeddings().weight.shape == fresh_te.get_input_embeddings().weight.shape
        for a, b in zip(
            _encode(te, tok, OTHER_PROMPTS), _encode(fresh_te, fresh_tok, OTHER_PROMPTS), strict=True
        ):
            assert torch.equal(a, b)


@pytest.mark.slow  # three short runs: about a minute of CPU
def test_resume_restores_the_embeddings(tiny_model, photos, tmp_path):
    """Stopped at step 2 and resumed, a pivotal run ends with the straight run's embeddings and LoRA
    (the checkpoint carries the new rows; their optimizer state is in its optimizer.pt)."""
    cfg = _pivotal_config(tiny_model, photos, tmp_path / "straight", train_text_encoder=True)
    straight = train(cfg)
    split = dataclasses.replace(cfg, output_dir=str(tmp_path / "split"))
    assert train(split, should_stop=stop_after(2)).summary["steps"] == 2
    assert (tmp_path / "split" / "checkpoints" / "checkpoint-2" / "embeddings.safetensors").is_file()
    resumed = train(dataclasses.replace(split, resume_from_checkpoint="latest"))
    assert resumed.status == "finished" and resumed.summary["steps"] == 4
    for name in ("pytorch_lora_weights.safetensors", "sks-dog_emb.safetensors"):
        assert_same_weights(straight.adapter_dir, resumed.adapter_dir, name)
    # A checkpoint of a pivotal run is not resumed by a run without it (nor with other token counts).
    from trainer_core.events import TrainingError

    with pytest.raises(TrainingError, match="pivotal_tokens"):
        train(dataclasses.replace(split, pivotal_tuning=False, resume_from_checkpoint="latest"))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(instance_prompt="a photo of a dog", class_prompt="a photo of a dog"), "token"),
        (dict(num_new_tokens=0), "num_new_tokens"),
        (dict(num_new_tokens=9), "num_new_tokens"),
        (dict(token_init="word"), "token_init"),
        (dict(token_embedding_lr=0.0), "token_embedding_lr"),
    ],
)
def test_bad_pivotal_settings_name_the_field(overrides, field):
    values = dict(instance_prompt="a photo of sks dog", token="sks", pivotal_tuning=True)
    values.update(overrides)
    if field == "token":
        values.pop("token")
    with pytest.raises(ValueError, match=f"^{field}: "):
        TrainConfig(**values)


def test_prompts_name_the_subject_by_its_new_tokens():
    cfg = TrainConfig(
        instance_prompt="a photo of sks dog", class_prompt="a photo of a dog", pivotal_tuning=True
    )
    assert cfg.pivotal_tokens == ("<s0>", "<s1>") and cfg.pivotal_init_word == "dog"
    assert (
        cfg.with_pivotal_tokens("sks, a photo of SKS dog. sks-dog")
        == "<s0><s1>, a photo of <s0><s1> dog. sks-dog"
    )
    assert dataclasses.replace(cfg, pivotal_tuning=False).with_pivotal_tokens("a sks dog") == "a sks dog"
    style = TrainConfig(instance_prompt="an image in the style of sks", token="sks", pivotal_tuning=True)
    assert style.pivotal_init_word is None  # no class noun: random start
    assert dataclasses.replace(cfg, token_init="random").pivotal_init_word is None


def test_the_cli_takes_the_pivotal_flags():
    from trainer_core.cli import _config_from_args, build_parser

    args = build_parser().parse_args(
        ["train", "--base-model", "tiny-sdxl", "--instance-dir", "p", "--instance-prompt", "a photo of sks dog",
         "--output-dir", "o", "--token", "sks", "--pivotal-tuning", "--num-new-tokens", "3", "--token-init", "random",
         "--token-embedding-lr", "1e-3"]
    )  # fmt: skip
    config = _config_from_args(args)
    assert config.pivotal_tuning and config.num_new_tokens == 3 and config.token_init == "random"
    assert config.token_embedding_lr == 1e-3 and config.pivotal_tokens == ("<s0>", "<s1>", "<s2>")
    assert "Pivotal tuning" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_the_new_rows_are_an_optimizer_group_of_their_own():
    from trainer_core.optim import make_optimizer

    unet_p, rows = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(2, 8))
    cfg = TrainConfig(
        instance_prompt="a photo of sks dog", token="sks", pivotal_tuning=True, adam_weight_decay=0.1
    )
    groups = {g["name"]: g for g in make_optimizer(cfg, [unet_p], [], token_embeddings=[rows]).param_groups}
    assert groups["token_embeddings"]["params"] == [rows]
    assert groups["token_embeddings"]["lr"] == 5e-4 and groups["token_embeddings"]["weight_decay"] == 0.0
    prodigy = dataclasses.replace(cfg, optimizer="prodigy", learning_rate=1.0)
    groups = {
        g["name"]: g for g in make_optimizer(prodigy, [unet_p], [], token_embeddings=[rows]).param_groups
    }
    assert groups["token_embeddings"]["lr"] == 1.0


def test_the_store_keeps_the_embeddings_with_the_adapter(runs, tmp_path):
    """A renamed adapter's embeddings file follows its name (A1111 calls it by that name), the
    generator still finds it, and a Hub push uploads it with a card that says how to use it."""
    from trainer_core.inference import describe_adapter
    from trainer_core.store import AdapterStore, _stage_for_hub, hub_model_card

    _, _, result = runs["sd15"]
    store = AdapterStore(tmp_path / "store")
    added = store.add(result.adapter_dir)
    renamed = store.rename(added.name, "my dog")
    info = json.loads((renamed.path / "adapter.json").read_text())
    assert info["files"]["embeddings"] == "my-dog_emb.safetensors"
    assert (renamed.path / "my-dog_emb.safetensors").is_file()
    assert not (renamed.path / "sks-dog_emb.safetensors").exists()
    assert "my-dog_emb" in (renamed.path / "README.md").read_text()
    assert describe_adapter(renamed.path).embeddings == renamed.path / "my-dog_emb.safetensors"
    staging = tmp_path / "staging"
    staging.mkdir()
    _stage_for_hub(renamed.path, staging)
    assert (staging / "my-dog_emb.safetensors").is_file()
    assert "<s0><s1>" in hub_model_card(info, "me/my-dog", [])


def test_a_checkpoint_exports_as_an_adapter_with_its_embeddings(runs, tmp_path):
    from trainer_core.evaluate import export_checkpoint

    _, cfg, result = runs["sdxl"]
    out = export_checkpoint(cfg.output_dir, cfg.max_train_steps, tmp_path / "exported")
    info = json.loads((out / "adapter.json").read_text())
    assert info["pivotal_tokens"] == TOKENS and info["files"]["embeddings"] == "sks-dog-step4_emb.safetensors"
    exported = load_file(str(out / info["files"]["embeddings"]))
    trained = load_file(str(result.adapter_dir / "sks-dog_emb.safetensors"))
    assert exported.keys() == trained.keys() == {"clip_l", "clip_g"}
    for key in trained:
        assert torch.equal(exported[key], trained[key])


def _pooled(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(
        [prompt],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids).text_embeds[0]


def test_sdxl_pools_the_whole_prompt_with_new_tokens(runs):
    """The CLIP configs of SD 1.5 and SDXL on the Hub carry eos_token_id 2 (from before transformers'
    fix #24773), and such a CLIP pools the prompt at its highest token id: the new tokens outrank the
    end-of-text token, so SDXL's pooled embedding (text_embeds) was read at the trigger word and never
    saw the rest of the prompt, in training and at generation. (The tiny models' own eos id is 1.
    With the real vocabulary, prompts without new tokens pool where they did: the end-of-text token
    is its highest id.)"""
    from trainer_core import pivotal
    from trainer_core.inference import describe_adapter, load_embeddings

    long = "a photo of <s0><s1> cat on a red beach at night"
    parts, _ = components.load_components("tiny-sdxl")
    tok, te = parts["tokenizer_2"], parts["text_encoder_2"].eval()
    te.text_model.eos_token_id = te.config.eos_token_id = 2  # as the Hub's SDXL config says
    pivotal.add_tokens([tok], [te], ("<s0>", "<s1>"), None, 0)  # training
    assert (_pooled(te, tok, "a photo of <s0><s1> dog") - _pooled(te, tok, long)).abs().max() > 1e-3

    model_dir, _cfg, result = runs["sdxl"]
    pipe = load_pipeline(str(model_dir), device="cpu")
    pipe.text_encoder_2.text_model.eos_token_id = pipe.text_encoder_2.config.eos_token_id = 2
    source = describe_adapter(result.adapter_dir)
    load_embeddings(pipe, source, source.pivotal_tokens)  # generation
    a, b = (_pooled(pipe.text_encoder_2, pipe.tokenizer_2, p.replace("<s0><s1>", "".join(source.pivotal_tokens)))
            for p in ("a photo of <s0><s1> dog", long))  # fmt: skip
    assert (a - b).abs().max() > 1e-3


def test_two_pivotal_adapters_with_one_trigger_both_get_it_in_request_order(runs, tmp_path, monkeypatch):
    """Two active pivotal adapters trained with the same trigger word (the presets' "sks"): the word
    becomes both adapters' tokens, in the request's order. Before, the first adapter loaded took the
    word alone, so the second's tokens never reached the prompt, and which one won depended on what
    ran earlier (load order, not the request)."""
    from trainer_core import inference

    _model_dir, _cfg, result = runs["sd15"]
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(result.adapter_dir, a)
    shutil.copytree(result.adapter_dir, b)
    prompts = []

    def capture(pipe, prompt, **kwargs):
        prompts.append(prompt)
        return []

    monkeypatch.setattr(inference, "generate", capture)
    gen = Generator(device="cpu")
    base = GenerateRequest(base_model=str(runs["sd15"][0]), prompt="a photo of sks dog", steps=1, seed=1)
    gen.generate(dataclasses.replace(base, adapters=((str(b), 1.0),)))  # b loaded first
    gen.generate(dataclasses.replace(base, adapters=((str(a), 0.5), (str(b), 0.5))))
    gen.generate(dataclasses.replace(base, adapters=((str(b), 0.5), (str(a), 0.5))))
    resident = next(iter(gen._pipelines.values()))
    tokens = {Path(key).name: "".join(t) for key, (_, t) in resident.embeddings.items()}
    assert prompts[1] == f"a photo of {tokens['a']}{tokens['b']} dog", prompts
    assert prompts[2] == f"a photo of {tokens['b']}{tokens['a']} dog", prompts


def test_weight_zero_is_the_base_model_for_a_pivotal_adapter(runs):
    """compare_weights' "weight 0" cell must be the base model: a pivotal adapter at weight 0 kept its
    token embeddings and rewrote the prompt with them, so the cell showed the trained tokens' effect."""
    model_dir, _cfg, result = runs["sd15"]
    gen = Generator(device="cpu")
    request = GenerateRequest(
        base_model=str(model_dir), prompt="a photo of sks dog", steps=3, seed=5,
        adapters=((str(result.adapter_dir), 1.0),),
    )  # fmt: skip
    _grid, cells = gen.compare_weights(request, weights=(0.0, 1.0))
    plain = gen.generate(dataclasses.replace(request, adapters=()))[0]
    zero, full = (np.asarray(image, dtype=np.int16) for _, image in cells)
    assert np.abs(zero - np.asarray(plain, dtype=np.int16)).max() <= 1
    assert np.abs(full - zero).max() > 2


def test_new_tokens_start_from_the_class_noun_despite_stray_punctuation(tiny_model, photos, tmp_path):
    """A class prompt ending in a lone "." (or a "," after the trigger) gave "" as the class noun, and the
    new tokens silently started from random embeddings instead."""
    cfg = _pivotal_config(tiny_model, photos, tmp_path, class_prompt="a photo of a dog .")
    assert cfg.pivotal_init_word == "dog"
    cfg = dataclasses.replace(cfg, class_prompt=None, token="sks", instance_prompt="a photo of sks , dog")
    assert cfg.pivotal_init_word == "dog"


def test_the_gallery_offers_the_embeddings_of_a_pivotal_adapter(runs, tmp_path):
    """AUTOMATIC1111 and ComfyUI need the token embeddings beside the LoRA file for the trigger word to
    mean the subject: the Gallery offered only the LoRA file (the embeddings were only in the zip)."""
    from dreambooth_ui.studio import Studio
    from dreambooth_ui.tabs.gallery import downloads_of

    studio = Studio(tmp_path / "data")
    studio.store.add(runs["sd15"][2].adapter_dir)
    info = studio.list_adapters()[0]
    buttons = downloads_of(studio, info)
    shown = {
        Path(b.value["path"] if isinstance(b.value, dict) else b.value).name for b in buttons if b.visible
    }
    name = info["name"]
    assert {f"{name}.safetensors", f"{name}_emb.safetensors", "pytorch_lora_weights.safetensors"} <= shown, (
        shown
    )


def test_a_plain_lora_sharing_the_trigger_still_sees_its_word(runs, tmp_path, monkeypatch):
    """Blending a pivotal adapter with a plain LoRA trained on the same word ("sks"): the pivotal one
    gets its tokens and the plain one keeps the word it was trained on. Before, the word was replaced
    by the pivotal tokens, so the plain LoRA never saw its trigger."""
    from lora_fixtures import lora_adapter

    from trainer_core import inference

    model_dir, _cfg, result = runs["sd15"]
    plain = lora_adapter(model_dir, tmp_path / "plain", 3, token="sks")
    prompts = []
    monkeypatch.setattr(inference, "generate", lambda pipe, prompt, **kw: prompts.append(prompt) or [])
    gen = Generator(device="cpu")
    request = GenerateRequest(
        base_model=str(model_dir), prompt="a photo of sks dog", steps=1, seed=1,
        adapters=((str(result.adapter_dir), 0.5), (str(plain), 0.5)),
    )  # fmt: skip
    gen.generate(request)
    resident = next(iter(gen._pipelines.values()))
    [(_, tokens)] = resident.embeddings.values()
    assert prompts == [f"a photo of {''.join(tokens)} sks dog"]
    gen.generate(dataclasses.replace(request, adapters=((str(result.adapter_dir), 1.0),)))
    assert prompts[-1] == f"a photo of {''.join(tokens)} dog", "alone, the word is the tokens only"
