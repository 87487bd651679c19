"""Launching the real app on localhost for the API and browser tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(data_dir: Path, base_model: str):
    """The app exactly as `python app.py` builds it, on a free localhost port; returns (demo, url, studio)."""
    import app
    from dreambooth_ui.layout import build_app
    from dreambooth_ui.studio import Studio

    studio = Studio(data_dir, base_model=base_model)
    demo = build_app(studio)
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **app.launch_options(studio),
    )
    return demo, url, studio


# Settings that keep a tiny-model run to seconds on a CPU.
FAST = {
    "num_class_images": 2,
    "class_generation_steps": 2,
    "checkpointing_steps": 3,
    "num_validation_images": 1,
    "validation_inference_steps": 2,
}
