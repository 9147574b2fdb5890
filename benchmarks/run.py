"""Side-by-side benchmarks of hooked_vlm against Hugging Face (and nnsight) on the same random models and inputs,
measured in ONE run and printed as ratios ours / reference.

    python benchmarks/run.py --threads 1 --out bench.json      # CPU suite, both families (< 10 min on 2 cores)
    python benchmarks/run.py --quick                           # small models, smoke run (< 2 min)
    python benchmarks/run.py --family qwen2_vl                 # one family (llava | qwen2_vl | both)
    python benchmarks/run.py --full-sweep                      # also run the complete patching sweeps end to end
    python benchmarks/run.py --gpu-7b --family qwen2_vl        # 7B shapes, bf16, cuda, ~7k tokens (needs a GPU)
    python benchmarks/run.py --gpu-7b-check                    # the --gpu-7b code path on the CPU with shrunk shapes

What is measured (per family; see docs/performance.md for the reading):
 1. forward with no hooks vs HF's own sdpa forward                                   goal <= 1.05
 2. run_with_cache(names_filter=resid_pre) vs HF output_hidden_states=True          goal <= 1.1
    run_with_cache() of every hook (attention patterns included) and of one layer's pattern, vs our forward
 3. resid_pre patching, every layer x 20 positions, text counterfactual: our batched
    `patch_resid_by_layer_and_position` vs plain torch forward pre-hooks on the HF model (one forward per patch)
    and vs nnsight (one trace per patch)                                              goal ours/ref <= 0.2 (>= 5x)
 4. `attribution_patching` (resid_pre, attn_out, mlp_out, z: all layers x positions x heads) vs one forward
                                                                                      goal <= 3.5
 5. peak memory of each call, and forward time vs sequence length and batch size.

Timing: contenders run in interleaved rounds and each keeps its minimum (bench_measure.Meter.compare).
Sweeps are timed on one unit of sites (ours: `batch_size` sites, i.e. one batched forward; references:
`--ref-sites` patches, one forward each), each a complete call including its fixed cost (baselines and the clean
cache). The fixed costs are timed alone in the same rounds; per-site cost = (unit - fixed cost) / sites, and the
full sweep is projected as fixed cost + per-site cost x sites (ours: rounded up to whole batches).
`--full-sweep` runs the complete sweeps once as a check (on the --quick models the projection was within 10% of
the full run).

nnsight is optional (`pip install nnsight`; not a project dependency): without it that reference is skipped and
the JSON says why.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_measure import Meter, machine_info  # noqa: E402
from bench_models import Setup, llava_setup, qwen_setup, seven_b_setup, text_counterfactual  # noqa: E402
from bench_sweeps import hf_hook_sweep, nnsight_available, nnsight_sweep, wrap_nnsight  # noqa: E402
from hooked_vlm.hf_compat import cache_keyword, output_cache  # noqa: E402

N_POSITIONS = 20  # positions per layer in the patching sweep


class _Stop(Exception):
    pass


def _stop_hook(act, hook):
    raise _Stop


def _row(family: str, section: str, what: str, ours: float, ref: float, ref_name: str, goal: float | None = None,
         ours_mb: float | None = None, ref_mb: float | None = None, **extra: Any) -> dict:
    ratio = ours / ref
    return dict(family=family, section=section, what=what, ours_s=ours, ref_s=ref, ref=ref_name, ratio=ratio,
                goal=goal, met=None if goal is None else bool(ratio <= goal), ours_peak_mb=ours_mb, ref_peak_mb=ref_mb,
                **extra)


def sweep_batch(setup: Setup, inputs: dict, model, requested: int | None, gpu: bool) -> tuple[int, str]:
    """The `batch_size` for our sweep: the API default (16), or 4 on the GPU's 7B shapes. (The Qwen vision tower no
    longer builds a dense [n, n] mask over the batch's packed patches, and with `reuse_prefix` the sweep's chunks
    do not run the tower at all, so the batch is not limited by it any more.)"""
    if requested:
        return requested, "requested"
    # 7B shapes: a batched forward returns full-vocabulary logits at every position, b x 7.4k x 152k in bf16 =
    # 2.3 GB per copy of the batch, so 4 copies
    return (4, "4 (7B shapes: full-vocabulary logits of every copy, GPU memory)") if gpu else (16, "API default")


def suffix_cost(hf, model, corrupt: dict, start: int, meter: Meter, reps: int) -> float | None:
    """Seconds for HF to run the tokens from `start` on over a KV cache of the tokens before it (no vision tower):
    a lower bound on a patch at position >= start if only the causal suffix were recomputed. None if the model
    refuses (e.g. a family whose cached positions need more than input_ids)."""
    try:
        with torch.no_grad():
            prefix = {k: v for k, v in corrupt.items()}
            for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                if key in prefix:
                    prefix[key] = prefix[key][:, :start]
            past = output_cache(hf(**prefix, use_cache=True))
            import copy

            image = {k: v for k, v in corrupt.items() if k not in ("input_ids", "attention_mask")}
            plan = model.family.plan(model, corrupt["input_ids"], **image)
            pos = model.family.position_ids(model, corrupt["input_ids"], corrupt.get("attention_mask"), plan)
            rest = dict(input_ids=corrupt["input_ids"][:, start:], attention_mask=corrupt["attention_mask"],
                        position_ids=pos[..., start:])

            def run():
                with torch.no_grad():
                    return hf(**rest, **{cache_keyword(hf): copy.deepcopy(past)}, use_cache=True).logits

            st = meter.compare({"suffix": run}, reps, memory=False)["suffix"]
            full = hf(**corrupt).logits[:, start:]
            diff = (st.result - full).abs().max().item()
            if diff > 1e-3 * max(1.0, full.abs().max().item()):
                print(f"  (suffix estimate discarded: its logits differ from the full forward's by {diff:.1e})")
                return None
            return st.best
    except Exception as err:  # an estimate only: never fail the suite for it
        print(f"  (suffix estimate skipped: {type(err).__name__}: {str(err)[:120]})")
        return None


class FamilyBench:
    """The five sections for one family; each appends table rows to `self.rows` and details to `self.info`."""

    def __init__(self, setup: Setup, args, meter: Meter, nn_reason: str | None):
        from hooked_vlm import HookedVLM

        self.setup, self.args, self.meter, self.nn_reason = setup, args, meter, nn_reason
        self.fam, self.hf = setup.family, setup.hf
        self.gpu = args.gpu_7b
        # the 7B shapes share the HF weights (same speed, half the memory); elsewhere from_hf's default copy
        self.model = HookedVLM.from_hf(self.hf, copy_weights=not self.gpu)
        self.L = self.model.cfg.n_layers
        self.mid = self.L // 2
        self.inputs = setup.make_inputs()
        self.n = int(self.inputs["input_ids"].shape[1])
        self.change = self.n - N_POSITIONS  # the counterfactual changes the first swept position (a text token)
        self.corrupt = text_counterfactual(self.inputs, self.change)
        self.rows: list[dict] = []
        self.info: dict[str, Any] = dict(family=self.fam, model=setup.describe, tokens=self.n, n_layers=self.L,
                                         params_m=round(sum(p.numel() for p in self.hf.parameters()) / 1e6, 1))
        self.fwd_s: float | None = None  # section 1's minima, reused by section 5 and for attribution vs HF
        self.hf_s: float | None = None

    # shared callables ------------------------------------------------------------------------------------------
    def ours_fwd(self, inputs=None):
        with torch.no_grad():
            return self.model(**(inputs or self.inputs))

    def hf_fwd(self, inputs=None):
        with torch.no_grad():
            return self.hf(**(inputs or self.inputs)).logits

    def row(self, *args, **kwargs) -> None:
        self.rows.append(_row(self.fam, *args, **kwargs))

    def run(self, sections: str) -> dict:
        print(f"\n== {self.fam}: {self.setup.describe}; {self.n} tokens, {self.info['params_m']}M parameters", flush=True)
        t = time.perf_counter()
        for s in "12345":
            if s in sections:
                getattr(self, f"section{s}")()
        self.info["seconds"] = time.perf_counter() - t
        return dict(info=self.info, rows=self.rows)

    # 1. forward ------------------------------------------------------------------------------------------------
    def section1(self) -> None:
        model = self.model

        def ours_prefix():  # vision tower + projector + merge: everything before the decoder's first block
            with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", _stop_hook)]):
                try:
                    model(**self.inputs)
                except _Stop:
                    pass

        st = self.meter.compare({"ours": self.ours_fwd, "hf": self.hf_fwd, "prefix": ours_prefix}, self.args.reps)
        parity = (st["ours"].result.float() - st["hf"].result.float()).abs().max().item()
        self.fwd_s, self.hf_s = st["ours"].best, st["hf"].best
        self.fwd_mb, self.hf_mb = st["ours"].peak_mb, st["hf"].peak_mb
        self.row("1", "forward, no hooks", self.fwd_s, self.hf_s, "HF sdpa forward", 1.05, st["ours"].peak_mb,
                 st["hf"].peak_mb, logits_max_abs_diff=parity)
        self.info["vision_prefix_s"] = st["prefix"].best
        self.info["vision_prefix_fraction"] = st["prefix"].best / self.fwd_s
        print(f"  forward: ours {self.fwd_s:.3f}s, HF {self.hf_s:.3f}s (logits max |diff| {parity:.1e}); "
              f"vision+projector+merge = {100 * st['prefix'].best / self.fwd_s:.0f}% of our forward", flush=True)

    # 2. caches -------------------------------------------------------------------------------------------------
    def section2(self) -> None:
        model, hf, inputs, L = self.model, self.hf, self.inputs, self.L
        resid = lambda name: name.endswith("hook_resid_pre")  # noqa: E731
        pattern = f"blocks.{self.mid}.attn.hook_pattern"

        def cache_resid():
            with torch.no_grad():
                return model.run_with_cache(**inputs, names_filter=resid)[1]

        def hf_hidden():
            with torch.no_grad():
                return hf(**inputs, output_hidden_states=True).hidden_states

        # section 1 warmed these shapes up: no warm-up round; peak memory is taken on the first round
        st = self.meter.compare({"cache": cache_resid, "hf": hf_hidden}, self.args.reps, warmup=False)
        ours_res, ref_res = st["cache"].result, st["hf"].result
        diff = max((ours_res[f"blocks.{l}.hook_resid_pre"] - ref_res[l]).abs().max().item() for l in range(L))
        self.row("2", "run_with_cache(resid_pre)", st["cache"].best, st["hf"].best, "HF output_hidden_states", 1.1,
                 st["cache"].peak_mb, st["hf"].peak_mb, resid_max_abs_diff=diff)
        print(f"  resid cache {st['cache'].best:.3f}s vs HF hidden states {st['hf'].best:.3f}s (max |diff| {diff:.1e})",
              flush=True)
        del st, ours_res, ref_res
        fns = {"fwd": self.ours_fwd}
        if not self.gpu:  # every hook of a 7B model at 7k tokens would be ~150 GB of attention patterns alone
            def cache_all():
                with torch.no_grad():
                    _, c = model.run_with_cache(**inputs)
                return len(c.cache_dict), sum(t.numel() * t.element_size() for t in c.cache_dict.values()) / 2**20

            fns["all"] = cache_all

        def cache_one_pattern():
            with torch.no_grad():
                return model.run_with_cache(**inputs, names_filter=[pattern])[1]

        fns["one"] = cache_one_pattern
        st = self.meter.compare(fns, 2, warmup=False)
        if "all" in st:
            n_hooks, cache_mb = st["all"].result
            self.row("2", f"run_with_cache() all {n_hooks} hooks", st["all"].best, st["fwd"].best, "our forward", None,
                     st["all"].peak_mb, st["fwd"].peak_mb, cache_mb=cache_mb,
                     note="patterns and hook_result of every layer; time and peak memory only")
        self.row("2", f"run_with_cache(layer {self.mid} hook_pattern)", st["one"].best, st["fwd"].best, "our forward", None,
                 st["one"].peak_mb, st["fwd"].peak_mb, note="only that layer switches to explicit attention")
        print("  caches: " + (f"all hooks {st['all'].best:.3f}s, {st['all'].peak_mb or 0:.0f} MB peak "
                              f"({st['all'].result[1]:.0f} MB cached); " if "all" in st else "")
              + f"one pattern {st['one'].best:.3f}s; our forward {st['fwd'].best:.3f}s", flush=True)

    # 3. activation-patching sweep ------------------------------------------------------------------------------
    def section3(self) -> None:
        from hooked_vlm.analyses.metrics import LogitDiff
        from hooked_vlm.analyses.patching import patch_resid_by_layer_and_position

        model, hf, inputs, corrupt, L, mid, n = self.model, self.hf, self.inputs, self.corrupt, self.L, self.mid, self.n
        positions = list(range(self.change, n))
        metric = LogitDiff(answer=[11], wrong=[12])
        bs, why = sweep_batch(self.setup, inputs, model, self.args.sweep_batch, self.gpu)
        k = min(self.args.ref_sites, bs)
        unit_pos, ref_pos = positions[:bs], positions[:k]
        n_sites = L * len(positions)
        n_batches = math.ceil(n_sites / bs)
        name = f"blocks.{mid}.hook_resid_pre"

        def ours_unit():
            return patch_resid_by_layer_and_position(model, inputs, corrupt, metric, layers=[mid], positions=unit_pos,
                                                     batch_size=bs, progress=False)

        def ours_setup():  # what patch_sweep does before its loop: the clean cache and baseline, the saved corrupt
            from hooked_vlm.resume import capture  # run (which is also the corrupt baseline)

            with torch.no_grad():
                model(**inputs)
                model.run_with_cache(**inputs, names_filter=[name])
                capture(model, corrupt)

        # the fixed costs (two plain forwards and a resid cache for ours, a hidden-states forward and a plain one for
        # HF) are timed in the same rounds as the units: taking them from sections 1-2 instead was tried and gave
        # per-site costs off by 2x when the load changed between sections
        fns = {"ours": ours_unit, "hf": lambda: hf_hook_sweep(hf, inputs, corrupt, metric, [mid], ref_pos),
               "ours_setup": ours_setup, "hf_setup": lambda: hf_hook_sweep(hf, inputs, corrupt, metric, [mid], [])}
        nm = None
        if self.nn_reason is None and not self.args.no_nnsight:
            nm = wrap_nnsight(hf)
            fns["nnsight"] = lambda: nnsight_sweep(nm, inputs, corrupt, metric, [mid], ref_pos)
        st = self.meter.compare(fns, 2, warmup=False)
        sweep: dict[str, Any] = dict(layers=L, positions=len(positions), sites=n_sites, our_batch_size=bs,
                                     our_batch_size_reason=why, ref_sites_timed=k, our_sites_timed=bs)
        ours_scores = st["ours"].result.scores[0, ref_pos]
        sweep["effect_max_abs"] = (ours_scores - st["ours"].result.corrupt).abs().max().item()
        setup_t = {"ours": st["ours_setup"].best, "hf": st["hf_setup"].best}
        if "nnsight" in st:
            # nnsight's setup is HF's (a clean and a corrupt run) plus two traces' overhead, estimated per trace from
            # its k + 2 traces against HF's k + 2 forwards
            overhead = max(st["nnsight"].best - st["hf"].best, 0.0) / (k + 2)
            setup_t["nnsight"] = setup_t["hf"] + 2 * overhead
            sweep["nnsight_overhead_per_trace_s"] = overhead
        per_site, projected = {}, {}
        for m, sites in (("ours", bs), ("hf", k), ("nnsight", k)):
            if m not in st:
                continue
            per_site[m] = max(st[m].best - setup_t[m], 1e-9) / sites
            # ours: one batched forward per `bs` sites (the last batch padded up); references: one forward per site
            projected[m] = setup_t[m] + (per_site[m] * bs * n_batches if m == "ours" else per_site[m] * n_sites)
            sweep[m] = dict(unit_s=st[m].best, setup_s=setup_t[m], per_site_s=per_site[m], projected_full_s=projected[m],
                            unit_peak_mb=st[m].peak_mb)
            if m != "ours":
                sweep[m]["scores_max_abs_diff_vs_ours"] = (st[m].result[0][0] - ours_scores).abs().max().item()
        refs = {"hf": "HF + torch pre-hooks, 1 forward/patch"}
        if "nnsight" in st:
            refs["nnsight"] = "nnsight, 1 trace/patch"
        for m, label in refs.items():
            self.row("3", f"patch sweep {L}x{len(positions)}, projected", projected["ours"], projected[m], label, 0.2,
                     st["ours"].peak_mb, st[m].peak_mb, per_site_ratio=per_site["ours"] / per_site[m],
                     note=f"ours batch_size={bs}")
        if nm is None:
            sweep["nnsight_skipped"] = self.nn_reason or "--no-nnsight"
        del st
        suffix = suffix_cost(hf, model, corrupt, self.change, self.meter, 2)
        if suffix is not None:
            sweep["suffix_forward_s"] = suffix
            sweep["suffix_note"] = (f"HF forward of the last {n - self.change} tokens over a KV cache of the first "
                                    f"{self.change}: about what one patch at a swept position would cost if only the "
                                    "causal suffix were recomputed")
        print(f"  sweep ({n_sites} sites, our batch {bs}): per site ours {per_site['ours']:.3f}s, HF hooks "
              f"{per_site['hf']:.3f}s" + (f", nnsight {per_site['nnsight']:.3f}s" if "nnsight" in per_site else "")
              + (f"; HF suffix-only forward {suffix:.3f}s" if suffix is not None else "")
              + "; projected full: " + ", ".join(f"{m} {v:.0f}s" for m, v in projected.items())
              + f"; scores max |diff| vs ours: " + ", ".join(
                  f"{m} {sweep[m]['scores_max_abs_diff_vs_ours']:.1e}" for m in refs)
              + f" (largest effect {sweep['effect_max_abs']:.1e})", flush=True)
        if self.args.full_sweep:
            full = {"ours": lambda: patch_resid_by_layer_and_position(model, inputs, corrupt, metric, positions=positions,
                                                                       batch_size=bs, progress=False),
                    "hf": lambda: hf_hook_sweep(hf, inputs, corrupt, metric, list(range(L)), positions)}
            if nm is not None:
                full["nnsight"] = lambda: nnsight_sweep(nm, inputs, corrupt, metric, list(range(L)), positions)
            st = self.meter.compare(full, 1, warmup=False)
            sweep["full_run_s"] = {m: s.best for m, s in st.items()}
            for m, label in refs.items():
                self.row("3", f"patch sweep {L}x{len(positions)}, full run", st["ours"].best, st[m].best, label, 0.2,
                         st["ours"].peak_mb, st[m].peak_mb)
            print("  full sweep: " + ", ".join(f"{m} {s.best:.1f}s" for m, s in st.items()), flush=True)
            del st
        del nm
        self.info["sweep"] = sweep

    # 4. attribution patching -----------------------------------------------------------------------------------
    def section4(self) -> None:
        from hooked_vlm.analyses.attribution import attribution_patching, gradients
        from hooked_vlm.analyses.metrics import LogitDiff

        model, inputs, corrupt, L = self.model, self.inputs, self.corrupt, self.L
        metric = LogitDiff(answer=[11], wrong=[12])
        names = [f"blocks.{l}.{h}" for h in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z")
                 for l in range(L)]

        def attribution():
            return attribution_patching(model, inputs, corrupt, metric)

        def attr_cache():  # attribution's first pass: the clean run, caching the hooks
            with torch.no_grad():
                return model.run_with_cache(**inputs, names_filter=names)[1]

        def attr_grad():  # its second pass: the corrupt run with the graph kept, and one backward
            return gradients(model, corrupt, metric, names)[0]

        def fwd_grad():  # a forward with autograd recording, no backward
            with torch.enable_grad():
                return model(**corrupt)[0, -1, 0].item()

        st = self.meter.compare({"attr": attribution, "fwd": self.ours_fwd}, 2, warmup=False)
        # where the time goes (one round: diagnostics, noisier than the two-round minima above)
        st.update(self.meter.compare({"cache": attr_cache, "grad": attr_grad, "fwd_grad": fwd_grad}, 1, warmup=False))
        shapes = {key: tuple(v.shape) for key, v in st["attr"].result.scores.items()}
        f = st["fwd"].best
        parts = dict(clean_cache_pass=st["cache"].best / f, corrupt_forward_and_backward=st["grad"].best / f,
                     forward_with_grad_only=st["fwd_grad"].best / f,
                     backward_only=(st["grad"].best - st["fwd_grad"].best) / f,
                     rest=(st["attr"].best - st["cache"].best - st["grad"].best) / f)
        self.info["attribution_x_forward"] = parts
        self.info["attribution_peak_mb"] = {k: st[k].peak_mb for k in ("attr", "cache", "grad", "fwd_grad")}
        self.row("4", "attribution patching, 4 hooks x all", st["attr"].best, f, "our forward", 3.5, st["attr"].peak_mb,
                 st["fwd"].peak_mb, score_shapes=shapes,
                 vs_hf_forward=st["attr"].best / self.hf_s if self.hf_s else None)
        print(f"  attribution: {st['attr'].best:.3f}s = {st['attr'].best / f:.2f} x our forward "
              f"({st['attr'].peak_mb or 0:.0f} MB peak); " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
              + f"; scores {shapes}", flush=True)

    # 5. scaling ------------------------------------------------------------------------------------------------
    def section5(self) -> None:
        scaling = []
        if self.fwd_s is not None:
            scaling.append(dict(tokens=self.n, batch=1, ours_s=self.fwd_s, hf_s=self.hf_s, ratio=self.fwd_s / self.hf_s,
                                ours_peak_mb=self.fwd_mb, hf_peak_mb=self.hf_mb, text_only=False))
        points = [(t, 1) for t in self.setup.scaling_tokens if t != self.n or self.fwd_s is None]
        if not self.gpu and not self.args.no_batch4:
            points.append((self.n, 4))
        for tokens, batch in points:
            inp = self.setup.make_inputs(tokens, batch)
            st = self.meter.compare({"ours": lambda: self.ours_fwd(inp), "hf": lambda: self.hf_fwd(inp)}, 2, warmup=False)
            nt = int(inp["input_ids"].shape[1])
            scaling.append(dict(tokens=nt, batch=batch, ours_s=st["ours"].best, hf_s=st["hf"].best,
                                ratio=st["ours"].best / st["hf"].best, ours_peak_mb=st["ours"].peak_mb,
                                hf_peak_mb=st["hf"].peak_mb, text_only="pixel_values" not in inp))
            print(f"  {nt:5d} tokens x batch {batch}: ours {st['ours'].best:.3f}s HF {st['hf'].best:.3f}s "
                  f"ratio {st['ours'].best / st['hf'].best:.2f}", flush=True)
            del st, inp
        scaling.sort(key=lambda s: (s["batch"], s["tokens"]))
        self.info["scaling"] = scaling


def print_table(results: list[dict], mem_method: str) -> None:
    print(f"\n{'family':9s} {'sec':3s} {'measurement':40s} {'ours s':>8s} {'ref s':>8s} {'ours/ref':>8s} {'goal':>7s} "
          f"{'met':>4s} {'ours MB':>8s} {'ref MB':>8s}  reference")
    for res in results:
        for r in res["rows"]:
            goal = f"<={r['goal']:g}" if r["goal"] is not None else "-"
            met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
            mb = lambda v: f"{v:8.0f}" if v is not None else f"{'-':>8s}"  # noqa: E731
            print(f"{r['family']:9s} {r['section']:3s} {r['what']:40s} {r['ours_s']:8.3f} {r['ref_s']:8.3f} "
                  f"{r['ratio']:8.3f} {goal:>7s} {met:>4s} {mb(r['ours_peak_mb'])} {mb(r['ref_peak_mb'])}  {r['ref']}")
    print("\nforward time vs sequence length and batch (ours vs HF sdpa):")
    for res in results:
        for s in res["info"].get("scaling", []):
            tag = " (text only)" if s.get("text_only") else ""
            print(f"  {res['info']['family']:9s} {s['tokens']:5d} tokens x {s['batch']}: ours {s['ours_s']:7.3f}s  "
                  f"HF {s['hf_s']:7.3f}s  ratio {s['ratio']:.2f}  peak MB ours {s['ours_peak_mb'] or 0:.0f} "
                  f"HF {s['hf_peak_mb'] or 0:.0f}{tag}")
    print(f"\npeak memory: {mem_method}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models (smoke run, < 2 min)")
    p.add_argument("--family", default="both", choices=["llava", "qwen2_vl", "both"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--sections", default="12345", help="which sections to run, e.g. 124 (default all)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds for sections 1 (after a warm-up) and 2 (the "
                   "costlier measurements use 2 rounds without warm-up)")
    p.add_argument("--sweep-batch", type=int, default=None, help="our sweep's batch_size (default: see sweep_batch)")
    p.add_argument("--ref-sites", type=int, default=3, help="patches timed for each one-forward-per-patch reference")
    p.add_argument("--full-sweep", action="store_true", help="also run the complete sweeps once (slow)")
    p.add_argument("--no-nnsight", action="store_true")
    p.add_argument("--no-batch4", action="store_true", help="skip the batch-4 scaling point")
    p.add_argument("--gpu-7b", action="store_true", help="7B shapes in bf16 on cuda with ~7k tokens")
    p.add_argument("--gpu-7b-check", action="store_true", help="run the --gpu-7b code path on the CPU with shrunk shapes")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    device = "cpu"
    if args.gpu_7b_check:
        args.gpu_7b = True
    if args.gpu_7b and not args.gpu_7b_check:
        if not torch.cuda.is_available():
            p.error("--gpu-7b needs a CUDA device (use --gpu-7b-check to exercise the code path on the CPU)")
        device = "cuda"
    meter = Meter(device)
    machine = machine_info()
    nn_reason = nnsight_available()
    if nn_reason is None:
        import nnsight

        machine["nnsight"] = nnsight.__version__
    print(f"machine: {machine}")
    print(f"nnsight: {'available ' + machine['nnsight'] if nn_reason is None else 'skipped (' + nn_reason + ')'}")
    families = ["llava", "qwen2_vl"] if args.family == "both" else [args.family]
    results = []
    for fam in families:
        if args.gpu_7b:
            dtype = torch.float32 if args.gpu_7b_check else torch.bfloat16
            setup = seven_b_setup(fam, device, dtype, shrink=8 if args.gpu_7b_check else 1)
        else:
            setup = (llava_setup if fam == "llava" else qwen_setup)(args.quick)
        results.append(FamilyBench(setup, args, meter, nn_reason).run(args.sections))
        del setup
        if device == "cuda":
            torch.cuda.empty_cache()
    machine["loadavg_end"] = os.getloadavg()
    total = time.perf_counter() - t0
    print_table(results, meter.method)
    print(f"total {total:.0f}s; load average at start {machine['loadavg_start']}, at end {machine['loadavg_end']}")
    out = dict(command=" ".join(["python", "benchmarks/run.py"] + list(sys.argv[1:] if argv is None else argv)),
               machine=machine, memory_method=meter.method, mode="gpu-7b" if args.gpu_7b else ("quick" if args.quick else "full"),
               total_s=total, families=[r["info"] for r in results], rows=[row for r in results for row in r["rows"]])
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
