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

from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR, ShapesGenerator, load_organism, organism_dir

from . import attribution, binding, generated, ground_truth, heads, narrow_gate, patching, plots, spatial, tasks
from .toolkit import progress_bar
from .metrics import LogitDiff
from .report import Report
from .tasks import Batch, encode, predictions, shapes_described_positions

QUERY_NAMES = {"shape_item": "shape -> item", "colour_item": "colour -> item (text only)",
               "shape_colour": "shape -> colour (image only)", "scene": "scene description -> other colour"}


def _scenes(seed: int, scene_layout: str) -> ShapesGenerator:
    """Scenes like the ones the organism was trained on (`scene_layout` from its record)."""
    return ShapesGenerator(seed, scene_layout)


def _rate(x: torch.Tensor) -> float:
    return float(x.float().mean())


def accuracy_section(model: HookedVLM, report: Report, n: int, seed: int,
                        scene_layout: str = "fixed") -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, float]] = {}
    for split in ("heldout", "train"):
        acc[split] = {}
        for qi, query in enumerate(progress_bar(QUERY_NAMES, desc=f"accuracy ({split})")):
            batch = encode(model.processor, _scenes(seed + 101 * qi, scene_layout).samples(n, query, split=split))
            acc[split][query] = _rate(predictions(model, batch) == batch.answer)
    rows = [dict(query=QUERY_NAMES[q], heldout_combinations=acc["heldout"][q], training_distribution=acc["train"][q])
            for q in QUERY_NAMES]
    report.add("Accuracy per query type",
               f"Argmax over the whole vocabulary at the last prompt token, {n} prompts per cell. 'Held-out "
               "combinations' prompts contain at least one (colour, shape, position) triple never seen in training.",
               rows=rows)
    return acc


def counterfactual_section(model: HookedVLM, report: Report, n: int, seed: int,
                              scene_layout: str = "fixed") -> dict[str, float]:
    checks = [("swap_shapes", "shape_item", True), ("swap_colours", "shape_item", True),
              ("swap_positions", "shape_item", False), ("swap_shapes", "colour_item", False)]
    rates = {}
    for kind, query, flips in progress_bar(checks, desc="counterfactuals"):
        pairs = _scenes(seed + 7, scene_layout).pairs(n, kind, query, split="heldout")
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


def narrow_gate_section(model: HookedVLM, report: Report, n: int, seed: int,
                           scene_layout: str = "fixed") -> dict[str, Any]:
    n_img = None
    tables = {}
    for query in ("shape_item", "shape_colour", "colour_item"):
        batch = encode(model.processor, _scenes(seed + 11, scene_layout).samples(n, query, split="heldout"))
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
    pairs = _scenes(seed + 13, scene_layout).pairs(n, "swap_shapes", "shape_item", split="heldout")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    steer = narrow_gate.steer_end_of_image(model, clean.inputs, cf.inputs, cf.answer)
    report.add("Narrow gate: steering through the end-of-image token",
               "The residual stream at the end-of-image token (all layers) is replaced by its value on the same prompt "
               "with the shapes swapped in the image. Fraction of answers that become the swapped image's answer: "
               f"<b>{steer.fraction:.3f}</b> (any change: {steer.fraction_changed:.3f}). A low value means image "
               "information does not pass through that single token.")
    return dict(knockout=tables, steering_fraction=steer.fraction, steering_changed=steer.fraction_changed)


def patching_section(model: HookedVLM, report: Report, n: int, seed: int,
                        scene_layout: str = "fixed") -> dict[str, Any]:
    pairs = _scenes(seed + 17, scene_layout).pairs(min(n, 64), "swap_shapes", "shape_item", split="heldout")
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
    """Assouel et al.'s causal-mediation head scores s = (M(c1*)[a1*] - M(c1*)[a1]) - (M(c1)[a1*] - M(c1)[a1])."""
    n = min(n, 64)
    presets = {}
    # ID retrieval / selection: the counterfactual swaps object positions; a1* is the answer position IDs would give
    clean, cf = _pairs(model, n, seed + 19, "swap_positions", "scene", scene_layout)
    ld = LogitDiff(clean.wrong, clean.answer, clean.inputs["attention_mask"])
    obj = shapes_described_positions(model, clean.inputs, clean.samples)
    presets["ID retrieval (swap positions; described-object tokens)"] = heads.id_retrieval_scores(
        model, clean.inputs, cf.inputs, ld, positions=obj,
        corrupt_positions=shapes_described_positions(model, cf.inputs, cf.samples))
    presets["ID selection (swap positions; final token)"] = heads.id_selection_scores(model, clean.inputs, cf.inputs, ld)
    clean, cf = _pairs(model, n, seed + 23, "change_colour", "shape_colour", scene_layout)
    presets["feature retrieval (change colour; final token)"] = heads.feature_retrieval_scores(
        model, clean.inputs, cf.inputs, LogitDiff(cf.answer, clean.answer, clean.inputs["attention_mask"]))
    clean, cf = _pairs(model, n, seed + 29, "swap_shapes", "shape_item", scene_layout)
    presets["binding decision (swap shapes; final token)"] = heads.feature_retrieval_scores(
        model, clean.inputs, cf.inputs, LogitDiff(cf.answer, clean.answer, clean.inputs["attention_mask"]))
    rows, top = [], {}
    for name, sc in presets.items():
        top[name] = ground_truth.top_k(sc, 3)
        rows.append(dict(preset=name, **{f"#{i + 1}": f"L{l}H{h} ({float(sc[l, h]):.2f})" for i, (l, h) in enumerate(top[name])}))
    # intervention: patch the top-3 binding-decision heads (final token) from the counterfactual; vs 3 random heads
    layout = model.layout(clean.inputs)
    final = layout.final_token()
    flip = {}
    gen = torch.Generator().manual_seed(seed)
    n_heads = model.cfg.n_heads
    random3 = [(int(i) // n_heads, int(i) % n_heads) for i in torch.randperm(model.cfg.n_layers * n_heads, generator=gen)[:3]]
    _, cf_cache = model.run_with_cache(**cf.inputs, names_filter=lambda x: x.endswith("hook_z"))
    for label, chosen in (("top-3 heads", top["binding decision (swap shapes; final token)"]), ("3 random heads", random3)):
        hooks = []
        for l, h in chosen:
            def put(z, hook, l=l, h=h):
                z = z.clone()
                z[final, h] = cf_cache[f"blocks.{l}.attn.hook_z"][final, h]
                return z
            hooks.append((f"blocks.{l}.attn.hook_z", put))
        flip[label] = _rate(torch.tensor(0) + (model.run_with_hooks(**clean.inputs, fwd_hooks=hooks)[final].argmax(-1) == cf.answer))
    key = "binding decision (swap shapes; final token)"
    report.add("Head attribution (visual symbolic mechanisms)",
               "Causal-mediation score of each head: its output (hook_z) at the patched positions is taken from the "
               "counterfactual run; score = change of logit[a1*] - logit[a1] (Assouel et al.). ID-retrieval and "
               "ID-selection presets swap the objects' positions: on this organism they score ~0, because it binds by "
               "colour and shape content, not by position. The feature-retrieval preset changes the queried object's "
               "colour; 'binding decision' swaps the shapes. Intervention: patching the top-3 binding-decision heads "
               f"at the final token flips {flip['top-3 heads']:.3f} of answers to the counterfactual's, "
               f"3 random heads {flip['3 random heads']:.3f}.",
               fig=plots.plot_heads(presets[key], title=f"Head scores: {key}"), rows=rows)
    return dict(top_heads={k: [f"L{l}H{h}" for l, h in v] for k, v in top.items()},
                scores={k: v for k, v in presets.items()}, intervention_flip_rate=flip)


def binding_section(model: HookedVLM, report: Report, n: int, seed: int) -> dict[str, Any]:
    matrices, row_labels, col_labels = tasks.shapes_factorizability(model, n=min(n, 16), seed=seed)
    mean = tasks.shapes_mean_intervention(model, n_fit=min(n, 32), n_eval=min(n, 16), seed=seed)
    rows = [dict(delta=k, swapped=v.get("swapped", float("nan")), kept=v.get("kept", float("nan")),
                 random_control_swapped=v.get("random_swapped", float("nan"))) for k, v in mean.items()]
    report.add("Binding IDs: factorizability and mean interventions",
               "Factorizability (2505.22200): for pairs of contexts c, c', the residual stream of one slot (object = its "
               "image tokens, colour word, item letter) of c is replaced by c'\'s at every layer with the rest of the "
               "context frozen; rows ask about objects O0, O1, O'0, O'1, columns give the answer chosen. Mean "
               "interventions add Delta = mean(slot 1) - mean(slot 0) to slot 0 and subtract it from slot 1 at every "
               "layer; 'swapped' = fraction of answers that move to the other item, with a same-norm random Delta as "
               "control. Honest reading: on this organism the Delta interventions swap about as often as the random "
               "control, i.e. it does not bind through additive binding-ID vectors; items are bound by the colour "
               "content gathered into them (see the planted gather head).",
               fig=binding.plot_factorizability_grid(matrices, row_labels, col_labels), rows=rows)
    return dict(factorizability={k: v for k, v in matrices.items()}, rows=row_labels, cols=col_labels, mean_intervention=mean)


def spatial_section(model: HookedVLM, report: Report, n: int, seed: int, scene_layout: str = "fixed") -> dict[str, Any]:
    samples = _scenes(seed + 31, scene_layout).samples(min(n, 256), "shape_item", split="any")
    batch = encode(model.processor, samples)
    layout = model.layout(batch.inputs)
    scenes = [s.scene for s in samples]
    hooks_ = ["hook_embed"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    acc = {}
    for attribute in ("colour", "shape", "block"):
        labels = tasks.shapes_token_labels(model, batch.inputs, scenes, attribute, layout)
        res = spatial.probe_hooks(model, batch.inputs, hooks_, layout.image_positions(), labels, seed=seed)
        acc[attribute] = {h.replace("blocks.", "L").replace(".hook_resid_post", ""): r.test_acc for h, r in res.items()}
    clean, cf = _pairs(model, min(n, 64), seed + 37, "swap_shapes", "shape_item", scene_layout)
    last = spatial.last_token_patching(model, clean.inputs, cf.inputs, clean.logit_diff())
    report.add("Spatial and feature probes",
               "Linear probes (2603.22278) on the image tokens' residual stream: colour and shape of the object covering "
               "each token (or background), and which block it sits in; hook_embed at image positions = projector "
               "output. Held-out prompts' accuracy.", fig=spatial.plot_probe_accuracy(acc, title="Probe test accuracy"))
    report.add("Last-token patching per layer",
               "The final token's residual stream (resid_pre) taken from the shape-swapped run, one layer at a time: the "
               "logit difference jumps where image information has reached the final token.",
               fig=spatial.plot_layer_patching(last, ylabel="logit diff (clean answer - other)"))
    return dict(probe_test_accuracy=acc, last_token_patching=last)


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
    if task.get("n_objects", 2) != 2:
        raise ValueError(f"{path} is a {task['n_objects']}-object organism; the demo's binding sections are written for "
                         "two-object scenes. Use `hooked-vlm bench-circuits --model ...` or the analyses directly.")
    scene_layout = task.get("layout", "fixed")
    report = Report(
        "hooked_vlm demo: binding in the Shapes organism",
        f"Model: <code>{path}</code> ({model.cfg.family}, {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, "
        f"d_model {model.cfg.d_model}). Every number below was measured in this run by <code>hooked-vlm demo</code>.")
    summary: dict[str, Any] = dict(model=path, n=n, seed=seed)
    steps = [("accuracy", lambda: accuracy_section(model, report, n, seed, scene_layout)),
             ("counterfactuals", lambda: counterfactual_section(model, report, n, seed, scene_layout)),
             ("narrow_gate", lambda: narrow_gate_section(model, report, n, seed, scene_layout)),
             ("generated", lambda: generated.generated_section(model, report, n, seed, scene_layout)),
             ("patching", lambda: patching_section(model, report, n, seed, scene_layout)),
             ("heads", lambda: heads_section(model, report, n, seed, scene_layout)),
             ("binding", lambda: binding_section(model, report, n, seed)),
             ("spatial", lambda: spatial_section(model, report, n, seed, scene_layout)),
             ("planted_circuit", lambda: planted_section(report, record)),
             ("circuit_recovery", lambda: circuit_section(model, report, record, n, seed))]
    summary["section_seconds"] = {}
    for name, step in progress_bar(steps, desc="demo", leave=True):
        t = time.perf_counter()
        with torch.enable_grad() if name in ("patching", "circuit_recovery", "spatial") else torch.no_grad():
            summary[name] = step()
        summary["section_seconds"][name] = time.perf_counter() - t
    summary["seconds"] = time.perf_counter() - start
    report.summary = summary
    index = report.write(out_dir)
    print(json.dumps({k: summary[k] for k in ("accuracy", "counterfactuals")}, indent=1))
    print(f"wrote {index} and {Path(out_dir) / 'summary.json'} in {summary['seconds']:.0f} s")
    return summary
