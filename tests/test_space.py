"""Running as a Hugging Face Space, simulated: environment variables and a temporary "persistent"
folder. Data folder choice, the ephemeral banner, ZeroGPU refusal, the automatic private push with
the HF_TOKEN secret (through an injected Hub client: no network here) and that the token is never
written to any file or log line. The README's Space front matter matches the pinned gradio.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml
from conftest import base_config, write_photos

from dreambooth_ui.space import detect
from dreambooth_ui.studio import Studio, UserError

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_TESTSECRETtoken1234567890abcdef"


def test_front_matter_parses_and_pins_the_gradio_of_requirements():
    text = (ROOT / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "README.md must start with the Space's YAML front matter"
    meta = yaml.safe_load(match.group(1))
    pinned = re.search(r"^gradio==([\w.]+)$", (ROOT / "requirements.txt").read_text(), flags=re.M).group(1)
    assert meta["sdk"] == "gradio" and str(meta["sdk_version"]) == pinned
    assert meta["app_file"] == "app.py" and (ROOT / meta["app_file"]).is_file()
    assert meta["suggested_hardware"] and meta["title"]


def test_data_folder_local_space_persistent_and_ephemeral(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = detect(env={})
    assert not local.on_space and local.persistent and local.banner is None and local.data_dir == Path("data")

    mount = tmp_path / "persist"
    mount.mkdir()
    space = detect(env={"SPACE_ID": "alice/studio", "SPACE_AUTHOR_NAME": "alice",
                        "DREAMBOOTH_STUDIO_PERSISTENT_DIR": str(mount), "HF_TOKEN": SECRET})  # fmt: skip
    assert space.on_space and space.persistent and space.data_dir == mount / "dreambooth-studio"
    assert space.banner is None and space.owner == "alice"
    assert SECRET not in repr(space)

    bare = detect(
        env={"SPACE_ID": "alice/studio", "DREAMBOOTH_STUDIO_PERSISTENT_DIR": str(tmp_path / "none")}
    )
    assert not bare.persistent and "deleted when it restarts" in bare.banner

    zero = detect(env={"SPACE_ID": "alice/studio", "SPACES_ZERO_GPU": "true"})
    assert "ZeroGPU" in zero.training_refusal and "ZeroGPU" in zero.banner


def test_zero_gpu_refuses_training_with_a_sentence(tmp_path, photos):
    deployment = detect(env={"SPACE_ID": "a/b", "SPACES_ZERO_GPU": "true"}, data_dir=str(tmp_path / "data"))
    studio = Studio(deployment.data_dir, deployment=deployment)
    config = base_config(Path("tiny-sd15"), photos, tmp_path / "run")
    with pytest.raises(UserError, match="Training does not run on ZeroGPU"):
        studio.start_training(config)
    assert not studio.runner.running and not any((studio.data_dir / "runs").iterdir())


class RecordingHub:
    """Stands in for huggingface_hub.HfApi (no network here); records what the push asked for."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs.get("repo_id"), kwargs))
        return f"https://huggingface.co/{kwargs.get('repo_id')}/commit/1"

    def __getattr__(self, name):  # any other HfApi call the store makes
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))

        return record


def test_space_pushes_finished_adapters_privately_and_never_writes_the_token(
    tmp_path, tiny_model, monkeypatch, caplog
):
    mount = tmp_path / "persist"
    mount.mkdir()
    env = {"SPACE_ID": "alice/studio", "SPACE_AUTHOR_NAME": "alice",
           "DREAMBOOTH_STUDIO_PERSISTENT_DIR": str(mount), "HF_TOKEN": SECRET}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    deployment = detect()
    hub = RecordingHub()
    studio = Studio(deployment.data_dir, base_model=str(tiny_model), deployment=deployment, hub_client=hub)
    photos = write_photos(tmp_path / "photos", n=3, size=(96, 96))
    report = studio.prepare_photos(sorted(photos.glob("*.jpg")), "dog", token="sks", class_noun="dog",
                                   crop="center")  # fmt: skip
    config = studio.plan_training(
        report["dataset"], subject_type="pet", token="sks", class_noun="dog", base_model=str(tiny_model),
        max_train_steps=3, num_class_images=2, class_generation_steps=2, num_validation_images=1,
        validation_inference_steps=2,
    )  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        studio.start_training(config)
        assert studio.runner.wait(240)
    snap = studio.training_status()
    assert snap["state"] == "finished", snap["message"]
    assert studio.data_dir.is_relative_to(mount)  # everything went to the persistent folder

    repo = f"alice/{snap['adapter_name']}"
    created = [c for c in hub.calls if c[0] == "create_repo"]
    assert created and created[0][1] == repo and created[0][2].get("private") is True
    assert any(c[0] == "upload_folder" and c[1] == repo for c in hub.calls)

    for path in mount.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"token written to {path}"
    assert SECRET not in caplog.text
