"""The one result type of the sweeps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class SweepResult:
    """Metric values of a sweep.

    scores:   the sweep's shape (e.g. [n_sites], [layer, pos], [layer], [layer, head], [condition]); with
              ``per_prompt`` a trailing batch axis is added. NaN marks entries that were not evaluated.
    clean:    metric on the clean run (scalar, or [batch] per prompt).
    corrupt:  metric on the corrupt (counterfactual) run (scalar, or [batch] per prompt).
    direction: "denoise" (the corrupt run was edited toward clean) or "noise" (the clean run was edited).
    dims:     axis names of `scores`; `labels` holds what each axis enumerates (layers, positions, heads, sites).
    """

    scores: Tensor
    clean: Tensor
    corrupt: Tensor
    direction: str = "denoise"
    dims: tuple[str, ...] = ()
    labels: dict[str, Any] = field(default_factory=dict)

    def normalized(self) -> Tensor:
        """(scores - corrupt) / (clean - corrupt): 1 = clean behaviour, 0 = corrupt behaviour (per prompt when
        per-prompt)."""
        return (self.scores - self.corrupt) / (self.clean - self.corrupt)

    def baseline(self) -> Tensor:
        """The unedited run's value: corrupt for denoising, clean for noising (and for ablations such as knockouts)."""
        return self.corrupt if self.direction == "denoise" else self.clean

    def effect(self) -> Tensor:
        """scores minus the unedited run's value (corrupt for denoising, clean for noising)."""
        return self.scores - self.baseline()

    def table(self) -> dict[str, Tensor]:
        """A sweep over one labelled axis as {"baseline": the unedited run's value, label: score, ...} in sweep
        order (e.g. `narrow_gate.knockout_table`'s conditions; `plots.plot_effect_table` draws it)."""
        if len(self.dims) != 1 or self.dims[0] not in self.labels:
            raise ValueError(f"table() needs a sweep over one labelled axis, this one has dims {self.dims}")
        labels = [str(label) for label in self.labels[self.dims[0]]]
        return {"baseline": self.baseline(), **dict(zip(labels, self.scores))}
