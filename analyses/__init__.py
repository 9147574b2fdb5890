"""The binding papers' experiments as composable functions over hook names and TokenLayout position sets.

Layers (docs/architecture.md): `analyses.toolkit` (hook names, position sets, the Metric contract, the guarded
cache, the sweep engine, the result type) at the bottom; the paper modules side by side on top of it; the Shapes
task (`analyses.tasks`), the demo and the circuit ground truth above them.

``analyses.set_progress(False)`` silences every progress bar (or set ``HOOKED_VLM_PROGRESS=0``)."""
from hooked_vlm.progress import set_progress

__all__ = ["set_progress"]
