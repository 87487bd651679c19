"""Photos tab: upload, check, crop and caption a photo set; captions are editable in place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from trainer_core.config import SUBJECT_TYPES
from trainer_core.events import Progress

from ..studio import CAPTIONERS, CROP_MODES, Studios
from ..views import prep_views
from . import bind

DEFAULT_NOUNS = {"person": "person", "pet": "dog", "object": "object", "style": "style"}


@dataclass(frozen=True)
class PhotosTab:
    subject: gr.Radio
    token: gr.Textbox
    noun: gr.Textbox
    dataset: gr.State  # the name of the set just prepared


def build(studios: Studios, base_model: gr.Dropdown) -> PhotosTab:
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
            # Warnings are sentences: wrapped in full, and every row on the page (no inner scroll).
            wrap=True,
            max_height=100_000,
            column_widths=["22%", "38%", "40%"],
        )
        rejected = gr.Dataframe(headers=["file", "reason"], label="Not used", interactive=False)
        dataset = gr.State("")

    subject.change(lambda s: DEFAULT_NOUNS.get(s, "person"), subject, noun)
    prepare.click(
        bind(on_prepare, studios),
        [files, token, noun, crop, caption, name, base_model],
        [summary, prepared, captions, rejected, dataset],
        api_visibility="private",
    )
    captions.input(bind(on_caption_edit, studios), [captions, dataset], None, api_visibility="private")
    return PhotosTab(subject=subject, token=token, noun=noun, dataset=dataset)


def on_prepare(
    studios: Studios,
    request: gr.Request,
    paths: list[str] | None,
    token: str,
    noun: str,
    crop: str,
    captioner: str,
    set_name: str,
    base: str,
    progress=gr.Progress(),  # noqa: B008 - Gradio's way to draw a progress bar
):
    studio = studios.get(request)

    def emit(event: Any) -> None:
        if isinstance(event, Progress) and event.total:
            label = "Writing captions" if event.stage == "caption" else "Checking and cropping photos"
            progress((event.current, event.total), desc=label)

    report = studio.prepare_photos(
        paths or [], set_name, token=token.strip(), class_noun=noun.strip(), crop=crop, caption=captioner,
        base_model=base, emit=emit,
    )  # fmt: skip
    return (*prep_views(report), report["dataset"])


def on_caption_edit(studios: Studios, request: gr.Request, table, dataset: str):
    studio = studios.get(request)
    if not dataset or table is None:
        return gr.skip()
    current = {a["output"]: a["caption"] for a in studio.dataset_report(dataset)["accepted"]}
    for output, text, _warnings in table.itertuples(index=False):
        if output in current and text != current[output]:
            studio.set_caption(dataset, output, text)
    return gr.skip()
