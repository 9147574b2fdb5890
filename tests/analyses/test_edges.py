"""analyses.edges (float64 tiny LLaVA): in a model made linear from hook_embed to the metric (MLPs zeroed,
attention patterns and norm scales frozen) EAP scores equal the exact edge-patching effects and EAP-IG equals EAP
for any number of steps; in the real model EAP equals the derivative of edge patching (central finite differences)
and EAP-IG with 1 step equals EAP; keeping every edge gives the clean run, ablating every edge the corrupt run."""
from __future__ import annotations

import random

import pytest
import torch

from hooked_vlm.analyses.edge_graph import node_activations, node_names, receiver_names, valid_edges, vision_depth
from hooked_vlm.analyses.edge_patching import edge_effects, faithfulness, patch_edges, prune
from hooked_vlm.analyses.edges import eap, eap_ig
from hooked_vlm.analyses.metrics import LogitDiff
from hooked_vlm import HookedVLM
from tiny import llava_inputs, tiny_llava

TOL = dict(rtol=1e-8, atol=1e-9)


@pytest.fixture(scope="module")
def hf():
    return tiny_llava()


@pytest.fixture(scope="module")
def setup(hf):
    model = HookedVLM.from_hf(hf).double()
    clean = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    clean["pixel_values"] = clean["pixel_values"].double()
    corrupt = dict(clean, input_ids=clean["input_ids"].clone())
    corrupt["input_ids"][:, -3:] = (corrupt["input_ids"][:, -3:] + 5) % 60 + 1
    corrupt["pixel_values"] = llava_inputs(hf, batch=2, pad_left=1, seed=1)["pixel_values"].double()
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    return model, clean, corrupt, metric


@pytest.fixture(scope="module")
def linear(hf, setup):
    """The same decoder with MLPs zeroed; `hooks` freeze every attention pattern and norm scale at the clean run's
    values, so everything from hook_embed to the metric is linear."""
    _, clean, corrupt, metric = setup
    model = HookedVLM.from_hf(hf).double()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.down.weight.zero_()
    names = [f"blocks.{l}.{n}" for l in range(3) for n in ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale")]
    names.append("ln_final.hook_scale")
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter=names)
    frozen = {n: cache[n] for n in names}
    hooks = [(n, lambda x, hook, n=n: frozen[n].to(x.dtype)) for n in names]
    return model, clean, corrupt, metric, hooks


def test_graph_shape(setup):
    model, *_ = setup
    nodes, recv = node_names(model), receiver_names(model)
    assert len(nodes) == 2 + 12 + 3 and len(recv) == 3 * (4 + 2 + 2 + 1) + 1
    edges = set(valid_edges(model))
    assert ("L0H1", "L1H0.q") in edges and ("L1H1", "MLP1") in edges and ("MLP2", "logits") in edges
    assert ("L1H1", "L1H0.q") not in edges and ("MLP1", "MLP1") not in edges and ("MLP1", "L1H0.v") not in edges


def test_eap_exact_on_linear_model(linear):
    model, clean, corrupt, metric, hooks = linear
    graph = eap(model, clean, corrupt, metric, fwd_hooks=hooks, per_prompt=True)
    edges = valid_edges(model)
    random.Random(0).shuffle(edges)
    into_logits = [e for e in edges if e[1] == "logits"]
    sample = into_logits[:8] + [e for e in edges if e[1].endswith(".v")][:12] + [e for e in edges if e[1].endswith(".q")][:4]
    exact = edge_effects(model, clean, corrupt, metric, sample, per_prompt=True, fwd_hooks=hooks, progress=False)
    est = torch.stack([graph.score(u, v) for u, v in sample])
    torch.testing.assert_close(est, exact, **TOL)
    assert exact.abs().max() > 1e-2
    ig = eap_ig(model, clean, corrupt, metric, steps=3, fwd_hooks=hooks, per_prompt=True)
    torch.testing.assert_close(ig.scores, graph.scores, equal_nan=True, **TOL)


def test_eap_is_the_edge_derivative(setup):
    """d/d(eps) M(clean with edge u->v carrying a_u + eps (a_u' - a_u)) at 0 == EAP(u -> v), in the real model."""
    model, clean, corrupt, metric = setup
    graph = eap(model, clean, corrupt, metric, per_prompt=True)
    _, acts_c = node_activations(model, clean)
    _, acts_x = node_activations(model, corrupt)
    eps = 1e-5
    for u, v in [("embed_image", "L0H2.q"), ("L0H1", "L2H1.k"), ("MLP0", "MLP1"), ("L1H3", "logits"),
                 ("embed_text", "L1H0.v")]:
        vals = []
        for sign in (1, -1):
            src = {u: acts_c[u] + sign * eps * (acts_x[u] - acts_c[u])}
            vals.append(metric(patch_edges(model, clean, [(u, v)], src)))
        fd = (vals[0] - vals[1]) / (2 * eps)
        torch.testing.assert_close(graph.score(u, v), fd, rtol=1e-5, atol=1e-7)


def test_ig_one_step_and_faithfulness(setup):
    model, clean, corrupt, metric = setup
    graph = eap(model, clean, corrupt, metric)
    ig1 = eap_ig(model, clean, corrupt, metric, steps=1)
    torch.testing.assert_close(ig1.scores, graph.scores, equal_nan=True, rtol=0, atol=1e-12)
    assert ig1.method == "EAP-IG(1)" and graph.method == "EAP"
    with torch.no_grad():
        m_clean, m_corrupt = metric(model(**clean)).mean(), metric(model(**corrupt)).mean()
    everything = faithfulness(model, clean, corrupt, metric, valid_edges(model))
    nothing = faithfulness(model, clean, corrupt, metric, [])
    torch.testing.assert_close(everything.value, m_clean, **TOL)
    torch.testing.assert_close(nothing.value, m_corrupt, **TOL)
    torch.testing.assert_close(nothing.ablated, m_corrupt, **TOL)
    kept = prune(graph, 20)
    assert len(kept) == 20 and abs(graph.score(*kept[0])) >= abs(graph.score(*kept[-1]))
    part = faithfulness(model, clean, corrupt, metric, kept)
    assert torch.isfinite(part.normalized)
    mean = faithfulness(model, clean, corrupt, metric, valid_edges(model), ablation="mean")
    torch.testing.assert_close(mean.value, m_clean, **TOL)


# ------------------------------------------------------------------ image path (vision tower) and per position
def _vlm(family):
    """float64 tiny model, clean inputs (2 prompts), a counterfactual changing the last 3 text tokens AND every
    pixel, the pixel noise, and a LogitDiff metric."""
    if family == "llava":
        hf = tiny_llava()
        clean = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    else:
        from tiny import qwen_inputs, tiny_qwen_vl

        hf = tiny_qwen_vl()
        clean = qwen_inputs([[(16, 16)], [(16, 8)]], seed=0)  # packed tower input [1, 24 patches, 32]
    model = HookedVLM.from_hf(hf).double()
    clean["pixel_values"] = clean["pixel_values"].double()
    ids = clean["input_ids"].clone()
    ids[:, -3:] = (ids[:, -3:] + 5) % 59 + 1  # text tokens stay text tokens (1..59) in both families
    noise = torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    corrupt = dict(clean, input_ids=ids, pixel_values=clean["pixel_values"] + noise)
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    return model, clean, corrupt, noise, metric


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm(request):
    return _vlm(request.param)


def _vision_edges(model):
    return [(u, v) for u, v in valid_edges(model, image_path=True) if v == "projector" or v.startswith("V")]


def test_image_path_graph_and_tower_additivity(vlm):
    """The graph adds V.embed / V{k}.attn / V{k}.mlp nodes and receivers for the blocks that run (LLaVA with
    feature layer -2: 2 of 3 blocks; Qwen2-VL: both), and the tower residual is the sum of its nodes."""
    model, clean, *_ = vlm
    k = vision_depth(model)
    assert k == 2 and len(model.vision.blocks) == (3 if model.cfg.family == "llava" else 2)
    nodes, recv = node_names(model, image_path=True), receiver_names(model, image_path=True)
    assert nodes[:5] == ["V.embed", "V0.attn", "V0.mlp", "V1.attn", "V1.mlp"] and nodes[5:] == node_names(model)
    assert recv[:5] == ["V0.attn", "V0.mlp", "V1.attn", "V1.mlp", "projector"] and recv[5:] == receiver_names(model)
    edges = set(valid_edges(model, image_path=True))
    assert edges - set(_vision_edges(model)) == set(valid_edges(model))
    assert len(_vision_edges(model)) == 1 + 2 + 3 + 4 + 5  # into V0.attn, V0.mlp, V1.attn, V1.mlp, projector
    assert {("V.embed", "V0.attn"), ("V0.attn", "V0.mlp"), ("V0.mlp", "V1.attn"), ("V1.mlp", "projector")} <= edges
    assert not {("V0.attn", "V0.attn"), ("V1.attn", "V0.mlp"), ("V1.mlp", "L0H0.q"), ("embed_image", "projector"),
                ("V1.mlp", "logits"), ("projector", "projector")} & edges
    _, acts = node_activations(model, clean, image_path=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter=[f"vision.blocks.{k - 1}.hook_resid_post"])
    total = acts["V.embed"] + sum(acts[f"V{i}.{s}"] for i in range(k) for s in ("attn", "mlp"))
    torch.testing.assert_close(total, cache[f"vision.blocks.{k - 1}.hook_resid_post"], rtol=0, atol=1e-12)
    assert acts["V.embed"].shape[0] == (2 if model.cfg.family == "llava" else 1)


def test_image_path_ig_one_step_and_faithfulness(vlm):
    model, clean, corrupt, _, metric = vlm
    graph = eap(model, clean, corrupt, metric, image_path=True)
    ig1 = eap_ig(model, clean, corrupt, metric, steps=1, image_path=True)
    torch.testing.assert_close(ig1.scores, graph.scores, equal_nan=True, rtol=0, atol=1e-12)
    vis = torch.stack([graph.score(u, v) for u, v in _vision_edges(model)])
    assert torch.isfinite(vis).all() and vis.abs().max() > 1e-3
    # the decoder block is the decoder-only graph's EAP (the vision hooks change no value)
    torch.testing.assert_close(graph.scores[5:, 5:], eap(model, clean, corrupt, metric).scores, equal_nan=True,
                               rtol=0, atol=1e-12)
    ig2 = eap_ig(model, clean, corrupt, metric, steps=2, image_path=True)
    assert torch.isfinite(torch.stack([ig2.score(u, v) for u, v in _vision_edges(model)])).all()
    with torch.no_grad():
        m_clean, m_corrupt = metric(model(**clean)).mean(), metric(model(**corrupt)).mean()
    assert (m_clean - m_corrupt).abs() > 0.1
    all_edges = valid_edges(model, image_path=True)
    everything = faithfulness(model, clean, corrupt, metric, all_edges, image_path=True)
    nothing = faithfulness(model, clean, corrupt, metric, [], image_path=True)
    torch.testing.assert_close(everything.value, m_clean, **TOL)
    torch.testing.assert_close(nothing.value, m_corrupt, **TOL)
    torch.testing.assert_close(nothing.ablated, m_corrupt, **TOL)
    # only the tower's edges ablated: the decoder then sees the corrupt image features, clean text
    with torch.no_grad():
        m_img = metric(model(**dict(clean, pixel_values=corrupt["pixel_values"]))).mean()
    decoder_only = faithfulness(model, clean, corrupt, metric, valid_edges(model), image_path=True)
    torch.testing.assert_close(decoder_only.value, m_img, **TOL)
    mean = faithfulness(model, clean, corrupt, metric, all_edges, ablation="mean", image_path=True)
    torch.testing.assert_close(mean.value, m_clean, **TOL)


def test_image_path_edge_effects_match_eap(vlm):
    """A pixel counterfactual 1e-3 * noise away: each vision edge's exact effect has EAP's sign and is within 5%
    of it (EAP is the first-order term; the rest is O(eps) relative: measured at most 0.7% (LLaVA) / 1.2%
    (Qwen2-VL, whose float32 rotary also adds rounding) over all 15 edges). A text-only counterfactual leaves
    every vision activation unchanged: effects and scores exactly 0."""
    model, clean, corrupt, noise, metric = vlm
    edges = _vision_edges(model)
    small = dict(clean, pixel_values=clean["pixel_values"] + 1e-3 * noise)
    graph = eap(model, clean, small, metric, image_path=True)
    exact = edge_effects(model, clean, small, metric, edges, image_path=True, progress=False)
    est = torch.stack([graph.score(u, v) for u, v in edges])
    assert exact.abs().min() > 1e-7 and (est.sign() == exact.sign()).all()
    torch.testing.assert_close(est, exact, rtol=0.05, atol=0)
    text_only = dict(clean, input_ids=corrupt["input_ids"])
    zero = edge_effects(model, clean, text_only, metric, edges, image_path=True, progress=False)
    assert (zero == 0).all()
    g0 = eap(model, clean, text_only, metric, image_path=True)
    assert all(g0.score(u, v) == 0 for u, v in edges) and g0.score("embed_text", "logits") != 0


def test_per_position_scores_sum_to_the_edge_scores(setup):
    model, clean, corrupt, metric = setup
    for per_prompt in (False, True):
        graph = eap(model, clean, corrupt, metric, per_prompt=per_prompt)
        pos = eap(model, clean, corrupt, metric, per_prompt=per_prompt, per_position=True)
        n, p = len(graph.nodes), clean["input_ids"].shape[1]
        assert pos.scores.shape == (n, len(graph.receivers)) + ((2,) if per_prompt else ()) + (p,)
        torch.testing.assert_close(pos.scores.sum(-1), graph.scores, equal_nan=True, rtol=0, atol=1e-10)
        assert [e[:2] for e in pos.edges()[:10]] == [e[:2] for e in graph.edges()[:10]]
        assert [e[2] for e in pos.edges()[:10]] == pytest.approx([e[2] for e in graph.edges()[:10]], rel=1e-10)
    # the embed_text -> logits edge only acts at positions the metric reads: prompt 0's final token (last column)
    at = pos.score("embed_text", "logits")
    assert at[:, -1].abs().min() > 1e-3 and (at[:, :-1] == 0).all()
    ig = eap_ig(model, clean, corrupt, metric, steps=2, per_position=True)
    torch.testing.assert_close(ig.scores.sum(-1), eap_ig(model, clean, corrupt, metric, steps=2).scores,
                               equal_nan=True, rtol=0, atol=1e-10)


def test_image_path_refusals(setup):
    model, clean, corrupt, metric = setup
    with pytest.raises(ValueError, match="per_prompt"):
        eap(model, clean, corrupt, metric, image_path=True, per_prompt=True)
    with pytest.raises(ValueError, match="per_position"):
        eap(model, clean, corrupt, metric, image_path=True, per_position=True)
    with pytest.raises(ValueError, match="image_path=True"):  # a vision edge in the decoder-only graph
        patch_edges(model, clean, [("V0.attn", "V0.mlp")], node_activations(model, corrupt, image_path=True)[1])
    with pytest.raises(ValueError, match="not edges"):
        patch_edges(model, clean, [("V1.mlp", "L0H0.q")], {}, image_path=True)
    multi = HookedVLM.from_hf(tiny_llava(layer=[-2, -1])).double()
    with pytest.raises(ValueError, match="single vision feature layer"):
        node_names(multi, image_path=True)
    with pytest.raises(ValueError, match="single vision feature layer"):
        eap(multi, clean, corrupt, metric, image_path=True)
    assert node_names(multi) == node_names(model)  # the decoder-only graph still works
