"""Runs tab: every training run in a table; tick several to overlay their losses, compare their
scores per step (each run's best checkpoint marked) and see their validation images side by side;
open a run's adapter in Generate, export one of its checkpoints as an adapter, or delete the run."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..studio import Studios, UserError
from ..views import RUN_COLUMNS, SCORE_COLUMNS, best_markdown, color_map, curves_frame, run_rows, score_rows
from . import bind

LOSS_KEYS = {"total": "loss", "instance": "instance_loss", "prior": "prior_loss"}


@dataclass(frozen=True)
class RunsTab:
    pick: gr.Dropdown  # the one run the buttons act on
    open: gr.Button  # "Open its adapter in Generate" (wired across tabs)
    export_step: gr.Dropdown  # a saved checkpoint's step of the picked run
    export: gr.Button  # "Export checkpoint as adapter" (wired across tabs: the pickers follow)


def build(studios: Studios) -> RunsTab:
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
        with gr.Row(elem_classes="phone-stack"):
            # The title inside the chart, not a block label: a label pushes the legend out of the box.
            plot = gr.LinePlot(
                x="step", y="smoothed", color="run", title="Smoothed loss", show_label=False, height=320,
                elem_id="runs-plot",
            )  # fmt: skip
            images = gr.Gallery(label="Validation images", columns=4, height=320, elem_id="runs-images")
        scores = gr.Dataframe(
            headers=SCORE_COLUMNS, interactive=False, label="Scores per step (PRES: lower is better)",
            elem_id="runs-scores",
        )  # fmt: skip
        best = gr.Markdown(elem_id="runs-best")
        with gr.Row():
            pick = gr.Dropdown([], label="Run", scale=2)
            open_btn = gr.Button("Open its adapter in Generate", scale=1)
            delete = gr.Button("Delete run", variant="stop", scale=1)
        with gr.Row():
            export_step = gr.Dropdown(
                [], label="Checkpoint step (★: the run's best)", scale=2, elem_id="export-step"
            )
            export = gr.Button("Export checkpoint as adapter", scale=1, elem_id="export-btn")

    listing = [table, selected, pick]
    tab.select(bind(on_refresh, studios), selected, listing)
    refresh.click(bind(on_refresh, studios), selected, listing, api_visibility="private")
    for trigger in (selected.change, loss.change, step.input):
        trigger(
            bind(on_compare, studios), [selected, loss, step], [plot, step, images], api_visibility="private"
        ).then(on_plot_colors, selected, plot, show_progress="hidden")
    selected.change(bind(on_scores, studios), selected, [scores, best], api_visibility="private")
    pick.change(bind(on_checkpoints, studios), pick, export_step, api_visibility="private")
    delete.click(bind(on_delete, studios), pick, None, api_visibility="private").then(
        bind(on_refresh, studios), selected, listing
    )
    return RunsTab(pick=pick, open=open_btn, export_step=export_step, export=export)


def on_refresh(studios: Studios, request: gr.Request, chosen):
    rows = studios.get(request).list_runs()
    ids = [r["run_id"] for r in rows]
    keep = [c for c in (chosen or []) if c in ids]
    return (
        run_rows(rows) or None,
        gr.CheckboxGroup(choices=ids, value=keep),
        gr.Dropdown(choices=ids, value=ids[0] if ids else None),
    )


def on_compare(studios: Studios, request: gr.Request, chosen, which, at_step):
    studio = studios.get(request)
    chosen = chosen or []
    frame = curves_frame(studio.compare_runs(chosen, LOSS_KEYS[which]) if chosen else [])
    by_step = studio.run_samples(chosen) if chosen else {}
    steps = list(by_step)
    value = at_step if at_step in steps else (steps[-1] if steps else None)
    items = [(str(p), f"{run} · step {value} · {p.stem}") for run, p in by_step.get(value, [])]
    return frame, gr.Dropdown(choices=steps, value=value), items


def on_plot_colors(chosen):
    """After the new curves are in the plot: one colour per ticked run, which redraws the chart with
    a line and a legend entry for each (a new value alone keeps the first runs' lines)."""
    return gr.LinePlot(color_map=color_map(chosen or []))


def on_delete(studios: Studios, request: gr.Request, run_id):
    if not run_id:
        raise UserError("Pick a run first.")
    studios.get(request).delete_run(run_id)
    gr.Info(f"Deleted the run {run_id}.")


def on_scores(studios: Studios, request: gr.Request, chosen):
    runs = studios.get(request).run_scores(chosen or [])
    return score_rows(runs) or None, best_markdown(runs)


def on_checkpoints(studios: Studios, request: gr.Request, run_id):
    """The picked run's saved checkpoint steps; its best one marked and chosen."""
    if not run_id:
        return gr.Dropdown(choices=[], value=None)
    steps, best = studios.get(request).run_checkpoints(run_id)
    choices = [(f"{s} ★ best" if s == best else str(s), s) for s in steps]
    return gr.Dropdown(choices=choices, value=best if best is not None else (steps[-1] if steps else None))
