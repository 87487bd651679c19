"""Pivotal tuning: new tokens for the subject, their embeddings trained together with the LoRA.

As in diffusers' `train_dreambooth_lora_sdxl_advanced.py`, the LoRA-ease Space and cloneofsimo's
lora_pti: the trigger word in every prompt becomes new tokens ("<s0><s1>"), added to each tokenizer
(both of SDXL's) with a row in its text encoder's embedding table. Only those rows train: each is a
small parameter (`pivotal_rows`, (n, dim)) on the embedding module, and a forward hook puts it in
place of the table's rows for the new ids. The table itself stays frozen, so every other token's
embedding is bit-identical by construction, the optimizer holds n x dim moments instead of the whole
table's, and a checkpoint carries n rows.

The rows are saved with the adapter as `<name>_emb.safetensors` in the layout AUTOMATIC1111 and
ComfyUI load: `clip_l` / `clip_g` for SDXL (one row per token in each), `emb_params` for SD 1.5 (the
single-tensor file A1111 and ComfyUI read, as kohya writes it). diffusers loads either with
`load_textual_inversion(tensor, token=[...])`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .events import TrainingError

log = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "text_encoder_2")
# The embeddings file's keys per text encoder, as AUTOMATIC1111 and ComfyUI read them.
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SD15_KEY = "emb_params"


def add_tokens(
    tokenizers: list, text_encoders: list, tokens: tuple[str, ...], init_word: str | None, seed: int
) -> None:
    """Add `tokens` to each tokenizer and a frozen `pivotal_rows` parameter for them to its text
    encoder's embedding module: the class noun's embedding (cycled over its sub-tokens) when
    `init_word` is given, else normal noise at the table's std. Call `train_rows` to train them."""
    for k, (tok, te) in enumerate(zip(tokenizers, text_encoders, strict=True)):
        if any(t in tok.get_vocab() for t in tokens):
            raise TrainingError(f"The tokenizer already has a token among {', '.join(tokens)}.")
        tok.add_tokens(list(tokens))
        ids = tok.convert_tokens_to_ids(list(tokens))
        joined = tok("".join(tokens), add_special_tokens=False).input_ids
        if joined != ids or ids != list(range(ids[0], ids[0] + len(ids))):
            raise TrainingError(f"The tokenizer does not read {''.join(tokens)} as {len(tokens)} new tokens.")
        old = te.get_input_embeddings()
        # mean_resizing would sample the new rows from the table's covariance: slow for CLIP-G, and
        # overwritten below anyway.
        te.resize_token_embeddings(max(len(tok), old.num_embeddings), mean_resizing=False)
        embedding = te.get_input_embeddings()
        embedding.weight.requires_grad_(False)
        table = embedding.weight.detach()
        if init_word:
            source = tok(init_word, add_special_tokens=False).input_ids
            init = table[[source[i % len(source)] for i in range(len(ids))]].float()
        else:
            g = torch.Generator().manual_seed(seed * 2 + k)
            init = torch.randn((len(ids), table.shape[1]), generator=g) * table.float().std()
        with torch.no_grad():
            embedding.weight[ids[0] : ids[0] + len(ids)] = init.to(table.dtype)
        embedding.register_parameter("pivotal_rows", torch.nn.Parameter(init.clone(), requires_grad=False))
        embedding.pivotal_first_id = ids[0]
        embedding.register_forward_hook(_use_rows)
        pool_at_end_token(tok, te)
    log.info("pivotal tuning: %s start from %s", "".join(tokens), init_word or "random embeddings")


def pool_at_end_token(tokenizer, text_encoder) -> None:
    """Make a CLIP text encoder pool the prompt at the tokenizer's end-of-text token.

    The CLIP configs of SD 1.5 and SDXL on the Hub carry eos_token_id 2 (from before transformers'
    fix #24773), and transformers then pools at the highest token id of the prompt: tokens added
    to the vocabulary outrank the end-of-text token, so SDXL's pooled embedding would be read at the
    trigger word and miss the rest of the prompt. For the base vocabulary nothing changes: the
    end-of-text token is its highest id, and its first occurrence is where argmax found it.
    """
    model = getattr(text_encoder, "text_model", None)
    end = tokenizer.eos_token_id
    if model is None or end is None or end == 2 or getattr(model, "eos_token_id", None) != 2:
        return
    model.eos_token_id = end
    text_encoder.config.eos_token_id = end


def _use_rows(module, args, output):
    """The embedding's output with the trained rows in place of the table's for the new ids."""
    if not args:  # called with keyword arguments only: not CLIP's embedding layer, leave it
        return output
    ids = args[0]
    rows = module.pivotal_rows
    first = module.pivotal_first_id
    new = (ids >= first) & (ids < first + rows.shape[0])
    picked = rows[(ids - first).clamp(0, rows.shape[0] - 1)].to(output.dtype)  # (..., dim)
    return torch.where(new.unsqueeze(-1), picked, output)


def rows(text_encoder) -> torch.nn.Parameter | None:
    """The text encoder's new token rows (n, dim), or None without pivotal tuning."""
    return getattr(text_encoder.get_input_embeddings(), "pivotal_rows", None)


def train_rows(text_encoders: list) -> list[torch.nn.Parameter]:
    """Make the new rows trainable (after `add_lora`, which freezes the whole text encoder)."""
    params = [p for p in (rows(te) for te in text_encoders) if p is not None]
    for p in params:
        p.requires_grad_(True)
    return params


def rows_state(text_encoders: list) -> dict[str, torch.Tensor]:
    """`{"text_encoder": (n, dim), "text_encoder_2": ...}`: detached fp32 copies on the CPU."""
    out = {}
    for name, te in zip(COMPONENTS, text_encoders, strict=False):
        p = rows(te)
        if p is not None:
            out[name] = p.detach().to("cpu", torch.float32).clone()
    return out


def load_rows_state(text_encoders: list, state: dict[str, torch.Tensor]) -> None:
    """Put saved rows (from `rows_state`) back into the text encoders' new token rows."""
    for name, te in zip(COMPONENTS, text_encoders, strict=False):
        p = rows(te)
        if (p is None) != (name not in state):
            raise TrainingError("The checkpoint's token embeddings do not match this run's pivotal tuning.")
        if p is not None:
            if tuple(state[name].shape) != tuple(p.shape):
                raise TrainingError(
                    f"The checkpoint has {state[name].shape[0]} new token embeddings, this run {p.shape[0]}."
                )
            with torch.no_grad():
                p.copy_(state[name])


# ---------------------------------------------------------------------------------------------
# The embeddings file (A1111 / ComfyUI layout)
# ---------------------------------------------------------------------------------------------


def file_layout(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """`rows_state` -> the embeddings file's tensors: clip_l / clip_g (SDXL) or emb_params (SD 1.5)."""
    if architecture == "sdxl":
        if set(state) != set(SDXL_KEYS):
            raise ValueError("an SDXL embeddings file needs the rows of both text encoders")
        return {SDXL_KEYS[k]: v.contiguous() for k, v in state.items()}
    return {SD15_KEY: state["text_encoder"].contiguous()}


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """An embeddings file (either layout, or a checkpoint's `rows_state`) -> `{"text_encoder": (n, dim),
    "text_encoder_2": ...}`."""
    from safetensors.torch import load_file

    data = load_file(str(path))
    if set(data) and set(data) <= set(COMPONENTS):
        return data
    if set(SDXL_KEYS.values()) <= set(data):
        return {k: data[v] for k, v in SDXL_KEYS.items()}
    if len(data) == 1:
        return {"text_encoder": next(iter(data.values()))}
    raise TrainingError(f"{Path(path).name} is not a token embeddings file (clip_l/clip_g or emb_params).")
