"""The binding papers' experiments as composable functions over hook names and TokenLayout position sets.

``analyses.set_progress(False)`` silences every progress bar (or set ``HOOKED_VLM_PROGRESS=0``)."""
from .toolkit.progress import set_progress

__all__ = ["set_progress"]
