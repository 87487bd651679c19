"""Photos tab: upload, check, crop and caption a photo set; then edit it: captions in place, and a
picked photo re-cropped (click its original where the crop should be centred, or pick a crop mode)
or removed. The checks themselves (faces, outliers, blur) are the engine's; this tab shows them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from trainer_core.config import SUBJECT_TYPES
from trainer_core.events import Progress

from ..studio import CAPTIONERS, CROP_MODES, Studios
from ..views import crop_preview, picked_markdown, prep_views
from . import bind

DEFAULT_NOUNS = {"person": "person", "pet": "dog", "object": "object", "style": "style"}
PREVIEW_SIDE = 1024  # the picked photo's original is shown at most this large (clicks are scaled back)


@dataclass(frozen=True)
class PhotosTab:
    subject: gr.Radio
    token: gr.Textbox
    noun: gr.Textbox
    dataset: gr.State  # the name of the set just prepared
    removals: gr.State  # counts photos removed from it (the Train tab's photo count follows)


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
                example = gr.Button(
                    "No photos at hand? Use the example: one orange circle, for the tiny-shapes model",
                    size="sm",
                    elem_id="example-btn",
                )
            with gr.Column(scale=1):
                subject = gr.Radio(
                    list(SUBJECT_TYPES), value="person", label="Subject type", elem_id="subject-type"
                )
                with gr.Row():
                    token = gr.Textbox(
                        "sks", label="Trigger token", info="A rare word that will mean your subject."
                    )
                    noun = gr.Textbox(
                        "person",
                        label="Class noun",
                        info="What it is: person, dog, mug…",
                        elem_id="class-noun",
                    )
                with gr.Row():
                    crop = gr.Dropdown(list(CROP_MODES), value="auto", label="Crop")
                    caption = gr.Dropdown(list(CAPTIONERS), value="template", label="Captions")
                name = gr.Textbox(
                    "", label="Photo set name", placeholder="default: token-class, e.g. sks-person"
                )
                prepare = gr.Button("Prepare photos", variant="primary", elem_id="prepare-btn")
        summary = gr.Markdown(elem_id="prep-summary")
        prepared = gr.Gallery(
            label="Prepared photos (square crops): click one to re-crop or remove it",
            columns=6,
            height="auto",
            allow_preview=False,  # a click picks the photo for the editor below
            elem_id="prepared",
        )
        with gr.Group(visible=False, elem_id="photo-editor") as editor:
            picked_info = gr.Markdown(elem_id="picked-info")
            with gr.Row(elem_id="edit-images"):
                original = gr.Image(
                    label="Original: click where the crop should be centred",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="edit-original",
                )
                square = gr.Image(
                    label="The crop training sees", interactive=False, elem_id="edit-crop", format="png"
                )
            with gr.Row():
                side = gr.Slider(
                    10, 100, value=100, step=1, label="Crop size (% of the photo's short side)",
                    elem_id="edit-size",
                )  # fmt: skip
                mode = gr.Dropdown(
                    list(CROP_MODES),
                    value="auto",
                    label="Or pick a crop mode",
                    elem_id="edit-mode",
                )
            with gr.Row():
                recrop = gr.Button("Crop again with this mode", elem_id="recrop-btn")
                remove = gr.Button("Remove from the set", variant="stop", elem_id="remove-btn")
        # The picked photo's report entry (output, crop_box, source_size...) and the preview's scale.
        picked = gr.State({})
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
        removals = gr.State(0)

    # `input`: a person's click on a subject type; the example set filling it in keeps its own noun.
    subject.input(lambda s: DEFAULT_NOUNS.get(s, "person"), subject, noun)
    set_view = [summary, prepared, captions, rejected]
    editor_view = [editor, picked, picked_info, original, square, side]
    prepare.click(
        bind(on_prepare, studios),
        [files, subject, token, noun, crop, caption, name, base_model],
        [*set_view, dataset, *editor_view],
        api_visibility="private",
    )
    example.click(
        bind(on_example, studios),
        None,
        [*set_view, dataset, *editor_view, subject, token, noun, base_model],
        api_visibility="private",
    )
    captions.input(bind(on_caption_edit, studios), [captions, dataset], None, api_visibility="private")
    private = {"api_visibility": "private"}
    prepared.select(bind(on_pick, studios), dataset, editor_view, **private)
    original.select(bind(on_focus, studios), [dataset, picked, side], [*set_view, *editor_view], **private)
    side.release(bind(on_resize, studios), [dataset, picked, side], [*set_view, *editor_view], **private)
    recrop.click(bind(on_recrop, studios), [dataset, picked, mode], [*set_view, *editor_view], **private)
    remove.click(bind(on_remove, studios), [dataset, picked], [*set_view, *editor_view], **private).success(
        lambda n: n + 1, removals, removals, **private
    )
    return PhotosTab(subject=subject, token=token, noun=noun, dataset=dataset, removals=removals)


def on_prepare(
    studios: Studios,
    request: gr.Request,
    paths: list[str] | None,
    subject: str,
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
        subject_type=subject, base_model=base, emit=emit,
    )  # fmt: skip
    return (*prep_views(report), report["dataset"], *_no_editor())


def on_example(studios: Studios, request: gr.Request):
    """The example photo set (one orange circle) prepared for tiny-shapes, and the fields that go with it."""
    from trainer_core.tiny_shapes import MODEL_ID

    report = studios.get(request).prepare_example_photos()
    fields = ("object", report["token"], report["class_noun"], MODEL_ID)
    return (*prep_views(report), report["dataset"], *_no_editor(), *fields)


def on_caption_edit(studios: Studios, request: gr.Request, table, dataset: str):
    studio = studios.get(request)
    if not dataset or table is None:
        return gr.skip()
    current = {a["output"]: a["caption"] for a in studio.dataset_report(dataset)["accepted"]}
    for output, text, _warnings in table.itertuples(index=False):
        if output in current and text != current[output]:
            studio.set_caption(dataset, output, text)
    return gr.skip()


# ---- the picked photo -------------------------------------------------------------------------


def on_pick(studios: Studios, request: gr.Request, dataset: str, evt: gr.SelectData):
    """A prepared photo clicked in the gallery: show it in the editor."""
    studio = studios.get(request)
    accepted = studio.dataset_report(dataset)["accepted"] if dataset else []
    if not isinstance(evt.index, int) or not 0 <= evt.index < len(accepted):
        return _no_editor()
    return _editor(studio, dataset, accepted[evt.index]["output"])


def on_focus(
    studios: Studios, request: gr.Request, dataset: str, picked: dict, side: float, evt: gr.SelectData
):
    """A click on the original: the square is cropped again around that point."""
    studio = studios.get(request)
    if not picked or not evt.index:
        return gr.skip()
    x, y = evt.index[0] / picked["scale"], evt.index[1] / picked["scale"]
    return _after_crop(studio, dataset, picked, focus=(x, y), side=side)


def on_resize(studios: Studios, request: gr.Request, dataset: str, picked: dict, side: float):
    """The size slider let go: the square is cropped again around its own centre at that size."""
    studio = studios.get(request)
    if not picked:
        return gr.skip()
    left, top, right, bottom = picked["crop_box"]
    return _after_crop(studio, dataset, picked, focus=((left + right) / 2, (top + bottom) / 2), side=side)


def on_recrop(studios: Studios, request: gr.Request, dataset: str, picked: dict, mode: str):
    studio = studios.get(request)
    if not picked:
        return gr.skip()
    return _after_crop(studio, dataset, picked, crop=mode)


def on_remove(studios: Studios, request: gr.Request, dataset: str, picked: dict):
    studio = studios.get(request)
    if not picked:
        return gr.skip()
    report = studio.remove_photo(dataset, picked["output"])
    gr.Info(f"{picked['output']} removed from the set.")
    return (*prep_views(report), *_no_editor())


def _after_crop(studio, dataset: str, picked: dict, **how: Any):
    if "side" in how:  # the slider's percent of the photo's short side, in photo pixels
        how["side"] = max(8, round(min(picked["source_size"]) * how["side"] / 100))
    report = studio.recrop_photo(dataset, picked["output"], **how)
    return (*prep_views(report), *_editor(studio, dataset, picked["output"]))


def _editor(studio, dataset: str, output: str):
    """The editor's components (see `editor_view` in `build`) for one photo."""
    image, scale, entry = studio.photo_original(dataset, output, PREVIEW_SIDE)
    left, top, right, _ = entry["crop_box"]
    short = min(entry["source_size"])
    picked = {"output": output, "scale": scale, **entry}
    return (
        gr.Group(visible=True),
        picked,
        picked_markdown(entry),
        crop_preview(image, entry["crop_box"], scale),
        entry["square"],
        round(min(100, 100 * (right - left) / short)),
    )


def _no_editor():
    return gr.Group(visible=False), {}, "", None, None, gr.skip()
