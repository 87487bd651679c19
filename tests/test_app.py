"""The app as a program: launched on localhost with tiny-sd15 and driven over HTTP with gradio_client,
through the automation API the design names (prepare_photos, start_training, training_status,
stop_training, list_adapters, generate). Real engine, real training, nothing mocked.
"""

from __future__ import annotations

import time

import pytest
from app_helpers import FAST, launch_app
from conftest import write_photos
from PIL import Image


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    from gradio_client import Client

    data = tmp_path_factory.mktemp("app-data")
    demo, url, studio = launch_app(data, "tiny-sd15")
    try:
        yield Client(url, verbose=False), studio
    finally:
        studio.runner.stop()
        studio.runner.wait(60)
        demo.close()


def wait_state(client, states, timeout=240.0):
    end = time.monotonic() + timeout
    snap = {}
    while time.monotonic() < end:
        snap = client.predict(api_name="/training_status")
        if snap["state"] in states:
            return snap
        time.sleep(0.5)
    raise AssertionError(f"job did not reach {states}: {snap}")


def test_whole_flow_over_http(app_client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, studio = app_client
    photos = sorted(write_photos(tmp_path / "photos", n=4).glob("*.jpg"))
    (tmp_path / "notes.txt").write_text("not a photo")
    report = client.predict(
        photos=[handle_file(str(p)) for p in photos] + [handle_file(str(tmp_path / "notes.txt"))],
        token="sks",
        class_noun="dog",
        crop="center",
        caption="template",
        dataset="my dog",
        api_name="/prepare_photos",
    )
    assert report["dataset"] == "my-dog"
    assert len(report["accepted"]) == 4
    # the name the person gave it (uploads keep their names; only prepared photos are numbered)
    assert [r["source"] for r in report["rejected"]] == ["notes.txt"]
    # The uploads were copied out of Gradio's temporary cache at once; the accepted photos are kept
    # in the set's originals/, the rejected file is not kept at all (issue 14).
    assert len(list((studio.data_dir / "datasets" / "my-dog" / "originals").iterdir())) == 4
    assert list((studio.data_dir / "uploads").rglob("*")) == []

    snap = client.predict(
        dataset="my-dog", subject_type="pet", token="sks", class_noun="dog",
        settings={**FAST, "max_train_steps": 6}, api_name="/start_training",
    )  # fmt: skip
    assert snap["state"] == "running"
    with pytest.raises(AppError, match="already running"):
        client.predict(dataset="my-dog", api_name="/start_training")
    with pytest.raises(AppError, match="Training is using the GPU"):
        client.predict(prompt="a photo of sks dog", api_name="/generate")

    done = wait_state(client, {"finished", "failed", "stopped"})
    assert done["state"] == "finished", done["message"]
    assert done["step"] == 6 and len(done["metrics"]) == 6
    assert {"instance_loss", "prior_loss", "loss"} <= set(done["metrics"][-1])
    assert any(s["image"].endswith(".png") for s in done["samples"])
    name = done["adapter_name"]

    adapters = client.predict(api_name="/list_adapters")
    assert [a["name"] for a in adapters] == [name]
    assert adapters[0]["token"] == "sks" and adapters[0]["steps"] == 6

    image_path = client.predict(
        prompt="a photo of sks dog", adapter=name, steps=2, seed=3, api_name="/generate"
    )
    with Image.open(image_path) as im:
        assert im.size[0] > 0 and im.mode == "RGB"
    again = client.predict(prompt="a photo of sks dog", adapter=name, steps=2, seed=3, api_name="/generate")
    with Image.open(image_path) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()  # same seed, same image

    # The page's "compare" button: same seed with and without the token, both saved.
    grid, labelled = studio.compare_token("a photo of sks dog", "sks", adapter=name, steps=2, seed=3)
    assert [label for label, _ in labelled] == ["with sks", "without sks"]
    with Image.open(labelled[0][1]) as a, Image.open(labelled[1][1]) as b, Image.open(grid) as g:
        assert a.tobytes() != b.tobytes() and g.size[0] >= 2 * a.size[0]

    with pytest.raises(AppError, match="no adapter called"):
        client.predict(prompt="a photo", adapter="nope", api_name="/generate")


def test_stop_mid_run_leaves_a_usable_adapter(app_client, tmp_path):
    from gradio_client import handle_file

    client, studio = app_client
    photos = sorted(write_photos(tmp_path / "photos", n=3, seed=5).glob("*.jpg"))
    client.predict(
        photos=[handle_file(str(p)) for p in photos], token="zwx", class_noun="cat", crop="center",
        dataset="cat", api_name="/prepare_photos",
    )  # fmt: skip
    client.predict(
        dataset="cat", subject_type="pet", token="zwx", class_noun="cat", adapter_name="zwx-cat",
        settings={**FAST, "max_train_steps": 400}, api_name="/start_training",
    )  # fmt: skip
    end = time.monotonic() + 240
    while client.predict(api_name="/training_status")["step"] < 2:
        assert time.monotonic() < end
        time.sleep(0.3)
    snap = client.predict(api_name="/stop_training")
    assert snap["state"] in ("stopping", "stopped")
    done = wait_state(client, {"stopped", "finished", "failed"})
    assert done["state"] == "stopped", done["message"]
    assert 2 <= done["step"] < 400
    names = [a["name"] for a in client.predict(api_name="/list_adapters")]
    assert "zwx-cat" in names
    image = client.predict(prompt="a photo of zwx cat", adapter="zwx-cat", steps=2, api_name="/generate")
    with Image.open(image) as im:
        assert im.size[0] > 0
    assert client.predict(api_name="/stop_training")["message"] == "No training is running."

    # Run history: both runs listed; their curves overlay in one table; the stopped run opens its adapter.
    runs = {r["run_id"]: r for r in studio.list_runs()}
    stopped_id = done["run_id"]
    assert runs[stopped_id]["status"] == "stopped" and runs[stopped_id]["step"] == done["step"]
    assert len(runs) == 2
    curves = studio.compare_runs(list(runs))
    assert {row["run"] for row in curves} == set(runs)
    assert sum(1 for row in curves if row["run"] == stopped_id) == done["step"]
    assert studio.run_adapter(stopped_id) == "zwx-cat"


def test_example_api_client_runs_the_whole_flow(app_client, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    client, studio = app_client
    root = Path(__file__).resolve().parents[1]
    photos = write_photos(tmp_path / "photos", n=3, seed=9)
    out = tmp_path / "out" / "dog.png"
    proc = subprocess.run(
        [sys.executable, "examples/api_client.py", "--url", client.src, "--photos", str(photos), "--out", str(out),
         "--steps", "3", "--num-class-images", "2", "--timeout", "240"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "image written to" in proc.stdout
    with Image.open(out) as im:
        assert im.size[0] > 0
