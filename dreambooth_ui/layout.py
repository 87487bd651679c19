"""The page: four tabs (Photos, Train, Generate, Gallery) over one `Studio`, plus the automation API.

Handlers are small module-level closures over the Studio; they turn its `UserError`s (and anything
unexpected) into one sentence in a toast, never a traceback. The training thread belongs to the
Studio's JobRunner, not to any browser session: a `gr.Timer` polls its snapshot every 2 seconds
while a job runs, and the page asks once on load, so a reload shows the truth.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from trainer_core.config import MIXED_PRECISIONS, SUBJECT_TYPES
from trainer_core.events import Progress

from . import api
from .api import friendly
from .studio import CAPTIONERS, CROP_MODES, Studio, Studios, UserError

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
DEFAULT_NOUNS = {"person": "person", "pet": "dog", "object": "object", "style": "style"}
CSS = """
.progress-outer {background: var(--neutral-200); border-radius: 6px; height: 14px; overflow: hidden;}
.progress-inner {background: var(--color-accent); height: 14px;}
#status-line {min-height: 3em;}
"""


# ------------------------------------------------------------------------------------------------
# View helpers (plain functions of a snapshot; no state)
# ------------------------------------------------------------------------------------------------


def loss_frame(metrics: list[dict[str, Any]]) -> pd.DataFrame:
    """Long-form losses for the line plot: raw instance/prior/total and a smoothed total."""
    from trainer_core.runs import smooth

    rows = []
    totals = [m["loss"] for m in metrics]
    smoothed = smooth(totals) if totals else []
    for m, s in zip(metrics, smoothed, strict=True):
        rows.append((m["step"], m["instance_loss"], "instance loss"))
        if m.get("prior_loss") is not None:
            rows.append((m["step"], m["prior_loss"], "prior loss"))
        rows.append((m["step"], m["loss"], "total"))
        rows.append((m["step"], s, "total (smoothed)"))
    return typed_frame(rows, {"step": "int64", "loss": "float64", "series": "str"})


def typed_frame(rows: list, dtypes: dict[str, str]) -> pd.DataFrame:
    """A frame with fixed column types even when empty: the plot keeps the axis types of its first
    value, and an empty frame's object columns would make the loss axis categorical for good."""
    frame = pd.DataFrame(rows, columns=list(dtypes))
    return frame.astype(dtypes)


def status_html(snap: dict[str, Any]) -> str:
    state = snap.get("state", "idle")
    if state == "idle":
        return "<p>No training yet. Prepare photos, then press <b>Start training</b>.</p>"
    current, total = (snap.get("progress") or [0, 0]) + [0, 0][len(snap.get("progress") or []) :]
    fraction = 1.0 if state == "finished" else (current / total) if total else 0.0
    eta = snap.get("eta_seconds")
    eta_text = f" · about {_duration(eta)} left" if eta is not None and state == "running" else ""
    head = {
        "running": f"{snap.get('stage_label', '')}: {current}/{total}{eta_text}",
        "stopping": "Stopping: saving a checkpoint and the adapter…",
        "finished": "Finished",
        "stopped": "Stopped",
        "failed": "Failed",
        "interrupted": f"Interrupted at step {snap.get('step', 0)}",
        "lost": f"Lost at step {snap.get('step', 0)}",
    }.get(state, state)
    steps = f"step {snap.get('step', 0)} of {snap.get('total_steps', 0)}"
    message = snap.get("message") or snap.get("stage_message") or ""
    return (
        f"<p><b>{_esc(head)}</b> · {steps} · run {_esc(snap.get('run_id', ''))}</p>"
        f'<div class="progress-outer"><div class="progress-inner" style="width:{100 * fraction:.1f}%"></div></div>'
        f"<p>{_esc(message)}</p>"
    )


def sample_items(snap: dict[str, Any]) -> list[tuple[str, str]]:
    """The newest validation images first (with and without the token side by side)."""
    items = []
    for s in sorted(snap.get("samples", []), key=lambda s: -s["step"]):
        label = "with token" if Path(s["image"]).name.startswith("with-") else "without token"
        items.append((s["image"], f"step {s['step']}: {label}"))
    return items[:8]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _esc(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def adapter_choices(adapters: list[dict[str, Any]]) -> list[str]:
    return [a["name"] for a in adapters]


def adapter_gallery(adapters: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["thumbnail"], a["name"]) for a in adapters if a.get("thumbnail")]


def adapter_markdown(a: dict[str, Any] | None) -> str:
    if not a:
        return "Select an adapter."
    loss = f"{a['final_loss']:.4f}" if isinstance(a.get("final_loss"), (int, float)) else "n/a"
    return (
        f"### {_esc(a['name'])}\n"
        f"- trigger: `{_esc(a.get('token') or '')}` · prompt: *{_esc(a.get('instance_prompt') or '')}*\n"
        f"- base model: `{_esc(a.get('base_model'))}` ({_esc(a.get('architecture'))})\n"
        f"- rank {a.get('rank')} · alpha {a.get('alpha')} · {a.get('steps')} steps · final loss {loss}\n"
        f"- created {_esc(a.get('created'))}"
    )


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------


def build_app(studios: Studios | Studio, *, banner: str | None = None) -> gr.Blocks:
    """The page over `studios` (one Studio per user when login is required; a lone Studio is wrapped)."""
    if isinstance(studios, Studio):
        studios = Studios.wrap(studios)
    defaults = studios.defaults
    with gr.Blocks(title="DreamBooth Studio") as demo:
        gr.Markdown(
            "# DreamBooth Studio\nTeach Stable Diffusion your subject from 5–20 photos: "
            "prepare photos → train a LoRA → generate."
        )
        if banner:
            gr.Markdown(banner, elem_id="banner")
        if studios.policy.oauth:
            gr.LoginButton()
        with gr.Row():
            base_model = gr.Dropdown(
                defaults.base_model_choices(),
                value=defaults.base_model,
                label="Base model",
                info="A Hub id, a local diffusers folder or a .safetensors file; tiny models are for trying the app offline.",
                allow_custom_value=True,
                scale=3,
            )
            base_note = gr.Markdown(elem_id="base-note")
        with gr.Tabs() as tabs:
            photos = _photos_tab(studios, base_model)
            train = _train_tab(studios, base_model, photos)
            generate = _generate_tab(studios, base_model)
            gallery = _gallery_tab(studios)
            runs = _runs_tab(studios)

        base_model.change(friendly(defaults.base_model_note), base_model, base_note)

        # Whatever happened before this page was opened (a job running, an app restart).
        def on_load(request: gr.Request, base):
            studio = studios.get(request)
            snap = studio.training_status()
            running = snap["state"] in ("running", "stopping")
            adapters = studio.list_adapters()
            names = adapter_choices(adapters)
            return (
                studio.base_model_note(base),
                gr.Dropdown(choices=studio.list_datasets(), value=(studio.list_datasets() or [None])[0]),
                *train["render"](snap),
                gr.Timer(active=running),
                adapter_gallery(adapters),
                gr.Dropdown(choices=names, value=names[0] if names else None),
                gr.Dropdown(choices=[""] + names, value=""),
                gr.Dropdown(choices=names, value=names[0] if names else None),
            )

        demo.load(
            friendly(on_load),
            base_model,
            [
                base_note,
                train["dataset"],
                *train["render_outputs"],
                train["timer"],
                generate["gallery"],
                generate["adapter"],
                generate["second_adapter"],
                gallery["adapter"],
            ],
        )

        # After training finishes, the new adapter is offered in Generate and the Gallery.
        def refresh_pickers(request: gr.Request, name):
            return _refresh_adapter_pickers(studios.get(request), name)

        train["finished"].change(
            friendly(refresh_pickers),
            train["finished"],
            [generate["gallery"], generate["adapter"], generate["second_adapter"], gallery["adapter"]],
        )
        train["go_generate"].click(lambda: gr.Tabs(selected="generate"), None, tabs)

        # A rename, delete or restore in the Gallery changes the list Generate offers (its choice is kept).
        def gallery_changed(request: gr.Request, _name, current, second):
            adapters = studios.get(request).list_adapters()
            names = adapter_choices(adapters)
            keep = current if current in names else (names[0] if names else None)
            return (
                adapter_gallery(adapters),
                gr.Dropdown(choices=names, value=keep),
                gr.Dropdown(choices=[""] + names, value=second if second in names else ""),
            )

        gallery["adapter"].change(
            friendly(gallery_changed),
            [gallery["adapter"], generate["adapter"], generate["second_adapter"]],
            [generate["gallery"], generate["adapter"], generate["second_adapter"]],
        )

        @friendly
        def open_run_adapter(request: gr.Request, run_id):
            studio = studios.get(request)
            if not run_id:
                raise UserError("Pick a run first.")
            name = studio.run_adapter(run_id)
            return (*_refresh_adapter_pickers(studio, name), gr.Tabs(selected="generate"))

        runs["open"].click(
            open_run_adapter,
            runs["pick"],
            [generate["gallery"], generate["adapter"], generate["second_adapter"], gallery["adapter"], tabs],
        )
        api.register(studios)
    demo.queue(default_concurrency_limit=4)
    return demo


def _refresh_adapter_pickers(studio: Studio, selected: str | None):
    adapters = studio.list_adapters()
    names = adapter_choices(adapters)
    value = selected if selected in names else (names[0] if names else None)
    return (
        adapter_gallery(adapters),
        gr.Dropdown(choices=names, value=value),
        gr.Dropdown(choices=[""] + names, value=""),
        gr.Dropdown(choices=names, value=value),
    )


def _photos_tab(studios: Studios, base_model) -> dict[str, Any]:
    with gr.Tab("1 · Photos", id="photos"):
        with gr.Row():
            with gr.Column(scale=2):
                files = gr.File(
                    label="Photos of your subject (drop 5–20 here)",
                    file_count="multiple",
                    type="filepath",
                    elem_id="photo-upload",
                )
            with gr.Column(scale=1):
                subject = gr.Radio(list(SUBJECT_TYPES), value="person", label="Subject type")
                with gr.Row():
                    token = gr.Textbox(
                        "sks", label="Trigger token", info="A rare word that will mean your subject."
                    )
                    noun = gr.Textbox("person", label="Class noun", info="What it is: person, dog, mug…")
                with gr.Row():
                    crop = gr.Dropdown(list(CROP_MODES), value="auto", label="Crop")
                    caption = gr.Dropdown(list(CAPTIONERS), value="template", label="Captions")
                name = gr.Textbox(
                    "", label="Photo set name", placeholder="default: token-class, e.g. sks-person"
                )
                prepare = gr.Button("Prepare photos", variant="primary", elem_id="prepare-btn")
        summary = gr.Markdown(elem_id="prep-summary")
        prepared = gr.Gallery(
            label="Prepared photos (square crops)", columns=6, height="auto", elem_id="prepared"
        )
        captions = gr.Dataframe(
            headers=["photo", "caption", "warnings"],
            datatype=["str", "str", "str"],
            interactive=True,
            label="Captions (edit in place; saved as you leave the cell)",
            elem_id="captions",
        )
        rejected = gr.Dataframe(headers=["file", "reason"], label="Not used", interactive=False)
        dataset_state = gr.State("")

    subject.change(lambda s: DEFAULT_NOUNS.get(s, "person"), subject, noun)

    def render(report: dict[str, Any]):
        folder = Path(report["output_dir"])
        gallery = [(str(folder / a["output"]), a["caption"]) for a in report["accepted"]]
        table = [[a["output"], a["caption"], "; ".join(a["warnings"])] for a in report["accepted"]]
        bad = [[r["source"], r["reason"]] for r in report["rejected"]]
        n_warn = sum(1 for a in report["accepted"] if a["warnings"])
        text = (
            f"**{len(report['accepted'])} photos ready** in set `{report['dataset']}`"
            + (f", {n_warn} with warnings" if n_warn else "")
            + (f"; {len(bad)} not used (reasons below)." if bad else ".")
        )
        return text, gallery, table or None, bad or None, report["dataset"]

    @friendly
    def on_prepare(
        request: gr.Request,
        paths,
        tok,
        cls,
        crop_mode,
        captioner,
        set_name,
        base,
        progress=gr.Progress(),  # noqa: B008 - Gradio's way to draw a progress bar
    ):
        studio = studios.get(request)

        def emit(event):
            if isinstance(event, Progress) and event.total:
                label = "Writing captions" if event.stage == "caption" else "Checking and cropping photos"
                progress((event.current, event.total), desc=label)

        report = studio.prepare_photos(
            paths or [], set_name, token=tok.strip(), class_noun=cls.strip(), crop=crop_mode, caption=captioner,
            base_model=base, emit=emit,
        )  # fmt: skip
        return render(report)

    @friendly
    def on_caption_edit(request: gr.Request, table, dataset):
        studio = studios.get(request)
        if not dataset or table is None:
            return gr.skip()
        current = {a["output"]: a["caption"] for a in studio.dataset_report(dataset)["accepted"]}
        for output, text, _warnings in table.itertuples(index=False):
            if output in current and text != current[output]:
                studio.set_caption(dataset, output, text)
        return gr.skip()

    outputs = [summary, prepared, captions, rejected, dataset_state]
    prepare.click(
        on_prepare, [files, token, noun, crop, caption, name, base_model], outputs, api_visibility="private"
    )
    captions.input(on_caption_edit, [captions, dataset_state], None, api_visibility="private")
    return {"subject": subject, "token": token, "noun": noun, "dataset_state": dataset_state}


def _train_tab(studios: Studios, base_model, photos) -> dict[str, Any]:
    with gr.Tab("2 · Train", id="train"):
        with gr.Row():
            dataset = gr.Dropdown(
                [], label="Photo set", info="Prepared in the Photos tab.", scale=2, elem_id="dataset"
            )
            adapter_name = gr.Textbox("", label="Adapter name", placeholder="default: token-class", scale=2)
        plan = gr.Markdown(elem_id="plan")
        with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
            with gr.Row():
                steps = gr.Number(label="Steps", precision=0, minimum=1, elem_id="adv-steps")
                rank = gr.Number(label="LoRA rank", precision=0, minimum=1)
                alpha = gr.Number(label="LoRA alpha (empty: = rank)")
                lr = gr.Number(label="Learning rate")
            with gr.Row():
                prior = gr.Checkbox(label="Prior preservation")
                class_prompt = gr.Textbox(label="Class prompt")
                num_class = gr.Number(
                    label="Class images", precision=0, minimum=1, elem_id="adv-class-images"
                )
                prior_weight = gr.Number(label="Prior loss weight")
            with gr.Row():
                resolution = gr.Number(label="Resolution (empty: the model's)", precision=0)
                batch = gr.Number(label="Batch size", precision=0, minimum=1)
                accum = gr.Number(label="Gradient accumulation", precision=0, minimum=1)
                precision = gr.Dropdown(list(MIXED_PRECISIONS), label="Mixed precision")
            with gr.Row():
                text_encoder = gr.Checkbox(label="Train the text encoder too")
                validation_prompt = gr.Textbox(label="Validation prompt (empty: the instance prompt)")
                validation_steps = gr.Number(
                    label="Validation every N steps (0: at the end)",
                    precision=0,
                    elem_id="adv-validation-steps",
                )
                checkpoint_steps = gr.Number(label="Checkpoint every N steps", precision=0)
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="start-btn")
            stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
            resume = gr.Button("Resume", visible=False, elem_id="resume-btn")
            go_generate = gr.Button("Open in Generate", visible=False, elem_id="go-generate")
        status = gr.HTML(elem_id="status-line")
        with gr.Row():
            plot = gr.LinePlot(
                x="step",
                y="loss",
                color="series",
                label="Loss",
                height=320,
                elem_id="loss-plot",
                x_title="step",
                y_title="loss",
            )
            samples = gr.Gallery(label="Validation images", columns=2, height=320, elem_id="samples")
        timer = gr.Timer(POLL_SECONDS, active=False)
        finished = gr.Textbox(visible=False)  # the new adapter's name, when a run ends with one

    advanced = [
        steps, rank, alpha, lr, prior, class_prompt, num_class, prior_weight, resolution, batch, accum,
        precision, text_encoder, validation_prompt, validation_steps, checkpoint_steps,
    ]  # fmt: skip
    fields = [
        "max_train_steps", "rank", "alpha", "learning_rate", "with_prior_preservation", "class_prompt",
        "num_class_images", "prior_loss_weight", "resolution", "train_batch_size",
        "gradient_accumulation_steps", "mixed_precision", "train_text_encoder", "validation_prompt",
        "validation_steps", "checkpointing_steps",
    ]  # fmt: skip

    def overrides_from(values) -> dict[str, Any]:
        out = {}
        for key, value in zip(fields, values, strict=True):
            if value is None or value == "":
                continue
            if key in ("max_train_steps", "rank", "num_class_images", "resolution", "train_batch_size",
                       "gradient_accumulation_steps", "validation_steps", "checkpointing_steps"):  # fmt: skip
                value = int(value)
            out[key] = value
        return out

    @friendly
    def on_plan(request: gr.Request, ds, subject, tok, noun, base):
        studio = studios.get(request)
        if not ds:
            return ("Prepare photos first; the settings follow from the subject type and photo count.",
                    *[gr.skip()] * len(advanced))  # fmt: skip
        config = studio.plan_training(ds, subject_type=subject, token=tok, class_noun=noun, base_model=base)
        n = len(studio.dataset_report(ds)["accepted"])
        prior_text = (
            f"prior preservation with {config.num_class_images} class images of “{config.class_prompt}”"
            if config.with_prior_preservation
            else "no prior preservation"
        )
        text = (
            f"**Preset for {n} {subject} photos:** {config.max_train_steps} steps, rank {config.rank}, "
            f"learning rate {config.learning_rate:g}, {prior_text}. "
            f"Prompt: “{config.instance_prompt}”.\n\n{studio.estimate_text(config)}"
        )
        values = [getattr(config, f) for f in fields]
        return (text, *values)

    plan_inputs = [dataset, photos["subject"], photos["token"], photos["noun"], base_model]
    for trigger in (dataset.change, photos["subject"].change, base_model.change):
        trigger(on_plan, plan_inputs, [plan, *advanced], api_visibility="private")

    def on_prepared(request: gr.Request, ds):
        return gr.Dropdown(choices=studios.get(request).list_datasets(), value=ds or None)

    photos["dataset_state"].change(
        friendly(on_prepared),
        photos["dataset_state"],
        dataset,
    )

    def render(snap):
        state = snap["state"]
        metrics = snap.get("metrics", [])
        return (
            status_html(snap),
            # No value at all until there are points: a plot first given an empty frame keeps an
            # empty colour domain and never draws its lines.
            loss_frame(metrics) if metrics else None,
            sample_items(snap),
            gr.Button(visible=bool(snap.get("resumable"))),
            gr.Button(visible=bool(snap.get("adapter_name")) and state in ("finished", "stopped")),
            snap.get("adapter_name") or "",
        )

    render_outputs = [status, plot, samples, resume, go_generate, finished]

    @friendly
    def on_start(request: gr.Request, ds, subject, tok, noun, base, name, *values):
        studio = studios.get(request)
        if not ds:
            raise UserError("Prepare a photo set in the Photos tab first.")
        config = studio.plan_training(
            ds, subject_type=subject, token=tok, class_noun=noun, base_model=base,
            adapter_name=name or None, **overrides_from(values),
        )  # fmt: skip
        snap = studio.start_training(config)
        return (*render(snap), gr.Timer(active=True))

    @friendly
    def on_stop(request: gr.Request):
        snap = studios.get(request).stop_training()
        gr.Info(snap["message"])
        return (*render(snap), gr.Timer(active=snap["state"] in ("running", "stopping")))

    @friendly
    def on_resume(request: gr.Request):
        studio = studios.get(request)
        run_id = studio.training_status().get("run_id")
        snap = studio.resume_training(run_id)
        return (*render(snap), gr.Timer(active=True))

    def on_tick(request: gr.Request):
        snap = studios.get(request).training_status()
        return (*render(snap), gr.Timer(active=snap["state"] in ("running", "stopping")))

    start.click(
        on_start, [*plan_inputs, adapter_name, *advanced], [*render_outputs, timer], api_visibility="private"
    )
    stop.click(on_stop, None, [*render_outputs, timer], api_visibility="private")
    resume.click(on_resume, None, [*render_outputs, timer], api_visibility="private")
    timer.tick(on_tick, None, [*render_outputs, timer], api_visibility="private", show_progress="hidden")
    return {
        "dataset": dataset,
        "timer": timer,
        "render": render,
        "render_outputs": render_outputs,
        "finished": finished,
        "go_generate": go_generate,
    }


def _generate_tab(studios: Studios, base_model) -> dict[str, Any]:
    with gr.Tab("3 · Generate", id="generate"), gr.Row():
        with gr.Column(scale=1):
            gallery = gr.Gallery(
                label="Your subjects (click one)", columns=3, height=240, allow_preview=False
            )
            adapter = gr.Dropdown([], label="Adapter", elem_id="adapter-pick")
            weight = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Adapter weight")
            with gr.Accordion("Blend a second adapter", open=False):
                second = gr.Dropdown([""], value="", label="Second adapter")
                second_weight = gr.Slider(0, 1.5, value=0.5, step=0.05, label="Second adapter weight")
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", value="blurry, low quality")
            with gr.Row():
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                guidance = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance")
                seed = gr.Number(0, label="Seed", precision=0)
            with gr.Row():
                width = gr.Number(0, label="Width (0: the model's)", precision=0, minimum=0)
                height = gr.Number(0, label="Height (0: the model's)", precision=0, minimum=0)
                count = gr.Slider(1, 4, value=1, step=1, label="Images")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                compare = gr.Button("Compare with / without the token", elem_id="compare-btn")
            images = gr.Gallery(label="Images", columns=2, height="auto", elem_id="images")

    def on_pick_thumb(evt: gr.SelectData):
        return (
            gr.Dropdown(value=evt.value["caption"]) if evt.value and evt.value.get("caption") else gr.skip()
        )

    @friendly
    def on_adapter(request: gr.Request, name):
        studio = studios.get(request)
        info = {a["name"]: a for a in studio.list_adapters()}.get(name)
        return info["instance_prompt"] if info and info.get("instance_prompt") else gr.skip()

    def kwargs_from(name, w, second_name, w2, neg, n_steps, g, s, wd, ht, n):
        return dict(
            adapter=name or None, adapter_weight=w, second_adapter=second_name or None, second_weight=w2,
            negative_prompt=neg, steps=n_steps, guidance=g, seed=s, width=wd, height=ht, num_images=n,
        )  # fmt: skip

    @friendly
    def on_generate(request: gr.Request, text, name, *rest):
        studio = studios.get(request)
        paths = studio.generate(text, **kwargs_from(name, *rest))
        return [str(p) for p in paths]

    @friendly
    def on_compare(request: gr.Request, text, name, *rest):
        studio = studios.get(request)
        info = {a["name"]: a for a in studio.list_adapters()}.get(name) or {}
        token = info.get("token") or ""
        if not token:
            raise UserError("Pick an adapter with a trigger token to compare with and without it.")
        _grid, labelled = studio.compare_token(text, token, **kwargs_from(name, *rest))
        return [(str(p), label) for label, p in labelled]

    settings = [adapter, weight, second, second_weight, negative, steps, guidance, seed, width, height, count]
    gallery.select(on_pick_thumb, None, adapter)
    adapter.change(on_adapter, adapter, prompt)
    go.click(on_generate, [prompt, *settings], images, api_visibility="private")
    compare.click(on_compare, [prompt, *settings], images, api_visibility="private")
    return {"gallery": gallery, "adapter": adapter, "second_adapter": second}


def _gallery_tab(studios: Studios) -> dict[str, Any]:
    with gr.Tab("4 · Gallery", id="gallery"), gr.Row():
        with gr.Column(scale=1):
            adapter = gr.Dropdown([], label="Adapter", elem_id="gallery-pick")
            details = gr.Markdown(elem_id="gallery-details")
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=2)
                rename = gr.Button("Rename", scale=1)
            delete = gr.Button("Delete (restorable)", variant="stop")
            with gr.Row():
                deleted = gr.Dropdown([], label="Deleted adapters", scale=2)
                restore = gr.Button("Restore", scale=1)
        with gr.Column(scale=2):
            samples = gr.Gallery(label="Samples", columns=3, height=260)
            files = gr.File(label="Download (diffusers weights, A1111/ComfyUI file, zip of everything)")
            with gr.Accordion("Push to the Hugging Face Hub", open=False):
                repo = gr.Textbox(label="Repository", placeholder="your-name/sks-dog-lora")
                hf_token = gr.Textbox(label="Access token (write)", type="password")
                private = gr.Checkbox(True, label="Private repository")
                push = gr.Button("Push")
                pushed = gr.Markdown()

    def show(studio: Studio, name):
        adapters = {a["name"]: a for a in studio.list_adapters()}
        info = adapters.get(name)
        trash = [a["name"] for a in studio.deleted_adapters()]
        if not info:
            return adapter_markdown(None), [], None, gr.Dropdown(choices=trash, value=None)
        folder = Path(info["folder"])
        pics = [str(p) for p in sorted((folder / "samples").rglob("*.png"))][:12]
        downloads = [str(p) for p in sorted(folder.glob("*.safetensors"))]
        return adapter_markdown(info), pics, downloads or None, gr.Dropdown(choices=trash, value=None)

    def pickers(studio: Studio, selected):
        names = adapter_choices(studio.list_adapters())
        value = selected if selected in names else (names[0] if names else None)
        return gr.Dropdown(choices=names, value=value)

    @friendly
    def on_rename(request: gr.Request, name, new):
        studio = studios.get(request)
        info = studio.rename_adapter(name, new)
        gr.Info(f"Renamed to {info['name']}.")
        return pickers(studio, info["name"])

    @friendly
    def on_delete(request: gr.Request, name):
        studio = studios.get(request)
        if not name:
            raise UserError("Select an adapter first.")
        studio.delete_adapter(name)
        gr.Info(f"{name} moved to the deleted adapters; Restore brings it back.")
        return pickers(studio, None)

    @friendly
    def on_restore(request: gr.Request, name):
        studio = studios.get(request)
        if not name:
            raise UserError("Select a deleted adapter to restore.")
        info = studio.restore_adapter(name)
        return pickers(studio, info["name"])

    @friendly
    def on_push(request: gr.Request, name, repo_id, token, is_private):
        url = studios.get(request).push_adapter(name, repo_id, token, private=is_private)
        return f"Pushed to [{url}]({url})."

    @friendly
    def on_select(request: gr.Request, name):
        studio = studios.get(request)
        out = show(studio, name)
        if name:
            zipped = studio.export_adapter(name)
            out = (*out[:2], [*(out[2] or []), str(zipped)], out[3])
        return out

    adapter.change(on_select, adapter, [details, samples, files, deleted])
    rename.click(on_rename, [adapter, new_name], adapter, api_visibility="private")
    delete.click(on_delete, adapter, adapter, api_visibility="private")
    restore.click(on_restore, deleted, adapter, api_visibility="private")
    push.click(on_push, [adapter, repo, hf_token, private], pushed, api_visibility="private")
    return {"adapter": adapter}


RUN_COLUMNS = [
    ("run_id", "run"), ("status", "status"), ("step", "step"), ("max_train_steps", "of"),
    ("learning_rate", "learning rate"), ("rank", "rank"), ("prior_loss_weight", "prior weight"),
    ("base_model", "base model"), ("final_loss", "final loss"), ("smoothed_final_loss", "smoothed"),
]  # fmt: skip
LOSS_KEYS = {"total": "loss", "instance": "instance_loss", "prior": "prior_loss"}


def _runs_tab(studios: Studios) -> dict[str, Any]:
    with gr.Tab("5 · Runs", id="runs") as tab:
        with gr.Row():
            refresh = gr.Button("Refresh", scale=0, min_width=120)
            gr.Markdown("Every training run, newest first. Tick two or more to overlay their losses and "
                        "see their validation images side by side.")  # fmt: skip
        table = gr.Dataframe(
            headers=[label for _, label in RUN_COLUMNS], interactive=False, elem_id="runs-table"
        )
        selected = gr.CheckboxGroup([], label="Compare runs", elem_id="runs-compare")
        with gr.Row():
            loss = gr.Radio(list(LOSS_KEYS), value="total", label="Loss")
            step = gr.Dropdown([], label="Validation images at step")
        with gr.Row():
            plot = gr.LinePlot(
                x="step", y="smoothed", color="run", label="Smoothed loss", height=320, elem_id="runs-plot"
            )
            images = gr.Gallery(label="Validation images", columns=4, height=320, elem_id="runs-images")
        with gr.Row():
            pick = gr.Dropdown([], label="Run", scale=2)
            open_btn = gr.Button("Open its adapter in Generate", scale=1)
            delete = gr.Button("Delete run", variant="stop", scale=1)

    @friendly
    def on_refresh(request: gr.Request, chosen):
        rows = studios.get(request).list_runs()
        ids = [r["run_id"] for r in rows]
        table_rows = [[_cell(r.get(key)) for key, _ in RUN_COLUMNS] for r in rows]
        keep = [c for c in (chosen or []) if c in ids]
        return (
            table_rows or None,
            gr.CheckboxGroup(choices=ids, value=keep),
            gr.Dropdown(choices=ids, value=ids[0] if ids else None),
        )

    @friendly
    def on_compare(request: gr.Request, chosen, which, at_step):
        studio = studios.get(request)
        chosen = chosen or []
        curves = studio.compare_runs(chosen, LOSS_KEYS[which]) if chosen else []
        frame = typed_frame(
            [[c["run"], c["step"], c["value"], c["smoothed"]] for c in curves],
            {"run": "str", "step": "int64", "value": "float64", "smoothed": "float64"},
        )
        by_step = studio.run_samples(chosen) if chosen else {}
        steps = list(by_step)
        value = at_step if at_step in steps else (steps[-1] if steps else None)
        items = [(str(p), f"{run} · step {value} · {p.stem}") for run, p in by_step.get(value, [])]
        return frame, gr.Dropdown(choices=steps, value=value), items

    @friendly
    def on_delete(request: gr.Request, run_id):
        if not run_id:
            raise UserError("Pick a run first.")
        studios.get(request).delete_run(run_id)
        gr.Info(f"Deleted the run {run_id}.")

    tab.select(on_refresh, selected, [table, selected, pick])
    refresh.click(on_refresh, selected, [table, selected, pick], api_visibility="private")
    for trigger in (selected.change, loss.change, step.input):
        trigger(on_compare, [selected, loss, step], [plot, step, images], api_visibility="private")
    delete.click(on_delete, pick, None, api_visibility="private").then(
        on_refresh, selected, [table, selected, pick]
    )
    return {"pick": pick, "open": open_btn}


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return "" if value is None else value
