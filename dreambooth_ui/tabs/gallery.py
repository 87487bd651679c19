"""Gallery tab: the saved adapters as a grid of cards (sample, name, trigger, base model, steps, date);
a click (or Enter) selects one, and beside the selection: its details and samples, downloads, rename,
delete with an undo (restore), and push to the Hub.

The card images are small copies sent inside the page (data URIs): the data folder is never served by
path (access.PrivateFiles), and a copy re-encoded here can only be a picture."""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from trainer_core.inference import LORA_WEIGHT_NAME

from ..studio import Studio, Studios, UserError
from ..views import NO_ADAPTERS, adapter_cards, adapter_choices, adapter_markdown
from . import bind

THUMB_SIDE = 192  # px of a card's image (twice its drawn size on a phone, for sharp screens)

# A card is a button: a click or Enter/Space selects it at once (pressed), and the server's answer
# redraws the grid; the keyboard's place is kept across that redraw.
PICK_JS = """
let chosen = null;
element.addEventListener('click', (e) => {
  const card = e.target.closest('button[data-adapter]');
  if (!card) return;
  chosen = element.contains(document.activeElement) ? card.dataset.adapter : null;
  element.querySelectorAll('button[data-adapter]').forEach(
    (c) => c.setAttribute('aria-pressed', c === card ? 'true' : 'false'));
  trigger('select', {index: Number(card.dataset.index), value: card.dataset.adapter});
});
watch('value', () => {
  if (chosen === null) return;
  const card = [...element.querySelectorAll('button[data-adapter]')].find((c) => c.dataset.adapter === chosen);
  if (card) card.focus();
});
"""

CARD_CSS = """
.adapter-grid {display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px;}
.adapter-card {display: flex; flex-direction: column; gap: 2px; padding: 8px; min-width: 0; text-align: left;
  font: inherit; color: var(--body-text-color); background: var(--background-fill-primary); cursor: pointer;
  border: 2px solid var(--border-color-primary); border-radius: var(--radius-lg);}
.adapter-card:hover {border-color: var(--color-accent-soft);}
.adapter-card[aria-pressed=true] {border-color: var(--color-accent); box-shadow: 0 0 0 3px var(--color-accent-soft);}
.adapter-card:focus-visible {outline: 3px solid var(--color-accent); outline-offset: 2px;}
.adapter-card img, .adapter-card .no-sample {width: 100%; aspect-ratio: 1; object-fit: cover; margin-bottom: 4px;
  border-radius: var(--radius-md); background: var(--neutral-100);}
.adapter-card .no-sample {display: flex; align-items: center; justify-content: center; color: #4b5563;}
.card-name {font-weight: 600; overflow-wrap: anywhere;}
.card-meta {font-size: var(--text-sm); color: #4b5563; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;}
"""


@dataclass(frozen=True)
class GalleryTab:
    # The selected adapter (set by a card, or by another tab); its changes are what other tabs follow.
    adapter: gr.Dropdown


def build(studios: Studios) -> GalleryTab:
    with gr.Tab("4 · Gallery", id="gallery") as tab, gr.Row(elem_classes="phone-stack"):
        with gr.Column(scale=3):
            cards = gr.HTML(NO_ADAPTERS, elem_id="gallery-cards", js_on_load=PICK_JS, css_template=CARD_CSS)
        with gr.Column(scale=2, elem_id="gallery-selection"):
            # Not shown: the cards are the picker. Kept in the page ("hidden", not False) so that its
            # value changes still fire the events the tabs listen to.
            adapter = gr.Dropdown([], label="Selected adapter", visible="hidden", elem_id="gallery-pick")
            details = gr.Markdown(adapter_markdown(None), elem_id="gallery-details")
            with gr.Column(elem_id="gallery-downloads"):
                downloads = [
                    gr.DownloadButton("Download diffusers weights (.safetensors)", visible=False, size="md",
                                      elem_id="download-weights"),
                    gr.DownloadButton("Download for A1111 / ComfyUI (.safetensors)", visible=False, size="md",
                                      elem_id="download-single-file"),
                    # Pivotal tuning: A1111 and ComfyUI need these beside the LoRA for the trigger word.
                    gr.DownloadButton("Download the token embeddings (A1111 / ComfyUI)", visible=False,
                                      size="md", elem_id="download-embeddings"),
                    gr.DownloadButton("Download everything (.zip)", visible=False, size="md",
                                      elem_id="download-zip"),
                ]  # fmt: skip
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=2)
                rename = gr.Button("Rename", scale=1)
            delete = gr.Button("Delete (restorable)", variant="stop", elem_id="delete-btn")
            with gr.Row():
                deleted = gr.Dropdown([], label="Deleted adapters", scale=2, elem_id="trash-pick")
                restore = gr.Button("Restore (undo)", scale=1, elem_id="restore-btn")
            samples = gr.Gallery(label="Samples", columns=4, height=240, elem_id="gallery-samples")
            with gr.Accordion("Push to the Hugging Face Hub", open=False):
                repo = gr.Textbox(label="Repository", placeholder="your-name/sks-dog-lora")
                hf_token = gr.Textbox(label="Access token (write)", type="password")
                private = gr.Checkbox(True, label="Private repository")
                push = gr.Button("Push")
                pushed = gr.Markdown()

    cards.select(bind(on_pick_card, studios), None, adapter, api_visibility="private")
    selection = [cards, details, samples, *downloads, deleted]
    adapter.change(bind(on_select, studios), [adapter, deleted], selection)
    # Opening the tab redraws the cards: adapters may have come from elsewhere (the CLI, another page).
    tab.select(bind(on_select, studios), [adapter, deleted], selection, api_visibility="private")
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


@functools.lru_cache(maxsize=512)
def _thumbnail_uri(path: str, mtime_ns: int) -> str:
    """A small JPEG copy of a sample image as a data URI (cached per file version)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def card_images(adapters: list[dict]) -> dict[str, str]:
    """Each adapter's card image (its first sample) as a data URI; none where it has no readable sample."""
    images = {}
    for a in adapters:
        try:
            path = Path(a["thumbnail"])
            images[a["name"]] = _thumbnail_uri(str(path), path.stat().st_mtime_ns)
        except (TypeError, KeyError, OSError, ValueError):  # no sample, or one that is not an image
            continue
    return images


def downloads_of(studio: Studio, info: dict | None) -> list:
    """The download buttons for the selected adapter: the diffusers weights, the kohya-style file for
    AUTOMATIC1111 / ComfyUI, a pivotal adapter's token embeddings (those tools need them beside the
    LoRA) and a zip of the folder; each hidden where there is no such file."""
    if not info:
        return [gr.DownloadButton(value=None, visible=False)] * 4
    folder = Path(info["folder"])
    named = adapter_files(folder)
    if not named.get("kohya"):  # an adapter.json from before "files" was written: the file's own name
        single = [p.name for p in sorted(folder.glob("*.safetensors"))
                  if p.name != LORA_WEIGHT_NAME and not p.name.endswith("_emb.safetensors")]  # fmt: skip
        named["kohya"] = single[0] if single else ""
    files = [
        folder / LORA_WEIGHT_NAME,
        folder / named["kohya"] if named.get("kohya") else None,
        folder / named["embeddings"] if named.get("embeddings") else None,
    ]
    files = [f if f is not None and f.is_file() and f.parent == folder else None for f in files]
    files.append(studio.export_adapter(info["name"]))
    return [gr.DownloadButton(value=str(f) if f else None, visible=f is not None) for f in files]


def adapter_files(folder: Path) -> dict[str, str]:
    """adapter.json's "files" (kohya, embeddings: file names in the folder); {} when unreadable."""
    import json

    try:
        files = json.loads((folder / "adapter.json").read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return (
        {k: Path(str(v)).name for k, v in files.items() if isinstance(v, str)}
        if isinstance(files, dict)
        else {}
    )


def on_pick_card(studios: Studios, request: gr.Request, evt: gr.SelectData):
    """A card was clicked: it becomes the selected adapter (when it is still one of this user's)."""
    names = adapter_choices(studios.get(request).list_adapters())
    if evt.value not in names:
        return gr.skip()
    return gr.Dropdown(choices=names, value=evt.value)


def on_select(studios: Studios, request: gr.Request, name, deleted):
    studio = studios.get(request)
    adapters = studio.list_adapters()
    info = {a["name"]: a for a in adapters}.get(name)
    cards = adapter_cards(adapters, name, card_images(adapters))
    trash = _trash(studio, deleted)
    if not info:
        return cards, adapter_markdown(None), [], *downloads_of(studio, None), trash
    pics = [str(p) for p in sorted((Path(info["folder"]) / "samples").rglob("*.png"))][:12]
    info = {**info, "scores": studio.adapter_scores(name)}  # an exported checkpoint's round
    return cards, adapter_markdown(info), pics, *downloads_of(studio, info), trash


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
    gr.Info(f"{name} moved to the deleted adapters; Restore (undo) brings it back.")
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
