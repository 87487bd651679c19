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


def test_a_bad_setting_is_named_on_its_box(tmp_path):
    import gradio as gr

    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import photos, train

    with gr.Blocks():
        base = gr.Dropdown(["tiny-sd15"], value="tiny-sd15")
        studios = Studios(tmp_path)
        tab = train.build(studios, base, photos.build(studios, base))
    values = {box: None for box in tab.settings.values()}
    values[tab.settings["max_train_steps"]] = 0
    values[tab.settings["rank"]] = 4
    verdicts = train.check_settings(tab, values)
    bad = [v["message"] for v in verdicts if not v["is_valid"]]
    assert bad == ["Steps must be at least 1."]


def test_generate_picks_a_random_seed_unless_one_is_given(tmp_path):
    import gradio as gr

    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import generate

    with gr.Blocks():
        tab = generate.build(Studios(tmp_path))
    values = {box: None for box in tab.settings.values()}
    values.update({tab.settings["seed"]: -1, tab.settings["prompt"]: "a photo of sks dog"})
    values.update({tab.settings[k]: v for k, v in (("adapter_weight", 1.0), ("steps", 5), ("guidance", 7.5))})
    kwargs = generate.request_of(tab, values)
    assert 0 <= kwargs["seed"] < 2**31
    assert generate.caption(kwargs).startswith(f"seed {kwargs['seed']} · no adapter")
    values[tab.settings["seed"]] = 7
    assert generate.request_of(tab, values)["seed"] == 7


def test_scores_views():
    """Scores (issue 17): four series for the plot beside the loss, a table with each run's best step
    marked and its reason, and an adapter's scores in the Gallery (none when it has none)."""
    from dreambooth_ui.views import best_markdown, score_rows, scores_frame, scores_line

    rows = [{"step": s, "dino": 0.5 + s / 100, "clip_i": 0.7, "clip_t": 0.3, "pres": 0.4} for s in (10, 20)]
    frame = scores_frame(rows)
    assert len(frame) == 8 and sorted(set(frame["step"])) == [10, 20]
    assert "pres (lower is better)" in set(frame["series"])
    runs = [
        {"run": "a", "scores": rows, "best": {"step": 20, "reason": "highest dino (0.700)"}},
        {"run": "b", "scores": [], "best": None},
    ]
    table = score_rows(runs)
    assert [r[1] for r in table] == [10, 20] and [r[-1] for r in table] == ["", "★ best"]
    text = best_markdown(runs)
    assert "**a**: best checkpoint step 20: highest dino (0.700)." in text and "**b**: not scored" in text
    assert scores_line({"dino": 0.61234, "clip_i": None}) == "\n- scores: dino 0.612 (PRES: lower is better)"
    assert scores_line(None) == ""


def test_generate_reports_the_samplers_steps(tmp_path):
    """Issue 15 item 6: the Generate handler drives the page's progress bar from the sampler's steps
    (a real generation on tiny-sd15)."""
    import gradio as gr

    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import generate

    studios = Studios(tmp_path, base_model="tiny-sd15")
    with gr.Blocks():
        tab = generate.build(studios)
    values = {box: None for box in tab.settings.values()}
    values.update({tab.settings[k]: v for k, v in (
        ("prompt", "a photo of sks dog"), ("adapter", ""), ("second_adapter", ""), ("adapter_weight", 1.0),
        ("second_weight", 0.5), ("negative_prompt", ""), ("steps", 3), ("guidance", 7.5), ("seed", 5),
        ("width", 0), ("height", 0), ("num_images", 1))})  # fmt: skip
    values[tab.past] = []
    seen = []

    def progress(value, desc=None, total=None, unit="steps"):
        seen.append((value, desc, unit))

    images, _history, _past = generate.on_generate(studios, tab, None, values, progress=progress)
    assert len(images) == 1
    assert [v for v, desc, unit in seen if isinstance(v, tuple)] == [(1, 3), (2, 3), (3, 3)]
    assert {desc for v, desc, _ in seen if isinstance(v, tuple)} == {"Sampling"}


def test_gallery_cards_show_each_adapter_and_the_selection():
    """Issue 15 item 10: a card per adapter (image, name, trigger, base model, steps, date), the selected
    one pressed; text from adapter.json is escaped; no adapters: a line saying how to get one."""
    from dreambooth_ui.views import adapter_cards

    adapters = [
        {"name": "sks-dog", "token": "sks", "base_model": "/data/models/tiny-sd15", "architecture": "sd15",
         "steps": 40, "created": "2026-01-01T10:00:00+0000"},
        {"name": "zwx-cat", "token": "<b>", "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
         "architecture": "sdxl", "steps": 800, "created": "2026-02-01T11:30:00+0000"},
    ]  # fmt: skip
    html = adapter_cards(adapters, "zwx-cat", {"sks-dog": "data:image/jpeg;base64,AAAA"})
    assert html.count('<button type="button" class="adapter-card"') == 2
    assert (
        'data-adapter="sks-dog" data-index="0" aria-pressed="false"><img src="data:image/jpeg;base64,AAAA"'
        in html
    )
    assert 'data-adapter="zwx-cat" data-index="1" aria-pressed="true"><span class="no-sample">' in html
    for text in ("tiny-sd15 · SD 1.5", "40 steps</span><span class=\"card-meta\">2026-01-01 10:00", "<code>sks</code>", "<code>&lt;b&gt;</code>",
                 "stabilityai/stable-diffusion-xl-base-1.0 · SDXL", "2026-02-01 11:30"):  # fmt: skip
        assert text in html, text
    assert "No adapters yet" in adapter_cards([], None, {})


def test_photo_editor_handlers(tmp_path):
    """Issue 15, item 4, without a browser: prepare a set (a mug among dogs is flagged in the warnings
    column), pick a photo, click its original (the crop is redone around the click, the new square
    shown at once), change the crop's size, crop it again by a mode, edit a caption, remove the mug."""
    import gradio as gr
    import numpy as np
    from photo_sets import write_dog_set
    from PIL import Image

    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import photos

    studios = Studios(tmp_path / "data")
    paths = write_dog_set(tmp_path / "in", 5, seed=6, with_mug=True)
    summary, gallery, table, rejected, dataset, *editor = photos.on_prepare(
        studios, None, [str(p) for p in paths], "pet", "sks", "dog", "auto", "template", "", "tiny-sd15"
    )
    assert dataset == "sks-dog" and len(gallery) == 6 and "1 with warnings" in summary
    assert [row[0] for row in table if row[2]] == ["006-mug.png"]
    assert "unlike the rest of the set" in table[5][2] and "remove it or replace it" in table[5][2]
    assert editor[0].visible is False

    def select(index, value=None):
        return gr.SelectData(None, {"index": index, "value": value})

    group, picked, info, preview, square, size = photos.on_pick(studios, None, dataset, select(5))
    assert group.visible is True and picked["output"] == "006-mug.png" and "unlike the rest" in info
    left, top, right, bottom = picked["crop_box"]
    assert (top, bottom, right - left) == (0, 480, 480) and size == 100, "the full-height square"
    assert preview.size == (640, 480), "the original, not the square (at most PREVIEW_SIDE wide)"
    # Outside the crop the preview is dimmed; inside it is the photo itself.
    original = Image.open(tmp_path / "in" / "mug.jpg").convert("RGB")
    assert np.abs(np.asarray(preview, float)[240, 20] - np.asarray(original, float)[240, 20] * 0.45).max() < 2

    # A click on the original: the square is cropped again around it, at the slider's size.
    _, _, table, _, group, picked, info, preview, square, size = photos.on_focus(
        studios, None, dataset, picked, 50, select([500, 100])
    )
    assert picked["crop_box"] == [380, 0, 620, 240] and size == 50
    from trainer_core.prep import render_square

    expected = np.asarray(render_square(original, (380, 0, 620, 240), 64), float)  # tiny-sd15's resolution
    assert np.abs(np.asarray(Image.open(square), float) - expected).max() <= 1, "the new square, at once"
    # The slider let go: the same centre, another size.
    *_, picked, info, preview, square, size = photos.on_resize(studios, None, dataset, picked, 25)
    assert picked["crop_box"] == [440, 60, 560, 180] and size == 25
    assert "a 120×120 px square of the 640×480 px photo" in info
    *_, picked, info, preview, square, size = photos.on_recrop(studios, None, dataset, picked, "center")
    assert picked["crop_box"] == [80, 0, 560, 480] and size == 100

    # Captions are still edited in place, and survive the other edits.
    import pandas as pd

    frame = pd.DataFrame(table, columns=["photo", "caption", "warnings"])
    frame.loc[0, "caption"] = "a photo of sks dog on the beach"
    photos.on_caption_edit(studios, None, frame, dataset)
    summary, gallery, table, _, group, picked, *_ = photos.on_remove(studios, None, dataset, picked)
    assert group.visible is False and picked == {}
    assert len(gallery) == 5 and [row[0] for row in table if row[2]] == [] and "5 photos ready" in summary
    assert table[0][1] == "a photo of sks dog on the beach"
    assert sorted(p.name for p in (studios.local.datasets_dir / dataset / "originals").iterdir()) == [
        f"00{i}-dog-0{i - 1}.jpg" for i in range(1, 6)
    ]


def test_advanced_settings_wait_for_a_photo_set(tmp_path):
    """Before a photo set is chosen the advanced settings have no values (Gradio drew every number box
    as 0: "Steps 0, Learning rate 0"), so they are hidden; a chosen set shows them, filled."""
    import gradio as gr

    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import photos, train

    studios = Studios(tmp_path / "data")
    with gr.Blocks() as demo:
        base = gr.Dropdown(["tiny-shapes"], value="tiny-shapes")
        tab = train.build(studios, base, photos.build(studios, base))
    [accordion] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "advanced"]
    assert accordion.visible is False, "hidden on a fresh page"
    args = ("object", "sks", "circle", "tiny-shapes", "Quick try")
    text, _note, shown, *values = train.on_plan(studios, tab, None, "", *args)
    assert "Prepare photos first" in text and shown.visible is False
    dataset = studios.get(None).prepare_example_photos()["dataset"]
    text, _note, shown, *values = train.on_plan(studios, tab, None, dataset, *args)
    assert shown.visible is True and "300 steps" in text
    filled = dict(zip(tab.settings, values, strict=True))
    assert filled["max_train_steps"] == 300 and filled["learning_rate"] == 0.002


def test_a_chosen_set_brings_back_its_subject(tmp_path):
    """The Train tab plans with the Photos tab's subject type, token and noun; a set chosen later (or
    the newest on a page load) must bring back its own, or a pet set is planned as a "person"."""
    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import train

    studios = Studios(tmp_path / "data")
    dataset = studios.get(None).prepare_example_photos()["dataset"]
    assert train.on_set_chosen(studios, None, dataset) == ("object", "sks", "circle")
    assert train.on_set_chosen(studios, None, "") == (gr_skip(),) * 3


def gr_skip():
    import gradio as gr

    return gr.skip()


def test_a_set_without_a_subject_type_leaves_the_fields(tmp_path):
    """A set prepared without a subject type (the CLI's default) records prep's default noun, which
    may not be what was meant: choosing it keeps the page's fields."""
    from conftest import write_photos

    from dreambooth_ui.studio import Studios
    from dreambooth_ui.tabs import train

    studios = Studios(tmp_path / "data")
    photos = sorted(write_photos(tmp_path / "photos", n=2).iterdir())
    studios.get(None).prepare_photos(photos, "old", class_noun="dog", resolution=64)
    assert train.on_set_chosen(studios, None, "old") == (gr_skip(),) * 3
