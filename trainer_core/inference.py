"""Image generation: one resident base pipeline, saved adapters hot-swapped in place, blends, comparisons.

The pipeline is built from the same loaded parts as training (`components.load_components` +
`assemble_pipeline`, so every base-model source and architecture works) and stays loaded. Adapters
are loaded once each by name with `load_lora_weights(..., adapter_name=...)` and switched with
`set_adapters` (weights, blends) or `disable_lora` (the plain base), so switching subject touches no
base weights; the least recently used adapters are unloaded with `delete_adapters` beyond a cap.
Training checkpoints (`checkpoint-N`) load as adapters too. `Generator` is what the CLI and the app use.

An adapter trained with pivotal tuning brings new token embeddings: while it is active they are
loaded (diffusers' `load_textual_inversion`) under tokens of its own, so two such adapters blend,
and the prompt's trigger word (or the trained tokens, "<s0><s1>") is rewritten to them; when it is
swapped out they are unloaded again (`unload_textual_inversion`), leaving the tokenizers and text
encoders as they were.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import math
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .events import TrainingError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# adapters.LORA_WEIGHT_NAME, repeated so that importing this module stays free of torch (the UI
# imports GenerateRequest at module level; torch loads on the first generation).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"  # checkpoints.EMBEDDINGS_FILE, for the same reason

SCHEDULERS = ("dpm++", "euler_a", "ddim")
ARCHITECTURE_LABELS = {"sd15": "SD 1.5", "sdxl": "SDXL"}
MAX_IMAGES_PER_REQUEST = 16

# Called after each sampler step with (steps done, steps in all): how a caller draws its own progress
# (the page's bar, a CLI line); the engine shows none itself.
StepCallback = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: the base model, the prompt and sampler settings, and the adapters to apply."""

    base_model: str
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int = 0
    num_images: int = 1
    scheduler: str = "dpm++"  # dpm++ | euler_a | ddim
    adapters: tuple[tuple[str, float], ...] = ()  # (adapter folder, weight); empty: the plain base
    single_file_config: str | None = None

    def __post_init__(self) -> None:
        if not str(self.base_model).strip():
            raise ValueError("base_model: give a Hub id, a local folder, a .safetensors file or tiny-sd15")
        if not self.prompt or not self.prompt.strip():
            raise ValueError("prompt: must contain text")
        if not 1 <= int(self.steps) <= 1000:
            raise ValueError(f"steps: must be between 1 and 1000, got {self.steps}")
        if not 0 <= float(self.guidance) <= 50:
            raise ValueError(f"guidance: must be between 0 and 50, got {self.guidance}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (int(value) < 8 or int(value) % 8):
                raise ValueError(f"{name}: must be a positive multiple of 8, got {value}")
        if not 1 <= int(self.num_images) <= MAX_IMAGES_PER_REQUEST:
            raise ValueError(
                f"num_images: must be between 1 and {MAX_IMAGES_PER_REQUEST}, got {self.num_images}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        # Callers (the app, JSON) hand lists; keep a hashable, normalised tuple of (str, float).
        try:
            adapters = tuple((str(path), float(weight)) for path, weight in self.adapters)
        except (TypeError, ValueError):
            raise ValueError("adapters: expected (adapter folder, weight) pairs") from None
        if not all(math.isfinite(w) for _, w in adapters):
            raise ValueError("adapters: weights must be finite numbers")
        paths = [p for p, _ in adapters]
        if len(set(paths)) != len(paths):
            raise ValueError("adapters: the same adapter is listed twice; give it one weight")
        object.__setattr__(self, "adapters", adapters)


# ---------------------------------------------------------------------------------------------
# Pipeline and scheduler
# ---------------------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    base_model: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    scheduler: str = "dpm++",
    single_file_config: str | None = None,
):
    """A text-to-image pipeline for `base_model`: fp16 on CUDA, fp32 on the CPU, progress bars off."""
    import torch

    from .components import assemble_pipeline, load_components

    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    parts, _source = load_components(base_model, dtype=dtype, single_file_config=single_file_config)
    pipe = assemble_pipeline(parts, make_scheduler(scheduler, parts["scheduler"].config))
    return pipe.to(device)


def make_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    raise ValueError(f"scheduler: must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def pipeline_architecture(pipe) -> str:
    """ "sdxl" or "sd15" (components.architecture: one rule for parts, pipelines and UNets)."""
    from .components import architecture

    return architecture(pipe)


def native_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def generate(
    pipe,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    on_step: StepCallback | None = None,
):
    """Images for `prompt` with whatever adapters are active; same seed and settings, same images.

    The noise comes from a CPU generator, so a seed gives the same start on every device. `on_step`
    hears each finished sampler step (it cannot change the images).
    """
    import torch

    if not prompt or not prompt.strip():
        raise ValueError("prompt: must contain text")
    size = native_size(pipe)
    width, height = width or size, height or size
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise ValueError(f"{name}: must be a multiple of 8, got {value}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    extra = {}
    if on_step is not None:

        def step_end(pipe, step: int, _timestep, callback_kwargs: dict) -> dict:
            on_step(step + 1, pipe.num_timesteps)  # the scheduler's count: what the loop really runs
            return callback_kwargs

        extra["callback_on_step_end"] = step_end
    with torch.inference_mode():
        return pipe(
            prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            num_images_per_prompt=num_images,
            generator=generator,
            **extra,
        ).images


# ---------------------------------------------------------------------------------------------
# Adapter sources: a finished adapter folder or a training checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSource:
    """What one adapter path holds, and the name it gets inside a pipeline."""

    path: Path  # resolved
    kind: str  # "adapter" (an adapter folder) or "checkpoint" (checkpoint-N of a run)
    label: str  # for people: the adapter's name, or "step N"
    architecture: str | None  # None: not recorded (a bare LoRA folder)
    version: tuple[int, int]  # (mtime_ns, size) of the weights: a retrained folder reloads
    pipeline_name: str  # the adapter_name inside the pipeline: unique per path, no dots (peft keys)
    # pivotal tuning: the token embeddings file and the tokens it was trained as; the trigger word
    # (a plain LoRA's too, when its adapter.json names it)
    embeddings: Path | None = None
    pivotal_tokens: tuple[str, ...] = ()
    trigger: str | None = None


def describe_adapter(path: str | Path) -> AdapterSource:
    """Identify an adapter folder or checkpoint folder; a TrainingError in one sentence otherwise."""
    from .adapters import read_adapter, sanitize_name
    from .checkpoints import read_state

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise TrainingError(f"The adapter folder {path} does not exist.")
    folder = folder.resolve()
    weights = folder / LORA_WEIGHT_NAME
    embeddings, pivotal = None, {}
    if weights.is_file():
        info = read_adapter(folder) if (folder / "adapter.json").exists() else {}
        kind, label, arch = "adapter", str(info.get("name") or folder.name), info.get("architecture")
        name = (info.get("files") or {}).get("embeddings")
        if name and info.get("pivotal_tokens"):
            embeddings = folder / name
            pivotal = {"tokens": info["pivotal_tokens"], "trigger": info.get("token")}
        else:
            pivotal = {"trigger": info.get("token")}  # a plain LoRA's trigger word, to keep in prompts
    elif (folder / "lora.safetensors").is_file() and read_state(folder) is not None:
        weights = folder / "lora.safetensors"
        state = read_state(folder) or {}
        kind, label, arch = "checkpoint", f"step {state.get('step', '?')}", state.get("architecture")
        if state.get("pivotal") and (folder / EMBEDDINGS_FILE).is_file():
            embeddings, pivotal = folder / EMBEDDINGS_FILE, state["pivotal"]
    else:
        raise TrainingError(
            f"{folder} is not an adapter folder (no {LORA_WEIGHT_NAME}) nor a training checkpoint "
            "(no lora.safetensors + state.json)."
        )
    stat = weights.stat()
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    base = sanitize_name(label if kind == "adapter" else folder.name).replace(".", "_")
    return AdapterSource(
        path=folder,
        kind=kind,
        label=label,
        architecture=arch,
        version=(stat.st_mtime_ns, stat.st_size),
        pipeline_name=f"{base}-{digest}",
        embeddings=embeddings,
        pivotal_tokens=tuple(pivotal.get("tokens") or ()),
        trigger=pivotal.get("trigger"),
    )


def check_architecture(source: AdapterSource, pipe_architecture: str, base_model: str) -> None:
    if source.architecture is not None and source.architecture != pipe_architecture:
        theirs = ARCHITECTURE_LABELS.get(source.architecture, source.architecture)
        ours = ARCHITECTURE_LABELS.get(pipe_architecture, pipe_architecture)
        raise TrainingError(
            f"The adapter {source.label} was trained for {theirs} and cannot be used with the {ours} "
            f"base model {base_model}; pick a base model of the same architecture."
        )


def load_adapter(pipe, source: AdapterSource) -> None:
    """Load `source` into `pipe` under `source.pipeline_name` (adapter folder or checkpoint)."""
    from safetensors import SafetensorError

    try:
        if source.kind == "adapter":
            pipe.load_lora_weights(
                str(source.path), weight_name=LORA_WEIGHT_NAME, adapter_name=source.pipeline_name
            )
        else:
            with tempfile.TemporaryDirectory(prefix="checkpoint-lora-") as tmp:
                _checkpoint_as_lora_file(pipe, source.path, Path(tmp))
                pipe.load_lora_weights(tmp, weight_name=LORA_WEIGHT_NAME, adapter_name=source.pipeline_name)
    except (ValueError, RuntimeError, KeyError, OSError, SafetensorError) as e:
        _drop_partial(pipe, source.pipeline_name)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(
            f"Could not load the adapter {source.label} from {source.path}: {first[:300]}"
        ) from e


def _text_encoder_pairs(pipe) -> list[tuple[str, Any, Any]]:
    """(component, text encoder, tokenizer) of the pipeline: one for SD 1.5, two for SDXL."""
    pairs = [("text_encoder", pipe.text_encoder, pipe.tokenizer)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append(("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2))
    return pairs


def load_embeddings(pipe, source: AdapterSource, tokens: Sequence[str]) -> None:
    """Load a pivotal-tuning adapter's token embeddings into the pipeline under `tokens` (one per
    trained token), through diffusers' own `load_textual_inversion`, one text encoder at a time."""
    from .pivotal import pool_at_end_token, read_file

    rows = read_file(source.embeddings)
    pairs = _text_encoder_pairs(pipe)
    if {name for name, _, _ in pairs} != set(rows):
        raise TrainingError(
            f"The token embeddings of {source.label} are for other text encoders than this pipeline's."
        )
    loaded = []
    try:
        for name, text_encoder, tokenizer in pairs:
            if rows[name].shape[0] != len(tokens):
                raise ValueError(f"{rows[name].shape[0]} embeddings for {len(tokens)} tokens")
            pipe.load_textual_inversion(
                rows[name], token=list(tokens), text_encoder=text_encoder, tokenizer=tokenizer
            )
            pool_at_end_token(tokenizer, text_encoder)
            loaded.append((text_encoder, tokenizer))
    except (ValueError, RuntimeError) as e:
        for text_encoder, tokenizer in loaded:
            pipe.unload_textual_inversion(list(tokens), tokenizer=tokenizer, text_encoder=text_encoder)
        raise TrainingError(f"Could not load the token embeddings of {source.label}: {e}") from e


def unload_embeddings(pipe, tokens: Sequence[str]) -> None:
    """Remove tokens loaded by `load_embeddings` from every tokenizer and text encoder."""
    for _, text_encoder, tokenizer in _text_encoder_pairs(pipe):
        pipe.unload_textual_inversion(list(tokens), tokenizer=tokenizer, text_encoder=text_encoder)


def rewrite_prompt(
    prompt: str, active: Sequence[tuple[AdapterSource, Sequence[str]]], keep: Iterable[str] = ()
) -> str:
    """`prompt` with each active pivotal adapter's trigger word, and the tokens it was trained as, set
    to the tokens it is loaded under. Adapters that share a trigger (the presets all use "sks") or
    trained tokens each get theirs there, one after another in the order given (the request's). A
    trigger in `keep` (an active plain LoRA's, trained on the word itself) stays after the tokens."""
    keep = {word.lower() for word in keep}
    from .config import replace_word

    by_trigger: dict[str, str] = {}
    by_trained: dict[str, str] = {}
    for source, tokens in active:
        joined = "".join(tokens)
        if source.trigger:
            key = source.trigger.lower()
            by_trigger[key] = by_trigger.get(key, "") + joined
        trained = "".join(source.pivotal_tokens)
        if trained:
            by_trained[trained] = by_trained.get(trained, "") + joined
    for trigger, joined in by_trigger.items():
        prompt = replace_word(prompt, trigger, f"{joined} {trigger}" if trigger in keep else joined)
    for trained, joined in by_trained.items():
        if trained != joined:
            prompt = prompt.replace(trained, joined)
    return prompt


def _drop_partial(pipe, name: str) -> None:
    """A failed load may leave layers of the adapter in some components; remove them."""
    try:
        if any(name in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(name)
    except (ValueError, KeyError):
        pass


def _checkpoint_as_lora_file(pipe, checkpoint: Path, out: Path) -> None:
    """Write a checkpoint's LoRA state (peft keys per component) as a diffusers LoRA file.

    The checkpoint holds `unet.<peft key>` / `text_encoder.<peft key>` tensors; the pipeline's own
    `save_lora_weights` writes them with each component's LoraConfig (rank, alpha, targets) as
    metadata, which `load_lora_weights` needs to scale the update by alpha / rank.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from safetensors.torch import load_file

    from .adapters import text_encoder_dora_keys
    from .checkpoints import read_state, split_components

    state = read_state(checkpoint) or {}
    parts = split_components(load_file(str(checkpoint / "lora.safetensors")))
    rank, alpha = int(state.get("rank", 0)), float(state.get("alpha", 0))
    kwargs: dict[str, Any] = {}
    components = sorted(parts)
    for component, part in parts.items():
        modules = sorted({k.rpartition(".lora_")[0] for k in part})
        r = rank or int(next(v for k, v in part.items() if k.endswith("lora_A.weight")).shape[0])
        dora = any(k.endswith(".lora_magnitude_vector") for k in part)
        config = LoraConfig(r=r, lora_alpha=alpha or r, target_modules=modules, use_dora=dora)
        layers = convert_state_dict_to_diffusers(part)
        kwargs[f"{component}_lora_layers"] = layers if component == "unet" else text_encoder_dora_keys(layers)
        kwargs[f"{component}_lora_adapter_metadata"] = config.to_dict()
    try:
        type(pipe).save_lora_weights(out, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs)
    except TypeError as e:  # a component this pipeline class has no LoRA slot for
        raise ValueError(f"the checkpoint has LoRA weights for {sorted(components)}") from e


# ---------------------------------------------------------------------------------------------
# The generator service
# ---------------------------------------------------------------------------------------------


@dataclass
class _Resident:
    """One loaded base pipeline and the adapters loaded into it, least recently used first."""

    pipe: Any
    architecture: str
    scheduler_config: Any
    base_model: str
    adapters: OrderedDict[str, AdapterSource] = dataclasses.field(default_factory=OrderedDict)
    lora_disabled: bool = False  # after a plain-base request
    # pivotal tuning: the active adapters' token embeddings, loaded under tokens of their own
    embeddings: dict[str, tuple[AdapterSource, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    plain_triggers: frozenset[str] = frozenset()  # the active plain LoRAs' trigger words


class Generator:
    """A text-to-image service: base pipelines kept loaded, adapters swapped in place.

    Thread-safe: one lock serialises loading and sampling (one accelerator, one job at a time).
    Pipelines are keyed by (base model, single-file config, dtype, device); at most
    `max_pipelines` stay loaded (the least recently used is dropped). In each, at most
    `max_loaded_adapters` adapters stay loaded; beyond that the least recently used one is deleted.
    """

    def __init__(
        self,
        *,
        device: str | None = None,
        max_loaded_adapters: int = 8,
        dtype: torch.dtype | None = None,
        max_pipelines: int = 1,
    ) -> None:
        if max_loaded_adapters < 1:
            raise ValueError(f"max_loaded_adapters: must be at least 1, got {max_loaded_adapters}")
        if max_pipelines < 1:
            raise ValueError(f"max_pipelines: must be at least 1, got {max_pipelines}")
        import torch

        self.device = device or default_device()
        self.dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.max_loaded_adapters = max_loaded_adapters
        self.max_pipelines = max_pipelines
        self._lock = threading.RLock()
        self._pipelines: OrderedDict[tuple, _Resident] = OrderedDict()

    # -- public API ----------------------------------------------------------------------------

    def generate(self, request: GenerateRequest, on_step: StepCallback | None = None) -> list:
        """The images for `request` (PIL images); the same request gives the same images."""
        with self._lock:
            resident = self._activate(request)
            return self._render(resident, request, on_step)

    def prepare(self, request: GenerateRequest) -> list[str]:
        """Load the base model and activate the request's adapters without sampling.

        Returns the active adapters' pipeline names. Useful to warm up, and what the switch
        benchmark times.
        """
        with self._lock:
            resident = self._activate(request)
            return [
                resident.adapters[str(describe_adapter(p).path)].pipeline_name for p, _ in request.adapters
            ]

    def compare_token(self, request: GenerateRequest, token: str, on_step: StepCallback | None = None):
        """The prompt with the trigger word vs without it, same seed and adapters: (grid, [(label, image)]).
        `on_step` counts both images' steps together."""
        token = (token or "").strip()
        if not token:
            raise ValueError("token: give the trigger word to compare, e.g. sks")
        without = prompt_without_token(request.prompt, token)
        if without is None:
            raise ValueError(f"token: {token!r} does not appear as a word in the prompt")
        variants = [
            (f"with {token}", request.prompt),
            (f"without {token}", without or " "),  # an empty prompt is still a valid unconditional image
        ]
        return self._compare(
            [(label, dataclasses.replace(request, prompt=prompt)) for label, prompt in variants], on_step
        )

    def compare_weights(self, request: GenerateRequest, weights: Iterable[float] = (0.0, 0.5, 1.0)):
        """The request's adapters at each weight (each adapter's weight times w): (grid, [(label, image)])."""
        if not request.adapters:
            raise ValueError("adapters: choose at least one adapter to compare weights")
        weights = [float(w) for w in weights]
        if not weights:
            raise ValueError("weights: give at least one weight")
        cells = []
        for w in weights:
            scaled = tuple((path, weight * w) for path, weight in request.adapters)
            cells.append((f"weight {w:g}", dataclasses.replace(request, adapters=scaled)))
        return self._compare(cells)

    def compare_checkpoints(self, request: GenerateRequest, checkpoint_dirs: Sequence[str | Path]):
        """One image per checkpoint of a run (or adapter folder), same seed: (grid, [(label, image)]).

        Each checkpoint replaces the request's adapters, at the weight of the request's first
        adapter (1.0 when it has none).
        """
        if not checkpoint_dirs:
            raise ValueError("checkpoint_dirs: give at least one checkpoint folder")
        weight = request.adapters[0][1] if request.adapters else 1.0
        cells = []
        for folder in checkpoint_dirs:
            source = describe_adapter(folder)
            cells.append((source.label, dataclasses.replace(request, adapters=((str(source.path), weight),))))
        return self._compare(cells)

    def loaded_adapters(self) -> list[str]:
        """Paths of the adapters loaded in any resident pipeline, least recently used first."""
        with self._lock:
            return [str(src.path) for res in self._pipelines.values() for src in res.adapters.values()]

    def unload_adapter(self, path: str | Path) -> bool:
        """Unload one adapter (e.g. after it was deleted from the store); False if it was not loaded."""
        key = str(Path(path).expanduser().resolve())
        found = False
        with self._lock:
            for resident in self._pipelines.values():
                source = resident.adapters.pop(key, None)
                if source is not None:
                    self._drop_embeddings(resident, key)
                    resident.pipe.delete_adapters(source.pipeline_name)
                    found = True
        return found

    def loaded_base_models(self) -> list[str]:
        with self._lock:
            return [res.base_model for res in self._pipelines.values()]

    def unload_all(self) -> None:
        """Drop every pipeline and adapter and return the memory (before training on the same GPU)."""
        with self._lock:
            self._pipelines.clear()
            _free_memory()

    # -- internals -------------------------------------------------------------------------------

    def _compare(self, cells: list[tuple[str, GenerateRequest]], on_step: StepCallback | None = None):
        images = []
        with self._lock:  # one lock for the whole grid: no other request interleaves its adapters
            for k, (label, req) in enumerate(cells):
                req = dataclasses.replace(req, num_images=1)
                images.append(
                    (label, self._render(self._activate(req), req, _nth(on_step, k, len(cells)))[0])
                )
        return make_grid(images), images

    def _resident(self, request: GenerateRequest) -> _Resident:
        base = str(request.base_model).strip()
        path = Path(base).expanduser()
        if path.exists():
            base = str(path.resolve())
        key = (base, request.single_file_config, str(self.dtype), self.device)
        resident = self._pipelines.get(key)
        if resident is not None:
            self._pipelines.move_to_end(key)
            return resident
        while len(self._pipelines) >= self.max_pipelines:
            dropped_key, _ = self._pipelines.popitem(last=False)
            log.info("unloading base model %s", dropped_key[0])
            _free_memory()
        from .components import assemble_pipeline, load_components

        log.info("loading base model %s on %s (%s)", base, self.device, self.dtype)
        parts, _source = load_components(
            request.base_model, dtype=self.dtype, single_file_config=request.single_file_config
        )
        pipe = assemble_pipeline(parts).to(self.device)
        resident = _Resident(
            pipe=pipe,
            architecture=pipeline_architecture(pipe),
            scheduler_config=parts["scheduler"].config,
            base_model=request.base_model,
        )
        self._pipelines[key] = resident
        return resident

    def _activate(self, request: GenerateRequest) -> _Resident:
        """The request's pipeline with exactly its adapters active at their weights."""
        if len(request.adapters) > self.max_loaded_adapters:
            raise ValueError(
                f"adapters: at most {self.max_loaded_adapters} adapters at once, got {len(request.adapters)}"
            )
        sources = [describe_adapter(path) for path, _ in request.adapters]
        resident = self._resident(request)
        for source in sources:
            check_architecture(source, resident.architecture, request.base_model)
        pipe = resident.pipe
        if not sources:
            if resident.adapters and not resident.lora_disabled:
                pipe.disable_lora()
                resident.lora_disabled = True
            self._sync_embeddings(resident, [])
            resident.plain_triggers = frozenset()
            return resident
        wanted = {str(s.path) for s in sources}
        for source in sources:
            self._ensure_loaded(resident, source, keep=wanted)
        # disable_lora (a plain-base request) sets a flag that set_adapters does not clear.
        if resident.lora_disabled:
            pipe.enable_lora()
            resident.lora_disabled = False
        pipe.set_adapters(
            [s.pipeline_name for s in sources], adapter_weights=[weight for _, weight in request.adapters]
        )
        # At weight 0 an adapter is off, its trigger word included: no tokens of its own in the prompt.
        on = [s for s, (_, weight) in zip(sources, request.adapters, strict=True) if float(weight) != 0.0]
        self._sync_embeddings(resident, on)
        resident.plain_triggers = frozenset(s.trigger for s in on if s.embeddings is None and s.trigger)
        return resident

    def _sync_embeddings(self, resident: _Resident, sources: list[AdapterSource]) -> None:
        """Exactly the active adapters' token embeddings loaded: swapped-out ones unloaded first."""
        wanted = {str(s.path): s for s in sources if s.embeddings is not None}
        for key, (loaded, _) in list(resident.embeddings.items()):
            if key not in wanted or wanted[key].version != loaded.version:
                self._drop_embeddings(resident, key)
        for key, source in wanted.items():
            if key not in resident.embeddings:
                # Tokens of its own (not the trained "<s0>"), so two pivotal adapters can blend.
                tokens = tuple(f"<{source.pipeline_name}-{i}>" for i in range(len(source.pivotal_tokens)))
                load_embeddings(resident.pipe, source, tokens)
                resident.embeddings[key] = (source, tokens)
        # In the request's order: a trigger the adapters share gets their tokens in that order.
        resident.embeddings = {key: resident.embeddings[key] for key in wanted}

    def _drop_embeddings(self, resident: _Resident, key: str) -> None:
        loaded = resident.embeddings.pop(key, None)
        if loaded is not None:
            unload_embeddings(resident.pipe, loaded[1])

    def _ensure_loaded(self, resident: _Resident, source: AdapterSource, keep: set[str]) -> None:
        key = str(source.path)
        loaded = resident.adapters.get(key)
        if loaded is not None and loaded.version == source.version:
            resident.adapters.move_to_end(key)
            return
        if loaded is not None:  # the folder was retrained or replaced since it was loaded
            log.info("reloading changed adapter %s", key)
            self._drop_embeddings(resident, key)
            resident.pipe.delete_adapters(loaded.pipeline_name)
            del resident.adapters[key]
        while len(resident.adapters) >= self.max_loaded_adapters:
            victim = next(k for k in resident.adapters if k not in keep)
            log.info("unloading least recently used adapter %s", victim)
            self._drop_embeddings(resident, victim)
            resident.pipe.delete_adapters(resident.adapters.pop(victim).pipeline_name)
        load_adapter(resident.pipe, source)
        resident.adapters[key] = source

    def _render(
        self, resident: _Resident, request: GenerateRequest, on_step: StepCallback | None = None
    ) -> list:
        # A fresh scheduler per request: multistep samplers keep state between steps.
        resident.pipe.scheduler = make_scheduler(request.scheduler, resident.scheduler_config)
        active = list(resident.embeddings.values())
        prompt = rewrite_prompt(request.prompt, active, resident.plain_triggers)
        negative = rewrite_prompt(request.negative_prompt, active, resident.plain_triggers)
        return generate(
            resident.pipe,
            prompt,
            negative_prompt=negative,
            seed=request.seed,
            steps=request.steps,
            guidance=request.guidance,
            width=request.width,
            height=request.height,
            num_images=request.num_images,
            on_step=on_step,
        )


def _nth(on_step: StepCallback | None, k: int, n: int) -> StepCallback | None:
    """`on_step` for the k-th of n equal samplings, counting all n together (step 3 of the 2nd of two
    25-step images: 28/50)."""
    if on_step is None:
        return None
    return lambda done, total: on_step(k * total + done, n * total)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def apply_adapters(
    pipe, adapter_dirs: Sequence[str | Path], weights: Sequence[float] | None = None
) -> list[str]:
    """Load the adapters into a pipeline of your own (once each, by name) and activate them.

    For callers that hold their own pipeline; `Generator` does the same with an LRU cap. A pivotal
    adapter's token embeddings are loaded under the tokens it was trained as ("<s0><s1>": write
    them in the prompt) and unloaded when a later call leaves the adapter out.
    """
    if weights is not None and len(weights) != len(adapter_dirs):
        raise ValueError(f"adapter_weights: {len(weights)} weights for {len(adapter_dirs)} adapters")
    sources = [describe_adapter(folder) for folder in adapter_dirs]
    arch = pipeline_architecture(pipe)
    loaded = {n for names in pipe.get_list_adapters().values() for n in names}
    for source in sources:
        check_architecture(source, arch, getattr(pipe, "name_or_path", "") or "this pipeline")
        if source.pipeline_name not in loaded:
            load_adapter(pipe, source)
            loaded.add(source.pipeline_name)
    _apply_embeddings(pipe, sources)
    names = [s.pipeline_name for s in sources]
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=list(weights) if weights is not None else [1.0] * len(names))
    elif loaded:
        pipe.disable_lora()
    return names


def _apply_embeddings(pipe, sources: list[AdapterSource]) -> None:
    """The listed pivotal adapters' embeddings under their trained tokens; others' unloaded."""
    loaded: dict[str, tuple[str, ...]] = pipe.__dict__.setdefault("_pivotal_embeddings", {})
    wanted = {str(s.path): s for s in sources if s.embeddings is not None}
    for key in [k for k in loaded if k not in wanted]:
        unload_embeddings(pipe, loaded.pop(key))
    taken = {t for tokens in loaded.values() for t in tokens}
    for key, source in wanted.items():
        if key in loaded:
            continue
        if taken & set(source.pivotal_tokens):
            raise TrainingError(
                f"{source.label} uses the tokens {''.join(source.pivotal_tokens)} that another active "
                "adapter already uses; blend them with the Generator, which gives each its own tokens."
            )
        load_embeddings(pipe, source, source.pivotal_tokens)
        loaded[key] = source.pivotal_tokens
        taken |= set(source.pivotal_tokens)


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def prompt_without_token(prompt: str, token: str) -> str | None:
    """`prompt` with every whole-word `token` removed (case-insensitive); None if it has none."""
    words = prompt.split()
    kept = [w for w in words if w.strip(",.;:!?").lower() != token.lower()]
    if len(kept) == len(words):
        return None
    return " ".join(kept)


def make_grid(cells: Sequence[tuple[str, Any]], columns: int | None = None):
    """A labelled contact sheet: the images in a row (or `columns` per row), each with its label below."""
    from PIL import Image, ImageDraw, ImageFont

    if not cells:
        raise ValueError("cells: nothing to put in the grid")
    img_w = max(im.width for _, im in cells)
    img_h = max(im.height for _, im in cells)
    size = max(11, img_w // 20)  # labels readable at 64 px and at 1024 px alike
    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textlength(label, font=font) for label, _ in cells)
    cell_w = int(max(img_w, text_w + size))
    band = int(size * 1.8)
    columns = columns or len(cells)
    rows = -(-len(cells) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * (img_h + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(cells):
        x, y = (i % columns) * cell_w, (i // columns) * (img_h + band)
        sheet.paste(image.convert("RGB"), (x + (cell_w - image.width) // 2, y))
        tw = draw.textlength(label, font=font)
        draw.text((x + (cell_w - tw) / 2, y + img_h + size * 0.35), label, fill="black", font=font)
    return sheet
