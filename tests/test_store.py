"""The adapter store on real adapter folders: list with metadata and thumbnail, add, rename, delete to
the trash and restore, zip export, names that could escape the store refused, and the Hub push
through an injected client (no machine here reaches the Hub), with the token never written."""

from __future__ import annotations

import inspect
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from lora_fixtures import PROMPT, lora_adapter

from trainer_core.events import TrainingError
from trainer_core.store import AdapterStore, check_name

TOKEN = "hf_TESTSECRETtokenDoNotWrite1234567890"


@pytest.fixture(scope="module")
def sources(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return dict(
        dog=lora_adapter(
            tiny_model,
            tmp / "dog" / "sks-dog",
            1,
            with_samples=True,
            created="2026-01-01T10:00:00+0000",
            class_prompt="a photo of a dog",
            final_loss=0.25,
            steps=40,
        ),
        cat=lora_adapter(tiny_model, tmp / "cat" / "sks-cat", 2, created="2026-02-01T10:00:00+0000"),
    )


@pytest.fixture
def store(tmp_path, sources):
    s = AdapterStore(tmp_path / "adapters")
    s.add(sources["dog"])
    s.add(sources["cat"])
    return s


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_list_newest_first_with_metadata_and_thumbnail(store, sources):
    listed = store.list()
    assert [a.name for a in listed] == ["sks-cat", "sks-dog"]
    dog = store.get("sks-dog")
    assert dog.instance_prompt == PROMPT and dog.token == "sks" and dog.class_prompt == "a photo of a dog"
    assert (dog.rank, dog.alpha, dog.steps, dog.final_loss) == (4, 8.0, 40, 0.25)
    assert dog.architecture == "sd15" and dog.created.startswith("2026-01-01")
    assert dog.thumbnail is not None and dog.thumbnail.name == "with-token-0.png"
    assert dog.path / "pytorch_lora_weights.safetensors" in dog.files
    assert store.get("sks-cat").thumbnail is None and store.get("sks-cat").final_loss is None
    # The copy is byte-identical to the run's adapter.
    assert tree_bytes(dog.path) == tree_bytes(sources["dog"])


def test_broken_folders_are_skipped_and_logged(store, caplog):
    (store.root / "no-json").mkdir()
    (store.root / "no-json" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (store.root / "bad-json").mkdir()
    (store.root / "bad-json" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (store.root / "bad-json" / "adapter.json").write_text("{not json")
    (store.root / "bad-rank").mkdir()
    (store.root / "bad-rank" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (store.root / "bad-rank" / "adapter.json").write_text(json.dumps({"rank": "four"}))
    (store.root / "stray.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="trainer_core.store"):
        names = [a.name for a in store.list()]
    assert names == ["sks-cat", "sks-dog"]
    assert all(n in caplog.text for n in ("no-json", "bad-json", "bad-rank"))


def test_add_twice_gets_a_unique_name_and_consistent_files(store, sources):
    info = store.add(sources["dog"])
    assert info.name == "sks-dog-2"
    meta = json.loads((info.path / "adapter.json").read_text())
    assert meta["name"] == "sks-dog-2" and meta["files"]["kohya"] == "sks-dog-2.safetensors"
    assert (info.path / "sks-dog-2.safetensors").read_bytes() == (
        sources["dog"] / "sks-dog.safetensors"
    ).read_bytes()
    assert not (info.path / "sks-dog.safetensors").exists()
    assert "<lora:sks-dog-2:1>" in (info.path / "README.md").read_text()
    named = store.add(sources["cat"], name="My Cat!")
    assert named.name == "My-Cat"
    with pytest.raises(TrainingError, match="not an adapter folder"):
        store.add(store.root.parent)


def test_rename_delete_restore(store):
    renamed = store.rename("sks-dog", "rex the dog")
    assert renamed.name == "rex-the-dog" and not (store.root / "sks-dog").exists()
    assert json.loads((renamed.path / "adapter.json").read_text())["name"] == "rex-the-dog"
    assert (renamed.path / "rex-the-dog.safetensors").is_file()
    with pytest.raises(ValueError, match="^name: an adapter called sks-cat already exists"):
        store.rename("rex-the-dog", "sks-cat")
    before = tree_bytes(renamed.path)
    store.delete("rex-the-dog")
    assert [a.name for a in store.list()] == ["sks-cat"]
    assert [a.name for a in store.trash()] == ["rex-the-dog"]
    store.add(store.trash()[0].path, name="rex-the-dog")  # the name is taken again meanwhile
    restored = store.restore("rex-the-dog")
    assert restored.name == "rex-the-dog-2" and store.trash() == []
    after = tree_bytes(restored.path)
    assert after["pytorch_lora_weights.safetensors"] == before["pytorch_lora_weights.safetensors"]
    store.delete("sks-cat")
    store.purge("sks-cat")
    assert store.trash() == [] and [a.name for a in store.list()] == ["rex-the-dog-2", "rex-the-dog"]
    with pytest.raises(ValueError, match="^name: there is no adapter called nope"):
        store.delete("nope")


@pytest.mark.parametrize(
    "bad",
    ["../x", "../../etc", "/etc", "/tmp/x", "a/../../b", "a\x00b", "", "  ", "..", ".trash", "~/x", "..\\x"],
)
def test_names_that_could_escape_the_store_are_refused(store, sources, tmp_path, bad):
    outside = tmp_path / "x"  # a real adapter right beside the store
    if not outside.exists():
        import shutil

        shutil.copytree(sources["cat"], outside)
    snapshot = tree_bytes(tmp_path)
    calls = [
        lambda: store.get(bad),
        lambda: store.rename("sks-cat", bad),
        lambda: store.rename(bad, "ok"),
        lambda: store.delete(bad),
        lambda: store.restore(bad),
        lambda: store.purge(bad),
        lambda: store.export_zip(bad, tmp_path / "zips"),
        lambda: store.add(sources["cat"], name=bad),
        lambda: store.push_to_hub(bad, "me/repo", token=TOKEN, client=RecordingClient()),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="^name: "):
            call()
    assert tree_bytes(tmp_path) == snapshot, "a refused name changed files"
    with pytest.raises(ValueError, match="^name: "):
        check_name(bad)


def test_symlinks_out_of_the_store_are_not_followed(store, sources, tmp_path):
    (store.root / "link").symlink_to(sources["cat"], target_is_directory=True)
    assert "link" not in [a.name for a in store.list()]
    with pytest.raises(ValueError, match="^name: 'link' is outside the adapter store"):
        store.delete("link")
    assert (sources["cat"] / "adapter.json").is_file()


def test_export_zip_holds_the_folder(store, tmp_path):
    path = store.export_zip("sks-dog", tmp_path / "exports")
    assert path == tmp_path / "exports" / "sks-dog.zip"
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert {
            "sks-dog/pytorch_lora_weights.safetensors",
            "sks-dog/adapter.json",
            "sks-dog/samples/with-token-0.png",
        } <= names
        assert (
            zf.read("sks-dog/pytorch_lora_weights.safetensors")
            == (store.root / "sks-dog" / "pytorch_lora_weights.safetensors").read_bytes()
        )
    assert [p.name for p in path.parent.iterdir()] == ["sks-dog.zip"]  # no temporary left


def test_exported_adapter_generates_like_the_original(store, tiny_model, tmp_path):
    from trainer_core.inference import GenerateRequest, Generator

    zf = zipfile.ZipFile(store.export_zip("sks-dog", tmp_path))
    zf.extractall(tmp_path / "unzipped")
    gen = Generator(device="cpu")

    def image(folder):
        r = GenerateRequest(
            base_model=str(tiny_model), prompt=PROMPT, steps=2, adapters=((str(folder), 1.0),)
        )
        return np.asarray(gen.generate(r)[0])

    assert np.array_equal(image(tmp_path / "unzipped" / "sks-dog"), image(store.root / "sks-dog"))


class RecordingClient:
    """Stands in for huggingface_hub.HfApi (the network is unreachable here): records the calls
    and what the uploaded folder held at upload time."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.fail = fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if self.fail:
            raise self.fail
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.uploaded = tree_bytes(Path(kwargs["folder_path"]))
        return "commit"


def test_push_builds_the_card_and_calls_the_client(store, tmp_path, caplog, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_TOKEN", raising=False)
    client = RecordingClient()
    with caplog.at_level(logging.DEBUG):
        url = store.push_to_hub("sks-dog", "someone/sks-dog-lora", token=TOKEN, client=client)
    assert url == "https://huggingface.co/someone/sks-dog-lora"
    (create, create_kw), (upload, upload_kw) = client.calls
    assert create == "create_repo" and upload == "upload_folder"
    assert create_kw == dict(repo_id="someone/sks-dog-lora", repo_type="model", private=True, exist_ok=True)
    assert upload_kw["repo_id"] == "someone/sks-dog-lora" and upload_kw["repo_type"] == "model"
    # The calls fit the real huggingface_hub client's signatures.
    inspect.signature(HfApi.create_repo).bind(None, **create_kw)
    inspect.signature(HfApi.upload_folder).bind(None, **upload_kw)

    files = client.uploaded
    assert set(files) == {
        "README.md",
        "adapter.json",
        "metrics.jsonl",
        "pytorch_lora_weights.safetensors",
        "sks-dog.safetensors",
        "samples/with-token-0.png",
        "samples/without-token-0.png",
    }, "config.json (local paths) must stay home"
    card = files["README.md"].decode()
    front, body = card.split("\n---\n", 1)
    assert front.startswith("---\nlibrary_name: diffusers")
    assert "base_model:" not in front  # a local path is not a Hub base model
    assert f"instance_prompt: {json.dumps(PROMPT)}" in front
    assert '- text: "a photo of sks dog"\n  output:\n    url: samples/with-token-0.png' in front
    assert '- text: "a photo of dog"\n  output:\n    url: samples/without-token-0.png' in front
    assert "Use `sks` in the prompt" in body
    assert "![with-token-0](samples/with-token-0.png)" in body
    assert (
        'pipe.load_lora_weights("someone/sks-dog-lora", weight_name="pytorch_lora_weights.safetensors")'
        in body
    )
    assert "StableDiffusionPipeline" in body and "<lora:sks-dog:1> a photo of sks dog" in body
    assert "ComfyUI" in body and "models/loras" in body

    # The token is nowhere on disk or in the logs.
    assert TOKEN not in caplog.text
    for blob in (*files.values(), *tree_bytes(store.root).values(), *tree_bytes(tmp_path).values()):
        assert TOKEN.encode() not in blob


def test_push_token_from_env_and_errors_without_the_token(store, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    client = RecordingClient(fail=RuntimeError(f"401 Unauthorized for token {TOKEN}"))
    with pytest.raises(TrainingError) as e:
        store.push_to_hub("sks-cat", "someone/cat", client=client, private=False)
    assert "Could not push sks-cat" in str(e.value) and TOKEN not in str(e.value) and "***" in str(e.value)
    assert client.calls[0][1]["private"] is False
    with pytest.raises(ValueError, match="^repo_id:"):
        store.push_to_hub("sks-cat", "not a repo", client=client)


def test_push_with_the_real_client_fails_offline_in_one_sentence(store, monkeypatch):
    # The default client is huggingface_hub.HfApi; with HF_HUB_OFFLINE=1 (no network here) it refuses.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TrainingError, match="Could not push sks-cat to the Hub repo someone/cat") as e:
        store.push_to_hub("sks-cat", "someone/cat", token=TOKEN)
    assert TOKEN not in str(e.value)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_store_and_inference_import_without_torch():
    """The UI imports these at module level, and the UI layer must not load torch on import."""
    import subprocess
    import sys

    from trainer_core import adapters, inference, store

    code = "import sys, trainer_core.store, trainer_core.inference; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    assert store.LORA_WEIGHT_NAME == inference.LORA_WEIGHT_NAME == adapters.LORA_WEIGHT_NAME


def test_renaming_to_the_diffusers_file_name_keeps_both_files(store):
    """An adapter renamed "pytorch_lora_weights" moved its kohya file onto pytorch_lora_weights.safetensors,
    overwriting the diffusers weights (the file the app loads); the kohya copy gets its own name, as a
    newly saved adapter of that name does."""
    before = tree_bytes(store.root / "sks-dog")
    renamed = store.rename("sks-dog", "pytorch_lora_weights")
    after = tree_bytes(renamed.path)
    assert after["pytorch_lora_weights.safetensors"] == before["pytorch_lora_weights.safetensors"]
    assert after["pytorch_lora_weights-kohya.safetensors"] == before["sks-dog.safetensors"]
    meta = json.loads((renamed.path / "adapter.json").read_text())
    assert meta["files"]["kohya"] == "pytorch_lora_weights-kohya.safetensors"
    back = store.rename("pytorch_lora_weights", "rex")
    assert tree_bytes(back.path)["rex.safetensors"] == before["sks-dog.safetensors"]


def test_card_attributes_escape_quotes():
    """The gallery card puts the base model in a title="..." attribute: a quote in a local path must
    not end it (and add attributes of its own)."""
    from html.parser import HTMLParser

    from dreambooth_ui.views import adapter_cards

    base = '/models/my "best" x" onmouseover="alert(document.cookie)'
    html = adapter_cards(
        [{"name": "rex", "base_model": base, "token": 'a"b', "architecture": "sd15"}], None, {}
    )
    seen = []

    class Attributes(HTMLParser):
        def handle_starttag(self, tag, attrs):
            seen.extend(attrs)

    Attributes().feed(html)
    assert ("title", base) in seen and "onmouseover" not in dict(seen)
