"""The circuit-recovery metrics on hand-made score matrices (computed right), and ablation on a tiny model."""
import torch
from tiny import llava_inputs, tiny_llava

from hooked_vlm.analyses.ground_truth import ablate_heads_accuracy, head_ranks, precision_recall_at_k, top_k
from hooked_vlm import HookedVLM


def test_ranks_precision_recall_on_hand_made_scores():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.8, float("nan")], [0.2, 0.3, 0.7]])
    planted = [(0, 0), (2, 2), (1, 2)]
    assert head_ranks(scores, planted) == {(0, 0): 1, (2, 2): 3, (1, 2): 9}  # NaN ranks last
    assert top_k(scores, 3) == [(0, 0), (1, 1), (2, 2)]
    p, r = precision_recall_at_k(scores, planted, 3)
    assert (p, r) == (2 / 3, 2 / 3)
    assert precision_recall_at_k(scores, planted[:2], 2) == (0.5, 0.5)


def test_ablating_no_heads_is_identity_and_all_heads_changes():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2)
    with torch.no_grad():
        pred = model(**inputs)[:, -1].argmax(-1)
    acc = lambda logits: (logits[:, -1].argmax(-1) == pred).float()  # noqa: E731
    assert ablate_heads_accuracy(model, inputs, [], acc) == 1.0
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    with torch.no_grad():
        hooks = [(f"blocks.{l}.attn.hook_z", lambda z, hook: torch.zeros_like(z)) for l in range(model.cfg.n_layers)]
        expected = acc(model.run_with_hooks(**inputs, fwd_hooks=hooks)).mean().item()
    assert ablate_heads_accuracy(model, inputs, every, acc) == expected


def test_organisms_planted_heads_recovered_by_patching():
    """The benchmark's claims, re-measured with its settings (64 held-out pairs, seed 41): on the image counterfactual,
    activation patching per head ranks the image-lookup and retrieval heads in the top 2 on every shipped organism,
    and all three planted heads in its top 5 on the random-position organism (L0H0 is #5 there, #6 with 32 pairs: a
    narrow margin; see docs/ground_truth.md for the full table)."""
    from hooked_vlm.analyses.ground_truth import circuit_methods, planted_heads
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator, load_organism, organism_record, shipped_organisms

    for name in shipped_organisms("circuit"):
        model, record = load_organism(name), organism_record(name)
        task = record["task"]
        pairs = ShapesGenerator(41, task["layout"], task.get("n_objects", 2)).pairs(64, "swap_shapes", "shape_item",
                                                                                    split="heldout")
        clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
        scores = circuit_methods(model, clean, cf)["activation patching per head (all positions)"]()
        ranks = head_ranks(scores, planted_heads(record))
        assert sorted([ranks[(1, 0)], ranks[(2, 0)]]) == [1, 2], (name, ranks)
        if name == "shapes_llava_random":
            assert max(ranks.values()) <= 5, ranks
