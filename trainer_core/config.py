"""The one training configuration: a frozen dataclass built by the CLI, the UI and the tests.

Every field carries its help text (reused by the CLI's --help). Validation raises ValueError naming
the field. Variations are made with `dataclasses.replace`, which re-runs validation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
PREDICTION_TYPES = ("epsilon", "v_prediction")
OPTIMIZERS = ("adamw", "prodigy")
TOKEN_INITS = ("class", "random")
MAX_NEW_TOKENS = 8
SUBJECT_TYPES = ("person", "pet", "object", "style")
# The built-in offline base models (built on first use, no download): id -> (architecture, label).
TINY_MODELS: dict[str, tuple[str, str]] = {
    "tiny-sd15": ("sd15", "tiny-sd15 (offline test model, produces noise)"),
    "tiny-sdxl": ("sdxl", "tiny-sdxl (offline test model, produces noise)"),
    # pretrained on simple coloured shapes, shipped in the repository once its weights are built
    "tiny-shapes": (
        "sd15",
        "tiny-shapes (offline, knows simple coloured shapes: learns a subject in minutes)",
    ),
}
MAX_LEARNING_RATE = 1.0
EVAL_MODELS = ("auto", "tiny", "none")
BEST_METRICS = ("dino", "clip_i")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    instance_dir: str = _f("", "Folder of the subject's photos (a .txt beside an image is its caption).")
    instance_prompt: str = _f("", "Prompt naming the subject with its rare token, e.g. 'a photo of sks dog'.")
    output_dir: str = _f("", "Run folder: checkpoints, samples, metrics and the finished adapter go here.")
    base_model: str = _f(
        "tiny-sd15",
        "Hub id, local diffusers folder or single-file .safetensors checkpoint (SD 1.5 or SDXL), "
        "or tiny-sd15 / tiny-sdxl (offline test models).",
    )
    single_file_config: str | None = _f(
        None, "For a single-file base model: a diffusers folder or Hub id with its configs (needed offline)."
    )
    pretrained_vae: str | None = _f(
        None,
        "A replacement VAE (Hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix, for latents, class and "
        "validation images (training keeps the VAE in fp32: SDXL's overflows in fp16).",
    )
    adapter_name: str | None = _f(None, "Name of the adapter (default: derived from the instance prompt).")
    token: str | None = _f(
        None,
        "The rare identifier in the instance prompt, e.g. 'sks' (default: the word not in the class prompt).",
    )
    # prior preservation
    with_prior_preservation: bool = _f(
        False, "Train on class images too, so the model keeps its idea of the class."
    )
    class_prompt: str | None = _f(None, "Prompt for the class images, e.g. 'a photo of a dog'.")
    class_data_dir: str | None = _f(
        None, "Folder of class images to use (topped up to num_class_images); default: the shared cache."
    )
    num_class_images: int = _f(100, "How many class images prior preservation uses.")
    prior_loss_weight: float = _f(1.0, "Weight of the class (prior) loss against the instance loss.")
    class_generation_steps: int = _f(25, "Sampler steps per generated class image (DPM-Solver++).")
    class_generation_batch_size: int = _f(4, "Class images generated per batch.")
    # LoRA
    rank: int = _f(4, "LoRA rank (adapter size).")
    alpha: float | None = _f(None, "LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank).")
    train_text_encoder: bool = _f(
        False, "Also train a LoRA on the text encoder's attention (both encoders for SDXL)."
    )
    use_dora: bool = _f(
        False,
        "DoRA: train each layer's weight magnitude apart from its LoRA-updated direction (peft); "
        "closer to full fine-tuning at the same rank, slower per step.",
    )
    # pivotal tuning (new token embeddings trained with the LoRA)
    pivotal_tuning: bool = _f(
        False,
        "Pivotal tuning (diffusers' advanced SDXL script, LoRA-ease): the trigger word is replaced in "
        "every prompt by new tokens (<s0><s1>...) whose embeddings, in each text encoder (both of "
        "SDXL's), train with the LoRA; saved beside it as an embeddings file AUTOMATIC1111 and "
        "ComfyUI load, and applied by the app's generator. Needs a trigger word (token).",
    )
    num_new_tokens: int = _f(2, "With pivotal tuning: how many new tokens replace the trigger word.")
    token_init: str = _f(
        "class",
        f"With pivotal tuning, how the new embeddings start: {' or '.join(TOKEN_INITS)} (class: the "
        "class noun's embedding, e.g. 'dog', random when there is none; random: normal noise at the "
        "embedding table's std, as diffusers' script does).",
    )
    token_embedding_lr: float = _f(
        5e-4,
        "With pivotal tuning: learning rate of the new token embeddings (textual inversion's usual "
        "5e-4; no weight decay; Prodigy uses learning_rate).",
    )
    # data
    resolution: int | None = _f(
        None, "Training resolution in pixels (default: the model's, 512 for SD 1.5, 1024 for SDXL)."
    )
    random_flip: bool = _f(False, "Randomly flip images horizontally (off: faces are not symmetric).")
    bucketing: bool = _f(
        False,
        "Aspect-ratio bucketing: train each photo uncropped (a prepared folder's originals) at the bucket "
        "of about resolution² pixels nearest its aspect ratio, sides in steps of 64; each batch is one "
        "bucket, and class images are cropped to the same bucket.",
    )
    masked_loss: bool = _f(
        False,
        "Weight each photo's loss by its subject mask (photo.mask.png beside it, white = subject, "
        "written by prep --masks); a photo without a mask counts whole. Class images are never masked.",
    )
    caption_dropout: float = _f(
        0.0,
        "Probability of training a photo with an empty caption (kohya's caption_dropout_rate, e.g. 0.1): "
        "less of the subject is tied to the prompt's other words.",
    )
    # optimisation
    max_train_steps: int = _f(400, "Optimizer steps to train.")
    train_batch_size: int = _f(1, "Instance images per step (as many class images are added).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    learning_rate: float = _f(
        1e-4, "Peak learning rate of the UNet's LoRA (Prodigy: a multiplier of its own step size, 1.0)."
    )
    text_encoder_lr: float = _f(
        5e-6,
        "Learning rate of the text encoders' LoRA (with train_text_encoder; diffusers' SDXL default; "
        "Prodigy uses learning_rate for every part).",
    )
    optimizer: str = _f(
        "adamw",
        f"Optimizer: {', '.join(OPTIMIZERS)} (adaptive step size: set learning_rate to 1.0; "
        "its authors' LoRA settings are the prodigy_* defaults).",
    )
    prodigy_d_coef: float = _f(
        1.0, "Prodigy's d_coef: scales the step size it estimates (0.5 halves it; its preferred knob)."
    )
    prodigy_safeguard_warmup: bool = _f(
        True,
        "Prodigy's safeguard_warmup: keeps its estimate stable during lr warm-up (its authors' setting).",
    )
    prodigy_use_bias_correction: bool = _f(
        True, "Prodigy's Adam-style bias correction (its authors' setting for diffusion models)."
    )
    lr_scheduler: str = _f("constant", f"Learning-rate schedule: {', '.join(LR_SCHEDULERS)}.")
    lr_warmup_steps: int = _f(0, "Warm-up steps of the learning-rate schedule.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "Weight decay of the UNet's LoRA (AdamW and Prodigy).")
    text_encoder_weight_decay: float = _f(
        1e-3, "Weight decay of the text encoders' LoRA (diffusers' SDXL default)."
    )
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes (needs CUDA and bitsandbytes).")
    fused_adam: bool = _f(False, "Fused AdamW (torch's one-kernel update of all LoRA weights).")
    snr_gamma: float | None = _f(None, "Min-SNR loss weighting gamma (5.0 is usual); off when unset.")
    noise_offset: float = _f(0.0, "Noise offset (e.g. 0.05) for darker darks and brighter brights.")
    prediction_type: str | None = _f(
        None, "Training target: epsilon or v_prediction (default: the model's scheduler)."
    )
    # speed and memory
    mixed_precision: str = _f("no", "Mixed precision: no, fp16 (CUDA) or bf16. LoRA weights stay fp32.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    enable_xformers: bool = _f(False, "Use xformers attention (needs CUDA and xformers); default is SDPA.")
    compile_unet: bool = _f(
        False,
        "torch.compile the UNet's repeated transformer blocks (CUDA only; the first steps compile, "
        "so only long runs gain).",
    )
    # reproducibility, logging, validation
    seed: int = _f(0, "Seed for noise, timesteps, data order and class images.")
    logging_steps: int = _f(1, "Report and log metrics every N steps.")
    validation_prompt: str | None = _f(
        None, "Prompt for validation images, made with and without the token (default: instance prompt)."
    )
    validation_steps: int = _f(0, "Make validation images every N steps (0: only at the end).")
    num_validation_images: int = _f(1, "Validation images per prompt (0: none at all).")
    validation_inference_steps: int = _f(25, "Sampler steps for validation images.")
    # scores of validation rounds (trainer_core/evaluate.py)
    eval_models: str = _f(
        "auto",
        "Score each validation round (subject fidelity DINO / CLIP-I, prompt fidelity CLIP-T, prior "
        "preservation PRES) into scores.jsonl: auto (the real CLIP and DINO models when cached or "
        "downloadable, else off with the reason), tiny (tiny random models, offline, for tests) or none.",
    )
    num_eval_prompts: int = _f(
        4, "Scene prompts per scored round ('a sks dog in the jungle', ...), one image each, fixed seeds."
    )
    num_eval_class_images: int = _f(
        2, "Class-prompt images per scored round, for PRES (how much the class drifted towards the subject)."
    )
    best_metric: str = _f(
        "dino", "Subject fidelity the best checkpoint maximises: dino (the paper's choice) or clip_i."
    )
    best_clip_t_tolerance: float = _f(
        0.1,
        "Best checkpoint: a candidate's CLIP-T may fall at most this fraction below the earliest round's.",
    )
    best_pres_tolerance: float = _f(
        0.1, "Best checkpoint: a candidate's PRES may rise at most this fraction above the earliest round's."
    )
    # checkpoints
    checkpointing_steps: int = _f(
        100, "Save a resumable checkpoint every N steps and at the end (0: only at the end and on a stop)."
    )
    checkpoints_total_limit: int | None = _f(3, "Keep only the newest N checkpoints (unset: keep all).")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder to continue from.")
    # experiment tracking
    report_to: str = _f(
        "tensorboard",
        "Experiment trackers: tensorboard (into the run folder's logs/, when installed), wandb, comet_ml "
        "(installed and logged in), a comma list, all (every one installed and set up) or none.",
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}")

        if not self.instance_prompt or not self.instance_prompt.strip():
            raise bad("instance_prompt", "must contain text, e.g. 'a photo of sks dog'")
        if not self.base_model or not str(self.base_model).strip():
            raise bad("base_model", "must name a Hub id, a local folder, a .safetensors file or tiny-sd15")
        if self.with_prior_preservation and not (self.class_prompt and self.class_prompt.strip()):
            raise bad("class_prompt", "prior preservation needs a class prompt, e.g. 'a photo of a dog'")
        if self.token is not None and self.token.lower() not in _words(self.instance_prompt):
            raise bad("token", f"{self.token!r} does not appear in the instance prompt")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise bad("resolution", f"must be a positive multiple of 8, got {self.resolution}")
        _positive_ints = (
            "rank",
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "num_class_images",
            "class_generation_steps",
            "class_generation_batch_size",
            "logging_steps",
            "validation_inference_steps",
            "num_eval_prompts",
        )
        for name in _positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, f"must be an integer >= 1, got {value!r}")
        for name in (
            "lr_warmup_steps",
            "validation_steps",
            "checkpointing_steps",
            "seed",
            "num_validation_images",
            "num_eval_class_images",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, f"must be an integer >= 0, got {value!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise bad("checkpoints_total_limit", "must be >= 1 or unset")
        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise bad("alpha", f"must be a positive number, got {self.alpha}")
        if self.pivotal_tuning and not self.identifier_token:
            raise bad(
                "token",
                "pivotal tuning replaces the trigger word with new tokens: give the token (e.g. 'sks') "
                "or a class prompt without it",
            )
        if isinstance(self.num_new_tokens, bool) or not (
            isinstance(self.num_new_tokens, int) and 1 <= self.num_new_tokens <= MAX_NEW_TOKENS
        ):
            raise bad(
                "num_new_tokens",
                f"must be an integer from 1 to {MAX_NEW_TOKENS}, got {self.num_new_tokens!r}",
            )
        if self.token_init not in TOKEN_INITS:
            raise bad("token_init", f"must be one of {', '.join(TOKEN_INITS)}, got {self.token_init!r}")
        if not (self.token_embedding_lr > 0 and math.isfinite(self.token_embedding_lr)):
            raise bad("token_embedding_lr", f"must be a positive number, got {self.token_embedding_lr}")
        if not (self.text_encoder_lr > 0 and math.isfinite(self.text_encoder_lr)):
            raise bad("text_encoder_lr", f"must be a positive number, got {self.text_encoder_lr}")
        for name in ("adam_weight_decay", "text_encoder_weight_decay"):
            value = getattr(self, name)
            if not (0 <= value < 1):
                raise bad(name, f"must be in [0, 1), got {value}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "prodigy":
            if self.use_8bit_adam or self.fused_adam:
                raise bad(
                    "optimizer", "prodigy cannot be combined with use_8bit_adam or fused_adam (AdamW options)"
                )
            if not 0.1 <= self.learning_rate <= 10:
                raise bad(
                    "learning_rate",
                    f"Prodigy finds its own step size and takes learning_rate as a multiplier: use 1.0, "
                    f"got {self.learning_rate}",
                )
        # AdamW on a LoRA trains at 1e-5 to 1e-3; anything above 1 only ends in NaN mid-run.
        elif not (0 < self.learning_rate <= MAX_LEARNING_RATE):
            raise bad(
                "learning_rate",
                f"must be a number above 0 and at most 1 (1e-4 is usual), got {self.learning_rate}",
            )
        if not (self.prodigy_d_coef > 0 and math.isfinite(self.prodigy_d_coef)):
            raise bad("prodigy_d_coef", f"must be a positive number, got {self.prodigy_d_coef}")
        if not (self.prior_loss_weight >= 0 and math.isfinite(self.prior_loss_weight)):
            raise bad("prior_loss_weight", f"must be >= 0, got {self.prior_loss_weight}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise bad("snr_gamma", f"must be > 0 or unset, got {self.snr_gamma}")
        if not 0 <= self.caption_dropout < 1:
            raise bad("caption_dropout", f"must be a probability in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.noise_offset < 1:
            raise bad("noise_offset", f"must be in [0, 1), got {self.noise_offset}")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be >= 0")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise bad("mixed_precision", f"must be one of {', '.join(MIXED_PRECISIONS)}")
        if self.fused_adam and self.use_8bit_adam:
            raise bad("fused_adam", "cannot be combined with use_8bit_adam; choose one optimizer")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise bad("lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise bad("prediction_type", f"must be one of {', '.join(PREDICTION_TYPES)}")
        if self.eval_models not in EVAL_MODELS:
            raise bad("eval_models", f"must be one of {', '.join(EVAL_MODELS)}, got {self.eval_models!r}")
        if self.best_metric not in BEST_METRICS:
            raise bad("best_metric", f"must be one of {', '.join(BEST_METRICS)}, got {self.best_metric!r}")
        for name in ("best_clip_t_tolerance", "best_pres_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value <= 1):
                raise bad(name, f"must be a fraction between 0 and 1, got {value!r}")
        from .tracking import parse_report_to

        parse_report_to(self.report_to)  # raises ValueError("report_to: ...")

    # derived values
    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def effective_validation_prompt(self) -> str:
        return self.validation_prompt or self.instance_prompt

    @property
    def identifier_token(self) -> str | None:
        """The subject's trigger word: `token`, else the first instance-prompt word the class prompt lacks."""
        if self.token:
            return self.token
        if not self.class_prompt:
            return None
        class_words = set(_words(self.class_prompt))
        extra = [w for w in _words(self.instance_prompt) if w not in class_words]
        return extra[0] if extra else None

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoders run in every step (their LoRA or new token embeddings train)."""
        return self.train_text_encoder or self.pivotal_tuning

    @property
    def pivotal_tokens(self) -> tuple[str, ...]:
        """The new tokens that stand for the trigger word with pivotal tuning ("<s0>", "<s1>", ...)."""
        return tuple(f"<s{i}>" for i in range(self.num_new_tokens)) if self.pivotal_tuning else ()

    def with_pivotal_tokens(self, prompt: str) -> str:
        """`prompt` as training reads it: with pivotal tuning the trigger word becomes "<s0><s1>"."""
        if not self.pivotal_tuning:
            return prompt
        return replace_word(prompt, self.identifier_token or "", "".join(self.pivotal_tokens))

    @property
    def pivotal_init_word(self) -> str | None:
        """The class noun the new embeddings start from (token_init "class"): the class prompt's last
        word, else the instance prompt's word after the trigger; None (random) when there is neither."""
        if self.token_init != "class":
            return None
        if self.class_prompt and _words(self.class_prompt):
            return _words(self.class_prompt)[-1]
        words, token = _words(self.instance_prompt), (self.identifier_token or "").lower()
        after = words[words.index(token) + 1 :] if token in words else []
        return after[0] if after else None

    def prompt_without_token(self, prompt: str) -> str | None:
        token = self.identifier_token
        if not token or token.lower() not in _words(prompt):
            return None
        return " ".join(w for w in prompt.split() if w.strip(",.").lower() != token.lower())

    # JSON round trip
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown config key (known keys: see --help)")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("config: a JSON object is expected")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None

    def save(self, path: str | Path) -> None:
        from .fileio import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")


def _words(text: str) -> list[str]:
    """The prompt's words, lower case, without a leading or trailing "," or "." (a lone one is no word)."""
    return [w for w in (w.strip(",.").lower() for w in text.split()) if w]


def replace_word(prompt: str, word: str, replacement: str) -> str:
    """Every whole-word `word` in `prompt` (case-insensitive; a trailing or leading "," or "." kept,
    as `_words` reads words) replaced by `replacement`."""

    def swap(match: re.Match) -> str:
        text = match.group(0)
        core = text.strip(",.")
        if not word or core.lower() != word.lower():
            return text
        start = text.index(core)
        return text[:start] + replacement + text[start + len(core) :]

    return re.sub(r"\S+", swap, prompt)


def field_help(name: str) -> str:
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


# Presets: sensible starting points per kind of subject, scaled by the number of photos.
# Steps follow the common rule of thumb of ~80-100 steps per photo at batch 1, clamped so a
# handful of photos still trains long enough and twenty do not overfit. Each preset's other choices
# come from the tools our users compare with (diffusers' advanced SDXL script and LoRA-ease for
# faces, kohya's caption dropout for styles); `note` says them in one line for the page.
@dataclass(frozen=True)
class _Preset:
    steps_per_image: int
    min_steps: int
    max_steps: int
    rank: int
    class_noun: str
    class_images_per_photo: int  # 0: no prior preservation
    note: str
    options: dict[str, Any] = field(default_factory=dict)  # other TrainConfig fields


_PRESETS: dict[str, _Preset] = {
    "person": _Preset(
        100, 500, 1600, rank=16, class_noun="person", class_images_per_photo=20,
        options=dict(pivotal_tuning=True, train_text_encoder=True, text_encoder_lr=5e-5),
        note="rank 16; pivotal tuning (the trigger word becomes 2 new tokens that start as the class "
        "noun) and a text-encoder LoRA at half the UNet's rate, since a face is a new identity the text "
        "side must learn too; prior preservation keeps other people looking like themselves.",
    ),
    "pet": _Preset(
        80, 400, 1200, rank=8, class_noun="dog", class_images_per_photo=15,
        options=dict(pivotal_tuning=True),
        note="rank 8; pivotal tuning (2 new tokens that start as the class noun) learns the animal's "
        "look in the text side while the UNet LoRA learns the details; prior preservation on the breed.",
    ),
    "object": _Preset(
        80, 400, 1200, rank=8, class_noun="object", class_images_per_photo=10,
        note="rank 8, plain LoRA with prior preservation: an object is mostly shape and texture, which "
        "the UNet LoRA learns; no flips, so lettering and logos stay the right way round.",
    ),
    # A style has no single class to preserve.
    "style": _Preset(
        100, 600, 2000, rank=16, class_noun="style", class_images_per_photo=0,
        options=dict(caption_dropout=0.1, random_flip=True),
        note="rank 16, no prior preservation (a style has no class); 10% caption dropout so the style "
        "sticks beyond the prompt's words, and random flips (a style looks the same mirrored).",
    ),
}  # fmt: skip


def preset_note(subject_type: str) -> str:
    """One line saying what the subject type's preset chooses and why (shown in the page)."""
    if subject_type not in _PRESETS:
        raise ValueError(f"subject_type: must be one of {', '.join(SUBJECT_TYPES)}, got {subject_type!r}")
    return f"{subject_type.capitalize()} preset: {_PRESETS[subject_type].note}"


def preset_config(
    subject_type: str,
    num_images: int,
    *,
    token: str = "sks",
    class_noun: str | None = None,
    **overrides: Any,
) -> TrainConfig:
    """A TrainConfig with steps, rank, learning rate, prior preservation and the preset's training
    options (`preset_note`) set for the subject."""
    if subject_type not in _PRESETS:
        raise ValueError(f"subject_type: must be one of {', '.join(SUBJECT_TYPES)}, got {subject_type!r}")
    if num_images < 1:
        raise ValueError(f"num_images: at least one photo is needed, got {num_images}")
    p = _PRESETS[subject_type]
    noun = class_noun or p.class_noun
    steps = max(p.min_steps, min(p.max_steps, p.steps_per_image * num_images))
    prior = p.class_images_per_photo > 0
    if subject_type == "style":
        instance_prompt, class_prompt = f"an image in the style of {token}", None
    else:
        instance_prompt, class_prompt = f"a photo of {token} {noun}", f"a photo of a {noun}"
    values: dict[str, Any] = dict(
        instance_prompt=instance_prompt,
        token=token,
        class_prompt=class_prompt,
        with_prior_preservation=prior,
        num_class_images=max(100, p.class_images_per_photo * num_images),
        prior_loss_weight=1.0,
        rank=p.rank,
        learning_rate=1e-4,
        max_train_steps=steps,
        checkpointing_steps=max(100, steps // 4),
        validation_steps=max(100, steps // 4),
        lr_scheduler="constant",
        **p.options,
    )
    values.update(overrides)
    return TrainConfig(**values)


def quick_try_settings(base_model: str) -> dict[str, Any]:
    """The "Quick try" preset's TrainConfig values on `base_model`. On tiny-shapes, the numbers
    measured to learn the demo subject (QUICK_TRY); on any other model a short run that shows the
    whole flow (150 steps, 25 class images)."""
    if base_model != "tiny-shapes":
        return dict(max_train_steps=150, num_class_images=25)
    return dict(
        num_class_images=QUICK_TRY["num_class_images"],
        class_generation_steps=QUICK_TRY["sampler_steps"],
        validation_inference_steps=QUICK_TRY["sampler_steps"],
        rank=QUICK_TRY["rank"],
        learning_rate=QUICK_TRY["learning_rate"],
        max_train_steps=QUICK_TRY["max_train_steps"],
        train_batch_size=QUICK_TRY["train_batch_size"],
    )


def quick_try_config(instance_dir: str, output_dir: str, **overrides: Any) -> TrainConfig:
    """The "Quick try" and `make demo` run: the built-in tiny-shapes model learns the demo subject
    (examples/make_subject_photos.py: one particular orange circle) as "sks circle", with prior
    preservation on "a photo of a circle", in about a minute on a CPU."""
    values: dict[str, Any] = dict(
        base_model="tiny-shapes",
        instance_dir=instance_dir,
        output_dir=output_dir,
        instance_prompt="a photo of sks circle",
        token="sks",
        class_prompt="a photo of a circle",
        with_prior_preservation=True,
        **quick_try_settings("tiny-shapes"),
        checkpointing_steps=0,
        num_validation_images=2,
        report_to="none",
    )
    values.update(overrides)
    return TrainConfig(**values)


# The quick try's numbers on tiny-shapes, also the flags of `make demo` (tested to agree). Measured
# on the shipped weights (docs/TINY_SHAPES.md): batch 4 (4 photos + 4 class images a step) at 2e-3
# for 300 steps learns the subject at seeds 0, 1 and 2; batch 1 at 1e-3 for 150 steps did not.
QUICK_TRY = dict(
    num_class_images=16, sampler_steps=20, rank=8, learning_rate=2e-3, max_train_steps=300, train_batch_size=4
)
