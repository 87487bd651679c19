"""What ties the tabs together, in one place: the page's first load, a finished run offered to the
adapter pickers, and the Gallery and Runs tabs handing an adapter to Generate.

Every adapter picker on the page is refreshed by one function, `adapter_pickers`."""

from __future__ import annotations

import gradio as gr

from .studio import Studio, Studios, UserError
from .tabs import bind
from .tabs import train as train_tab
from .tabs.gallery import GalleryTab
from .tabs.generate import GenerateTab
from .tabs.runs import RunsTab
from .tabs.train import TrainTab
from .views import adapter_choices, adapter_gallery


def adapter_pickers(studio: Studio, selected: str | None = None, second: str | None = None) -> tuple:
    """Values for Generate's thumbnails, adapter and second adapter, and the Gallery's adapter:
    `selected` where it still exists (else the first adapter), `second` likewise (else none)."""
    adapters = studio.list_adapters()
    names = adapter_choices(adapters)
    value = selected if selected in names else (names[0] if names else None)
    return (
        adapter_gallery(adapters),
        gr.Dropdown(choices=names, value=value),
        gr.Dropdown(choices=["", *names], value=second if second in names else ""),
        gr.Dropdown(choices=names, value=value),
    )


def wire_cross_tab(
    demo: gr.Blocks,
    studios: Studios,
    tabs: gr.Tabs,
    base_note: gr.Markdown,
    train: TrainTab,
    generate: GenerateTab,
    gallery: GalleryTab,
    runs: RunsTab,
) -> None:
    all_pickers = [*generate.pickers, gallery.adapter]
    # Two loads: the base-model note imports part of the engine (seconds, the first time), and a
    # slow load that answered after the person had prepared photos would reset the photo set.
    demo.load(bind(on_load, studios), None, [train.dataset, *train.view, *all_pickers])
    for trigger in (demo.load, train.base_model.change):
        trigger(bind(on_base_note, studios), train.base_model, base_note)
    train.finished.change(bind(on_finished, studios), train.finished, all_pickers)
    train.go_generate.click(lambda: gr.Tabs(selected="generate"), None, tabs)
    # A rename, delete or restore in the Gallery changes the list Generate offers (its choice is kept).
    gallery.adapter.change(
        bind(on_gallery_changed, studios), [generate.adapter, generate.second_adapter], generate.pickers
    )
    runs.open.click(bind(on_open_run, studios), runs.pick, [*all_pickers, tabs])
    # An exported checkpoint is a new adapter: every picker offers it, selected (the Gallery shows it).
    runs.export.click(bind(on_export_checkpoint, studios), [runs.pick, runs.export_step], all_pickers)


def on_load(studios: Studios, request: gr.Request):
    """Whatever happened before this page was opened (a job running, an app restart)."""
    studio = studios.get(request)
    datasets = studio.list_datasets()
    return (
        gr.Dropdown(choices=datasets, value=(datasets or [None])[0]),
        *train_tab.render(studio.training_status()),
        *adapter_pickers(studio),
    )


def on_base_note(studios: Studios, request: gr.Request, base):
    return studios.get(request).base_model_note(base)


def on_finished(studios: Studios, request: gr.Request, name):
    """A run ended with an adapter: offer it everywhere, selected."""
    return adapter_pickers(studios.get(request), name)


def on_gallery_changed(studios: Studios, request: gr.Request, current, second):
    return adapter_pickers(studios.get(request), current, second)[:3]


def on_open_run(studios: Studios, request: gr.Request, run_id):
    studio = studios.get(request)
    if not run_id:
        raise UserError("Pick a run first.")
    return (*adapter_pickers(studio, studio.run_adapter(run_id)), gr.Tabs(selected="generate"))


def on_export_checkpoint(studios: Studios, request: gr.Request, run_id, step):
    studio = studios.get(request)
    if not run_id:
        raise UserError("Pick a run first.")
    info = studio.export_checkpoint(run_id, step)
    gr.Info(f"Exported step {step} of {run_id} as the adapter {info['name']}.")
    return adapter_pickers(studio, info["name"])
