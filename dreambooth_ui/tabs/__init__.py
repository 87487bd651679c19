"""One module per tab: each `build(...)` lays its tab out, wires its own events to module-level
`on_*` handlers, and returns a frozen dataclass of the components other tabs need.

Handlers are written as `on_x(studios, request: gr.Request, ...)` (plus any tab object they need)
and bound for one page with `bind`, so they stay plain module-level functions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from ..api import friendly


def bind(fn: Callable, *bound: Any) -> Callable:
    """`fn` with its first `len(bound)` arguments fixed, as a Gradio handler that shows one sentence
    on failure. Gradio reads the signature (for `gr.Request`, `gr.Progress`, `gr.SelectData`), so
    the bound parameters are dropped from it."""

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        return fn(*bound, *args, **kwargs)

    signature = inspect.signature(fn)
    handler.__signature__ = signature.replace(parameters=list(signature.parameters.values())[len(bound) :])
    return friendly(handler)
