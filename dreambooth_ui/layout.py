"""The page: a header, the base-model picker, five tabs over one `Studios`, and the automation API.

This module is the page's table of contents. Each tab lives in `tabs/<name>.py` (its layout, its own
events, module-level handlers); `wiring.py` ties the tabs together; `views.py` turns the Studio's
answers into what the page shows. Handlers turn the Studio's `UserError`s (and anything unexpected)
into one sentence in a toast, never a traceback. The training thread belongs to the Studio's
JobRunner, not to any browser session: the Train tab's `gr.Timer` polls its snapshot while a job
runs, and the page asks once on load, so a reload shows the truth.
"""

from __future__ import annotations

import gradio as gr

from . import api, wiring
from .studio import Studio, Studios
from .tabs import gallery, generate, photos, runs, train

CSS = """
.progress-outer {background: var(--neutral-200); border-radius: 6px; height: 14px; overflow: hidden;}
.progress-inner {background: var(--color-accent); height: 14px;}
#status-line {min-height: 3em;}
/* Help text under labels: the soft theme's grey measured 3.6:1 here; WCAG AA asks 4.5:1. */
[data-testid="block-info"], .block-info {color: #4b5563 !important;}
/* Photos: the prepared squares take the rows they need (Gradio's gallery keeps 450 px however few
   there are); the crop training sees fills its box even when it is a tiny model's 64 px square. */
#prepared .grid-wrap {min-height: 0 !important; height: auto !important;}
/* Galleries: the label above the pictures, not floating over the first row (it covered them, and
   a phone wraps it to two lines). */
.block:has(> .gallery-container) > label[data-testid="block-label"] {position: static; margin-bottom: 6px;}
.block:has(> .gallery-container) .grid-container.pt-6 {padding-top: 0;}
#edit-crop .image-frame {width: 100%; justify-content: center;}
#edit-crop img {width: min(100%, 480px) !important; height: auto !important; object-fit: contain !important;}
/* A phone: the base-model picker and its note stack instead of squeezing side by side, and so do the
   picked photo's original and crop; three squares to a row. */
@media (max-width: 640px) {
  #base-row, #edit-images {flex-direction: column; flex-wrap: wrap;}
  #base-row > *, #edit-images > * {width: 100%; min-width: 100%;}
  #prepared .grid-container {grid-template-columns: repeat(3, minmax(0, 1fr)) !important;}
}
/* A phone: rows marked phone-stack (settings four to a row, plots side by side, the gallery and its
   selection) put their boxes one under another, each the full width. Gradio wraps a row's form
   fields in a .form of their own, which stacks the same way. */
@media (max-width: 640px) {
  .phone-stack, .phone-stack > .form {flex-direction: column !important; flex-wrap: nowrap !important;}
  .phone-stack > *, .phone-stack > .form > * {width: 100% !important; min-width: 0 !important; flex: none !important;}
}
"""


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
        with gr.Row(elem_id="base-row"):
            base_model = gr.Dropdown(
                defaults.base_model_choices(),
                value=defaults.base_model,
                label="Base model",
                info="A Hub id, a local diffusers folder or a .safetensors file; tiny models are for trying the app offline.",
                allow_custom_value=True,
                scale=3,
            )
            base_note = gr.Markdown(elem_id="base-note")

        # Five tabs on every screen: a narrow one wraps them onto two lines (not behind "⋯").
        with gr.Tabs(overflow_behavior="wrap") as tabs:
            photos_tab = photos.build(studios, base_model)
            train_tab = train.build(studios, base_model, photos_tab)
            generate_tab = generate.build(studios)
            gallery_tab = gallery.build(studios)
            runs_tab = runs.build(studios)

        wiring.wire_cross_tab(demo, studios, tabs, base_note, train_tab, generate_tab, gallery_tab, runs_tab)
        api.register(studios)
    demo.queue(default_concurrency_limit=4)
    return demo
