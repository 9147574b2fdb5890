"""Tokens per second of `HookedVLM.generate` (KV cache, greedy) against HF's greedy `generate` on the same model and
prompt, in one run (interleaved rounds, each side keeps its best time; see bench_measure.Meter.compare).

    python benchmarks/bench_generate.py --threads 1 --out bench_generate.json     # llava --quick and full, organism
    python benchmarks/bench_generate.py --quick                                   # the small llava + organism only
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16            # on a GPU

Subjects: the LLaVA-1.5-shaped models of bench_models.py (--quick: d 256, 4 layers, 323-token prompt; full: d 512,
8 layers, 1091-token prompt) and the shipped Shapes organism (batch of 8 prompts). Both sides generate exactly
`--new` tokens (no EOS) and must produce the same tokens; tokens/s counts new tokens of every row. Prefill is
included (it is part of a generate call); `--new` sets how much decoding weighs. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_measure import Meter, machine_info  # noqa: E402
from bench_models import llava_setup  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402


def subjects(quick: bool, device: str, dtype: torch.dtype) -> dict:
    out = {}
    for small in ([True] if quick else [True, False]):
        setup = llava_setup(small)
        hf = setup.hf.to(device=device, dtype=dtype)
        out[f"llava ({'quick' if small else 'full'}): {setup.describe}"] = (hf, setup.make_inputs(None, 1))
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator, organism_dir
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = organism_dir("shapes_llava")
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    proc = AutoProcessor.from_pretrained(path)
    batch = encode(proc, ShapesGenerator(0).samples(8, "shape_item", split="heldout"))
    out["shapes_llava organism (batch 8)"] = (hf, batch.inputs)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new", type=int, default=64, help="tokens to generate per row")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    meter = Meter(args.device)
    results = dict(machine=machine_info(), new_tokens=args.new, rows=[])
    for name, (hf, inputs) in subjects(args.quick, args.device, dtype).items():
        hf.generation_config.eos_token_id = None  # both sides generate exactly --new tokens
        model = HookedVLM.from_hf(hf, copy_weights=False)
        inputs = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        pad = 0
        with torch.no_grad():
            fns = {"hf": lambda: hf.generate(**inputs, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                                             pad_token_id=pad, eos_token_id=None),
                   "ours": lambda: model.generate(**inputs, max_new_tokens=args.new, pad_token_id=pad, eos_token_id=None,
                                                  progress=False)}
            stats = meter.compare(fns, reps=args.reps, memory=False)
        ref, ours = stats["hf"].result, stats["ours"].result
        n = inputs["input_ids"].shape[0] * args.new
        row = dict(subject=name, prompt_tokens=int(inputs["input_ids"].shape[1]), batch=int(inputs["input_ids"].shape[0]),
                   same_tokens=bool(torch.equal(ref.cpu(), ours.cpu())), hf_s=stats["hf"].best,
                   ours_s=stats["ours"].best, hf_tok_s=n / stats["hf"].best, ours_tok_s=n / stats["ours"].best)
        row["ratio_time_ours_over_hf"] = row["ours_s"] / row["hf_s"]
        results["rows"].append(row)
        print(f"{name}\n  prompt {row['prompt_tokens']} x batch {row['batch']}, {args.new} new: HF {row['hf_tok_s']:.1f} tok/s,"
              f" ours {row['ours_tok_s']:.1f} tok/s, time ours/HF {row['ratio_time_ours_over_hf']:.2f}, "
              f"same tokens: {row['same_tokens']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
