"""Generate tab: pick an adapter (or two to blend), write a prompt, make images; or compare the
same seed with and without the trigger token."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from trainer_core.planning import recommended_sampling

from ..studio import Studios, UserError
from . import bind


@dataclass(frozen=True)
class GenerateTab:
    gallery: gr.Gallery  # adapter thumbnails: click one to pick it
    adapter: gr.Dropdown
    second_adapter: gr.Dropdown
    settings: dict[str, gr.components.Component]  # Studio.generate keyword -> its box
    past: gr.State  # [(image path, caption)] of this page's results, newest first

    @property
    def pickers(self) -> list:
        return [self.gallery, self.adapter, self.second_adapter]


def build(studios: Studios) -> GenerateTab:
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
                seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="seed")
                dice = gr.Button("Random seed", scale=0, min_width=120)
            with gr.Row():
                width = gr.Number(0, label="Width (0: the model's)", precision=0, minimum=0)
                height = gr.Number(0, label="Height (0: the model's)", precision=0, minimum=0)
                count = gr.Slider(1, 4, value=1, step=1, label="Images")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                compare = gr.Button("Compare with / without the token", elem_id="compare-btn")
            images = gr.Gallery(label="Images", columns=2, height="auto", elem_id="images")
            history = gr.Gallery(
                label="History (newest first; click one to reuse its seed)", columns=6, height="auto",
                allow_preview=False, elem_id="history",
            )  # fmt: skip
            past = gr.State([])  # [(image path, caption)], newest first

    settings = {
        "prompt": prompt, "adapter": adapter, "adapter_weight": weight, "second_adapter": second,
        "second_weight": second_weight, "negative_prompt": negative, "steps": steps, "guidance": guidance,
        "seed": seed, "width": width, "height": height, "num_images": count,
    }  # fmt: skip
    tab = GenerateTab(gallery=gallery, adapter=adapter, second_adapter=second, settings=settings, past=past)
    gallery.select(on_pick_thumb, None, adapter)
    adapter.change(bind(on_adapter, studios), adapter, [prompt, steps, guidance, negative])
    inputs = set(settings.values())
    results = [images, history, past]
    go.click(bind(on_generate, studios, tab), {*inputs, past}, results, api_visibility="private")
    compare.click(bind(on_compare, studios, tab), {*inputs, past}, results, api_visibility="private")
    history.select(on_pick_history, None, seed)
    dice.click(lambda: -1, None, seed)
    return tab


HISTORY = 48  # images kept in the History strip


def request_of(tab: GenerateTab, values: dict) -> dict[str, Any]:
    """The boxes' values as Studio.generate's keywords (an empty adapter box: none; a negative
    seed: a new random one, shown afterwards so it can be reused)."""
    out = {key: values[box] for key, box in tab.settings.items()}
    out["adapter"] = out["adapter"] or None
    out["second_adapter"] = out["second_adapter"] or None
    if out["seed"] is None or out["seed"] < 0:
        out["seed"] = random.randrange(2**31)
    return out


def caption(kwargs: dict[str, Any], label: str = "") -> str:
    """What made an image, short enough for a thumbnail: seed first (it is what people reuse)."""
    adapter = kwargs["adapter"] or "no adapter"
    extra = f" · {label}" if label else ""
    return (
        f"seed {kwargs['seed']} · {adapter} × {kwargs['adapter_weight']:g} · {kwargs['steps']} steps · "
        f"cfg {kwargs['guidance']:g}{extra} · {kwargs['prompt']}"
    )


def _results(items: list[tuple[str, str]], past: list | None) -> tuple:
    history = (items + list(past or []))[:HISTORY]
    return items, history, history


def on_pick_history(evt: gr.SelectData):
    text = (evt.value or {}).get("caption") or ""
    return int(text.split()[1]) if text.startswith("seed ") else gr.skip()


def on_pick_thumb(evt: gr.SelectData):
    return gr.Dropdown(value=evt.value["caption"]) if evt.value and evt.value.get("caption") else gr.skip()


def on_adapter(studios: Studios, request: gr.Request, name):
    """An adapter picked: its instance prompt, and the sampling that suits its base model if that
    differs from the usual (tiny-shapes: 20 steps, guidance 4, no negative prompt)."""
    info = {a["name"]: a for a in studios.get(request).list_adapters()}.get(name) or {}
    prompt = info["instance_prompt"] if info.get("instance_prompt") else gr.skip()
    sampling = recommended_sampling(info.get("base_model") or "")
    if not sampling:
        return prompt, gr.skip(), gr.skip(), gr.skip()
    return prompt, sampling["steps"], sampling["guidance"], sampling["negative_prompt"]


def step_progress(progress) -> Callable[[int, int], None]:
    """The engine's per-step callback drawing the page's progress bar ("Sampling 12/25 steps")."""
    progress(0, desc="Loading the model")  # the first request loads it: seconds before step 1

    def on_step(done: int, total: int) -> None:
        progress((done, total), desc="Sampling", unit="steps")

    return on_step


def on_generate(
    studios: Studios, tab: GenerateTab, request: gr.Request, values: dict, progress=gr.Progress()
):
    kwargs = request_of(tab, values)
    paths = studios.get(request).generate(**kwargs, on_step=step_progress(progress))
    return _results([(str(p), caption(kwargs)) for p in paths], values[tab.past])


def on_compare(studios: Studios, tab: GenerateTab, request: gr.Request, values: dict, progress=gr.Progress()):
    studio = studios.get(request)
    kwargs = request_of(tab, values)
    info = {a["name"]: a for a in studio.list_adapters()}.get(kwargs["adapter"]) or {}
    token = info.get("token") or ""
    if not token:
        raise UserError("Pick an adapter with a trigger token to compare with and without it.")
    _grid, labelled = studio.compare_token(token=token, **kwargs, on_step=step_progress(progress))
    items = [(str(p), caption(kwargs, label)) for label, p in labelled]
    return _results(items, values[tab.past])
