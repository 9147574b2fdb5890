"""Training state of the Shapes organism on disk: saved atomically, resumed only into the same run.

Layout of ``state_dir``::

    manifest.json                 {"step", "model", "optimizer", "elapsed_s", "log", "config"}
    model-000250.safetensors      the model at that step (safetensors)
    optimizer-000250.pt           the optimizer's state (tensors and numbers only, loaded with weights_only=True)

Every file is written under a temporary name and renamed into place (``os.replace`` is atomic); the step's
model and optimizer files carry the step in their names, and the manifest, written last, names them. A crash at
any point of a save therefore leaves the previous manifest pointing at the previous complete pair: a resumed run
continues from the last step whose save finished. Files of older steps are removed only after the new manifest
is in place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"

# TrainConfig fields a resumed run must share with the saved one (they decide the data, the model or the update),
# with the command-line flag that sets each. Free to change: steps (extend a run), threads, and the logging /
# evaluation / saving cadence.
MUST_MATCH = {"seed": "--seed", "family": "--family", "layout": "--layout", "n_objects": "--objects",
              "supervise_steps": "--supervise-steps", "batch_size": None, "blocks_per_sequence": None,
              "scene_fraction": None, "init_range": None, "lr": None, "betas": None, "weight_decay": None,
              "clip": None, "warmup": None, "final_lr_frac": None, "attn_weight": None,
              "task": "--task", "init_from": "--init-from", "options": "the task's options"}
# Values of fields added later, for manifests saved before they existed (so a changed task is still refused).
SAVED_BEFORE = {"task": "shapes", "init_from": None, "options": {}}


def _write_atomic(path: Path, write: Any) -> None:
    """`write(tmp_path)`, then rename onto `path`: `path` is either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_model(path: Path, model: torch.nn.Module) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _write_optimizer(path: Path, opt: torch.optim.Optimizer) -> None:
    torch.save(opt.state_dict(), path)


def save_state(state_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, log: list,
               elapsed: float, config: dict[str, Any]) -> None:
    """Save the training state after `step` (see the module docstring for why a crash cannot leave a mix)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    files = {"model": f"model-{step:06d}.safetensors", "optimizer": f"optimizer-{step:06d}.pt"}
    _write_atomic(state_dir / files["model"], lambda p: _write_model(p, model))
    _write_atomic(state_dir / files["optimizer"], lambda p: _write_optimizer(p, opt))
    manifest = {"step": step, **files, "elapsed_s": elapsed, "log": log, "config": config}
    _write_atomic(state_dir / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    for old in (*state_dir.glob("model-*.safetensors"), *state_dir.glob("optimizer-*.pt")):
        if old.name not in files.values():
            old.unlink()


def read_manifest(state_dir: Path) -> dict[str, Any] | None:
    """The last complete save's manifest; None when `state_dir` holds no training state. Refuses a state directory
    without a manifest that still holds state files (written before saves were atomic: it may be a mix)."""
    state_dir = Path(state_dir)
    if (state_dir / MANIFEST).exists():
        return json.loads((state_dir / MANIFEST).read_text())
    legacy = [n for n in ("state.json", "model.safetensors", "optimizer.pt") if (state_dir / n).exists()]
    if legacy:
        raise ValueError(f"--resume: {state_dir} holds training state {legacy} without a {MANIFEST} (saved by an "
                         "older version, whose saves could leave a model and state of different steps). Start afresh "
                         "(without --resume, or with another --state-dir).")
    return None


def check_resumable(manifest: dict[str, Any], config: dict[str, Any], steps: int, state_dir: Path) -> None:
    """Refuse to resume into a run that differs from the saved one in a field of MUST_MATCH, or that would end
    before the saved step."""
    saved = manifest.get("config", {})
    new = json.loads(json.dumps(config))  # tuples -> lists, as saved
    saved = {**SAVED_BEFORE, **saved}
    for field, flag in MUST_MATCH.items():
        if field in saved and saved[field] != new.get(field):
            name = f"{field} ({flag})" if flag else field
            raise ValueError(
                f"--resume: the training state in {state_dir} was saved with {name} = {saved[field]!r}, this run has "
                f"{new.get(field)!r}. Resume with the saved value, or start afresh (without --resume, or with another "
                "--state-dir).")
    if manifest["step"] > steps:
        raise ValueError(f"--resume: the training state in {state_dir} is at step {manifest['step']}, beyond "
                         f"--steps {steps}; pass --steps >= {manifest['step']}")


def load_state(state_dir: Path, manifest: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load the model and optimizer files the manifest names (the pair of one step)."""
    state_dir = Path(state_dir)
    model.load_state_dict(load_file(str(state_dir / manifest["model"])))
    opt.load_state_dict(torch.load(state_dir / manifest["optimizer"], weights_only=True))


def saved_model(state_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the last complete save."""
    manifest = read_manifest(state_dir)
    if manifest is None:
        raise FileNotFoundError(f"no training state in {state_dir}")
    return load_file(str(Path(state_dir) / manifest["model"]))
