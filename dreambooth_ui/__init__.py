"""DreamBooth Studio's browser app: Gradio Blocks over the `trainer_core` engine.

No training math here and no torch at import: the page is built from `Studio` (services) and the
engine is loaded on the first training or generation.
"""

from __future__ import annotations

__all__ = ["build_app", "Studio"]


def __getattr__(name: str):
    # Lazy, so `import dreambooth_ui.jobs` does not pull gradio in (tests of the runner stay light).
    if name == "build_app":
        from .layout import build_app

        return build_app
    if name == "Studio":
        from .studio import Studio

        return Studio
    raise AttributeError(name)
