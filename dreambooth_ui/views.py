"""What the page shows, as plain functions of the Studio's answers (a job snapshot, a prep report,
adapter and run lists): HTML, Markdown, tables and plot frames. No Gradio, no state."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

RUN_COLUMNS = [
    ("run_id", "run"), ("status", "status"), ("step", "step"), ("max_train_steps", "of"),
    ("learning_rate", "learning rate"), ("rank", "rank"), ("prior_loss_weight", "prior weight"),
    ("base_model", "base model"), ("final_loss", "final loss"), ("smoothed_final_loss", "smoothed"),
]  # fmt: skip


# Vega's tableau10, the colours the plots would pick themselves.
PALETTE = [
    "#4c78a8",
    "#f58518",
    "#e45756",
    "#72b7b2",
    "#54a24b",
    "#eeca3b",
    "#b279a2",
    "#ff9da6",
    "#9d755d",
    "#bab0ac",
]


def color_map(series: list[str]) -> dict[str, str]:
    """A colour per series. Gradio's plot fixes its colour domain (the lines and legend entries it
    draws) when the chart is built, and rebuilds it only when a setting such as this map changes,
    from the value it holds then: so set the new value first, then the map (see tabs/runs.py)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}


def esc(text: Any) -> str:
    """`text` safe in HTML, in element text and in quoted attribute values alike."""
    return html.escape(str(text), quote=True)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def typed_frame(rows: list, dtypes: dict[str, str]) -> pd.DataFrame:
    """A frame with fixed column types even when empty: the plot keeps the axis types of its first
    value, and an empty frame's object columns would make the loss axis categorical for good."""
    frame = pd.DataFrame(rows, columns=list(dtypes))
    return frame.astype(dtypes)


# ---- Train --------------------------------------------------------------------------------------


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


# The scores' series in the plots and tables; PRES is the one where lower is better.
SCORE_SERIES = {"dino": "dino", "clip_i": "clip_i", "clip_t": "clip_t", "pres": "pres (lower is better)"}


def scores_frame(scores: list[dict[str, Any]]) -> pd.DataFrame:
    """Long-form scores of the scored rounds (runs.read_scores rows) for a line plot beside the loss."""
    rows = [
        (r["step"], r[key], label)
        for r in scores
        for key, label in SCORE_SERIES.items()
        if isinstance(r.get(key), int | float)
    ]
    return typed_frame(rows, {"step": "int64", "score": "float64", "series": "str"})


def status_html(snap: dict[str, Any]) -> str:
    state = snap.get("state", "idle")
    if state == "idle":
        return "<p>No training yet. Prepare photos, then press <b>Start training</b>.</p>"
    current, total = (snap.get("progress") or [0, 0]) + [0, 0][len(snap.get("progress") or []) :]
    fraction = 1.0 if state == "finished" else (current / total) if total else 0.0
    eta = snap.get("eta_seconds")
    eta_text = f" · about {duration(eta)} left" if eta is not None and state == "running" else ""
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
        f"<p><b>{esc(head)}</b> · {steps} · run {esc(snap.get('run_id', ''))}</p>"
        f'<div class="progress-outer"><div class="progress-inner" style="width:{100 * fraction:.1f}%"></div></div>'
        f"<p>{esc(message)}</p>"
    )


def sample_items(snap: dict[str, Any]) -> list[tuple[str, str]]:
    """The newest validation images first (with and without the token side by side)."""
    items = []
    for s in sorted(snap.get("samples", []), key=lambda s: -s["step"]):
        label = "with token" if Path(s["image"]).name.startswith("with-") else "without token"
        items.append((s["image"], f"step {s['step']}: {label}"))
    return items[:8]


def plan_markdown(config: Any, n_photos: int, subject: str, estimate: str, preset: str = "Full") -> str:
    """The preset line above the Train button: what will run, and about how long."""
    prior_text = (
        f"prior preservation with {config.num_class_images} class images of “{config.class_prompt}”"
        if config.with_prior_preservation
        else "no prior preservation"
    )
    from trainer_core.config import SUBJECT_TYPES, preset_note

    extras = [
        "pivotal tuning" if config.pivotal_tuning else "",
        f"text-encoder LoRA at {config.text_encoder_lr:g}" if config.train_text_encoder else "",
        "DoRA" if config.use_dora else "",
        f"caption dropout {config.caption_dropout:g}" if config.caption_dropout else "",
    ]
    extra_text = "".join(f", {e}" for e in extras if e)
    note = f"\n\n*{preset_note(subject)}*" if subject in SUBJECT_TYPES else ""
    return (
        f"**{preset} preset for {n_photos} {subject} photos:** {config.max_train_steps} steps, rank {config.rank}, "
        f"learning rate {config.learning_rate:g}, {prior_text}{extra_text}. "
        f"Prompt: “{config.instance_prompt}”.{note}\n\n{estimate}"
    )


# ---- Photos -------------------------------------------------------------------------------------


def prep_views(report: dict[str, Any]) -> tuple[str, list, list | None, list | None]:
    """A prep report as (summary, gallery items, caption rows, rejected rows)."""
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
    return text, gallery, table or None, bad or None


def crop_preview(image, box: list[int], scale: float):
    """The picked photo with its crop marked: the rest dimmed, the square outlined. `image` is the
    original shrunk by `scale`; `box` is in the original's pixels (may reach past the edges)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = (round(v * scale) for v in box)
    inner = (max(left, 0), max(top, 0), min(right, image.width), min(bottom, image.height))
    shown = Image.eval(image, lambda v: int(v * 0.45))
    shown.paste(image.crop(inner), inner[:2])
    width = max(2, round(min(image.size) / 200))
    ImageDraw.Draw(shown).rectangle(inner, outline=(255, 200, 0), width=width)
    return shown


def picked_markdown(entry: dict[str, Any]) -> str:
    """The picked photo's name, crop and warnings, above the editor."""
    left, top, right, _ = entry["crop_box"]
    w, h = entry["source_size"]
    lines = [
        f"**{esc(entry['output'])}**: a {right - left}×{right - left} px square of the {w}×{h} px photo. "
        "Click the photo to centre the crop there, or change its size."
    ]
    lines += [f"- ⚠ {esc(w_)}" for w_ in entry.get("warnings", [])]
    return "\n".join(lines)


# ---- Adapters (Generate, Gallery) ---------------------------------------------------------------


def adapter_choices(adapters: list[dict[str, Any]]) -> list[str]:
    return [a["name"] for a in adapters]


def adapter_gallery(adapters: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["thumbnail"], a["name"]) for a in adapters if a.get("thumbnail")]


NO_ADAPTERS = (
    '<p class="no-adapters">No adapters yet: train one in the Train tab (or import a LoRA file with '
    "<code>python -m trainer_core import-adapter</code>).</p>"
)


def adapter_cards(adapters: list[dict[str, Any]], selected: str | None, images: dict[str, str]) -> str:
    """The Gallery's grid: one card (a button) per adapter with its sample image (`images`: name ->
    an image URL, none: a blank square), name, trigger, base model, steps and date; `selected` pressed."""
    from trainer_core.inference import ARCHITECTURE_LABELS

    if not adapters:
        return NO_ADAPTERS
    cards = []
    for i, a in enumerate(adapters):
        name = esc(a["name"])
        src = images.get(a["name"])
        picture = f'<img src="{src}" alt="">' if src else '<span class="no-sample">no samples</span>'
        base = str(a.get("base_model") or "")
        arch = ARCHITECTURE_LABELS.get(a.get("architecture"), a.get("architecture") or "")
        token = a.get("token") or "none"
        cards.append(
            f'<button type="button" class="adapter-card" data-adapter="{esc(a["name"])}" data-index="{i}" '
            f'aria-pressed="{"true" if a["name"] == selected else "false"}">{picture}'
            f'<span class="card-name">{name}</span>'
            f'<span class="card-meta">trigger <code>{esc(token)}</code></span>'
            f'<span class="card-meta" title="{esc(base)}">{esc(base_label(base))} · {esc(arch)}</span>'
            f'<span class="card-meta">{a.get("steps") or 0} steps</span>'
            f'<span class="card-meta">{esc(day(a.get("created")))}</span></button>'
        )
    return f'<div class="adapter-grid" role="group" aria-label="Adapters">{"".join(cards)}</div>'


def base_label(base: str) -> str:
    """A base model as a card can show it: a Hub id or a built-in name whole, a local path by its last part."""
    if base.startswith(("/", ".", "~")) or base.count("/") > 1 or "\\" in base:
        return Path(base).name or base
    return base


def day(created: Any) -> str:
    """adapter.json's `created` (2026-11-30T19:26:43+0000) as 2026-11-30 19:26."""
    text = str(created or "")
    return text[:16].replace("T", " ") if len(text) >= 16 and text[10] == "T" else text


def adapter_markdown(a: dict[str, Any] | None) -> str:
    if not a:
        return "Select an adapter."
    loss = f"{a['final_loss']:.4f}" if isinstance(a.get("final_loss"), (int, float)) else "n/a"
    return (
        f"### {esc(a['name'])}\n"
        f"- trigger: `{esc(a.get('token') or '')}` · prompt: *{esc(a.get('instance_prompt') or '')}*\n"
        f"- base model: `{esc(a.get('base_model'))}` ({esc(a.get('architecture'))})\n"
        f"- rank {a.get('rank')} · alpha {a.get('alpha')} · {a.get('steps')} steps · final loss {loss}\n"
        f"- created {esc(a.get('created'))}" + scores_line(a.get("scores"))
    )


def scores_line(scores: dict[str, Any] | None) -> str:
    """An adapter's scores (adapter.json `scores`) as one Markdown list item; empty when it has none."""
    cells = [
        f"{key} {scores[key]:.3f}" for key in SCORE_SERIES if isinstance((scores or {}).get(key), int | float)
    ]
    return ("\n- scores: " + " · ".join(cells) + " (PRES: lower is better)") if cells else ""


# ---- Runs ---------------------------------------------------------------------------------------


def run_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    return [[_cell(r.get(key)) for key, _ in RUN_COLUMNS] for r in runs]


def curves_frame(curves: list[dict[str, Any]]) -> pd.DataFrame:
    """Loss curves of several runs, long-form (one row per run and step) for one line per run."""
    return typed_frame(
        [[c["run"], c["step"], c["value"], c["smoothed"]] for c in curves],
        {"run": "str", "step": "int64", "value": "float64", "smoothed": "float64"},
    )


SCORE_COLUMNS = ["run", "step", "dino", "clip_i", "clip_t", "pres", "best"]


def score_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per run and scored step (Studio.run_scores), the run's best checkpoint marked."""
    rows = []
    for run in runs:
        best = (run.get("best") or {}).get("step")
        for r in run["scores"]:
            mark = "★ best" if r["step"] == best else ""
            rows.append([run["run"], r["step"], *(_cell(r.get(k)) for k in SCORE_SERIES), mark])
    return rows


def best_markdown(runs: list[dict[str, Any]]) -> str:
    """Each ticked run's best checkpoint and the rule's reason, one line per run."""
    lines = []
    for run in runs:
        best = run.get("best")
        if best:
            lines.append(
                f"- **{esc(run['run'])}**: best checkpoint step {best['step']}: {esc(best['reason'])}."
            )
        elif run["scores"]:
            lines.append(f"- **{esc(run['run'])}**: no saved checkpoint passes the rule.")
        else:
            lines.append(f"- **{esc(run['run'])}**: not scored (scores were off or no validation round ran).")
    return "\n".join(lines)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return "" if value is None else value
