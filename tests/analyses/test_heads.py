"""analyses.heads: the mathematics on a tiny random LLaVA; real effects on the Shapes organism when it exists."""
import copy

import pytest
import torch
from tiny import llava_inputs, tiny_llava

from hooked_vlm.analyses.heads import (feature_retrieval_scores, head_scores, id_retrieval_scores, id_selection_scores,
                            intervene_heads, mean_head_outputs, plot_head_scores, top_k_heads)
from hooked_vlm.analyses.toolkit import act_name, run_cached, transplant_sweep, word_positions
from hooked_vlm.analyses.metrics import LogitDiff
from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR

A, A_STAR = [5], [9]  # two answer token ids (one for every prompt)


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    clean = llava_inputs(hf, batch=2, seed=0)
    cf = dict(clean, pixel_values=llava_inputs(hf, batch=2, seed=1)["pixel_values"])  # same text, other images
    return model, clean, cf


def final(model, inputs):
    return model.layout(inputs).final_token()


def test_patching_with_the_clean_run_gives_zero(setup):
    model, clean, _ = setup
    s = head_scores(model, clean, clean, LogitDiff(A_STAR, A), positions=final(model, clean))
    assert s.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert s.abs().max() < 1e-4


def test_swapping_the_answers_flips_the_sign_and_scores_are_not_trivial(setup):
    model, clean, cf = setup
    pos = model.layout(clean).image_positions() | final(model, clean)
    s = head_scores(model, clean, cf, LogitDiff(A_STAR, A), positions=pos)
    t = head_scores(model, clean, cf, LogitDiff(A, A_STAR), positions=pos)
    assert torch.allclose(s, -t, atol=1e-5)
    assert s.abs().max() > 1e-3


def test_batched_equals_looped_equals_a_hand_written_hook(setup):
    model, clean, cf = setup
    pos = model.layout(clean).image_positions()
    metric = LogitDiff(A_STAR, A)
    heads = [(0, 1), (1, 3), (2, 0), (2, 2), (0, 0)]
    batched = head_scores(model, clean, cf, metric, positions=pos, heads=heads, batch_size=16, per_prompt=True)
    looped = head_scores(model, clean, cf, metric, positions=pos, heads=heads, batch_size=1, per_prompt=True)
    torch.testing.assert_close(batched, looped, atol=1e-4, rtol=1e-4, equal_nan=True)
    assert torch.isnan(batched[1, 0]).all() and not torch.isnan(batched[1, 3]).any()
    # independent reference for one head
    _, cache = run_cached(model, cf, [act_name("z", 1)])

    def hook(z, hook):
        z = z.clone()
        z[:, :, 3][pos] = cache[act_name("z", 1)][:, :, 3][pos]
        return z

    with torch.no_grad():
        base = metric(model(**clean))
        patched = metric(model.run_with_hooks(**clean, fwd_hooks=[(act_name("z", 1), hook)]))
    torch.testing.assert_close(batched[1, 3], patched - base, atol=1e-4, rtol=1e-4)


def linear_readout(model):
    """Copy of the model whose last-layer heads reach the logits linearly: no MLP after them, no final norm."""
    m = copy.deepcopy(model)
    torch.nn.init.zeros_(m.blocks[-1].mlp.down.weight)
    if m.blocks[-1].mlp.down.bias is not None:
        torch.nn.init.zeros_(m.blocks[-1].mlp.down.bias)
    m.ln_final.forward = lambda x: x
    return m


def test_role_swap_is_antisymmetric_where_the_readout_is_linear(setup):
    model, clean, cf = setup
    m = linear_readout(model)
    last = m.cfg.n_layers - 1
    heads = [(last, h) for h in range(m.cfg.n_heads)]
    fwd = head_scores(m, clean, cf, LogitDiff(A_STAR, A), positions=final(m, clean), heads=heads, per_prompt=True)
    back = head_scores(m, cf, clean, LogitDiff(A_STAR, A), positions=final(m, cf), heads=heads, per_prompt=True)
    torch.testing.assert_close(fwd[last], -back[last], atol=1e-4, rtol=1e-4)  # same answer labels: -s
    swapped = head_scores(m, cf, clean, LogitDiff(A, A_STAR), positions=final(m, cf), heads=heads, per_prompt=True)
    torch.testing.assert_close(fwd[last], swapped[last], atol=1e-4, rtol=1e-4)  # answers swapped with the runs
    assert fwd[last].abs().max() > 1e-3


def test_presets_and_different_source_positions(setup):
    model, clean, cf = setup
    metric = LogitDiff(A_STAR, A)
    sel = id_selection_scores(model, clean, cf, metric)
    feat = feature_retrieval_scores(model, clean, cf, metric)
    torch.testing.assert_close(sel, feat)
    # patch image tokens from a shifted place in the source: masks differ but hold as many positions per prompt
    img = model.layout(clean).image_positions()
    shifted = torch.roll(img, 1, dims=1)
    a = id_retrieval_scores(model, clean, cf, metric, positions=img, corrupt_positions=shifted, heads=[(0, 0), (1, 1)])
    assert torch.isfinite(a[0, 0]) and torch.isfinite(a[1, 1])
    with pytest.raises(ValueError, match="number per prompt"):
        head_scores(model, clean, cf, metric, positions=img, corrupt_positions=final(model, cf), heads=[(0, 0)])


def test_patch_sweep_of_whole_activations_matches_heads(setup):
    model, clean, cf = setup
    pos = final(model, clean)
    _, cache = run_cached(model, cf, [act_name("z", 2)])
    whole = transplant_sweep(model, clean, cache, [(act_name("z", 2), None)], LogitDiff(A_STAR, A), positions=pos)
    per_head = transplant_sweep(model, clean, cache, [(act_name("z", 2), h) for h in range(model.cfg.n_heads)],
                                LogitDiff(A_STAR, A), positions=pos)
    assert whole.shape == (1, 2) and per_head.shape == (model.cfg.n_heads, 2)


def test_top_k_heads():
    s = torch.tensor([[0.1, float("nan"), -2.0], [3.0, 0.5, 0.0]])
    assert top_k_heads(s, 2) == [(1, 0), (1, 1)]
    assert top_k_heads(s, 1, largest=False) == [(0, 2)]
    assert len(top_k_heads(s, 10)) == 5


def test_intervention_alpha_zero_is_identity_and_alpha_one_is_patching(setup):
    model, clean, cf = setup
    metric = LogitDiff(A_STAR, A)
    heads = [(2, 1), (1, 0)]
    c1, f1 = ({k: v[:1] for k, v in x.items()} for x in (clean, cf))  # one prompt: means = the head outputs
    pos = final(model, c1)
    d_t, d_o = mean_head_outputs(model, f1, heads, pos), mean_head_outputs(model, c1, heads, pos)
    assert d_t.shape == (2, model.cfg.d_head)
    with torch.no_grad():
        base = model(**c1)
    torch.testing.assert_close(intervene_heads(model, c1, heads, 0.0, d_t, d_o, pos), base)
    torch.testing.assert_close(intervene_heads(model, c1, heads, 3.0, d_t, d_t, pos), base)
    # alpha = 1 on one head at the final token adds (z_cf - z_clean): exactly the head patch
    one = intervene_heads(model, c1, heads[:1], 1.0, d_t[:1], d_o[:1], pos, metric=metric)
    s = head_scores(model, c1, f1, metric, positions=pos, heads=heads[:1], per_prompt=True)
    torch.testing.assert_close(one - metric(base), s[2, 1], atol=1e-4, rtol=1e-4)


def test_word_positions_with_the_shapes_tokenizer():
    from hooked_vlm.organism.processing import build_tokenizer

    tok = build_tokenizer()
    ids = tok(["The red object contains item A . Which item does the cube contain ? The cube contains item",
               "<pad> The blue object contains item B . Which item does the cone contain ? The cone contains item"],
              return_tensors="pt", padding=True)["input_ids"]
    m = word_positions(tok, ids, ["cube", "cone"])
    assert m.sum(1).tolist() == [2, 2]
    first = word_positions(tok, ids, ["cube", "cone"], occurrence=0)
    assert first.sum(1).tolist() == [1, 1] and (first & m).sum() == 2
    assert word_positions(tok, ids, ".").sum(1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="not found"):
        word_positions(tok, ids, "sphere")


def test_shapes_described_positions():
    from hooked_vlm.organism import ShapesGenerator
    from hooked_vlm.organism.processing import build_tokenizer

    from hooked_vlm.analyses.tasks import shapes_described_positions

    tok = build_tokenizer()
    g = ShapesGenerator(0)
    samples = [g.sample("scene"), g.sample("shape_item"), g.sample("colour_item")]
    ids = tok([s.prompt for s in samples], return_tensors="pt", padding=True)["input_ids"]
    m = shapes_described_positions(tok, {"input_ids": ids}, samples)
    got = [tok.convert_ids_to_tokens(ids[b][m[b]].tolist()) for b in range(3)]
    sc = [s.scene for s in samples]
    t = [s.target for s in samples]
    assert got[0] == [sc[0].colours[1 - t[0]], sc[0].shapes[1 - t[0]]]
    assert got[1] == [sc[1].shapes[t[1]]] * 2
    assert got[2] == [sc[2].colours[t[2]]] and int(m[2].nonzero().max()) > int((ids[2] == tok.convert_tokens_to_ids(".")).nonzero().max())


def test_plot_head_scores():
    fig = plot_head_scores(torch.randn(3, 4))
    assert fig.data[0].type == "heatmap"


# ------------------------------------------------------------------------------------------- organism
needs_organism = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no organism checkpoint")


@pytest.fixture(scope="module")
def organism():
    return HookedVLM.from_pretrained(str(ORGANISM_DIR))


@needs_organism
def test_organism_planted_heads_top_the_scores(organism):
    """swap_shapes on shape -> item questions flips the answer; patching single heads' final-token outputs from
    the counterfactual ranks the planted image-lookup (L1H0) and retrieval (L2H0) heads first, and L2H0 alone
    carries most of the logit-difference gap."""
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    model = organism
    pairs = ShapesGenerator(3).pairs(8, "swap_shapes", "shape_item")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    metric = LogitDiff(cf.answer, clean.answer)  # M[a1*] - M[a1]
    s = id_selection_scores(model, clean.inputs, cf.inputs, metric, layers=[1, 2, 3])
    with torch.no_grad():
        gap = float((metric(model(**cf.inputs)) - metric(model(**clean.inputs))).mean())
    assert gap > 10
    assert set(top_k_heads(s, 2)) == {(1, 0), (2, 0)}
    assert s[2, 0] > 0.7 * gap and s[1, 0] > 0.4 * gap


@needs_organism
def test_organism_retrieval_head_carries_the_item(organism):
    """d_t / d_o = mean final-token outputs of the planted retrieval head L2H0 on prompts answered "A" / "B".
    Adding d_t - d_o on new prompts answered "B" makes the model answer "A" (not even in their context);
    the same intervention on the image-lookup head L1H0 does nothing: it does not carry the item."""
    from hooked_vlm.analyses.metrics import Accuracy
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    model = organism
    pool = ShapesGenerator(11).samples(240, "shape_item")
    a = encode(model.processor, [s for s in pool if s.answer == "A"][:12])
    b = [s for s in pool if s.answer == "B"]
    fit, ev = encode(model.processor, b[:12]), encode(model.processor, b[12:24])
    fin = lambda x: model.layout(x.inputs).final_token()
    to_a = Accuracy([model.tokenizer.convert_tokens_to_ids("A")], ev.inputs["attention_mask"])
    for heads, expected in (([(2, 0)], 1.0), ([(1, 0)], 0.0)):
        d_t, d_o = mean_head_outputs(model, a.inputs, heads, fin(a)), mean_head_outputs(model, fit.inputs, heads, fin(fit))
        assert intervene_heads(model, ev.inputs, heads, 0.0, d_t, d_o, fin(ev), metric=to_a).mean() == 0.0
        assert intervene_heads(model, ev.inputs, heads, 1.0, d_t, d_o, fin(ev), metric=to_a).mean() == expected


def test_intervention_protocol_held_out_split_and_identities(monkeypatch):
    """alpha * (d_t - d_o) on the top-k heads of a selection split, judged on another split against random heads:
    with identical conditions d_t - d_o = 0 and the intervention is the identity at every alpha; the random draws
    never include a chosen head."""
    from hooked_vlm.analyses import heads as H
    from hooked_vlm.analyses.heads import intervention_protocol

    asked: list[list] = []
    real = H.mean_head_outputs
    monkeypatch.setattr(H, "mean_head_outputs", lambda m, x, heads, *a, **kw: asked.append(list(heads)) or real(m, x, heads, *a, **kw))
    from hooked_vlm.analyses.metrics import final_logits
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator, load_organism

    model = load_organism("shapes_llava")
    pairs = ShapesGenerator(1).pairs(16, "swap_shapes", "shape_item", split="heldout")
    clean, cf = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    other = encode(model.processor, ShapesGenerator(3).samples(16, "shape_item", split="heldout"))
    held = encode(model.processor, ShapesGenerator(4).samples(16, "shape_item", split="heldout"))
    select = (clean.inputs, cf.inputs, LogitDiff(cf.answer, clean.answer, clean.inputs["attention_mask"]))
    res = intervention_protocol(model, select, (other.inputs, other.inputs), (held.inputs, held.wrong), k=2,
                                alphas=(1.0, 8.0), n_random=3, progress=False)
    with torch.no_grad():
        base = final_logits(model(**held.inputs), held.inputs["attention_mask"]).argmax(-1)
    baseline = float((base == held.wrong).float().mean())  # the trained organism answers right: ~0
    assert all(e.value == pytest.approx(baseline) and e.n == 16 for e in res.efficacy.values())
    assert all(r.value == pytest.approx(baseline) and r.n == 3 for r in res.random.values())
    assert res.heads == [(2, 0), (1, 0)] and res.layers == [1, 2]  # the planted retrieval and lookup heads
    assert res.stability.in_top_k[2 * model.cfg.n_heads] == 1.0  # L2H0 in the top 2 in every resample
    assert [r["alpha"] for r in res.rows()] == [1.0, 8.0]
    draws = asked[2:]  # d_t and d_o of the chosen heads first, then two per random draw
    assert len(draws) == 6 and all(len(d) == 2 and not set(d) & set(res.heads) for d in draws)
