"""Measurements of the symbolic-heads organism (hooked_vlm/organism/symbolic.py) that its organism.json records
(`hooked-vlm bench-effects --write-record`, through analyses/effects/symbolic_heads.py `record`): the planted heads'
attention masses, held-out interchange accuracies and whether the ID-retrieval counterfactual moves the
feature-retrieval head's read. Here, not in the organism package: the training package never imports the analyses."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..tasks import encode
from ..toolkit import act_name, run_cached
from ..toolkit.stats import rate

from hooked_vlm.organism import shapes as S
from hooked_vlm.organism.symbolic import COLOUR_AT, FEATURE_RETRIEVAL, FINAL_AT, ID_RETRIEVAL, SHAPE_AT, STAGES, iit_label


@torch.no_grad()
def planted_report(model: Any, n: int = 256, seed: int = 70_000, split: str = "heldout") -> dict[str, Any]:
    """On ``n`` scene prompts of ``split`` (a HookedVLM of a Shapes organism): each planted head's attention mass
    on its targets, and each stage's interchange accuracy (the head's output at its rows taken from an
    independent scene; share answering what the three-stage mechanism predicts), with 95% Wilson intervals."""

    gen = S.ShapesGenerator(seed)
    base = gen.samples(n, "scene", split=split)
    source = gen.samples(n, "scene", split=split)
    b, s = encode(model.processor, base), encode(model.processor, source)
    tok = model.processor.tokenizer
    ids = b.inputs["input_ids"]
    final = ids.shape[1] - 1  # scene prompts share one length: no padding
    words = [final - (FINAL_AT - COLOUR_AT), final - (FINAL_AT - SHAPE_AT)]
    image = model.layout(b.inputs).image_positions()[0].nonzero().flatten()
    patches = lambda smp, i: image[smp.scene.object_patches(i)]  # noqa: E731
    pattern_names = [act_name("pattern", l) for l, _ in STAGES.values()]
    _, cache = run_cached(model, b.inputs, pattern_names)
    mass: dict[str, list[float]] = {k: [] for k in STAGES}
    for i, smp in enumerate(base):
        described = smp.scene.partner(smp.target)
        p = {k: cache[act_name("pattern", l)][i, h].float() for k, (l, h) in STAGES.items()}
        mass["id_retrieval"] += [float(p["id_retrieval"][w, patches(smp, described)].sum()) for w in words]
        mass["id_selection"].append(float(p["id_selection"][final, words].sum()))
        mass["feature_retrieval"].append(float(p["feature_retrieval"][final, patches(smp, smp.target)].sum()))
    out: dict[str, Any] = {"prompts": f"{n} scene prompts, split {split!r}, ShapesGenerator({seed}); sources: the next "
                                      f"{n} samples of the same generator",
                           "attention_mass": {k: round(float(np.mean(v)), 4) for k, v in mass.items()}}
    rows = {"id_retrieval": words, "id_selection": [final], "feature_retrieval": [final]}
    _, src_cache = run_cached(model, s.inputs, [act_name("z", l) for l, _ in STAGES.values()])
    out["interchange_accuracy"] = {}
    for stage, (layer, head) in STAGES.items():
        labels = []
        for smp, src in zip(base, source):
            read = iit_label(stage, smp.scene, smp.target, src.scene, src.target)
            labels.append(src.scene.colours[src.target] if read < 0 else smp.scene.colours[read])
        want = torch.tensor(tok.convert_tokens_to_ids(labels))
        z_src = src_cache[act_name("z", layer)]

        def patch(z: torch.Tensor, hook: Any, head: int = head, pos: list[int] = rows[stage], z_src=z_src) -> torch.Tensor:
            z = z.clone()
            z[:, pos, head] = z_src[:, pos, head].to(z.dtype)
            return z

        with model.hooks(fwd_hooks=[(act_name("z", layer), patch)]):
            logits = model(**b.inputs)
        hits = (logits[:, -1].argmax(-1).cpu() == want).float()
        changed = float(np.mean([lab != smp.answer for lab, smp in zip(labels, base)]))
        out["interchange_accuracy"][stage] = dict(rate(hits).to_dict(), label_differs_from_clean_answer=round(changed, 4))
    # does the ID-retrieval counterfactual change what the feature-retrieval head reads? L1H3's output at the
    # described words comes from the positions-swapped twin; share of prompts whose L3H3 then attends more to the
    # described object's patches than to the answer object's (1 = it follows the position ID)
    twins = encode(model.processor, [S.make_sample(S.counterfactual_scene(smp.scene, "swap_positions", smp.target),
                                                   "scene", smp.target) for smp in base])
    (rl, rh), (fl, fh) = ID_RETRIEVAL, FEATURE_RETRIEVAL
    _, twin_cache = run_cached(model, twins.inputs, [act_name("z", rl)])
    grabbed: dict[str, torch.Tensor] = {}

    def swap_z(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, words, rh] = twin_cache[act_name("z", rl)][:, words, rh].to(z.dtype)
        return z

    def keep(p: torch.Tensor, hook: Any) -> None:
        grabbed["p"] = p[:, fh, final].detach().float()

    moved = []
    for hooks in ([], [(act_name("z", rl), swap_z)]):
        with model.hooks(fwd_hooks=hooks + [(act_name("pattern", fl), keep)]):
            model(**b.inputs)
        moved.append([float(grabbed["p"][i, patches(smp, smp.scene.partner(smp.target))].sum())
                      > float(grabbed["p"][i, patches(smp, smp.target)].sum()) for i, smp in enumerate(base)])
    out["feature_read_follows_id_retrieval"] = {
        "clean": rate(np.array(moved[0], dtype=float)).to_dict(),
        "l1h3_from_positions_swapped_twin": rate(np.array(moved[1], dtype=float)).to_dict(),
        "note": "share of prompts whose feature-retrieval head (L3H3) attends more to the described object than to "
                "the answer object, clean and with only the ID-retrieval head's output at the described words taken "
                "from the run with the objects' positions swapped (same content)"}
    return out
