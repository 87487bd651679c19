"""The adapter store: a plain folder of adapter folders (`<root>/<name>/`), with a restorable trash.

List with metadata and a thumbnail, add a finished run's adapter, rename, delete (moved to
`<root>/.trash/`), restore, export as a zip, push to the Hugging Face Hub. Every name goes through
one check: it is sanitised, and path-like names (`../x`, absolute paths, NUL) are refused, so no
operation can reach outside the store. The Hub token is used for the upload only; it is never
logged or written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .events import TrainingError
from .fileio import atomic_directory, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# adapters.LORA_WEIGHT_NAME, repeated so that importing the store stays free of torch (the UI's
# gallery imports it at module level); adapters' helpers are imported where they are used.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def kohya_file_name(name: str) -> str:
    """The kohya file of an adapter called `name`: `<name>.safetensors`, except for an adapter named
    like the diffusers file, which must not be overwritten by its kohya copy."""
    file = f"{name}.safetensors"
    return file if file != LORA_WEIGHT_NAME else f"{name}-kohya.safetensors"


TRASH = ".trash"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# What goes to the Hub: the weights in both formats, the metadata, samples and the card.
# config.json stays home: it holds the user's local folder paths.
_HUB_FILES = (LORA_WEIGHT_NAME, "adapter.json", "metrics.jsonl")


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter in the store, as the gallery shows it."""

    name: str
    path: Path
    base_model: str
    architecture: str
    token: str
    instance_prompt: str
    class_prompt: str
    rank: int
    alpha: float
    steps: int
    created: str
    final_loss: float | None
    thumbnail: Path | None  # the first sample image, if any
    files: tuple[Path, ...]


def check_name(name: Any) -> str:
    """A store name from what a user typed: sanitised, or ValueError("name: ...") for path-like input."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name: must not be empty")
    if "\x00" in name:
        raise ValueError("name: must not contain a NUL character")
    text = name.strip()
    if "/" in text or "\\" in text or os.path.isabs(text) or text.startswith("~"):
        raise ValueError(f"name: {name!r} is a path; give a plain name such as sks-dog")
    if text in (".", "..") or text.startswith("."):
        raise ValueError(f"name: {name!r} must not start with a dot")
    from .adapters import sanitize_name

    try:
        return sanitize_name(text)
    except ValueError:
        raise ValueError(f"name: {name!r} has no usable characters (letters, digits, - _ .)") from None


class AdapterStore:
    """Adapter folders under `root`; every operation stays inside it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reading ---------------------------------------------------------------------------------

    def list(self) -> list[AdapterInfo]:
        """Every readable adapter, newest first. Broken folders are logged and skipped."""
        return self._scan(self.root)

    def trash(self) -> list[AdapterInfo]:
        """The deleted adapters that `restore` can bring back, newest first."""
        return self._scan(self.root / TRASH)

    def get(self, name: str) -> AdapterInfo:
        return _info(self._existing(self.root, name))

    # -- changing --------------------------------------------------------------------------------

    def add(self, adapter_dir: str | Path, name: str | None = None, *, replace: bool = False) -> AdapterInfo:
        """Copy a finished adapter folder into the store under a unique name (atomically).

        With `replace`, an adapter already called `name` is swapped for this one (a resumed run
        replaces what its stop published) instead of getting a numbered sibling.
        """
        source = Path(adapter_dir).expanduser()
        if not (source / LORA_WEIGHT_NAME).is_file():
            raise TrainingError(f"{adapter_dir} is not an adapter folder (no {LORA_WEIGHT_NAME}).")
        info = _read_adapter(source)
        wanted = check_name(name) if name is not None else check_name(str(info.get("name") or source.name))
        target = self._path(self.root, wanted) if replace else self._unique(self.root, wanted)
        with atomic_directory(target, replace=replace) as tmp:
            for item in source.iterdir():
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name, symlinks=False)
                elif item.is_file():
                    shutil.copy2(item, tmp / item.name)
            _retitle(tmp, target.name)
        log.info("added adapter %s from %s", target.name, source)
        return _info(target)

    def rename(self, name: str, new_name: str) -> AdapterInfo:
        """Rename an adapter: its folder, its kohya file, adapter.json and the model card."""
        folder = self._existing(self.root, name)
        new = check_name(new_name)
        if new == folder.name:
            return _info(folder)
        target = self._path(self.root, new)
        if target.exists():
            raise ValueError(f"name: an adapter called {new} already exists")
        os.rename(folder, target)  # atomic; the folder is complete under one name or the other
        _retitle(target, new)
        return _info(target)

    def delete(self, name: str) -> None:
        """Move the adapter to the trash (`restore` brings it back)."""
        folder = self._existing(self.root, name)
        trash = self.root / TRASH
        trash.mkdir(exist_ok=True)
        os.rename(folder, self._unique(trash, folder.name))

    def restore(self, name: str) -> AdapterInfo:
        """Bring an adapter back from the trash, under its name (or a free variant of it)."""
        folder = self._existing(self.root / TRASH, name)
        try:
            wanted = check_name(str(_read_adapter(folder).get("name") or folder.name))
        except (TrainingError, ValueError):
            wanted = folder.name
        target = self._unique(self.root, wanted)
        os.rename(folder, target)
        if target.name != wanted:
            _retitle(target, target.name)
        return _info(target)

    def purge(self, name: str) -> None:
        """Delete an adapter from the trash for good."""
        shutil.rmtree(self._existing(self.root / TRASH, name))

    # -- sharing ---------------------------------------------------------------------------------

    def export_zip(self, name: str, dest_dir: str | Path) -> Path:
        """`<dest_dir>/<name>.zip` holding the adapter folder as `<name>/...`, written atomically."""
        folder = self._existing(self.root, name)
        dest = Path(dest_dir).expanduser()
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / f"{folder.name}.zip"
        fd, tmp = tempfile.mkstemp(prefix=f".{folder.name}.", suffix=".zip.tmp", dir=dest)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(folder.rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def push_to_hub(
        self,
        name: str,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = True,
        client=None,
    ) -> str:
        """Upload the adapter with a Hub model card to `repo_id`; returns the repo URL.

        The token comes from `token` or HF_TOKEN (or huggingface_hub's saved login) and goes only
        to the client: it is not logged and not written. `client` defaults to `HfApi(token=...)`;
        tests pass their own object, since no machine here reaches the Hub.
        """
        folder = self._existing(self.root, name)
        if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
            raise ValueError(f"repo_id: expected 'user-or-org/repo-name', got {repo_id!r}")
        token = token or os.environ.get("HF_TOKEN") or None
        if client is None:
            from huggingface_hub import HfApi

            client = HfApi(token=token)
        info = _read_adapter(folder)
        with tempfile.TemporaryDirectory(prefix="hub-upload-") as tmp:
            staging = Path(tmp)
            samples = _stage_for_hub(folder, staging)
            (staging / "README.md").write_text(hub_model_card(info, repo_id, samples))
            try:
                url = client.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
                client.upload_folder(
                    repo_id=repo_id,
                    repo_type="model",
                    folder_path=str(staging),
                    commit_message=f"Upload DreamBooth LoRA {folder.name}",
                )
            except Exception as e:  # huggingface_hub raises many types (HTTP, connection, auth)
                text = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if token:
                    text = text.replace(token, "***")
                raise TrainingError(
                    f"Could not push {folder.name} to the Hub repo {repo_id}: {text[:300]}"
                ) from None
        log.info("pushed adapter %s to %s", folder.name, repo_id)
        return str(url) if isinstance(url, str) and url else f"https://huggingface.co/{repo_id}"

    # -- paths -----------------------------------------------------------------------------------

    def _path(self, parent: Path, name: str) -> Path:
        path = (parent / name).resolve()
        if path.parent != parent.resolve():  # belt and braces behind check_name
            raise ValueError(f"name: {name!r} is outside the adapter store")
        return path

    def _existing(self, parent: Path, name: str) -> Path:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError("name: must be a non-empty name")
        if "/" in name or "\\" in name or os.path.isabs(name) or name.startswith("."):
            raise ValueError(f"name: {name!r} is a path; give an adapter name from the list")
        path = self._path(parent, name)
        if not path.is_dir() or path.is_symlink():
            where = "the trash" if parent.name == TRASH else "the adapter store"
            raise ValueError(f"name: there is no adapter called {name} in {where}")
        return path

    def _unique(self, parent: Path, name: str) -> Path:
        path, n = self._path(parent, name), 2
        while path.exists():
            path = self._path(parent, f"{name}-{n}")
            n += 1
        return path

    def _scan(self, parent: Path) -> list[AdapterInfo]:
        found = []
        if not parent.is_dir():
            return found
        for folder in parent.iterdir():
            if folder.name.startswith(".") or not folder.is_dir() or folder.is_symlink():
                continue
            try:
                found.append(_info(folder))
            except (TrainingError, ValueError, TypeError, OSError) as e:
                log.warning("skipping %s in the adapter store: %s", folder, e)
        return sorted(found, key=lambda a: (_timestamp(a), a.name), reverse=True)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _read_adapter(folder: Path) -> dict[str, Any]:
    from .adapters import read_adapter

    return read_adapter(folder)


def _info(folder: Path) -> AdapterInfo:
    if not (folder / LORA_WEIGHT_NAME).is_file():
        raise TrainingError(f"{folder} is not an adapter folder (no {LORA_WEIGHT_NAME}).")
    meta = _read_adapter(folder)
    samples = sorted((folder / "samples").glob("*.png")) if (folder / "samples").is_dir() else []
    final_loss = meta.get("final_loss")
    return AdapterInfo(
        name=folder.name,
        path=folder,
        base_model=str(meta.get("base_model") or ""),
        architecture=str(meta.get("architecture") or "sd15"),
        token=str(meta.get("token") or ""),
        instance_prompt=str(meta.get("instance_prompt") or ""),
        class_prompt=str(meta.get("class_prompt") or ""),
        rank=int(meta.get("rank") or 0),
        alpha=float(meta.get("alpha") or 0.0),
        steps=int(meta.get("steps") or 0),
        created=str(meta.get("created") or ""),
        final_loss=float(final_loss) if final_loss is not None else None,
        thumbnail=samples[0] if samples else None,
        files=tuple(sorted(p for p in folder.rglob("*") if p.is_file())),
    )


def _timestamp(info: AdapterInfo) -> float:
    try:
        return datetime.strptime(info.created, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return info.path.stat().st_mtime


def _retitle(folder: Path, name: str) -> None:
    """Make the folder's own files agree with its (new) name: adapter.json, kohya file, pivotal
    tuning's embeddings file (A1111 calls it by its name), model card."""
    meta = _read_adapter(folder)
    old = meta.get("name")
    files = dict(meta.get("files") or {})
    old_kohya = folder / str(files.get("kohya") or f"{old}.safetensors")
    if old == name and old_kohya.name == kohya_file_name(name):
        return
    if old_kohya.is_file() and old_kohya.parent == folder:
        kohya = kohya_file_name(name)  # never the diffusers file's own name
        os.rename(old_kohya, folder / kohya)
        files["kohya"] = kohya
    old_embeddings = folder / str(files.get("embeddings") or f"{old}_emb.safetensors")
    if files.get("embeddings") and old_embeddings.is_file() and old_embeddings.parent == folder:
        os.rename(old_embeddings, folder / f"{name}_emb.safetensors")
        files["embeddings"] = f"{name}_emb.safetensors"
    meta.update(name=name, files=files)
    atomic_write_json(folder / "adapter.json", meta)
    if "rank" in meta and "alpha" in meta:
        from .adapters import model_card

        atomic_write_text(folder / "README.md", model_card(meta))


def _stage_for_hub(folder: Path, staging: Path) -> list[str]:
    """Copy what the Hub repo holds into `staging`; returns the sample paths (repo-relative)."""
    meta = _read_adapter(folder)
    names = list(_HUB_FILES)
    for kind in ("kohya", "embeddings"):
        extra = (meta.get("files") or {}).get(kind)
        if extra:
            names.append(str(extra))
    for file_name in names:
        src = folder / file_name
        if src.is_file() and src.parent == folder:
            shutil.copy2(src, staging / file_name)
    samples = []
    if (folder / "samples").is_dir():
        (staging / "samples").mkdir()
        for png in sorted((folder / "samples").glob("*.png")):
            shutil.copy2(png, staging / "samples" / png.name)
            samples.append(f"samples/{png.name}")
    return samples


def _looks_like_hub_id(text: str) -> bool:
    return bool(_REPO_ID.match(text or "")) and not Path(text).expanduser().exists()


def hub_model_card(info: dict[str, Any], repo_id: str, samples: list[str]) -> str:
    """The README.md of a Hub repo: YAML metadata (base model, tags, widget) and how to use the LoRA."""
    name = str(info.get("name") or repo_id.split("/")[-1])
    arch = str(info.get("architecture") or "sd15")
    base = str(info.get("base_model") or "")
    prompt = str(info.get("instance_prompt") or "")
    trigger = str(info.get("token") or "")
    kohya = (info.get("files") or {}).get("kohya") or f"{name}.safetensors"
    pipeline_class = "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
    base_for_code = base if _looks_like_hub_id(base) else "<the base model you trained on>"
    header = ["---", "library_name: diffusers"]
    if _looks_like_hub_id(base):
        header.append(f"base_model: {base}")
    tags = [
        "text-to-image",
        "diffusers",
        "lora",
        "dreambooth",
        "stable-diffusion-xl" if arch == "sdxl" else "stable-diffusion",
    ]
    header.append("tags:")
    header += [f"- {t}" for t in tags]
    header.append(f"instance_prompt: {json.dumps(prompt)}")
    if samples:
        header.append("widget:")
        for sample in samples:
            text = prompt if "/with-" in sample else _without(prompt, trigger)
            header += [f"- text: {json.dumps(text)}", "  output:", f"    url: {sample}"]
    header.append("---")
    gallery = "\n".join(f"![{Path(s).stem}]({s})" for s in samples) or "(no sample images)"
    steps = info.get("steps", "?")
    return (
        "\n".join(header)
        + f"""

# {name}

A DreamBooth LoRA for {"SDXL" if arch == "sdxl" else "Stable Diffusion 1.5"}, trained with DreamBooth Studio
on `{base}` for {steps} steps (rank {info.get("rank", "?")}, alpha {info.get("alpha", "?")}).

## Trigger words

Use `{trigger or prompt}` in the prompt; it was trained on the instance prompt `{prompt}`.
Class prompt (prior preservation): `{info.get("class_prompt") or "none"}`.

## Samples

{gallery}

## Use it

diffusers:

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{base_for_code}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{repo_id}", weight_name="{LORA_WEIGHT_NAME}")
image = pipe("{prompt}").images[0]
```

AUTOMATIC1111: download `{kohya}` into `models/Lora` and prompt with
`<lora:{Path(kohya).stem}:1> {prompt}`.

ComfyUI: download `{kohya}` into `models/loras` and load it with a "Load LoRA" node; use the trigger
word in the prompt.
{_hub_pivotal_note(info)}"""
    )


def _hub_pivotal_note(info: dict[str, Any]) -> str:
    """With pivotal tuning: the embeddings file and the tokens the trigger word stands for."""
    embeddings = (info.get("files") or {}).get("embeddings")
    tokens = "".join(info.get("pivotal_tokens") or [])
    if not (embeddings and tokens):
        return ""
    stem = Path(embeddings).stem
    return f"""
Pivotal tuning: the trigger word `{info.get("token") or ""}` stands for the new tokens `{tokens}`, whose
embeddings are in `{embeddings}`. diffusers: load it with `pipe.load_textual_inversion(...)` (one call
per text encoder: keys `clip_l` / `clip_g` for SDXL, `emb_params` for SD 1.5) with
`token=[{", ".join(f'"{t}"' for t in info["pivotal_tokens"])}]` and write `{tokens}` in the prompt.
AUTOMATIC1111: put it in `embeddings/` and write `{stem}` where the trigger word goes; ComfyUI: put it
in `models/embeddings/` and write `embedding:{stem}`.
"""


def _without(prompt: str, token: str) -> str:
    if not token:
        return prompt
    return " ".join(w for w in prompt.split() if w.strip(",.").lower() != token.lower())
