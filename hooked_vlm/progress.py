"""Progress bars for the analyses and generation: one switch for all of them (it lives here, below both).

Every analysis takes ``progress=`` per call; ``set_progress(False)`` (or the environment variable
``HOOKED_VLM_PROGRESS=0``) silences them all, e.g. in a notebook that runs many small sweeps. Bars never stay on
screen after they finish (``leave=False``) and redraw at most twice a second.
"""
from __future__ import annotations

import os
from typing import Any

try:  # notebook widgets where ipywidgets exists; else the plain bar (tqdm.auto would warn "IProgress not found")
    import ipywidgets  # noqa: F401
    from tqdm.auto import tqdm
except ImportError:
    from tqdm.std import tqdm

_enabled = os.environ.get("HOOKED_VLM_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def set_progress(enabled: bool) -> bool:
    """Turn every analysis progress bar on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def progress_bar(iterable: Any = None, *, progress: bool = True, **kwargs: Any) -> tqdm:
    """`tqdm` that respects both the per-call `progress` flag and the global switch."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, disable=not (progress and _enabled), **kwargs)
