"""One detector finding, and the one decision rule `hooked-vlm bench-effects` applies to every paper.

A detector runs one paper's paper-faithful protocol on a model and returns `Finding`s: an effect estimate with its
95% interval, oriented so that LARGER means MORE of the effect (e.g. the share of answers an intervention swaps,
or the accuracy lost under a knockout), and the interval of its control (the same measurement where the effect
cannot act: random heads, random directions, random image tokens, ...).

Decision rule: **detected** when the estimate's interval clears its control's interval, ``ci_low >
control_ci_high``. A finding without a control measurement states a fixed null value instead (e.g. 0.5, chance for
two objects), and is detected when ``ci_low > null_value``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

PAPERS = {"2505.22200": "binding IDs", "2603.22278": "spatial binding", "2506.15871": "symbolic heads",
          "2412.06646": "narrow gate"}


@dataclass(frozen=True)
class Finding:
    paper: str
    effect: str  # what was measured, in words (e.g. "Delta_C swaps answers at 1x")
    estimate: float
    ci_low: float
    ci_high: float
    n: int
    control_ci_high: Optional[float] = None  # the control's upper 95% bound
    null_value: Optional[float] = None  # used only when there is no control measurement
    detail: dict[str, Any] = field(default_factory=dict)  # the numbers behind it (control estimate, per-seed, ...)

    def __post_init__(self) -> None:
        if self.paper not in PAPERS:
            raise ValueError(f"Finding.paper must be one of {sorted(PAPERS)}, got {self.paper!r}")
        if (self.control_ci_high is None) == (self.null_value is None):
            raise ValueError("a Finding needs exactly one of control_ci_high (a control measurement) or null_value "
                             f"(a fixed null); got control_ci_high={self.control_ci_high!r}, "
                             f"null_value={self.null_value!r}")
        if not self.ci_low <= self.estimate <= self.ci_high:
            raise ValueError(f"Finding {self.effect!r}: estimate {self.estimate} outside its interval "
                             f"[{self.ci_low}, {self.ci_high}]")

    @property
    def detected(self) -> bool:
        bound = self.control_ci_high if self.control_ci_high is not None else self.null_value
        return self.ci_low > bound

    def row(self, organism: str, family: str, expected: str) -> dict[str, Any]:
        """The bench-effects JSON row."""
        if expected not in ("present", "absent"):
            raise ValueError(f"expected must be 'present' or 'absent', got {expected!r}")
        return {"organism": organism, "family": family, "paper": self.paper, "effect": self.effect,
                "expected": expected, "estimate": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "control_ci_high": self.control_ci_high, "verdict": "detected" if self.detected else "not detected",
                "n": self.n, **({"null_value": self.null_value} if self.null_value is not None else {}),
                "detail": self.detail}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "detected": self.detected}
