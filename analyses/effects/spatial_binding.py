"""Detector for spatial binding (arXiv 2603.22278, "dual mechanisms of spatial binding") on the Shapes organisms.

Protocol (the paper's criss-cross interchange, /work/shared/notes/papers.md "Protocol details"):

1. **Question.** The paper asks questions whose answer is a colour. Two are tried, on scenes whose objects are
   apart along x: the position-only question of the spatial organism (``In this image the object is`` -> the left
   object's colour, hooked_vlm/organism/spatial.py) and the content question every Shapes organism answers
   (``The {shape} is`` -> that object's colour). The position question is used when the model answers it (>= 0.8,
   two-colour argmax, on a separate selection set; chance 0.5), else the content question: the detector reads the
   model's behaviour, never its name.
2. **Counterfactual.** The clean image mirrored left-right, pixel for pixel. Every Shapes silhouette is left-right
   symmetric (up to PIL's rasterisation), so each object keeps its colour and shape and only its position moves (the
   colours' order along x is reversed); the answer is read from the mirrored scene.
3. **Criss-cross.** At one site (``blocks.0.hook_resid_pre`` = the LM input, or ``hook_resid_post`` of a layer) the
   clean run's image tokens of both objects' regions (the patches each silhouette covers) are replaced by the
   counterfactual's tokens of the mirrored patches: clean-left <- cf-right and clean-right <- cf-left. The content
   that lands on each region is the same object (same colour, same shape); only the position the tokens carry is
   swapped. A model that reads position from the tokens' content must answer the other colour.
4. **Estimate.** The share of golden prompts (clean and counterfactual both answered right) whose answer (argmax over
   the scene's two colours) becomes the other object's colour, at the best site (chosen on a separate selection
   set, then measured on fresh prompts), with a Wilson interval.
   **Control** (same site, same prompts): the same mirrored interchange on every image token OUTSIDE the objects'
   regions (the background's position signal moves, the objects' does not).
5. **Position probe** (second finding): logistic regression, left object vs right object, on the post-projection
   tokens (``hook_embed``) of the tokens of exactly one object, split by prompt (75/25); estimate = test accuracy,
   control = the same probe trained and scored on labels permuted over the tokens. Interval: the wider of a bootstrap
   over test prompts and a Wilson interval over test tokens (the bootstrap collapses at 1.0).
   **Detail** (not decision rows): the flip rate at every site; a "content move" interchange (object regions from a
   colour-swapped image at the same positions: the colour moves, the position does not; it flips the answer of any
   model that reads the objects at all, a check that the interchange reaches the answer).

6. **Amplification** (`amplification`, not part of `detect`: a trained organism has no failures to fix): the paper's
   h += alpha * sum_k projection on probe column k at the LM input (image tokens), fix rate on the baseline's
   failures at the best global alpha vs random W swept over the same alphas. Run it on an under-trained checkpoint
   (hooked_vlm.organism.spatial.undertrained).

The interchange runs on analyses/criss_cross.py's hook and sites. Its pairs are built here (`mirror_pairs`: clean
(row, col) <- counterfactual (row, cols - 1 - col)), because `criss_cross_pairs` pairs regions of boxes that both
images share, and a mirrored image moves the boxes. The amplification helpers here (`probe_columns`,
`column_projection`, `amplification`) predate analyses/spatial_amplify.py and still stand alone.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from hooked_vlm.analyses.toolkit import act_name, bootstrap, over_seeds, rate, run_cached
from hooked_vlm.analyses.criss_cross import default_sites, interchange_hook

from .base import Finding

if TYPE_CHECKING:
    from hooked_vlm import HookedVLM

PAPER = "2603.22278"
ANSWERS_THRESHOLD = 0.8  # the model "answers" a question at >= this two-colour accuracy (chance 0.5)
N_SELECT = 32


# ------------------------------------------------------------------------------------------------ prompts
def _samples(kind: str, n: int, seed: int) -> list[tuple[Any, Any]]:
    """(clean, mirrored) Sample pairs of question ``kind`` ("position" or "content") on x-separated scenes."""
    from hooked_vlm.organism import shapes as S
    from hooked_vlm.organism.spatial import mirror_scene, spatial_sample, spatial_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = spatial_scene(rng, "any")
        mirror = mirror_scene(scene)
        if kind == "position":
            out.append((spatial_sample(scene), spatial_sample(mirror)))
        else:
            t = int(rng.integers(2))
            out.append((S.make_sample(scene, "shape_colour", t), S.make_sample(mirror, "shape_colour", t)))
    return out


def _inputs(model: "HookedVLM", samples: Sequence[Any], mirrored: bool = False) -> dict[str, Any]:
    """Processor inputs; mirrored=True: each image is the pixel-exact left-right mirror of the sample's scene's
    (``samples`` then hold the mirrored scenes, which give the answers: PIL's ellipses and triangles are not drawn
    pixel-symmetric, so the counterfactual is the mirrored clean image, not a re-rendered mirrored scene)."""
    from PIL import ImageOps

    from hooked_vlm.organism.spatial import mirror_scene
    from hooked_vlm.organism.shapes import render

    images = [ImageOps.mirror(render(mirror_scene(s.scene))) if mirrored else s.image for s in samples]
    return dict(model.processor(images=images, text=[s.prompt for s in samples], return_tensors="pt", padding=True))


def _two_colour(model: "HookedVLM", logits: Tensor, samples: Sequence[Any]) -> Tensor:
    """1 where the answer (argmax over the scene's two colours at the final token) is the sample's answer."""
    tok = model.processor.tokenizer
    ans = torch.tensor(tok.convert_tokens_to_ids([s.answer for s in samples]))
    wrong = torch.tensor(tok.convert_tokens_to_ids([s.wrong for s in samples]))
    last = logits[:, -1].float().cpu()
    rows = torch.arange(len(samples))
    return (last[rows, ans] > last[rows, wrong]).long()


# ------------------------------------------------------------------------------------------ interchange
def _grid_positions(layout: Any, b: int) -> dict[tuple[int, int], int]:
    pos = layout.image_positions()[b].nonzero().flatten()
    return {(int(layout.row[b, p]), int(layout.col[b, p])): int(p) for p in pos}


def mirror_pairs(layout: Any, scenes: Sequence[Any], where: str = "objects") -> list[tuple[Tensor, Tensor]]:
    """Per prompt (clean positions, counterfactual positions) for the mirrored counterfactual: token (row, col) <- the
    counterfactual's (row, cols - 1 - col). where="objects": the patches either object covers; "background": every
    other image token. (Clean and mirrored prompts have the same text, so they share the layout.)"""
    from hooked_vlm.organism import shapes as S

    if where not in ("objects", "background"):
        raise ValueError(f"where must be 'objects' or 'background', got {where!r}")
    out = []
    for b, scene in enumerate(scenes):
        grid = _grid_positions(layout, b)
        cols = max(c for _, c in grid) + 1
        covered = {k for i in range(scene.n_objects) for k in scene.object_patches(i)}
        keep = covered if where == "objects" else set(range(S.NUM_IMAGE_TOKENS)) - covered
        cells = [divmod(k, S.GRID) for k in sorted(keep)]
        dst = [grid[rc] for rc in cells]
        src = [grid[(r, cols - 1 - c)] for r, c in cells]
        out.append((torch.tensor(dst, dtype=torch.long), torch.tensor(src, dtype=torch.long)))
    return out


def same_pairs(layout: Any, scenes: Sequence[Any]) -> list[tuple[Tensor, Tensor]]:
    """Per prompt (positions, same positions) of both objects' patches (for the content-move interchange)."""
    from hooked_vlm.organism import shapes as S

    out = []
    for b, scene in enumerate(scenes):
        grid = _grid_positions(layout, b)
        cells = [divmod(k, S.GRID) for k in sorted({k for i in range(scene.n_objects) for k in scene.object_patches(i)})]
        p = torch.tensor([grid[rc] for rc in cells], dtype=torch.long)
        out.append((p, p))
    return out


@torch.no_grad()
def interchange(model: "HookedVLM", clean: dict[str, Any], source_cache: dict[str, Tensor], site: str,
                pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Logits of the clean run with act[b, dst] = source[b, src] at ``site`` (the shared criss-cross hook)."""
    with model.hooks(fwd_hooks=[(site, interchange_hook(source_cache[site], pairs))]):
        return model(**clean)


def sites(model: "HookedVLM") -> list[str]:
    """resid_pre of layer 0 and resid_post of every layer (analyses/criss_cross.py `default_sites`)."""
    return list(default_sites(model))


# ------------------------------------------------------------------------------------------------ measures
@torch.no_grad()
def _flips(model: "HookedVLM", pairs_of_samples: list[tuple[Any, Any]], site_list: Sequence[str],
           ) -> dict[str, Any]:
    """Per site: flip indicators on the golden prompts for the criss-cross (objects), the background control and the
    content move."""
    clean = [c for c, _ in pairs_of_samples]
    cf = [m for _, m in pairs_of_samples]
    ci, fi = _inputs(model, clean), _inputs(model, cf, mirrored=True)
    if not torch.equal(ci["input_ids"], fi["input_ids"]):
        raise RuntimeError("clean and mirrored prompts differ in text; the interchange pairs tokens by grid cell")
    layout = model.layout(ci)
    base_ok = _two_colour(model, model(**ci), clean).bool()
    cf_logits, cache = run_cached(model, fi, list(site_list))
    golden = base_ok & _two_colour(model, cf_logits, cf).bool()
    # content move: the same object regions from the image with the two objects' colours exchanged (positions kept)
    recoloured = [replace(c, scene=replace(c.scene, colours=c.scene.colours[::-1])) for c in clean]
    _, rcache = run_cached(model, _inputs(model, recoloured), list(site_list))
    objects, background = mirror_pairs(layout, [c.scene for c in clean]), mirror_pairs(layout, [c.scene for c in clean],
                                                                                        "background")
    same = same_pairs(layout, [c.scene for c in clean])
    out: dict[str, Any] = {"golden": golden, "base_accuracy": base_ok.float().mean().item()}
    for site in site_list:
        out[site] = {
            "criss_cross": (1 - _two_colour(model, interchange(model, ci, cache, site, objects), clean))[golden],
            "background": (1 - _two_colour(model, interchange(model, ci, cache, site, background), clean))[golden],
            "content_move": (1 - _two_colour(model, interchange(model, ci, rcache, site, same), clean))[golden],
        }
    return out


def _est(x: Any) -> dict[str, float]:
    e = rate(np.asarray(x, dtype=float))
    return {"value": round(e.value, 4), "ci_low": round(e.ci_low, 4), "ci_high": round(e.ci_high, 4), "n": e.n}


@torch.no_grad()
def _probe_rows(model: "HookedVLM", samples: Sequence[Any], with_prompt: bool = False) -> tuple[Tensor, ...]:
    """(hook_embed rows of the tokens of exactly one object, label 0 = left object / 1 = right object[, prompt])."""
    from hooked_vlm.organism import shapes as S
    from hooked_vlm.organism.spatial import left_object

    inputs = _inputs(model, samples)
    layout = model.layout(inputs)
    _, cache = run_cached(model, inputs, ["hook_embed"])
    x, y, prompt = [], [], []
    for b, s in enumerate(samples):
        grid = _grid_positions(layout, b)
        left = left_object(s.scene)
        a, c = set(s.scene.object_patches(left)), set(s.scene.object_patches(1 - left))
        for k in sorted(a ^ c):  # tokens of exactly one object
            x.append(cache["hook_embed"][b, grid[divmod(k, S.GRID)]].float().cpu())
            y.append(0 if k in a else 1)
            prompt.append(b)
    out = (torch.stack(x), torch.tensor(y))
    return out + (torch.tensor(prompt),) if with_prompt else out


@torch.no_grad()
def position_probe(model: "HookedVLM", n: int, seed: int) -> dict[str, Any]:
    """Left-vs-right-object probe on the post-projection tokens (hook_embed) of the objects' patches, split by prompt
    (75/25), with a shuffled-label control (the labels permuted over all tokens, seeded; trained and scored the same way). Intervals: bootstrap over
    the test prompts of their per-prompt accuracy."""
    from hooked_vlm.analyses.spatial import fit_probe, split_prompts

    samples = [c for c, _ in _samples("position", n, seed)]
    X, Y, P = _probe_rows(model, samples, with_prompt=True)
    test = split_prompts(len(samples), 0.25, seed)[P]
    shuffled = Y[torch.from_numpy(np.random.default_rng(seed + 1).permutation(len(Y)))]
    out = {}
    for name, labels in (("probe", Y), ("shuffled_labels", shuffled)):
        probe = fit_probe(X[~test], labels[~test], 2)
        hit = (probe.predict(X[test]) == labels[test]).double()
        tp = P[test]
        per_prompt = np.array([hit[tp == p].mean().item() for p in tp.unique()])
        e, w = bootstrap(per_prompt, seed=seed), rate(hit.numpy())
        out[name] = {"value": round(w.value, 4), "ci_low": round(min(e.ci_low, w.ci_low), 4),
                     "ci_high": round(max(e.ci_high, w.ci_high), 4), "n_prompts": e.n, "n_tokens": w.n}
    out["note"] = ("left vs right object, tokens of exactly one object's patches at hook_embed (post-projection); "
                   f"{len(Y)} tokens of {n} prompts; value = test-token accuracy; interval = the wider of a bootstrap over "
                   "test prompts and a Wilson interval over test tokens")
    return out


# ------------------------------------------------------------------------------------------------ detect
@torch.no_grad()
def choose_question(model: "HookedVLM", seed: int) -> tuple[str, dict[str, float]]:
    """("position" or "content", selection accuracies): the position question when the model answers it."""
    acc = {}
    for kind in ("position", "content"):
        clean = [c for c, _ in _samples(kind, N_SELECT, seed + 17 + len(acc))]
        acc[kind] = round(_two_colour(model, model(**_inputs(model, clean)), clean).float().mean().item(), 4)
    if acc["position"] >= ANSWERS_THRESHOLD:
        return "position", acc
    return "content", acc


@torch.no_grad()
def detect(model: "HookedVLM", *, n: int = 128, seed: int = 0) -> list[Finding]:
    """Two findings (module docstring) on a Shapes organism: (1) the share of golden prompts whose colour answer flips
    when the objects' tokens are interchanged with their mirrored counterparts (position moves, content stays), at
    the best site, against the background-interchange control; (2) the position probe's order accuracy against its
    shuffled-label control."""
    if n < 8:
        raise ValueError(f"detect: n must be >= 8 prompts, got {n}")
    kind, select_acc = choose_question(model, seed)
    site_list = sites(model)
    select = _flips(model, _samples(kind, max(16, n // 4), seed + 1000), site_list)
    best = max(site_list, key=lambda s: float(select[s]["criss_cross"].float().mean()) if len(select[s]["criss_cross"]) else 0.0)
    main = _flips(model, _samples(kind, n, seed), site_list)
    flips, control = main[best]["criss_cross"], main[best]["background"]
    if len(flips) == 0:
        raise RuntimeError(f"detect: no golden prompt (base accuracy {main['base_accuracy']:.2f}) on the {kind} question")
    est, ctrl = rate(flips.numpy().astype(float)), rate(control.numpy().astype(float))
    detail = {
        "question": kind, "selection_accuracy": select_acc, "best_site": best, "site_selected_on": "separate prompts",
        "base_accuracy_two_colour": round(main["base_accuracy"], 4), "golden": int(main["golden"].sum()),
        "control": {**_est(control), "what": "the same mirrored interchange on every image token outside the objects"},
        "per_site": {s: {k: _est(main[s][k]) for k in ("criss_cross", "background", "content_move")} for s in site_list},
        "content_move_note": "object regions from the colour-exchanged image at the same positions: the colour moves, "
                             "the position stays; flips the answer of any model that reads the objects",
    }
    probe = position_probe(model, n, seed + 2000)
    p, c = probe["probe"], probe["shuffled_labels"]
    return [Finding(PAPER, f"criss-cross interchange of the objects' tokens flips the {kind} question's colour answer",
                    est.value, est.ci_low, est.ci_high, est.n, control_ci_high=ctrl.ci_high, detail=detail),
            Finding(PAPER, "position probe decodes the objects' left/right order from the post-projection tokens",
                    p["value"], p["ci_low"], p["ci_high"], p["n_tokens"], control_ci_high=c["ci_high"],
                    detail={"shuffled_label_control": c, "note": probe["note"]})]


# ------------------------------------------------------------------------------------------- amplification (LOCAL)
# The grid stops at 2: on the under-trained checkpoint (hooked_vlm.organism.spatial.undertrained) random W fix as many
# failures as the probe from alpha 4 on (0.21-0.88 at alpha 8 over four draws, against 0.84 for the probe): adding
# several times a token's own projection on any direction makes the image tokens louder, which the half-trained
# lookup also needs. Up to alpha 2 the probe fixes 0.71 and random W 0.10-0.38.
AMPLIFY_ALPHAS = (0.25, 0.5, 1.0, 2.0)
AMPLIFY_MIN_FAILURES = 16


def probe_columns(probe: Any) -> Tensor:
    """The probe's weight columns in the raw activation space [classes, d] (W / std: the probe standardises)."""
    return (probe.W / probe.std[:, None]).T.contiguous()


def column_projection(h: Tensor, columns: Tensor) -> Tensor:
    """sum_k (h . w_k / |w_k|^2) w_k: h's projection on each column, summed (a binary probe has two columns)."""
    c = columns.to(h.device, torch.float32)
    return ((h.float() @ c.T) / (c * c).sum(-1)) @ c


@torch.no_grad()
def _amplified_right(model: "HookedVLM", inputs: dict[str, Any], samples: Sequence[Any], columns: Tensor,
                     alpha: float) -> Tensor:
    """Two-colour correctness with h += alpha * column_projection(h) at blocks.0.hook_resid_pre, image tokens."""
    image = model.layout(inputs).image_positions()

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        add = alpha * column_projection(act, columns)
        return torch.where(image.to(act.device)[..., None], act + add.to(act.dtype), act)

    with model.hooks(fwd_hooks=[(act_name("resid_pre", 0), hook)]):
        return _two_colour(model, model(**inputs), samples)


@torch.no_grad()
def amplification(model: "HookedVLM", n: int = 128, seed: int = 0, random_draws: int = 5,
                  alphas: Sequence[float] = AMPLIFY_ALPHAS) -> dict[str, Any] | None:
    """2603.22278's amplification on the position question: a position probe (left vs right object) trained on
    hook_embed of separate prompts; on ``n`` fresh prompts, h += alpha * sum_k projection on probe column k at the
    LM input (blocks.0.hook_resid_pre), image tokens. Fix rate = share of the baseline's failures answered right,
    at the best global alpha and at a per-item oracle alpha; control = ``random_draws`` fresh random W (columns of
    the probe's norms) swept over the same alphas (each draw's best global alpha; pooled). None when the model fails
    fewer than AMPLIFY_MIN_FAILURES prompts (nothing to fix)."""
    from hooked_vlm.analyses.spatial import fit_probe

    samples = [c for c, _ in _samples("position", n, seed)]
    inputs = _inputs(model, samples)
    base = _two_colour(model, model(**inputs), samples).bool()
    fail = ~base
    if int(fail.sum()) < AMPLIFY_MIN_FAILURES:
        return None
    X, Y = _probe_rows(model, [c for c, _ in _samples("position", n, seed + 5000)])
    columns = probe_columns(fit_probe(X, Y, 2))

    def sweep(cols: Tensor) -> Tensor:  # [alpha, prompt] right after amplification
        return torch.stack([_amplified_right(model, inputs, samples, cols, a) for a in alphas])

    probe_right = sweep(columns)[:, fail]
    best = int(probe_right.float().mean(1).argmax())
    gen = torch.Generator().manual_seed(seed + 7)
    rand_best = []
    for _ in range(random_draws):
        r = torch.randn(columns.shape, generator=gen)
        r = r / r.norm(dim=-1, keepdim=True) * columns.norm(dim=-1, keepdim=True)
        rr = sweep(r)[:, fail]
        rand_best.append(rr[int(rr.float().mean(1).argmax())])
    fixed = probe_right[best].numpy().astype(float)
    return {"fix_rate": _est(fixed), "best_alpha": alphas[best], "failures": int(fail.sum()),
            "base_accuracy": round(base.float().mean().item(), 4),
            "oracle_alpha_fix_rate": _est(probe_right.any(0).numpy().astype(float)),
            "per_alpha": {str(a): round(v, 4) for a, v in zip(alphas, probe_right.float().mean(1).tolist())},
            "random_control": {**_seeds([x.float().mean().item() for x in rand_best]),
                               "per_draw": [round(x.float().mean().item(), 4) for x in rand_best],
                               "what": f"{random_draws} random W (column norms matched), each at its best alpha; "
                                       "t interval over the draws"}}


def _seeds(values: Sequence[float]) -> dict[str, float]:
    e = over_seeds(np.asarray(values, dtype=float))
    return {"value": round(e.value, 4), "ci_low": round(e.ci_low, 4), "ci_high": round(e.ci_high, 4), "n": e.n}
