"""Scores that say when the subject is learned: the DreamBooth paper's metrics per validation round.

A scored round renders a fixed prompt set with fixed seeds: a few of the paper's recontextualisation
prompts ("a sks dog in the jungle", ...) and the class prompt without the token. From those images:
`dino` and `clip_i` (subject fidelity: DINO ViT-S/16 CLS and CLIP image embeddings of the scene
images against the instance photos), `clip_t` (prompt fidelity: each scene image against its prompt
without the token) and `pres` (prior preservation: DINO of the class-prompt images against the
photos; lower is better). Each is a mean of cosine similarities, stored with its count (`dino_n`,
...) as one line per step of `RUN_DIR/scores.jsonl`. `best_checkpoint` applies the stated rule.

Models: `auto` loads CLIP and DINO from the local Hugging Face cache (or the Hub when online) and
is off, with a one-line reason, when neither has them; `tiny` builds tiny random models offline
(saved once, loaded back through `from_pretrained`); `none` is off. Nothing here touches torch's
global random state, so scoring never changes a training run. torch is imported lazily: the page
can read scores and pick the best checkpoint without loading it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .events import Emit, StageStarted, TrainingError, no_emit

log = logging.getLogger(__name__)

CLIP_MODEL = "openai/clip-vit-large-patch14"
DINO_MODEL = "facebook/dino-vits16"
SCORES_FILE = "scores.jsonl"
METRICS = ("dino", "clip_i", "clip_t", "pres")
# The DreamBooth paper's recontextualisation prompts (its dataset's prompt list); the first
# `num_eval_prompts` are used, so rounds and runs with the same setting compare.
RECONTEXT_PROMPTS = (
    "a {subject} in the jungle",
    "a {subject} in the snow",
    "a {subject} on the beach",
    "a {subject} on a cobblestone street",
    "a {subject} on top of pink fabric",
    "a {subject} on top of a wooden floor",
    "a {subject} with a city in the background",
    "a {subject} with a mountain in the background",
    "a {subject} with a blue house in the background",
    "a {subject} on top of a purple rug in a forest",
)


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalModels:
    """CLIP (model, tokenizer, image processor) and DINO (ViTModel, image processor), loaded."""

    clip: Any
    clip_tokenizer: Any
    clip_processor: Any
    dino: Any
    dino_processor: Any
    label: str  # "tiny" or the two model ids

    @property
    def device(self):
        return next(self.clip.parameters()).device

    def to(self, device) -> EvalModels:
        self.clip.to(device)
        self.dino.to(device)
        return self

    def dino_embeddings(self, images: Sequence) -> Any:
        """(n, dim) unit vectors: the CLS token of DINO's last layer, as the paper uses it."""
        import torch

        pixels = self.dino_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            cls = self.dino(pixel_values=pixels.to(self.device, self.dino.dtype)).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1)

    def clip_image_embeddings(self, images: Sequence) -> Any:
        """(n, projection) unit vectors: CLIP's projected image embeddings."""
        import torch

        pixels = self.clip_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype))
        return torch.nn.functional.normalize(_features(out).float(), dim=-1)

    def clip_text_embeddings(self, texts: Sequence[str]) -> Any:
        """(n, projection) unit vectors: CLIP's projected text embeddings."""
        import torch

        tokens = self.clip_tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.clip_tokenizer.model_max_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = self.clip.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return torch.nn.functional.normalize(_features(out).float(), dim=-1)


def _features(out):
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
    return getattr(out, "pooler_output", out)


def tiny_eval_models_dir() -> Path:
    """The cached folder of the tiny random CLIP (`clip/`) and DINO (`dino/`) models, built on first
    use under a file lock (like tiny-sd15)."""
    import fcntl

    from .components import studio_home

    path = studio_home() / "models" / "tiny-eval"
    if _is_model_pair(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".tiny-eval.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_model_pair(path):
                log.info("building the tiny evaluation models in %s", path)
                make_tiny_eval_models(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _is_model_pair(path: Path) -> bool:
    return (path / "clip" / "config.json").is_file() and (path / "dino" / "config.json").is_file()


def make_tiny_eval_models(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random CLIP and a tiny random DINO (ViTModel) with their processors, offline.

    Same classes and file layout as openai/clip-vit-large-patch14 and facebook/dino-vits16 at toy
    widths (32-pixel inputs, 2 layers). Built inside a forked RNG: the caller's random stream is
    untouched.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    from .components import build_tiny_tokenizer
    from .fileio import atomic_directory

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(
            CLIPConfig(
                text_config=dict(
                    vocab_size=len(tokenizer),
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    max_position_embeddings=77,
                    bos_token_id=0,
                    eos_token_id=1,
                    pad_token_id=1,
                ),
                vision_config=dict(
                    image_size=32,
                    patch_size=8,
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                ),
                projection_dim=16,
            )
        )
        torch.manual_seed(seed + 1)
        dino = ViTModel(
            ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=2,
            ),
            add_pooling_layer=False,
        )
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        clip.save_pretrained(tmp / "clip")
        tokenizer.save_pretrained(tmp / "clip")
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            tmp / "clip"
        )
        dino.save_pretrained(tmp / "dino")
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp / "dino")
        (tmp / "dreambooth_studio.json").write_text(json.dumps({"tiny": True, "kind": "eval"}) + "\n")
    return out


def _load_pair(clip_loc: str, dino_loc: str, *, local_only: bool, label: str) -> EvalModels:
    import torch
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer, ViTModel

    kw: dict[str, Any] = dict(local_files_only=local_only)
    # PIL image processors, named explicitly: transformers' default backend is torchvision, which has
    # no CPU build here and which this project does not install.
    pil = dict(kw, backend="pil")
    with torch.random.fork_rng(devices=[]):  # weights a file lacks (a pooler) are drawn at random
        return EvalModels(
            clip=CLIPModel.from_pretrained(clip_loc, **kw).eval(),
            clip_tokenizer=CLIPTokenizer.from_pretrained(clip_loc, **kw),
            clip_processor=AutoImageProcessor.from_pretrained(clip_loc, **pil),
            dino=ViTModel.from_pretrained(dino_loc, add_pooling_layer=False, **kw).eval(),
            dino_processor=AutoImageProcessor.from_pretrained(dino_loc, **pil),
            label=label,
        )


def load_eval_models(spec: str) -> tuple[EvalModels | None, str]:
    """(models, "") for `spec` (auto, tiny, none), or (None, why scores are off) in one sentence."""
    from .components import _hub_offline, _hub_reachable

    if spec == "none":
        return None, "Scores are off (eval_models is none)."
    if spec == "tiny":
        folder = tiny_eval_models_dir()
        return _load_pair(str(folder / "clip"), str(folder / "dino"), local_only=True, label="tiny"), ""
    if spec != "auto":
        raise ValueError(f"eval_models: must be one of auto, tiny, none, got {spec!r}")
    label = f"{CLIP_MODEL} + {DINO_MODEL}"
    try:
        return _load_pair(CLIP_MODEL, DINO_MODEL, local_only=True, label=label), ""
    except (OSError, ValueError) as e:
        if _hub_offline() or not _hub_reachable():
            return None, (
                f"Scores are off: the CLIP and DINO models ({CLIP_MODEL}, {DINO_MODEL}) are not in the "
                "local Hugging Face cache and the Hub cannot be reached; download them once, or use "
                "--eval-models tiny to try the scoring offline."
            )
        log.info("downloading the evaluation models (%s): %s", label, type(e).__name__)
    try:
        return _load_pair(CLIP_MODEL, DINO_MODEL, local_only=False, label=label), ""
    except (OSError, ValueError) as e:
        return None, f"Scores are off: the CLIP and DINO models could not be downloaded ({_first_line(e)})."


def eval_status(spec: str) -> tuple[bool, str]:
    """(on, one line for the page) for `spec`, without loading anything (no torch): whether a
    training run's rounds will be scored and with what."""
    if spec == "none":
        return False, "Scores are off (eval_models is none)."
    if spec == "tiny":
        return True, "Scores use tiny random models: they try the flow and say nothing about the subject."
    from huggingface_hub import try_to_load_from_cache

    if all(isinstance(try_to_load_from_cache(m, "config.json"), str) for m in (CLIP_MODEL, DINO_MODEL)):
        return True, f"Scores use {CLIP_MODEL} and {DINO_MODEL} from the local Hugging Face cache."
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, (
            f"Scores are off: {CLIP_MODEL} and {DINO_MODEL} are not in the local Hugging Face cache "
            "and the Hub is off (HF_HUB_OFFLINE)."
        )
    return (
        True,
        f"Scores will download {CLIP_MODEL} and {DINO_MODEL} at the first round (off if the Hub is unreachable).",
    )


# One loaded pair per process (the run being trained or scored); a new spec replaces it.
_LOADED: dict[str, tuple[EvalModels | None, str]] = {}


def eval_models_for(spec: str) -> tuple[EvalModels | None, str]:
    """`load_eval_models`, kept for the next round; the reason for `off` is logged once per spec."""
    if spec not in _LOADED:
        _LOADED.clear()
        _LOADED[spec] = load_eval_models(spec)
        if _LOADED[spec][1]:
            log.warning("%s", _LOADED[spec][1])
    return _LOADED[spec]


def release_eval_models() -> None:
    """Drop the loaded evaluation models (the app calls this when a run ends to free memory)."""
    _LOADED.clear()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


# ---------------------------------------------------------------------------------------------
# Prompts and scores
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundPrompts:
    scene: list[str]  # with the token: what is rendered
    scene_plain: list[str]  # the same without the token: what CLIP-T compares against
    class_prompt: str | None  # the class prompt without the token (for PRES), None when there is none


def round_prompts(config) -> RoundPrompts:
    """The fixed prompt set of a scored round: `num_eval_prompts` recontextualisation prompts around
    the subject ("sks dog": the token and the words after it in the instance prompt) and the class prompt."""
    token = config.identifier_token
    words = config.instance_prompt.split()
    lowered = [w.strip(",.").lower() for w in words]
    if token and token.lower() in lowered:
        subject = " ".join(words[lowered.index(token.lower()) :]).strip(",.")
    else:
        subject = config.instance_prompt.strip()
    scene = [
        RECONTEXT_PROMPTS[i % len(RECONTEXT_PROMPTS)].format(subject=subject)
        for i in range(config.num_eval_prompts)
    ]
    plain = [config.prompt_without_token(p) or p for p in scene]
    class_prompt = config.class_prompt or config.prompt_without_token(config.instance_prompt)
    return RoundPrompts(scene, plain, class_prompt if config.num_eval_class_images else None)


def mean_cosine(a, b) -> tuple[float, int]:
    """Mean of every pairwise cosine similarity between rows of unit vectors `a` and `b`, and the count."""
    sims = a @ b.T
    return _cosine(sims.mean()), int(sims.numel())


def _cosine(value) -> float:
    # Unit vectors in float32 can give 1.0000001; a cosine is reported in [-1, 1].
    return min(1.0, max(-1.0, float(value)))


def score_images(
    models: EvalModels,
    scene_images: Sequence,
    scene_texts: Sequence[str],
    class_images: Sequence,
    instance_images: Sequence,
) -> dict[str, Any]:
    """The four scores of one round (each a mean of cosine similarities) with their counts.

    dino / clip_i: every scene image against every instance photo; clip_t: each scene image against
    its own prompt (without the token); pres: every class image against every photo (DINO), None
    without class images.
    """
    if len(scene_images) != len(scene_texts):
        raise ValueError("scene_texts: one prompt per scene image is needed")
    instance_dino = models.dino_embeddings(instance_images)
    instance_clip = models.clip_image_embeddings(instance_images)
    scene_clip = models.clip_image_embeddings(scene_images)
    row: dict[str, Any] = {}
    row["dino"], row["dino_n"] = mean_cosine(models.dino_embeddings(scene_images), instance_dino)
    row["clip_i"], row["clip_i_n"] = mean_cosine(scene_clip, instance_clip)
    text_clip = models.clip_text_embeddings(scene_texts)
    row["clip_t"], row["clip_t_n"] = _cosine((scene_clip * text_clip).sum(-1).mean()), len(scene_texts)
    row["pres"], row["pres_n"] = None, 0
    if class_images:
        row["pres"], row["pres_n"] = mean_cosine(models.dino_embeddings(class_images), instance_dino)
    return row


def _render(
    pipe, prompts: list[str], seeds: list[int], *, steps: int, resolution: int, autocast=None
) -> list:
    """One image per prompt, each from its own CPU generator (so a seed gives the same image in any
    round). With `autocast` (mixed precision) the pipeline stops at latents and the VAE decodes them
    in its own dtype outside autocast, as validation does (SDXL's VAE overflows in half precision)."""
    import torch

    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        kwargs = dict(
            num_inference_steps=steps,
            height=resolution,
            width=resolution,
            generator=torch.Generator().manual_seed(seed),
        )
        if autocast is None:
            images.append(pipe(prompt, **kwargs).images[0])
            continue
        with autocast():
            latents = pipe(prompt, output_type="latent", **kwargs).images
        vae = pipe.vae
        latents = latents.to(vae.device, torch.float32) / vae.config.scaling_factor
        pixels = vae.decode(latents.to(next(vae.parameters()).dtype)).sample
        images.append(pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0])
    return images


def instance_images(config) -> list:
    from .data import list_images, load_rgb

    folder = Path(config.instance_dir)
    paths = list_images(folder) if folder.is_dir() else []
    if not paths:
        raise TrainingError(
            f"Cannot score: the subject's photos are no longer in {config.instance_dir}; put them back."
        )
    return [load_rgb(p) for p in paths]


def score_round(
    config,
    step: int,
    pipe,
    run_dir: str | Path,
    *,
    resolution: int | None = None,
    autocast: Callable[[], Any] | None = None,
    emit: Emit = no_emit,
    source: str = "validation",
    write: bool = True,
) -> dict[str, Any] | None:
    """Score the pipeline's current weights at `step`: render the round's prompts, compare, and
    (with `write`) append the row to RUN_DIR/scores.jsonl. None when scores are off.

    Runs inside a forked RNG, so the caller's random stream (training's) is as it was.
    """
    import torch

    models, why = eval_models_for(config.eval_models)
    if models is None:
        return None
    emit(StageStarted("evaluate", f"scoring step {step}"))
    t0 = time.perf_counter()
    device = pipe.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        prompts = round_prompts(config)
        resolution = resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        seeds = [config.seed + i for i in range(len(prompts.scene))]
        scene = _render(
            pipe,
            [config.with_pivotal_tokens(p) for p in prompts.scene],  # pivotal tuning: "<s0><s1> dog"
            seeds,
            steps=config.validation_inference_steps,
            resolution=resolution,
            autocast=autocast,
        )
        klass = []
        if prompts.class_prompt:
            n = config.num_eval_class_images
            klass = _render(
                pipe,
                [prompts.class_prompt] * n,
                [config.seed + i for i in range(n)],
                steps=config.validation_inference_steps,
                resolution=resolution,
                autocast=autocast,
            )
        models.to(device)
        try:
            row = score_images(models, scene, prompts.scene_plain, klass, instance_images(config))
        finally:
            models.to("cpu")
    row = {"step": int(step), **row, "source": source, "eval_models": models.label}
    row["seconds"] = round(time.perf_counter() - t0, 3)
    if write:
        run_dir = Path(run_dir)
        images_dir = run_dir / "eval" / f"step-{step:06d}"
        images_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(scene):
            image.save(images_dir / f"scene-{i}.png")
        for i, image in enumerate(klass):
            image.save(images_dir / f"class-{i}.png")
        from .fileio import append_jsonl

        append_jsonl(run_dir / SCORES_FILE, row)
    return row


# ---------------------------------------------------------------------------------------------
# The best checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BestRule:
    """Highest `metric` among the steps whose CLIP-T stays within `clip_t_tolerance` (a fraction)
    below the earliest round's and whose PRES rises at most `pres_tolerance` above it."""

    metric: str = "dino"
    clip_t_tolerance: float = 0.1
    pres_tolerance: float = 0.1

    @classmethod
    def from_config(cls, config: Any) -> BestRule:
        """From a TrainConfig or a run's config.json dict (older runs without the keys get defaults)."""
        get = config.get if isinstance(config, dict) else lambda k, d: getattr(config, k, d)
        return cls(
            metric=get("best_metric", cls.metric),
            clip_t_tolerance=float(get("best_clip_t_tolerance", cls.clip_t_tolerance)),
            pres_tolerance=float(get("best_pres_tolerance", cls.pres_tolerance)),
        )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def best_checkpoint(
    scores: Sequence[dict[str, Any]], rule: BestRule = BestRule(), steps: Sequence[int] | None = None
) -> dict[str, Any] | None:
    """The best scored step by `rule`: {step, metric, value, scores, reason, rule}; None when no row
    has a finite `rule.metric`. `steps` limits the candidates (e.g. to checkpoints still on disk);
    the reference stays the earliest scored round.

    The earliest round always passes its own bounds, so with any candidate there is an answer.
    """
    rows = sorted((r for r in scores if _finite(r.get(rule.metric))), key=lambda r: r["step"])
    if not rows:
        return None
    first = rows[0]
    clip_t_floor = pres_ceiling = None
    if _finite(first.get("clip_t")):
        clip_t_floor = first["clip_t"] - rule.clip_t_tolerance * abs(first["clip_t"])
    if _finite(first.get("pres")):
        pres_ceiling = first["pres"] + rule.pres_tolerance * abs(first["pres"])

    def passes(r: dict[str, Any]) -> bool:
        lost_prompt = clip_t_floor is not None and _finite(r.get("clip_t")) and r["clip_t"] < clip_t_floor
        lost_class = pres_ceiling is not None and _finite(r.get("pres")) and r["pres"] > pres_ceiling
        return not (lost_prompt or lost_class)

    candidates = [r for r in rows if steps is None or r["step"] in set(steps)]
    passing = [r for r in candidates if passes(r)]
    if not passing:
        return None
    # Ties go to the earlier step: less training, same fidelity.
    best = max(passing, key=lambda r: (r[rule.metric], -r["step"]))
    reason = (
        f"highest {rule.metric} ({best[rule.metric]:.3f}) among {len(passing)} of {len(candidates)} scored "
        f"steps whose CLIP-T stayed within {rule.clip_t_tolerance:.0%} of step {first['step']}'s"
        f" and whose PRES rose at most {rule.pres_tolerance:.0%}"
    )
    return {
        "step": best["step"],
        "metric": rule.metric,
        "value": best[rule.metric],
        "scores": {k: best.get(k) for k in METRICS},
        "reason": reason,
        "rule": asdict(rule),
    }


def best_checkpoint_for_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's best checkpoint among those still on disk (rule from its config), with `path`."""
    from . import runs

    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    saved = _saved_checkpoints(run_dir / "checkpoints")
    best = best_checkpoint(runs.read_scores(run_dir), BestRule.from_config(config), steps=list(saved))
    if best is not None:
        best["path"] = str(saved[best["step"]])
    return best


def _saved_checkpoints(checkpoints_dir: Path) -> dict[int, Path]:
    """{step: folder} of complete checkpoints (torch-free: the page calls this)."""
    from .checkpoints import list_checkpoints

    return dict(list_checkpoints(checkpoints_dir))


# ---------------------------------------------------------------------------------------------
# After training: score checkpoints, export one as an adapter
# ---------------------------------------------------------------------------------------------


def _run_config(run_dir: Path):
    from .config import TrainConfig

    try:
        return TrainConfig.load(run_dir / "config.json")
    except OSError:
        raise ValueError(f"run_dir: {run_dir} is not a run folder (no readable config.json)") from None


def _base_pipeline(config):
    """The run's base model as a validation pipeline (DPM-Solver), on the default device."""
    from diffusers import DPMSolverMultistepScheduler

    from .components import assemble_pipeline, load_components, load_vae
    from .inference import default_device

    parts, _ = load_components(config.base_model, single_file_config=config.single_file_config)
    if config.pretrained_vae:
        parts["vae"] = load_vae(config.pretrained_vae)
    pipe = assemble_pipeline(parts, DPMSolverMultistepScheduler.from_config(parts["scheduler"].config))
    return pipe.to(default_device())


def score_checkpoints(
    run_dir: str | Path, eval_models: str | None = None, emit: Emit = no_emit
) -> list[dict]:
    """Score every saved checkpoint of a run (its LoRA on the run's base model, the round's prompts
    and seeds) and write them into RUN_DIR/scores.jsonl, replacing earlier rows of the same steps.

    Raises TrainingError (one sentence) when scores are off, or the run has no checkpoint.
    """
    import dataclasses

    from . import runs
    from .checkpoints import list_checkpoints
    from .fileio import atomic_write_text
    from .inference import describe_adapter, load_adapter, load_embeddings, unload_embeddings

    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    if eval_models is not None:
        config = dataclasses.replace(config, eval_models=eval_models)
    saved = list_checkpoints(run_dir / "checkpoints")
    if not saved:
        raise TrainingError(f"The run {run_dir.name} has no saved checkpoint to score.")
    models, why = eval_models_for(config.eval_models)
    if models is None:
        raise TrainingError(why)
    instance_images(config)  # fail before loading the base model when the photos are gone
    emit(StageStarted("load", f"loading {config.base_model}"))
    pipe = _base_pipeline(config)
    rows = []
    for step, path in saved:
        source = describe_adapter(path)
        load_adapter(pipe, source)
        pipe.set_adapters([source.pipeline_name])
        if source.embeddings is not None:  # pivotal tuning: its tokens, as training wrote the prompts
            load_embeddings(pipe, source, source.pivotal_tokens)
        try:
            rows.append(score_round(config, step, pipe, run_dir, emit=emit, source="checkpoint", write=False))
        finally:
            if source.embeddings is not None:
                unload_embeddings(pipe, source.pivotal_tokens)
            pipe.delete_adapters(source.pipeline_name)
    scored = {r["step"] for r in rows}
    kept = [r for r in runs.read_scores(run_dir) if r["step"] not in scored]
    merged = sorted(kept + rows, key=lambda r: r["step"])
    atomic_write_text(run_dir / SCORES_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in merged))
    return rows


def export_checkpoint(run_dir: str | Path, step: int, out: str | Path) -> Path:
    """A complete adapter folder (as training's final adapter) from checkpoint `step` of a run.

    The LoRA goes through the same load path as generation (checkpoint -> pipeline) and is written
    by `adapters.save_adapter`; metadata, config, metrics up to `step`, that step's samples and
    scores come from the run. An existing `out` is not overwritten.
    """
    import tempfile

    from . import runs
    from .adapters import default_adapter_name, save_adapter
    from .checkpoints import list_checkpoints
    from .components import assemble_pipeline, default_resolution, load_components
    from .inference import describe_adapter, load_adapter
    from .pivotal import read_file

    run_dir, out = Path(run_dir), Path(out)
    config = _run_config(run_dir)
    saved = dict(list_checkpoints(run_dir / "checkpoints"))
    if step not in saved:
        have = ", ".join(str(s) for s in saved) or "none"
        raise ValueError(
            f"step: the run {run_dir.name} has no checkpoint at step {step} (saved steps: {have})"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {out} already exists; give a new folder")
    parts, _ = load_components(config.base_model, single_file_config=config.single_file_config)
    pipe = assemble_pipeline(parts)
    source = describe_adapter(saved[step])
    load_adapter(pipe, source)
    metrics = [r for r in runs.read_metrics(run_dir) if r.get("step", 0) <= step]
    at_step = metrics[-1] if metrics and metrics[-1].get("step") == step else {}
    scores = {r["step"]: r for r in runs.read_scores(run_dir)}.get(step)
    metadata = {
        "base_model": config.base_model,
        "instance_prompt": config.instance_prompt,
        "token": config.identifier_token,
        "class_prompt": config.class_prompt,
        "with_prior_preservation": config.with_prior_preservation,
        "steps": step,
        "resolution": config.resolution or default_resolution(pipe.unet, pipe.vae),
        "final_loss": at_step.get("loss"),
        "final_instance_loss": at_step.get("instance_loss"),
        "final_prior_loss": at_step.get("prior_loss"),
        "exported_from": str(saved[step]),
        "scores": {k: scores.get(k) for k in METRICS} if scores else None,
    }
    name = f"{config.adapter_name or default_adapter_name(config.instance_prompt)}-step{step}"
    samples = run_dir / "samples" / f"step-{step:06d}"
    if out.is_dir():
        out.rmdir()  # empty: replaced atomically by the finished folder
    with tempfile.TemporaryDirectory(prefix="export-metrics-") as tmp:
        metrics_file = Path(tmp) / "metrics.jsonl"
        metrics_file.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in metrics))
        pipe.set_adapters([source.pipeline_name])
        return save_adapter(
            out,
            unet=pipe.unet,
            text_encoder=pipe.text_encoder,
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
            name=name,
            metadata=metadata,
            config_json=config.to_json(),
            metrics_file=metrics_file,
            samples_dir=samples if samples.is_dir() else None,
            peft_adapter=source.pipeline_name,
            replace=False,
            token_embeddings=read_file(source.embeddings) if source.embeddings else None,
            pivotal_tokens=source.pivotal_tokens,
        )
