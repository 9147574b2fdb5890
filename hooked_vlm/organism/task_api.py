"""What a training task is: the Shapes organism, or an organism with one paper's effect planted (issue 19).

`hooked-vlm train-organism --task NAME` looks NAME up in a registry of `OrganismTask`s. The trainer
(hooked_vlm/organism/train.py) owns the loop, the optimiser, resumable state and saving; a task says what differs:
its data, training-only constraints (a mask, a hook), extra loss terms, how the result is measured and what
organism.json records. Adding a task = one new module with a registered subclass + its tests; the trainer does not
branch on task names.

A task's knobs live in ``TrainConfig.options`` (declared in ``options``: name -> (type, default, help)); the CLI
offers each as ``--name-with-dashes`` and refuses one that belongs to another task. ``defaults`` are the task's
TrainConfig values (steps, family, init_from, ...), used unless the command line sets them.
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar, ContextManager

import numpy as np
import torch

_TASKS: dict[str, "OrganismTask"] = {}


class OrganismTask:
    """The Shapes task's behaviour; subclasses override what their effect needs."""

    name: ClassVar[str] = "shapes"
    suffix: ClassVar[str] = ""  # appended to the organism name (shapes_<family>[_<layout>][_<k>obj] + suffix)
    help: ClassVar[str] = "the Shapes organism (binding questions over two rendered objects)"
    defaults: ClassVar[dict[str, Any]] = {}
    options: ClassVar[dict[str, tuple[type, Any, str]]] = {}

    # ------------------------------------------------------------------ configuration
    def option(self, cfg: Any, name: str) -> Any:
        """cfg.options[name], or the declared default."""
        if name not in self.options:
            raise KeyError(f"task {self.name!r} has no option {name!r}; it has {sorted(self.options)}")
        return cfg.options.get(name, self.options[name][1])

    def check(self, cfg: Any) -> None:
        """Refuse a configuration that cannot train this task (ValueError naming the field). The base check refuses
        options that belong to no option of this task and ``init_from`` unless the task declares it."""
        unknown = sorted(set(cfg.options) - set(self.options))
        if unknown:
            raise ValueError(f"train_organism: option(s) {unknown} do not belong to task {self.name!r} "
                             f"(its options: {sorted(self.options) or 'none'})")
        if cfg.init_from is not None and "init_from" not in self.defaults:
            raise ValueError(f"train_organism: init_from (--init-from) does not belong to task {self.name!r}")

    # ------------------------------------------------------------------ training
    def make_batch(self, rng: np.random.Generator, cfg: Any) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """(model inputs, sequences); each sequence has ``answers`` [(position, token id, query name)] (the loss and
        the logged accuracy per query) and ``sup`` {layer: [(query position, key positions)]} (head-0 attention
        supervision while step < cfg.supervise_steps)."""
        from .train import shapes_batch

        return shapes_batch(rng, cfg)

    def wants_attentions(self, cfg: Any, step: int) -> bool:
        """Whether ``extra_loss`` needs the attention patterns this step (eager attention returns them)."""
        return False

    def forward_context(self, model: Any, cfg: Any, step: int) -> ContextManager:
        """A training-only constraint around the forward (e.g. an attention mask); nothing by default."""
        return contextlib.nullcontext()

    def extra_loss(self, out: Any, inputs: dict[str, torch.Tensor], seqs: list[Any], cfg: Any,
                   step: int) -> dict[str, torch.Tensor]:
        """Named loss terms added to the answer cross-entropy (each logged under its name)."""
        return {}

    # ------------------------------------------------------------------ measuring and shipping
    def evaluate(self, model: Any, processor: Any, cfg: Any, n: int, seed: int) -> dict[str, float]:
        """The periodic held-out evaluation logged during training."""
        from .measure import evaluate

        return evaluate(model, processor, n=n, seed=seed, heldout=True, layout=cfg.layout, n_objects=cfg.n_objects)

    def report(self, model: Any, processor: Any, cfg: Any, n: int) -> dict[str, Any]:
        """organism.json's measurements of the finished model."""
        from .measure import circuit_report

        return circuit_report(model, processor, n=n, layout=cfg.layout, family=cfg.family, n_objects=cfg.n_objects)

    def planted_circuit(self, cfg: Any) -> list[dict[str, Any]]:
        from .sequences import PLANTED_HEADS

        return [dict(h, supervised_steps=min(cfg.supervise_steps, cfg.steps)) for h in PLANTED_HEADS]

    def training_record(self, cfg: Any) -> dict[str, Any]:
        """Extra fields of organism.json's training section (the options by default)."""
        return {name: self.option(cfg, name) for name in self.options}

    def finish(self, spec: dict[str, Any], cfg: Any, processor: Any, out_dir: Any) -> None:
        """Amend organism.json (``spec``) after the checkpoint is written to ``out_dir``: a planted effect records
        ``note``, ``planted_mechanism`` and ``ground_truth`` ({paper id: {"expected": "present" | "absent",
        "effect": ..., "why": ...}}, read by `hooked-vlm bench-effects`)."""


def register_task(task: OrganismTask) -> OrganismTask:
    if task.name in _TASKS:
        raise ValueError(f"organism task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    _load_builtin()
    return sorted(_TASKS)


def get_task(name: str) -> OrganismTask:
    _load_builtin()
    if name not in _TASKS:
        raise ValueError(f"train_organism: task (--task) must be one of {sorted(_TASKS)}, got {name!r}")
    return _TASKS[name]


def all_tasks() -> list[OrganismTask]:
    _load_builtin()
    return [_TASKS[n] for n in sorted(_TASKS)]


def _load_builtin() -> None:
    """Import the modules that register the shipped tasks (each registers itself on import)."""
    from . import gate  # noqa: F401
    from . import binding_ids  # noqa: F401
    from . import binding_ids_text  # noqa: F401
    from . import spatial  # noqa: F401
    from . import symbolic  # noqa: F401


register_task(OrganismTask())
