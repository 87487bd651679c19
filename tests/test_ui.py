"""The page's wiring, without a browser: every handler is bound to the inputs Gradio will pass it,
and the pure views turn snapshots into what the page shows."""

from __future__ import annotations

import warnings


def test_every_handler_matches_its_inputs(tmp_path):
    """Gradio only warns when a handler's parameters and its inputs disagree (then fails at click
    time); building the page with those warnings as errors catches a miswired tab at once."""
    from dreambooth_ui.layout import build_app
    from dreambooth_ui.studio import Studio

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Expected .* arguments for function")
        demo = build_app(Studio(tmp_path))
    names = {fn.fn.__name__ for fn in demo.fns.values() if fn.fn is not None}
    assert {"on_load", "on_base_note", "on_plan", "on_start", "on_tick", "on_generate", "on_compare"} <= names


def test_views_of_a_snapshot():
    from dreambooth_ui.views import loss_frame, status_html

    metrics = [
        {"step": s, "loss": 1.0 / s, "instance_loss": 0.5 / s, "prior_loss": 0.5 / s} for s in (1, 2, 3)
    ]
    frame = loss_frame(metrics)
    assert sorted(set(frame["series"])) == ["instance loss", "prior loss", "total", "total (smoothed)"]
    assert len(frame) == 12
    html = status_html({"state": "running", "stage_label": "Training", "progress": [3, 30], "step": 3,
                        "total_steps": 30, "run_id": "r<1>"})  # fmt: skip
    assert "Training: 3/30" in html and "r&lt;1&gt;" in html and "width:10.0%" in html
