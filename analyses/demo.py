"""`hooked-vlm demo`: the four papers' analyses on the Shapes organism (or any supported checkpoint), written to
report/index.html (plotly) and report/summary.json.

Every number is measured in this run; nothing is copied from the organism's record except the description of
its planted circuit, which the report states as planted."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR, ShapesGenerator

from . import narrow_gate, patching, plots
from .report import Report
from .tasks import Batch, encode, predictions

QUERY_NAMES = {"shape_item": "shape -> item", "colour_item": "colour -> item (text only)",
               "shape_colour": "shape -> colour (image only)", "scene": "scene description -> other colour"}


def _rate(x: torch.Tensor) -> float:
    return float(x.float().mean())


def accuracy_section(model: HookedVLM, report: Report, n: int, seed: int) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, float]] = {}
    for split in ("heldout", "train"):
        acc[split] = {}
        for qi, query in enumerate(tqdm(QUERY_NAMES, desc=f"accuracy ({split})", leave=False)):
            batch = encode(model.processor, ShapesGenerator(seed + 101 * qi, "fixed").samples(n, query, split=split))
            acc[split][query] = _rate(predictions(model, batch) == batch.answer)
    rows = [dict(query=QUERY_NAMES[q], heldout_combinations=acc["heldout"][q], training_distribution=acc["train"][q])
            for q in QUERY_NAMES]
    report.add("Accuracy per query type",
               f"Argmax over the whole vocabulary at the last prompt token, {n} prompts per cell. 'Held-out "
               "combinations' prompts contain at least one (colour, shape, position) triple never seen in training.",
               rows=rows)
    return acc


def counterfactual_section(model: HookedVLM, report: Report, n: int, seed: int) -> dict[str, float]:
    checks = [("swap_shapes", "shape_item", True), ("swap_colours", "shape_item", True),
              ("swap_positions", "shape_item", False), ("swap_shapes", "colour_item", False)]
    rates = {}
    for kind, query, flips in tqdm(checks, desc="counterfactuals", leave=False):
        pairs = ShapesGenerator(seed + 7, "fixed").pairs(n, kind, query, split="heldout")
        clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
        pred = predictions(model, cf)
        # flip: the model now gives the other object's item; keep: it still gives the clean answer
        rates[f"{kind}/{query}"] = _rate(pred == (cf.answer if flips else clean.answer))
        assert flips == bool((cf.answer != clean.answer).all())
    rows = [dict(edit=kind, query=QUERY_NAMES[query], expected="answer flips" if flips else "answer stays",
                 rate=rates[f"{kind}/{query}"]) for kind, query, flips in checks]
    report.add("Counterfactual checks",
               "Swapping the two objects' SHAPES (or colours) in the image must flip the answer, since the queried shape "
               "now sits on the object of the other colour; swapping their POSITIONS must not. Rate = fraction of "
               f"{n} held-out prompt pairs behaving as expected.", rows=rows)
    return rates


def narrow_gate_section(model: HookedVLM, report: Report, n: int, seed: int) -> dict[str, Any]:
    n_img = None
    tables = {}
    for query in ("shape_item", "shape_colour", "colour_item"):
        batch = encode(model.processor, ShapesGenerator(seed + 11, "fixed").samples(n, query, split="heldout"))
        n_img = int(model.layout(batch.inputs).is_image[0].sum())
        k = min(10, max(1, n_img // 2))
        conditions = {"end-of-image token": "end_of_image", "last image token": "last_image_token",
                      f"{k} random image tokens": f"random_{k}", "all image tokens": "all_image"}
        tables[query] = {k_: float(v) for k_, v in narrow_gate.knockout_table(
            model, batch.inputs, batch.accuracy(), conditions, seed=seed, progress=False).items()}
    rows = [dict(condition=c, **{QUERY_NAMES[q]: tables[q][c] for q in tables}) for c in tables["shape_item"]]
    fig = plots.plot_effect_table(tables["shape_item"], title="Attention knockout (shape -> item accuracy)",
                                  yaxis_title="accuracy")
    report.add("Narrow gate: attention knockout",
               "Post-softmax attention from every text token after the image to the chosen image keys is set to zero in "
               "all layers and heads, without renormalisation (arXiv 2412.06646). Shape queries need the image "
               "(chance is 0.5); the text-only colour -> item query is a control that should not care. "
               f"This organism has {n_img} image tokens and, like LLaVA, no end-of-image marker: the end-of-image token "
               "is the last image token.", fig=fig, rows=rows)
    # steering: patch the end-of-image residual from the same prompt on a shape-swapped image
    pairs = ShapesGenerator(seed + 13, "fixed").pairs(n, "swap_shapes", "shape_item", split="heldout")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    steer = narrow_gate.steer_end_of_image(model, clean.inputs, cf.inputs, cf.answer)
    report.add("Narrow gate: steering through the end-of-image token",
               "The residual stream at the end-of-image token (all layers) is replaced by its value on the same prompt "
               "with the shapes swapped in the image. Fraction of answers that become the swapped image's answer: "
               f"<b>{steer.fraction:.3f}</b> (any change: {steer.fraction_changed:.3f}). A low value means image "
               "information does not pass through that single token.")
    return dict(knockout=tables, steering_fraction=steer.fraction, steering_changed=steer.fraction_changed)


def patching_section(model: HookedVLM, report: Report, n: int, seed: int) -> dict[str, Any]:
    pairs = ShapesGenerator(seed + 17, "fixed").pairs(min(n, 64), "swap_shapes", "shape_item", split="heldout")
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
    return rows


def run_demo(model_path: str | None = None, out_dir: str = "report", n: int = 256, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    path = str(model_path or ORGANISM_DIR)
    model = HookedVLM.from_pretrained(path)
    record_file = Path(path) / "organism.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    report = Report(
        "hooked_vlm demo: binding in the Shapes organism",
        f"Model: <code>{path}</code> ({model.cfg.family}, {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, "
        f"d_model {model.cfg.d_model}). Every number below was measured in this run by <code>hooked-vlm demo</code>.")
    summary: dict[str, Any] = dict(model=path, n=n, seed=seed)
    steps = [("accuracy", lambda: accuracy_section(model, report, n, seed)),
             ("counterfactuals", lambda: counterfactual_section(model, report, n, seed)),
             ("narrow_gate", lambda: narrow_gate_section(model, report, n, seed)),
             ("patching", lambda: patching_section(model, report, n, seed)),
             ("planted_circuit", lambda: planted_section(report, record))]
    for name, step in tqdm(steps, desc="demo"):
        with torch.no_grad() if name != "patching" else torch.enable_grad():
            summary[name] = step()
    summary["seconds"] = time.perf_counter() - start
    index = report.write(out_dir)
    report.summary = summary
    report.write(out_dir)
    print(json.dumps({k: summary[k] for k in ("accuracy", "counterfactuals")}, indent=1))
    print(f"wrote {index} and {Path(out_dir) / 'summary.json'} in {summary['seconds']:.0f} s")
    return summary
