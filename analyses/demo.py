"""`hooked-vlm demo`: the four papers' analyses on the Shapes organism (or any supported checkpoint), written to
report/index.html (plotly) and report/summary.json.

Every number is measured in this run; nothing is copied from the organism's record except the description of
its planted circuit, which the report states as planted."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR, ShapesGenerator, load_organism, organism_dir

from . import attribution, binding, generated, ground_truth, heads, narrow_gate, patching, plots, spatial, tasks
from .toolkit import Estimate, progress_bar, rank_stability, rate
from .metrics import LogitDiff
from .report import Report
from .tasks import Batch, encode, predictions, shapes_described_positions

QUERY_NAMES = {"shape_item": "shape -> item", "colour_item": "colour -> item (text only)",
               "shape_colour": "shape -> colour (image only)", "scene": "scene description -> other colour"}


def _scenes(seed: int, scene_layout: str, n_objects: int = 2) -> ShapesGenerator:
    """Scenes like the ones the organism was trained on (`scene_layout` and `n_objects` from its record)."""
    return ShapesGenerator(seed, scene_layout, n_objects)


# sections written for two-object scenes only; on a 3-object organism the demo skips them and says so
TWO_OBJECT_SECTIONS = ("generated", "heads", "binding", "spatial")
# the Shapes queries each section asks (organism.json's task.queries says which ones an organism was trained on; a
# section whose queries it was not trained on would only measure an untrained answer, so it is skipped, visibly)
SECTION_QUERIES = {"counterfactuals": ("shape_item", "colour_item"), "narrow_gate": ("shape_item", "colour_item"),
                   "generated": ("shape_item", "scene"), "patching": ("shape_item",),
                   "heads": ("shape_item", "scene", "shape_colour"), "binding": ("shape_item",),
                   "spatial": ("shape_colour",), "circuit_recovery": ("shape_item",)}


def _rate(x: torch.Tensor) -> dict[str, float | int]:
    """A share of prompts as summary.json writes every rate: {"value", "ci_low", "ci_high", "n"} (Wilson)."""
    return rate(x.detach().flatten().float().cpu()).to_dict()


def _fmt(e: dict[str, Any] | Estimate | None) -> str:
    """'0.98 [0.95, 0.99]' for a table cell."""
    if e is None:
        return ""
    d = e.to_dict() if isinstance(e, Estimate) else e
    return f"{d['value']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"


def accuracy_section(model: HookedVLM, report: Report, n: int, seed: int, scene_layout: str = "fixed",
                     n_objects: int = 2, queries: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float | int]]]:
    """Held-out and training-distribution accuracy of each Shapes query (`queries`: those the organism was trained on;
    default all four)."""
    wanted = [q for q in QUERY_NAMES if queries is None or q in queries]
    acc: dict[str, dict[str, dict[str, float | int]]] = {}
    for split in ("heldout", "train"):
        acc[split] = {}
        for qi, query in enumerate(progress_bar(QUERY_NAMES, desc=f"accuracy ({split})")):
            if query not in wanted:
                continue
            batch = encode(model.processor, _scenes(seed + 101 * qi, scene_layout, n_objects).samples(n, query, split=split))
            acc[split][query] = _rate(predictions(model, batch) == batch.answer)
    rows = [dict(query=QUERY_NAMES[q], heldout_combinations=_fmt(acc["heldout"][q]),
                 training_distribution=_fmt(acc["train"][q])) for q in wanted]
    report.add("Accuracy per query type",
               f"Argmax over the whole vocabulary at the last prompt token, {n} prompts per cell, with 95% Wilson "
               "intervals. 'Held-out combinations' prompts contain at least one (colour, shape, position) triple never "
               "seen in training.", rows=rows)
    return acc


def counterfactual_section(model: HookedVLM, report: Report, n: int, seed: int, scene_layout: str = "fixed",
                           n_objects: int = 2) -> dict[str, dict[str, float | int]]:
    checks = [("swap_shapes", "shape_item", True), ("swap_colours", "shape_item", True),
              ("swap_positions", "shape_item", False), ("swap_shapes", "colour_item", False)]
    rates = {}
    for kind, query, flips in progress_bar(checks, desc="counterfactuals"):
        pairs = _scenes(seed + 7, scene_layout, n_objects).pairs(n, kind, query, split="heldout")
        clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
        pred = predictions(model, cf)
        # flip: the model now gives the other object's item; keep: it still gives the clean answer
        rates[f"{kind}/{query}"] = _rate(pred == (cf.answer if flips else clean.answer))
        assert flips == bool((cf.answer != clean.answer).all())
    rows = [dict(edit=kind, query=QUERY_NAMES[query], expected="answer flips" if flips else "answer stays",
                 rate=_fmt(rates[f"{kind}/{query}"])) for kind, query, flips in checks]
    report.add("Counterfactual checks",
               "Swapping the two objects' SHAPES (or colours) in the image must flip the answer, since the queried shape "
               "now sits on the object of the other colour; swapping their POSITIONS must not. Rate = fraction of "
               f"{n} held-out prompt pairs behaving as expected (95% Wilson interval).", rows=rows)
    return rates


def narrow_gate_section(model: HookedVLM, report: Report, n: int, seed: int, scene_layout: str = "fixed",
                        n_objects: int = 2) -> dict[str, Any]:
    """2412.06646's protocol: knockout conditions with and without renormalisation, random 2% over 5 seeds, the
    text-only colour -> item query as the control beside every condition; steering one layer at a time."""
    gen = _scenes(seed + 11, scene_layout, n_objects)
    batch = encode(model.processor, gen.samples(n, "shape_item", split="heldout"))
    control = encode(model.processor, gen.samples(n, "colour_item", split="heldout"))
    lay = model.layout(batch.inputs)
    n_img = int(lay.is_image[0].sum())
    rows = narrow_gate.knockout_protocol(model, batch.inputs, batch.accuracy(), control_inputs=control.inputs,
                                         control_metric=control.accuracy(), progress=False)
    eoi_name = ("the end-of-image marker" if lay.has_end_of_image_token else
                "the first text position after the image (this family has no end-of-image token, as LLaVA-1.5)")
    table = [dict(condition=r.condition, renormalised="yes" if r.renormalize else "no (paper)",
                  shape_item_accuracy=_fmt(r.estimate), control_colour_item=_fmt(r.control),
                  sd_over_seeds="" if r.per_seed is None else f"{r.estimate.sd:.3f}") for r in rows]
    plain = {r.condition: r.estimate.value for r in rows if not r.renormalize}
    fig = plots.plot_effect_table(plain, title="Attention knockout (shape -> item accuracy, no renormalisation)",
                                  yaxis_title="accuracy")
    report.add("Narrow gate: attention knockout",
               "Attention from every text token after the image to the chosen keys is knocked out in all layers and "
               "heads (arXiv 2412.06646): post-softmax weights zeroed without renormalisation (the paper), and, beside "
               "it, renormalised (the scores masked, so the knocked-out keys leave the softmax too). Shape queries need "
               f"the image (chance is {'0.5' if n_objects == 2 else f'1/{n_objects}'}); the text-only colour -> item query is the control, run under the same "
               f"knockouts. The end-of-image position is {eoi_name}. Random: {rows[3].n_keys} of {n_img} image tokens "
               "(about 2%), mean over 5 seeds with a t interval over the seeds. 95% intervals; "
               f"{n} held-out prompts.", fig=fig, rows=table)
    # steering: the end-of-image state from the same prompt with the shapes swapped, one layer at a time
    pairs = _scenes(seed + 13, scene_layout, n_objects).pairs(n, "swap_shapes", "shape_item", split="heldout")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    sweep = {variant: narrow_gate.steering_sweep(model, clean.inputs, cf.inputs, cf.answer, variant=variant)
             for variant in ("resid", "attn_input")}
    steer_rows = [dict(layer=r.layer, **{f"{v}_moved_to_source": _fmt(sweep[v][i].flipped) for v in sweep})
                  for i, r in enumerate(sweep["resid"])]
    best = max((r for rs in sweep.values() for r in rs), key=lambda r: r.flipped.value)
    report.add("Narrow gate: steering through the end-of-image position, layer by layer",
               "The end-of-image state is taken from the same prompt with the shapes swapped in the image: 'resid' "
               "patches the residual stream at that one layer, 'attn_input' the attention input (ln1 output) of that "
               "layer and every later one (the paper's two variants). Cell = share of prompts whose answer becomes the "
               "swapped image's answer (95% Wilson interval). A low value at every layer means image information does "
               f"not pass through that single position; the largest here is {_fmt(best.flipped)} "
               f"({best.variant}, layer {best.layer}).", rows=steer_rows)
    return dict(knockout=[r.to_dict() for r in rows], end_of_image_is_marker=bool(lay.has_end_of_image_token),
                steering={v: [r.to_dict() for r in rs] for v, rs in sweep.items()},
                steering_best=dict(best.flipped.to_dict(), layer=best.layer, variant=best.variant))


def patching_section(model: HookedVLM, report: Report, n: int, seed: int, scene_layout: str = "fixed",
                     n_objects: int = 2) -> dict[str, Any]:
    pairs = _scenes(seed + 17, scene_layout, n_objects).pairs(min(n, 64), "swap_shapes", "shape_item", split="heldout")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    res = patching.patch_resid_by_layer_and_position(model, clean.inputs, cf.inputs, clean.logit_diff(),
                                                     direction="denoise", progress=False)
    norm = res.normalized()
    layout = model.layout(clean.inputs)
    fig = plots.plot_layer_position(norm, layout, tokens=model, title="Denoising resid_pre patching (normalised logit diff)")
    best = {int(l): int(torch.nan_to_num(norm[i], nan=-1e9).argmax()) for i, l in enumerate(res.labels["layer"])}
    report.add("Activation patching: where does the binding decision live?",
               "Clean = original image, corrupt = shapes swapped in the image (the answer flips). Each cell patches the "
               "clean residual stream (resid_pre) at one layer and one position into the corrupt run; 1 = clean "
               "logit difference fully restored, 0 = no effect. Hover for the token (and, for image tokens, "
               "row/col).", fig=fig)
    return dict(clean_logit_diff=float(res.clean), corrupt_logit_diff=float(res.corrupt), best_position_per_layer=best)


def _pairs(model: HookedVLM, n: int, seed: int, kind: str, query: str, scene_layout: str) -> tuple[Batch, Batch]:
    pairs = _scenes(seed, scene_layout).pairs(n, kind, query, split="heldout")
    return encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])


def heads_section(model: HookedVLM, report: Report, n: int, seed: int, scene_layout: str = "fixed") -> dict[str, Any]:
    """Assouel et al.'s causal-mediation head scores s = (M(c1*)[a1*] - M(c1*)[a1]) - (M(c1)[a1*] - M(c1)[a1]),
    with the rank stability of each preset's top heads, and their alpha * (d_t - d_o) intervention judged on a
    held-out split against random heads."""
    n = min(n, 64)
    presets, per_prompt = {}, {}
    # ID retrieval / selection: the counterfactual swaps object positions; a1* is the answer position IDs would give
    clean, cf = _pairs(model, n, seed + 19, "swap_positions", "scene", scene_layout)
    ld = LogitDiff(clean.wrong, clean.answer, clean.inputs["attention_mask"])
    obj = shapes_described_positions(model, clean.inputs, clean.samples)
    per_prompt["ID retrieval (swap positions; described-object tokens)"] = heads.id_retrieval_scores(
        model, clean.inputs, cf.inputs, ld, positions=obj, per_prompt=True,
        corrupt_positions=shapes_described_positions(model, cf.inputs, cf.samples))
    per_prompt["ID selection (swap positions; final token)"] = heads.id_selection_scores(
        model, clean.inputs, cf.inputs, ld, per_prompt=True)
    clean, cf = _pairs(model, n, seed + 23, "change_colour", "shape_colour", scene_layout)
    per_prompt["feature retrieval (change colour; final token)"] = heads.feature_retrieval_scores(
        model, clean.inputs, cf.inputs, LogitDiff(cf.answer, clean.answer, clean.inputs["attention_mask"]), per_prompt=True)
    clean, cf = _pairs(model, n, seed + 29, "swap_shapes", "shape_item", scene_layout)
    key = "binding decision (swap shapes; final token)"
    per_prompt[key] = heads.feature_retrieval_scores(
        model, clean.inputs, cf.inputs, LogitDiff(cf.answer, clean.answer, clean.inputs["attention_mask"]), per_prompt=True)
    n_h = model.cfg.n_heads
    labels = [f"L{i // n_h}H{i % n_h}" for i in range(model.cfg.n_layers * n_h)]
    rows, top = [], {}
    for name, sc in per_prompt.items():
        presets[name] = sc.mean(-1)
        stab = rank_stability(sc.flatten(0, 1).T, 3, labels=labels, seed=seed)
        top[name] = [dict(head=lab, rank=r, in_top3=share, rank_ci=list(ci)) for lab, r, share, ci in stab.top(3)]
        rows.append(dict(preset=name, **{f"#{i + 1}": f"{t['head']} ({float(presets[name].flatten()[labels.index(t['head'])]):.2f}; "
                                                    f"top-3 in {t['in_top3']:.0%})" for i, t in enumerate(top[name])}))
    # the intervention: heads chosen on one split (the pairs above), d_t / d_o from the answer being the first- vs
    # second-mentioned item, efficacy on another split: does adding alpha * (d_t - d_o) switch the answer?
    def by_mention(split_seed: int) -> tuple[Batch, Batch]:
        ss = _scenes(split_seed, scene_layout).samples(4 * n, "shape_item", split="heldout")
        first = [s for s in ss if s.scene.mention_order[0] == s.target][:n]
        return encode(model.processor, first), encode(model.processor, [s for s in ss if s.scene.mention_order[0] != s.target][:n])
    other, target = by_mention(seed + 31)
    held, _ = by_mention(seed + 37)
    select = (clean.inputs, cf.inputs, LogitDiff(cf.answer, clean.answer, clean.inputs["attention_mask"]))
    inter = heads.intervention_protocol(model, select, (other.inputs, target.inputs), (held.inputs, held.wrong),
                                        k=3, alphas=(1.0, 2.0, 4.0, 8.0), n_random=20, seed=seed, progress=False)
    inter_rows = [dict(alpha=a, top3_heads_switched=_fmt(inter.efficacy[a]), random_3_heads=_fmt(inter.random[a]))
                  for a in inter.efficacy]
    report.add("Head attribution (visual symbolic mechanisms)",
               "Causal-mediation score of each head: its output (hook_z) at the patched positions is taken from the "
               "counterfactual run; score = change of logit[a1*] - logit[a1] (Assouel et al.), mean over "
               f"{n} pairs; 'top-3 in' = share of 1,000 bootstrap resamples of the prompts in which that head is among "
               "the top 3. ID-retrieval and ID-selection presets swap the objects' positions; feature retrieval changes "
               "the queried object's colour; 'binding decision' swaps the shapes.", fig=plots.plot_heads(presets[key],
               title=f"Head scores: {key}"), rows=rows)
    report.add("Head intervention: alpha * (d_t - d_o)",
               f"The top-3 binding-decision heads ({', '.join(f'L{l}H{h}' for l, h in inter.heads)}, chosen on the "
               "pairs above) get alpha * (d_t - d_o) added to their output at the final token, d_t / d_o being their "
               "mean outputs when the answer is the second- / first-mentioned item; judged on a held-out split of "
               f"{n} prompts whose answer is the first-mentioned item: share switched to the other item (95% Wilson), "
               f"against 3 random heads ({inter.n_random} draws, t interval over the draws).", rows=inter_rows)
    return dict(top_heads=top, scores={k: v for k, v in presets.items()},
                intervention=dict(heads=[f"L{l}H{h}" for l, h in inter.heads], layers=inter.layers, rows=inter.rows()))


def binding_section(model: HookedVLM, report: Report, n: int, seed: int) -> dict[str, Any]:
    matrices, row_labels, col_labels = tasks.shapes_factorizability(model, n=min(n, 16), seed=seed)
    mean = tasks.shapes_mean_intervention(model, n_fit=min(n, 32), n_eval=min(n, 16), seed=seed)
    at1 = {c: r for (c, s, q), r in mean.rates.items() if q == "both" and s == 1}
    claim = "; ".join(f"{c} {_fmt(r['swapped'])} vs random {_fmt(r['random_swapped'])}" for c, r in at1.items())
    shown = {k: matrices[k] for k in ("none", "object slot 0", "colour slot 0", "item slot 0", "item slot 1",
                                      "item both slots") if k in matrices}
    report.add("Binding IDs: factorizability and mean interventions",
               "Factorizability (2505.22200): for pairs of contexts c, c', slot 0, slot 1 or both slots of one kind "
               "(object = its image tokens; colour word + the token after it; the token before the item letter + the "
               "letter, the paper's padding) of c are replaced by c'\'s at every layer, the rest of the context frozen; "
               "rows ask the four questions (O0, O1, O'0, O'1), columns give the answer chosen (all nine matrices in "
               "summary.json). Mean interventions, the paper's protocol: Delta from paired scenes (the same entity at "
               "slot 0 of one scene and at slot 1 of another), one vector per layer and token of the slot; +s*Delta at "
               "slot 0 and -s*Delta at slot 1 at every layer's resid_pre, image and context frozen; conditions O, C, I, "
               "O+I, O+C; questions about both objects (pooled here; each in summary.json); scales 1x, 2x, 4x, each "
               "against random vectors of the same norm; 95% Wilson intervals. What this measured: at 1x the paired "
               f"per-token Delta swaps {claim} of the answers (n = questions).",
               fig=binding.plot_factorizability_grid(shown, row_labels, col_labels),
               rows=[dict({k: v for k, v in r.items() if k != "scale"}, condition=f"{r['condition']} {r['scale']}".strip())
                     for r in mean.rows("both")])
    return dict(factorizability={k: v for k, v in matrices.items()}, rows=row_labels, cols=col_labels,
                mean_intervention=mean.to_dict(), delta_norm=mean.delta_norm)


def _site(h: str) -> str:
    return "L0 input" if h == "blocks.0.hook_resid_pre" else h.replace("blocks.", "L").replace(".hook_resid_post", " out")


def spatial_section(model: HookedVLM, report: Report, n: int, seed: int, scene_layout: str = "fixed") -> dict[str, Any]:
    """2603.22278's protocols on Shapes scenes (analyses/tasks.py, spatial section). The organisms were never
    asked where anything is: the probes need no question, criss-cross / ablation / amplification use the image-only
    query "The {shape} is" -> colour."""
    n_probe, n_eval = min(n, 64), min(n, 64)
    probes = tasks.shapes_position_probes(model, n_probe, seed + 31, scene_layout)
    acc = {_site(h).replace("hook_embed", "projector out"): r.test_acc for h, r in probes.items()}
    chance = next(iter(probes.values())).chance
    cc = {kind: tasks.shapes_criss_cross(model, n_eval, seed + 37, scene_layout, kind) for kind in ("object", "strip")}
    ablation = tasks.shapes_vision_ablation(model, n_eval, seed + 41, scene_layout)
    # the organisms answer their own layout's prompts (almost) perfectly: failures to fix come from the random layout
    amp = tasks.shapes_amplification(model, n_probe, n_eval, seed + 43, "random", alphas=(1, 4, 16), control_seeds=range(5),
                                     columns=probes["hook_embed"].columns())
    absrel = tasks.shapes_absolute_vs_relative(model, n_probe, seed + 47) if scene_layout == "random" else None
    clean, cf = _pairs(model, n_eval, seed + 37, "swap_shapes", "shape_item", scene_layout)
    last = spatial.last_token_patching(model, clean.inputs, cf.inputs, clean.logit_diff())
    report.add("Position probes (2603.22278)",
               f"The paper's order probe: per image token of an object, which object it belongs to in left-to-right order "
               f"(2 classes: the left or the right object), a linear layer with one column per class trained with AdamW "
               f"(lr 1e-3, weight decay 1e-4, 200 full-batch epochs, as the authors) on {n_probe} {scene_layout}-layout scenes, split by prompt; "
               "held-out accuracy with 95% bootstrap intervals over held-out prompts. Projector out = post-projection "
               "visual tokens (the paper's site). This organism was never asked where anything is.",
               fig=spatial.plot_estimates({"order probe": acc}, "Order probe, held-out accuracy", "accuracy", chance))
    rows = [dict(site=_site(s), objects_flipped=_fmt(cc["object"].flipped[s]), strips_flipped=_fmt(cc["strip"].flipped[s]))
            for s in cc["object"].sites]
    report.add("Criss-cross interchange (2603.22278)",
               "Clean scene vs the same scene with its two colours reversed (text unchanged); at one site, the left "
               "object's region of the clean run takes the counterfactual's right region and the reverse (objects: the "
               "objects' tokens; strips: the full columns under them). Query \"The {shape} is\" (the organism has no "
               "left/right question): the tokens landing on the asked shape's place carry the OTHER shape, so 'flipped' "
               "= the answer follows the moved tokens. Scored on pairs the model gets right unpatched (Wilson intervals).",
               fig=spatial.plot_estimates({k: {_site(s): r.flipped[s] for s in r.sites} for k, r in cc.items()},
                                          "Criss-cross: answers flipped", "fraction flipped"), rows=rows)
    amp_s = amp.summary()
    report.add("Vision-encoder ablation and amplification (2603.22278)",
               "Full-grid ablation at the LM input: each object's tokens from an image of that object alone at the centre, "
               "all other image tokens from an empty image (layout erased, identity kept). Amplification: h += alpha * "
               "sum of the projections on both order-probe columns at the layer-0 input, image tokens; fix rate = share "
               "of the model's failures (random-layout scenes) answered right, at the best global alpha and per-item "
               "oracle, against 5 random W swept over the same alphas (mean and t interval over draws).",
               rows=[dict(measure="accuracy, unedited", value=_fmt(ablation.clean_acc)),
                     dict(measure="accuracy, vision layout ablated", value=_fmt(ablation.ablated_acc)),
                     dict(measure=f"amplification fix rate, best alpha {amp_s['best_alpha']:g} (of {amp.n_failures} failures)",
                          value=_fmt(amp_s["fix_global"])),
                     dict(measure="amplification fix rate, oracle alpha", value=_fmt(amp_s["fix_oracle"])),
                     dict(measure="random W fix rate, best alpha", value=_fmt(amp_s["control_fix_global"])),
                     dict(measure="random W fix rate, oracle alpha", value=_fmt(amp_s["control_fix_oracle"]))]
               + ([dict(measure=f"absolute vs relative: probe follows order ({absrel.n_disagree} disagreeing tokens)",
                        value=_fmt(absrel.follows_relative)),
                   dict(measure="absolute vs relative: probe follows image half", value=_fmt(absrel.follows_absolute))]
                  if absrel else []))
    report.add("Last-token patching per layer",
               "The final token's residual stream (resid_pre) taken from the shape-swapped run, one layer at a time: the "
               "logit difference jumps where image information has reached the final token.",
               fig=spatial.plot_layer_patching(last, ylabel="logit diff (clean answer - other)"))
    d = lambda e: None if e is None else e.to_dict()  # noqa: E731
    return dict(position_probe_test_accuracy={k: v.to_dict() for k, v in acc.items()}, position_probe_chance=chance,
                criss_cross={k: {_site(s): dict(flipped=r.flipped[s].to_dict(), kept=r.kept[s].to_dict()) for s in r.sites}
                             for k, r in cc.items()},
                vision_ablation=dict(clean=ablation.clean_acc.to_dict(), ablated=ablation.ablated_acc.to_dict()),
                amplification=amp_s,
                absolute_vs_relative=None if absrel is None else dict(
                    follows_relative=d(absrel.follows_relative), follows_absolute=d(absrel.follows_absolute),
                    n_disagree=absrel.n_disagree),
                last_token_patching=last)


def circuit_section(model: HookedVLM, report: Report, record: dict[str, Any] | None, n: int, seed: int) -> list[dict[str, Any]]:
    if record is None:
        return []
    rows = ground_truth.bench_circuits(model, record, n=min(n, 32), seed=seed, n_random=10)
    report.add("Does each method find the known circuit?",
               "Rank (1 = most important of all heads) of each planted head under each method, precision/recall at k "
               "(k = number of planted heads), and shape -> item accuracy after zero-ablating the method's top-k heads "
               "vs k random heads (mean of 10 draws), for an image counterfactual (shapes swapped) and a text one "
               "(the context's items swapped). A method can only find what its counterfactual changes: the shape swap "
               "does not touch the context-binding gather head L0H0, the item swap does not need the image lookup "
               "L1H0. L1H0 also has learned backups (L1H1/L1H2 read the image too), so single-head ablation cannot "
               "rank it. Same table: <code>hooked-vlm bench-circuits</code>.", rows=rows)
    return rows


def planted_section(report: Report, record: dict[str, Any] | None) -> list[dict[str, Any]]:
    if record is None:
        report.add("Planted circuit", "This model is not the Shapes organism: no planted circuit to compare with.")
        return []
    rows = [dict(head=f"L{h['layer']}H{h['head']}", role=h["role"], queries=h["query_positions"], keys=h["key_positions"],
                 supervised_steps=h["supervised_steps"]) for h in record.get("planted_circuit", [])]
    report.add("What was planted",
               "Part of this organism's circuit was PLANTED by an auxiliary attention loss during the first training "
               "steps (these heads were told where to look); it is ground truth for checking the tools, not a finding "
               "about real VLMs. Everything else it does was learned freely.", rows=rows)
    mechanism = record.get("planted_mechanism")
    if mechanism:  # an effect organism (issue 19): one paper's effect planted by construction
        truth = record.get("ground_truth", {})
        report.add("Planted effect",
                   f"This organism has one paper's effect PLANTED by construction: {mechanism.get('effect', '')}. How: "
                   + "; ".join(mechanism.get("how", [])) + ". Expected of the papers' detectors (ground_truth): "
                   + "; ".join(f"{p}: {t['expected']} ({t.get('effect', '')})" for p, t in truth.items())
                   + ". <code>hooked-vlm bench-effects</code> runs them.")
    return rows


def effects_section(model: HookedVLM, report: Report, record: dict[str, Any] | None, n: int, seed: int) -> list[dict[str, Any]]:
    """Each paper's detector (analyses/effects/) for the papers this organism's ground_truth names, with the verdict
    and whether it agrees with what was planted (the rows `hooked-vlm bench-effects` writes, at min(n, 64) prompts)."""
    from .effects.runner import detector_modules, finding_expectation

    truth = (record or {}).get("ground_truth") or {}
    modules = detector_modules()
    rows: list[dict[str, Any]] = []
    for paper in sorted(truth):
        if paper not in modules:
            rows.append(dict(paper=paper, effect="(no detector module)", expected=truth[paper]["expected"],
                             estimate="-", control_upper="-", verdict="SKIPPED", agrees="-"))
            continue
        for f in modules[paper].detect(model, n=min(n, 64), seed=seed):
            expected = finding_expectation(truth[paper], f.effect)
            bound = f.control_ci_high if f.control_ci_high is not None else f.null_value
            rows.append(dict(paper=paper, effect=f.effect, expected=expected,
                             estimate=f"{f.estimate:.3f} [{f.ci_low:.3f}, {f.ci_high:.3f}]", control_upper=f"{bound:.3f}",
                             verdict="detected" if f.detected else "not detected",
                             agrees="yes" if f.detected == (expected == "present") else "NO"))
    report.add("Each paper's detector on this organism",
               "The detectors of <code>hooked-vlm bench-effects</code> (analyses/effects/), for the papers this "
               "organism's ground truth names. A finding is detected when its estimate's 95% interval lies wholly "
               "above its control's (docs/ground_truth.md).", rows=rows)
    return rows


def _resolve(model_path: str | None) -> str:
    """A shipped organism name (e.g. "shapes_qwen2_vl") or None -> its directory; anything else as given."""
    if model_path is None:
        return str(ORGANISM_DIR)
    try:
        return str(organism_dir(model_path))
    except FileNotFoundError:
        return str(model_path)  # a hub name or a directory HookedVLM.from_pretrained will judge


def check_out_dir(out_dir: str | Path, force: bool = False) -> None:
    """Refuse to write into an existing directory that holds files (a previous report) unless `force`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the demo's output {str(out)!r} exists and is not a directory; pass another --out")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not force:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise FileExistsError(f"the report directory {str(out)!r} already exists and holds files ({listed}); pass "
                              "--force to overwrite it (force=True in Python), or --out another directory")


def run_demo(model_path: str | None = None, out_dir: str = "report", n: int = 256, seed: int = 0,
             force: bool = False) -> dict[str, Any]:
    """Run every section and write `out_dir`/index.html and summary.json. `n` >= 1 samples per measurement; an
    `out_dir` that already holds files is refused unless `force` (see `check_out_dir`)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"run_demo: n must be an integer >= 1 (samples per measurement), got {n!r}")
    check_out_dir(out_dir, force)
    torch.manual_seed(seed)
    start = time.perf_counter()
    path = _resolve(model_path)
    model = load_organism(path) if (Path(path) / "organism.json").exists() else HookedVLM.from_pretrained(path)
    record_file = Path(path) / "organism.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    task = (record or {}).get("task", {})
    scene_layout, n_objects = task.get("layout", "fixed"), int(task.get("n_objects", 2))
    report = Report(
        "hooked_vlm demo: binding in the Shapes organism",
        f"Model: <code>{path}</code> ({model.cfg.family}, {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, "
        f"d_model {model.cfg.d_model}). Every number below was measured in this run by <code>hooked-vlm demo</code>.")
    summary: dict[str, Any] = dict(model=path, n=n, seed=seed)
    trained = set(task.get("queries", QUERY_NAMES))
    steps = [("accuracy", lambda: accuracy_section(model, report, n, seed, scene_layout, n_objects,
                                                   queries=sorted(trained))),
             ("counterfactuals", lambda: counterfactual_section(model, report, n, seed, scene_layout, n_objects)),
             ("narrow_gate", lambda: narrow_gate_section(model, report, n, seed, scene_layout, n_objects)),
             ("generated", lambda: generated.generated_section(model, report, n, seed, scene_layout)),
             ("patching", lambda: patching_section(model, report, n, seed, scene_layout, n_objects)),
             ("heads", lambda: heads_section(model, report, n, seed, scene_layout)),
             ("binding", lambda: binding_section(model, report, n, seed)),
             ("spatial", lambda: spatial_section(model, report, n, seed, scene_layout)),
             ("planted_circuit", lambda: planted_section(report, record)),
             ("circuit_recovery", lambda: circuit_section(model, report, record, n, seed)),
             ("effects", lambda: effects_section(model, report, record, n, seed))]
    if not (record or {}).get("ground_truth"):
        steps = steps[:-1]
    summary["section_seconds"] = {}
    if n_objects != 2:  # the sections written for two-object scenes are skipped, visibly
        summary["skipped_sections"] = list(TWO_OBJECT_SECTIONS)
        steps = [(name, step) for name, step in steps if name not in TWO_OBJECT_SECTIONS]
        report.add("Sections skipped for this organism",
                   f"This is a {n_objects}-object organism; the sections {', '.join(TWO_OBJECT_SECTIONS)} are written "
                   "for two-object scenes and were not run. The others use this organism's own scenes.")
    untrained = [name for name, _ in steps if not set(SECTION_QUERIES.get(name, ())) <= trained]
    if not trained & set(QUERY_NAMES):
        untrained.insert(0, "accuracy")
    if untrained:  # sections that would only measure answers this organism was never trained to give
        summary["skipped_sections"] = summary.get("skipped_sections", []) + untrained
        steps = [(name, step) for name, step in steps if name not in untrained]
        report.add("Sections skipped for this organism",
                   f"This organism was trained on the queries {', '.join(sorted(trained))} only; the sections "
                   f"{', '.join(untrained)} ask others and were not run.")
    for name, step in progress_bar(steps, desc="demo", leave=True):
        t = time.perf_counter()
        with torch.enable_grad() if name in ("patching", "circuit_recovery", "spatial") else torch.no_grad():
            summary[name] = step()
        summary["section_seconds"][name] = time.perf_counter() - t
    summary["seconds"] = time.perf_counter() - start
    report.summary = summary
    index = report.write(out_dir)
    print(json.dumps({k: summary[k] for k in ("accuracy", "counterfactuals") if k in summary}, indent=1))
    print(f"wrote {index} and {Path(out_dir) / 'summary.json'} in {summary['seconds']:.0f} s")
    return summary
