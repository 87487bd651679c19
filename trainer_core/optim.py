"""The optimizer over the LoRA weights: AdamW (torch's, fused, or bitsandbytes' 8-bit) or Prodigy.

The UNet's and the text encoders' LoRA weights are separate parameter groups, each with its own
learning rate and weight decay (as diffusers' SDXL script and kohya's --unet_lr/--text_encoder_lr
do): text encoders overfit at the UNet's rate. A learning-rate schedule scales every group alike.
DoRA's magnitude vectors (each layer's weight norms, not a low-rank update) get no weight decay, as
biases and norms get none in kohya's and OneTrainer's optimizers: decay would shrink the layers'
outputs. They sit in their component's "<name>_no_decay" group, at its learning rate. Pivotal
tuning's new token embeddings are a "token_embeddings" group with their own rate and no decay.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Collection, Sequence

import torch

from .config import TrainConfig
from .events import TrainingError


def param_groups(
    config: TrainConfig,
    unet_params: Sequence[torch.nn.Parameter],
    text_encoder_params: Sequence[torch.nn.Parameter],
    no_decay: Collection[torch.nn.Parameter] = (),
    token_embeddings: Sequence[torch.nn.Parameter] = (),
) -> list[dict]:
    """One group per component that has trainable weights: "unet" and "text_encoder" (all of SDXL's
    text encoders share one), with their learning rate and weight decay; the parameters in
    `no_decay` go to "unet_no_decay" / "text_encoder_no_decay", same rate, weight decay 0;
    `token_embeddings` (pivotal tuning) to "token_embeddings", at token_embedding_lr, no decay."""
    text_encoder_lr, token_lr = config.text_encoder_lr, config.token_embedding_lr
    if config.optimizer == "prodigy":
        # Prodigy estimates one step size and multiplies it by each group's lr; its authors (and
        # diffusers' scripts) keep lr = 1.0 for every group.
        text_encoder_lr = token_lr = config.learning_rate
    groups = [
        {
            "name": "unet",
            "params": list(unet_params),
            "lr": config.learning_rate,
            "weight_decay": config.adam_weight_decay,
        },
        {
            "name": "text_encoder",
            "params": list(text_encoder_params),
            "lr": text_encoder_lr,
            "weight_decay": config.text_encoder_weight_decay,
        },
    ]
    skip = {id(p) for p in no_decay}
    split = []
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in skip]
        free = [p for p in group["params"] if id(p) in skip]
        split.append({**group, "params": kept})
        split.append({**group, "name": f"{group['name']}_no_decay", "params": free, "weight_decay": 0.0})
    # Decay would pull the new tokens towards the zero vector, away from every real word's norm.
    split.append(
        {"name": "token_embeddings", "params": list(token_embeddings), "lr": token_lr, "weight_decay": 0.0}
    )
    return [g for g in split if g["params"]]


def make_optimizer(
    config: TrainConfig,
    unet_params: Sequence[torch.nn.Parameter],
    text_encoder_params: Sequence[torch.nn.Parameter] = (),
    *,
    no_decay: Collection[torch.nn.Parameter] = (),
    token_embeddings: Sequence[torch.nn.Parameter] = (),
) -> torch.optim.Optimizer:
    """The configured optimizer over the UNet's and the text encoders' LoRA weights; `no_decay` (DoRA
    magnitudes, `components.dora_magnitudes`) are trained without weight decay, `token_embeddings`
    (pivotal tuning's new rows) at their own rate."""
    groups = param_groups(config, unet_params, text_encoder_params, no_decay, token_embeddings)
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Its authors' settings for fine-tuning diffusion models: bias correction on, and the
        # warm-up safeguard so the step-size estimate does not run away while the lr is small.
        # (Prodigy prints a line on construction; the engine never writes to stdout.)
        with contextlib.redirect_stdout(io.StringIO()):
            return Prodigy(
                groups,
                lr=config.learning_rate,
                betas=betas,
                eps=config.adam_epsilon,
                weight_decay=config.adam_weight_decay,
                d_coef=config.prodigy_d_coef,
                use_bias_correction=config.prodigy_use_bias_correction,
                safeguard_warmup=config.prodigy_safeguard_warmup,
            )
    kwargs = dict(
        lr=config.learning_rate, betas=betas, weight_decay=config.adam_weight_decay, eps=config.adam_epsilon
    )
    if config.use_8bit_adam:
        if not torch.cuda.is_available():
            raise TrainingError("8-bit Adam needs a CUDA GPU; turn it off on this machine.")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainingError("8-bit Adam needs the bitsandbytes package: pip install bitsandbytes.") from e
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, **({"fused": True} if config.fused_adam else {}))
