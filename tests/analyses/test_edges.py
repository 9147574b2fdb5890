"""analyses.edges (float64 tiny LLaVA): in a model made linear from hook_embed to the metric (MLPs zeroed,
attention patterns and norm scales frozen) EAP scores equal the exact edge-patching effects and EAP-IG equals EAP
for any number of steps; in the real model EAP equals the derivative of edge patching (central finite differences)
and EAP-IG with 1 step equals EAP; keeping every edge gives the clean run, ablating every edge the corrupt run."""
from __future__ import annotations

import random

import pytest
import torch

from analyses.edges import (eap, eap_ig, edge_effects, faithfulness, node_activations, node_names, patch_edges,
                            prune, receiver_names, valid_edges)
from analyses.metrics import LogitDiff
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
