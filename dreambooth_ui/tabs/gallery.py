"""Gallery tab: the saved adapters; details, samples and downloads of one; rename, delete (restorable),
restore and push to the Hub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..studio import Studio, Studios, UserError
from ..views import adapter_choices, adapter_markdown
from . import bind


@dataclass(frozen=True)
class GalleryTab:
    adapter: gr.Dropdown  # the selected adapter; its changes are what other tabs follow


def build(studios: Studios) -> GalleryTab:
    with gr.Tab("4 · Gallery", id="gallery"), gr.Row():
        with gr.Column(scale=1):
            adapter = gr.Dropdown([], label="Adapter", elem_id="gallery-pick")
            details = gr.Markdown(elem_id="gallery-details")
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=2)
                rename = gr.Button("Rename", scale=1)
            delete = gr.Button("Delete (restorable)", variant="stop", elem_id="delete-btn")
            with gr.Row():
                deleted = gr.Dropdown([], label="Deleted adapters", scale=2)
                restore = gr.Button("Restore", scale=1, elem_id="restore-btn")
        with gr.Column(scale=2):
            samples = gr.Gallery(label="Samples", columns=3, height=260)
            files = gr.File(label="Download (diffusers weights, A1111/ComfyUI file, zip of everything)")
            with gr.Accordion("Push to the Hugging Face Hub", open=False):
                repo = gr.Textbox(label="Repository", placeholder="your-name/sks-dog-lora")
                hf_token = gr.Textbox(label="Access token (write)", type="password")
                private = gr.Checkbox(True, label="Private repository")
                push = gr.Button("Push")
                pushed = gr.Markdown()

    adapter.change(bind(on_select, studios), [adapter, deleted], [details, samples, files, deleted])
    rename.click(bind(on_rename, studios), [adapter, new_name], adapter, api_visibility="private")
    delete.click(bind(on_delete, studios), adapter, [adapter, deleted], api_visibility="private")
    restore.click(bind(on_restore, studios), deleted, adapter, api_visibility="private")
    push.click(bind(on_push, studios), [adapter, repo, hf_token, private], pushed, api_visibility="private")
    return GalleryTab(adapter=adapter)


def _picker(studio: Studio, selected: str | None) -> gr.Dropdown:
    names = adapter_choices(studio.list_adapters())
    return gr.Dropdown(choices=names, value=selected if selected in names else (names[0] if names else None))


def _trash(studio: Studio, selected: str | None) -> gr.Dropdown:
    names = [a["name"] for a in studio.deleted_adapters()]
    return gr.Dropdown(choices=names, value=selected if selected in names else None)


def on_select(studios: Studios, request: gr.Request, name, deleted):
    studio = studios.get(request)
    info = {a["name"]: a for a in studio.list_adapters()}.get(name)
    trash = _trash(studio, deleted)
    if not info:
        return adapter_markdown(None), [], None, trash
    folder = Path(info["folder"])
    pics = [str(p) for p in sorted((folder / "samples").rglob("*.png"))][:12]
    downloads = [str(p) for p in sorted(folder.glob("*.safetensors"))]
    downloads.append(str(studio.export_adapter(name)))
    info = {**info, "scores": studio.adapter_scores(name)}  # an exported checkpoint's round
    return adapter_markdown(info), pics, downloads, trash


def on_rename(studios: Studios, request: gr.Request, name, new):
    studio = studios.get(request)
    info = studio.rename_adapter(name, new)
    gr.Info(f"Renamed to {info['name']}.")
    return _picker(studio, info["name"])


def on_delete(studios: Studios, request: gr.Request, name):
    studio = studios.get(request)
    if not name:
        raise UserError("Select an adapter first.")
    studio.delete_adapter(name)
    gr.Info(f"{name} moved to the deleted adapters; Restore brings it back.")
    # The one just deleted is selected under "Deleted adapters": Restore right away is an undo.
    return _picker(studio, None), _trash(studio, name)


def on_restore(studios: Studios, request: gr.Request, name):
    studio = studios.get(request)
    if not name:
        raise UserError("Select a deleted adapter to restore.")
    return _picker(studio, studio.restore_adapter(name)["name"])


def on_push(studios: Studios, request: gr.Request, name, repo_id, token, is_private):
    url = studios.get(request).push_adapter(name, repo_id, token, private=is_private)
    return f"Pushed to [{url}]({url})."
