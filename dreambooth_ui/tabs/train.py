"""Train tab: the preset for the prepared set, advanced settings, start / stop / resume, and the live
view of the one job (status line, loss plot, scores plot, validation images) polled by a timer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from trainer_core.config import (
    EVAL_MODELS,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    TOKEN_INITS,
    quick_try_settings,
)

from ..studio import Studios, UserError
from ..views import loss_frame, plan_markdown, sample_items, scores_frame, status_html
from . import bind
from .photos import PhotosTab

POLL_SECONDS = 2.0
# Settings whose boxes hold floats in the page but whole numbers in TrainConfig.
INT_FIELDS = {
    "max_train_steps", "rank", "num_class_images", "resolution", "train_batch_size",
    "gradient_accumulation_steps", "validation_steps", "checkpointing_steps", "num_new_tokens",
}  # fmt: skip


# The smallest value each numeric setting takes. Checked by `check_settings` before a start, so a bad
# value is named on its own box; Gradio's `minimum=` would answer "Value 0 is less than minimum
# value 1." in a toast naming no field, and mark every output of the click as failed.
MINIMUMS = {
    "max_train_steps": 1, "rank": 1, "num_class_images": 1, "train_batch_size": 1,
    "gradient_accumulation_steps": 1, "validation_steps": 0, "checkpointing_steps": 0, "resolution": 8,
    "num_new_tokens": 1,
}  # fmt: skip


# The first preset a person meets: a short run that shows the whole flow in minutes (on tiny-shapes,
# the numbers measured to learn a subject: config.quick_try_settings). The full preset is the
# subject type's own (config.preset_config).
PRESETS = ("Quick try", "Full")


@dataclass(frozen=True)
class TrainTab:
    dataset: gr.Dropdown
    subject: gr.Radio
    token: gr.Textbox
    noun: gr.Textbox
    base_model: gr.Dropdown
    preset: gr.Radio
    adapter_name: gr.Textbox
    plan: gr.Markdown
    settings: dict[str, gr.components.Component]  # TrainConfig field -> its box under "Advanced"
    status: gr.HTML
    plot: gr.LinePlot
    scores: gr.LinePlot  # dino, clip_i, clip_t, pres of each scored validation round
    samples: gr.Gallery
    resume: gr.Button
    go_generate: gr.Button
    finished: gr.Textbox  # the new adapter's name, when a run ends with one
    timer: gr.Timer

    @property
    def view(self) -> list:
        """What `render` fills, in its order, then the timer."""
        return [
            self.status,
            self.plot,
            self.scores,
            self.samples,
            self.resume,
            self.go_generate,
            self.finished,
            self.timer,
        ]

    @property
    def plan_inputs(self) -> list:
        return [self.dataset, self.subject, self.token, self.noun, self.base_model, self.preset]


def build(studios: Studios, base_model: gr.Dropdown, photos: PhotosTab) -> TrainTab:
    with gr.Tab("2 · Train", id="train"):
        with gr.Row():
            dataset = gr.Dropdown(
                [], label="Photo set", info="Prepared in the Photos tab.", scale=2, elem_id="dataset"
            )
            adapter_name = gr.Textbox("", label="Adapter name", placeholder="default: token-class", scale=2)
        preset = gr.Radio(
            list(PRESETS), value=PRESETS[0], label="Preset", elem_id="preset",
            info="Quick try: a short run to see the whole flow. Full: the settings for a real adapter.",
        )  # fmt: skip
        plan = gr.Markdown(elem_id="plan")
        # Hidden until a photo set is chosen: before that no box has a value, and Gradio draws an
        # empty number box as 0 ("Steps 0, Learning rate 0"), which reads as the settings.
        with gr.Accordion("Advanced settings", open=False, elem_id="advanced", visible=False) as advanced:
            settings = _settings_boxes()
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="start-btn")
            stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
            resume = gr.Button("Resume", visible=False, elem_id="resume-btn")
            go_generate = gr.Button("Open in Generate", visible=False, elem_id="go-generate")
        status = gr.HTML(elem_id="status-line")
        with gr.Row(elem_classes="phone-stack"):
            plot = gr.LinePlot(
                x="step",
                y="loss",
                color="series",
                title="Loss",  # inside the chart: a block label would push the legend out of the box
                show_label=False,
                height=320,
                elem_id="loss-plot",
                x_title="step",
                y_title="loss",
            )
            scores = gr.LinePlot(
                x="step", y="score", color="series", title="Scores (each validation round)", show_label=False,
                height=320, elem_id="scores-plot", x_title="step", y_title="score",
            )  # fmt: skip
        eval_note = gr.Markdown(elem_id="eval-note")
        samples = gr.Gallery(label="Validation images", columns=4, height=320, elem_id="samples")
        timer = gr.Timer(POLL_SECONDS, active=False)
        finished = gr.Textbox(visible=False)

    tab = TrainTab(
        dataset=dataset, subject=photos.subject, token=photos.token, noun=photos.noun, base_model=base_model,
        preset=preset, adapter_name=adapter_name, plan=plan, settings=settings, status=status, plot=plot, scores=scores,
        samples=samples, resume=resume, go_generate=go_generate, finished=finished, timer=timer,
    )  # fmt: skip
    # (`removals`: a photo taken out of the set on the Photos tab changes the photo count.)
    for trigger in (
        dataset.change,
        photos.subject.change,
        photos.removals.change,
        base_model.change,
        preset.change,
    ):
        trigger(
            bind(on_plan, studios, tab), tab.plan_inputs, [plan, eval_note, advanced, *settings.values()],
            api_visibility="private",
        )  # fmt: skip
    # Whether the rounds will be scored: the preset's setting (above), then the person's choice. Not
    # `change`: a box in the closed accordion is not drawn yet, and a preset filling it fires nothing.
    settings["eval_models"].input(
        bind(on_eval_note, studios), settings["eval_models"], eval_note, api_visibility="private"
    )
    photos.dataset.change(bind(on_prepared, studios), photos.dataset, dataset)
    # A set chosen (or the newest one on a page load): its subject type, token and noun come back, so
    # the preset is the set's own and not whatever the Photos tab last showed.
    dataset.change(
        bind(on_set_chosen, studios), dataset, [photos.subject, photos.token, photos.noun],
        api_visibility="private",
    )  # fmt: skip
    # The estimate follows the settings as the person edits them (`input`: not when a preset fills them).
    estimate_inputs = {*tab.plan_inputs, adapter_name, *settings.values()}
    for box in settings.values():
        box.input(
            bind(on_estimate, studios, tab), estimate_inputs, plan, api_visibility="private",
            trigger_mode="always_last",  # typing 2000 is four inputs: the estimate is for the last
        )  # fmt: skip
    start_inputs = {*tab.plan_inputs, adapter_name, *settings.values()}
    start.click(
        bind(on_start, studios, tab),
        start_inputs,
        tab.view,
        api_visibility="private",
        validator=bind(check_settings, tab),
    )
    stop.click(bind(on_stop, studios), None, tab.view, api_visibility="private")
    resume.click(bind(on_resume, studios), None, tab.view, api_visibility="private")
    timer.tick(bind(on_tick, studios), None, tab.view, api_visibility="private", show_progress="hidden")
    return tab


def _settings_boxes() -> dict[str, gr.components.Component]:
    """The advanced settings, one box per TrainConfig field."""
    boxes: dict[str, gr.components.Component] = {}
    with gr.Row(elem_classes="phone-stack"):
        boxes["max_train_steps"] = gr.Number(label="Steps", precision=0, elem_id="adv-steps")
        boxes["rank"] = gr.Number(label="LoRA rank", precision=0)
        boxes["alpha"] = gr.Number(label="LoRA alpha (empty: = rank)")
        boxes["learning_rate"] = gr.Number(label="Learning rate")
    with gr.Row(elem_classes="phone-stack"):
        boxes["with_prior_preservation"] = gr.Checkbox(label="Prior preservation")
        boxes["class_prompt"] = gr.Textbox(label="Class prompt")
        boxes["num_class_images"] = gr.Number(label="Class images", precision=0, elem_id="adv-class-images")
        boxes["prior_loss_weight"] = gr.Number(label="Prior loss weight")
    with gr.Row(elem_classes="phone-stack"):
        boxes["resolution"] = gr.Number(label="Resolution (empty: the model's)", precision=0)
        boxes["train_batch_size"] = gr.Number(label="Batch size", precision=0)
        boxes["gradient_accumulation_steps"] = gr.Number(label="Gradient accumulation", precision=0)
        boxes["mixed_precision"] = gr.Dropdown(list(MIXED_PRECISIONS), label="Mixed precision")
    with gr.Row(elem_classes="phone-stack"):
        boxes["train_text_encoder"] = gr.Checkbox(label="Train the text encoder too")
        boxes["validation_prompt"] = gr.Textbox(label="Validation prompt (empty: the instance prompt)")
        boxes["validation_steps"] = gr.Number(
            label="Validation every N steps (0: at the end)", precision=0, elem_id="adv-validation-steps"
        )
        boxes["checkpointing_steps"] = gr.Number(
            label="Checkpoint every N steps", precision=0, elem_id="adv-checkpointing-steps"
        )
    # The craft options of kohya_ss / OneTrainer / diffusers' advanced script (docs/cli.md explains each).
    with gr.Row(elem_classes="phone-stack"):
        boxes["lr_scheduler"] = gr.Dropdown(list(LR_SCHEDULERS), label="LR schedule")
        boxes["optimizer"] = gr.Dropdown(list(OPTIMIZERS), label="Optimizer (prodigy: learning rate 1.0)")
        boxes["text_encoder_lr"] = gr.Number(label="Text encoder learning rate")
        boxes["use_8bit_adam"] = gr.Checkbox(label="8-bit Adam (CUDA)")
    with gr.Row(elem_classes="phone-stack"):
        boxes["use_dora"] = gr.Checkbox(label="DoRA")
        boxes["caption_dropout"] = gr.Number(label="Caption dropout (0-1)")
        boxes["masked_loss"] = gr.Checkbox(label="Masked loss (subject masks are made at start)")
        boxes["bucketing"] = gr.Checkbox(label="Aspect-ratio buckets")
    with gr.Row(elem_classes="phone-stack"):
        boxes["pivotal_tuning"] = gr.Checkbox(label="Pivotal tuning (new tokens for the trigger word)")
        boxes["num_new_tokens"] = gr.Number(label="New tokens", precision=0)
        boxes["token_init"] = gr.Dropdown(list(TOKEN_INITS), label="New tokens start as")
        boxes["token_embedding_lr"] = gr.Number(label="Token embedding learning rate")
    with gr.Row(elem_classes="phone-stack"):
        boxes["random_flip"] = gr.Checkbox(label="Random flip")
        boxes["noise_offset"] = gr.Number(label="Noise offset")
        boxes["snr_gamma"] = gr.Number(label="Min-SNR gamma (empty: off)")
        boxes["eval_models"] = gr.Dropdown(
            list(EVAL_MODELS), label="Scores (CLIP/DINO) each validation", elem_id="adv-eval-models"
        )
    return boxes


def overrides(tab: TrainTab, values: dict) -> dict[str, Any]:
    """The advanced settings the person filled in, keyed by TrainConfig field (empty boxes: preset)."""
    out = {}
    for key, box in tab.settings.items():
        value = values[box]
        if value is None or value == "":
            continue
        out[key] = int(value) if key in INT_FIELDS else value
    return out


def render(snap: dict[str, Any], *, poll: bool | None = None) -> tuple:
    """A job snapshot as the values of `TrainTab.view`; the timer runs while the job does (or as `poll` says)."""
    state = snap["state"]
    metrics = snap.get("metrics", [])
    return (
        status_html(snap),
        # No value at all until there are points: a plot first given an empty frame keeps an
        # empty colour domain and never draws its lines.
        loss_frame(metrics) if metrics else None,
        scores_frame(snap["scores"]) if snap.get("scores") else None,
        sample_items(snap),
        gr.Button(visible=bool(snap.get("resumable"))),
        gr.Button(visible=bool(snap.get("adapter_name")) and state in ("finished", "stopped")),
        snap.get("adapter_name") or "",
        gr.Timer(active=state in ("running", "stopping") if poll is None else poll),
    )


def preset_overrides(preset: str, base: str | None) -> dict[str, Any]:
    if preset != "Quick try":
        return {"base_model": base}
    return {**quick_try_settings((base or "").strip()), "base_model": base}


def _plan_text(studio, config, preset: str, ds: str, subject: str) -> str:
    n = len(studio.dataset_report(ds)["accepted"])
    return plan_markdown(config, n, subject, studio.estimate_text(config), preset)


def on_plan(studios: Studios, tab: TrainTab, request: gr.Request, ds, subject, token, noun, base, preset):
    studio = studios.get(request)
    if not ds:
        return ("Prepare photos first; the settings follow from the subject type and photo count.",
                gr.skip(), gr.Accordion(visible=False), *[gr.skip()] * len(tab.settings))  # fmt: skip
    config = studio.plan_training(
        ds, subject_type=subject, token=token, class_noun=noun, **preset_overrides(preset, base)
    )
    return (
        _plan_text(studio, config, preset, ds, subject),
        studio.eval_note(config.eval_models),
        gr.Accordion(visible=True),
        *[getattr(config, key) for key in tab.settings],
    )


def on_estimate(studios: Studios, tab: TrainTab, request: gr.Request, values: dict):
    """The plan line again for the settings as they are now (a bad value: the reason instead)."""
    studio = studios.get(request)
    if not values[tab.dataset]:
        return gr.skip()
    try:
        config = _config(studio, tab, values)
    except UserError as e:
        return f"**Not ready to start:** {e}"
    return _plan_text(studio, config, values[tab.preset], values[tab.dataset], values[tab.subject])


def on_eval_note(studios: Studios, request: gr.Request, eval_models):
    return studios.get(request).eval_note(eval_models)


def on_set_chosen(studios: Studios, request: gr.Request, ds):
    """The subject type, trigger token and class noun the set was prepared with. A set with no subject
    type recorded (prepared before it was, or from the command line without one) leaves the fields as
    they are: its token and noun may be prep's defaults rather than what was meant."""
    if not ds:
        return gr.skip(), gr.skip(), gr.skip()
    subject = studios.get(request).dataset_report(ds)["subject"]
    if not subject.get("subject_type"):
        return gr.skip(), gr.skip(), gr.skip()
    return tuple(subject.get(key) or gr.skip() for key in ("subject_type", "token", "class_noun"))


def on_prepared(studios: Studios, request: gr.Request, ds):
    return gr.Dropdown(choices=studios.get(request).list_datasets(), value=ds or None)


def check_settings(tab: TrainTab, values: dict) -> list:
    """One verdict per input of the Start click (in Gradio's order for a set of inputs): a number
    below its minimum is named on its own box, and nothing starts."""
    fields = {box: key for key, box in tab.settings.items()}
    verdicts = []
    for box in sorted(values, key=lambda b: b._id):
        key, value = fields.get(box), values[box]
        low = MINIMUMS.get(key)
        if low is not None and value is not None and value != "" and value < low:
            verdicts.append(gr.validate(False, f"{box.label} must be at least {low}."))
        else:
            verdicts.append(gr.validate(True, ""))
    return verdicts


def on_start(studios: Studios, tab: TrainTab, request: gr.Request, values: dict):
    """Start a run; a refusal is a warning that leaves the last run's status, plot and images shown."""
    try:
        return _start(studios.get(request), tab, values)
    except UserError as e:
        gr.Warning(str(e))
        return tuple(gr.skip() for _ in tab.view)


def _config(studio, tab: TrainTab, values: dict):
    """The TrainConfig the page describes: the preset, then every box the person filled in."""
    if not values[tab.dataset]:
        raise UserError("Prepare a photo set in the Photos tab first.")
    settings = {**preset_overrides(values[tab.preset], values[tab.base_model]), **overrides(tab, values)}
    return studio.plan_training(
        values[tab.dataset], subject_type=values[tab.subject], token=values[tab.token],
        class_noun=values[tab.noun], adapter_name=values[tab.adapter_name] or None, **settings,
    )  # fmt: skip


def _start(studio, tab: TrainTab, values: dict) -> tuple:
    return render(studio.start_training(_config(studio, tab, values)), poll=True)


def on_stop(studios: Studios, request: gr.Request):
    snap = studios.get(request).stop_training()
    gr.Info(snap["message"])
    return render(snap)


def on_resume(studios: Studios, request: gr.Request):
    studio = studios.get(request)
    run_id = studio.training_status().get("run_id")
    return render(studio.resume_training(run_id), poll=True)


def on_tick(studios: Studios, request: gr.Request):
    return render(studios.get(request).training_status())
