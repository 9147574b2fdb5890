"""analyses.binding_means (2505.22200's mean interventions): the paired, per-token Delta recovers a vector planted in a
model; Delta edits and the frozen context behave exactly; the protocol's bookkeeping; the paper's slot padding and
the factorizability identity."""
import pytest
import torch
from tiny import llava_inputs, tiny_llava

from hooked_vlm import HookedVLM
from hooked_vlm.analyses.binding import (BindingQuery, SlotPairs, add_deltas, binding_deltas, factorizability,
                                         mean_intervention_protocol, pad_slot, paired_deltas, per_token_delta,
                                         random_deltas, resid_names, run_with_resid, slot_activations, swap_slot)
from hooked_vlm.analyses.toolkit import Estimate, run_cached
from test_binding import random_organism  # noqa: F401  (the shared untrained Shapes organism fixture)


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=3, text_len=9, seed=0)
    layout = model.layout(inputs)
    after = layout.text_positions() & (torch.arange(inputs["input_ids"].shape[1])[None]
                                       > layout.last_image_token().int().argmax(1, keepdim=True))
    rank = after.cumsum(1) * after
    slot0 = (rank == 1) | (rank == 2)  # two-token slots in the text after the image
    slot1 = (rank == 4) | (rank == 5)
    context = after & (rank <= 6) | layout.image_positions()  # the query: the last text tokens
    return model, inputs, layout, slot0, slot1, context


def test_per_token_delta_recovers_a_planted_vector_that_pooling_loses():
    """Pure tensors: pair i holds content c_i at slot 0 of one context and at slot 1 (plus the planted b(1) - b(0)
    = v, a different vector per token) of the other, with noise. The paired estimator gets v per token; the
    pooled one (unpaired means of the two slots, one vector for all tokens) does not."""
    g = torch.Generator().manual_seed(0)
    n, layers, tok, d = 400, 2, 3, 8
    v = torch.randn(layers, tok, d, generator=g)
    content = 3 * torch.randn(n, layers, tok, d, generator=g)
    z0 = content + 0.1 * torch.randn(n, layers, tok, d, generator=g)
    z1 = content + v + 0.1 * torch.randn(n, layers, tok, d, generator=g)
    torch.testing.assert_close(per_token_delta(z0, z1), v, atol=0.03, rtol=0)
    other = 3 * torch.randn(n, layers, tok, d, generator=g)  # unpaired: the slot-1 entities are other ones
    pooled = (other + v).mean((0, 2)) - content.mean((0, 2))
    assert (pooled[:, None] - v).abs().max() > 0.5
    with pytest.raises(ValueError, match="same shape"):
        per_token_delta(z0, z1[:, :, :2])


def test_paired_deltas_recover_a_vector_planted_in_a_model(setup):
    """A tiny random LLaVA whose embedding adds v[j] to token j of slot 1 in every run (its 'binding ID' for slot 1;
    slot 0 gets none). Pairs: prompt b carries prompt a's slot-0 tokens at slot 1 (other tokens random). At the
    first layer's resid_pre the paired Delta is exactly v; deeper layers still give one vector per token."""
    model, inputs, _, s0, s1, _ = setup
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, model.cfg.d_model, generator=g)
    b = dict(inputs, input_ids=inputs["input_ids"].clone())
    b["input_ids"][s1] = inputs["input_ids"][s0]
    b["input_ids"][s0] = torch.randint(1, 20, (int(s0.sum()),), generator=g)

    def plant(x, hook):
        add = torch.zeros_like(x)
        add[s1[: x.shape[0]]] = v.repeat(x.shape[0], 1).to(x.dtype)  # every prompt has the same layout
        return x + add

    pairs = SlotPairs(inputs, s0, b, s1)
    with model.hooks(fwd_hooks=[("hook_embed", plant)]):
        d0 = paired_deltas(model, pairs, hook_names=["blocks.0.hook_resid_pre"])
        d_all = paired_deltas(model, pairs, batch_size=2)
        pooled = binding_deltas(model, inputs, s0, s1, ["blocks.0.hook_resid_pre"])
    torch.testing.assert_close(d0[0], v, atol=1e-5, rtol=1e-5)
    assert d_all.shape == (model.cfg.n_layers, 2, model.cfg.d_model)
    torch.testing.assert_close(d_all[0], v, atol=1e-5, rtol=1e-5)  # chunked runs agree
    assert (pooled[0] - v.mean(0)).abs().max() > 0.1  # the pooled Delta carries the tokens' content difference


def test_slot_activations_need_equal_slot_sizes(setup):
    model, inputs, _, s0, _, _ = setup
    z = slot_activations(model, inputs, s0)
    assert z.shape == (3, model.cfg.n_layers, 2, model.cfg.d_model)
    uneven = s0.clone()
    uneven[0, uneven[0].int().argmax()] = False
    with pytest.raises(ValueError, match="same, non-zero number"):
        slot_activations(model, inputs, uneven)


def test_add_deltas_zero_is_identity_and_the_exact_difference_swaps(setup):
    model, inputs, _, s0, s1, context = setup
    base = model(**inputs)
    zero = torch.zeros(model.cfg.n_layers, 2, model.cfg.d_model)
    torch.testing.assert_close(add_deltas(model, inputs, [(s0, s1, zero)], freeze=context), base, atol=1e-5, rtol=1e-5)
    # batch of one: Delta = x(slot 1) - x(slot 0) token by token puts slot 1 at slot 0 and slot 0 at slot 1
    one = {k: v[:1] for k, v in inputs.items()}
    a, b = s0[:1], s1[:1]
    delta = per_token_delta(slot_activations(model, one, a), slot_activations(model, one, b))
    names = resid_names(model)
    _, cache = run_cached(model, one, names)
    targets = {}
    for n in names:
        t = cache[n].clone()
        t[a], t[b] = cache[n][b], cache[n][a]
        targets[n] = t
    torch.testing.assert_close(add_deltas(model, one, [(a, b, delta)]), run_with_resid(model, one, targets, a | b),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="3 tokens"):
        add_deltas(model, inputs, [(s0, s1, torch.zeros(model.cfg.n_layers, 3, model.cfg.d_model))])


def test_frozen_context_stays_bit_identical_under_a_delta(setup):
    """The context positions (outside the slots) keep their clean residual stream at every layer, bit for bit, while
    the Delta still changes the query positions after them."""
    model, inputs, layout, s0, s1, context = setup
    names = [f"blocks.{l}.ln1.hook_normalized" for l in range(model.cfg.n_layers)]
    _, clean = model.run_with_cache(**inputs, names_filter=names)
    delta = 5 * torch.randn(model.cfg.n_layers, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    seen = {}
    with model.hooks(fwd_hooks=[(n, lambda x, hook: seen.__setitem__(hook.name, x.clone())) for n in names]):
        frozen = add_deltas(model, inputs, [(s0, s1, delta)], freeze=context)
    keep = context & ~(s0 | s1)
    for n in names:
        assert torch.equal(seen[n][keep], clean[n][keep]), n
    free = add_deltas(model, inputs, [(s0, s1, delta)])
    final = layout.final_token()
    base = model(**inputs)
    assert (frozen[final] - base[final]).abs().max() > 1e-4 and (frozen[final] - free[final]).abs().max() > 1e-5


def test_random_deltas_keep_every_token_norm():
    d = torch.randn(3, 2, 16) * torch.tensor([1.0, 0.0, 5.0])[:, None, None]
    r = random_deltas(d, seed=1)
    torch.testing.assert_close(r.norm(dim=-1), d.norm(dim=-1))
    assert not torch.equal(random_deltas(d, 1), random_deltas(d, 2))


def test_protocol_bookkeeping(setup):
    """Every rate is an Estimate over the prompts (pooled over both questions for "both"); zero Deltas leave every
    answer as it was, at every scale, and so does their (zero-norm) random control."""
    model, inputs, _, s0, s1, context = setup
    pred = model(**inputs)[:, -1].argmax(-1)
    other = (pred + 1) % model.cfg.d_vocab
    q = BindingQuery(inputs, {"item": (s0, s1), "object": (s0, s1)}, pred, other, context)
    zero = torch.zeros(model.cfg.n_layers, 2, model.cfg.d_model)
    res = mean_intervention_protocol(model, {"item": zero, "object": zero}, {"slot 0": q, "slot 1": q},
                                     conditions=("I", "O+I"), scales=(1, 2))
    assert res.baseline["both"]["kept"].value == 1.0 and res.baseline["both"]["kept"].n == 6
    for key, r in res.rates.items():
        assert set(r) == {"swapped", "kept", "random_swapped", "random_kept"}
        assert all(isinstance(e, Estimate) for e in r.values())
        assert r["kept"].value == 1.0 and r["random_kept"].value == 1.0 and r["swapped"].value == 0.0
    assert set(res.rates) == {(c, s, qn) for c in ("I", "O+I") for s in (1.0, 2.0) for qn in ("slot 0", "slot 1", "both")}
    d = res.to_dict()
    assert set(d["I"]["2x"]["both"]["swapped"]) == {"value", "ci_low", "ci_high", "n"}
    assert res.rows()[0]["condition"] == "none" and len(res.rows()) == 5
    with pytest.raises(ValueError, match="need Deltas"):
        mean_intervention_protocol(model, {"item": zero}, {"q": q}, conditions=("O",))


def test_pad_slot_adds_the_neighbouring_tokens():
    m = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert pad_slot(m, before=1).int().tolist() == [[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]]
    assert pad_slot(m, after=1).int().tolist() == [[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]]
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert pad_slot(m, after=1, attention_mask=attn).int().tolist()[1] == [1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match=">= 0"):
        pad_slot(m, before=-1)


def test_factorizability_with_identical_clean_and_corrupt_is_the_identity(setup):
    model, inputs, _, s0, s1, context = setup
    answers = torch.tensor([[3, 3, 3], [7, 7, 7], [11, 11, 11]])
    base = factorizability(model, [inputs, inputs], answers, readout="logit")
    for slot in (s0, s1, s0 | s1):
        same = factorizability(model, [inputs, inputs], answers, inputs, slots=[slot, slot], corrupt_slot=slot,
                               freeze=[context, context], readout="logit", batch_size=2)
        torch.testing.assert_close(same, base, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs slots"):
        factorizability(model, [inputs], answers, inputs)
    torch.testing.assert_close(swap_slot(model, inputs, inputs, slot=s0 | s1, batch_size=1), model(**inputs),
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------- Shapes wiring, random organism
def test_shapes_padded_slots_are_the_papers(random_organism):
    """Item slot = "item" + the letter; colour slot = the colour word + "object" (the token after it)."""
    from hooked_vlm.analyses.tasks import encode, shapes_slots
    from hooked_vlm.organism import ShapesGenerator

    model = random_organism
    samples = ShapesGenerator(0).samples(3, "shape_item")
    batch = encode(model.processor, samples)
    slots = shapes_slots(model, batch.inputs, samples, padded=True)
    ids, tok = batch.inputs["input_ids"], model.tokenizer
    for k in range(2):
        for bi, s in enumerate(samples):
            i = s.scene.mention_order[k]
            assert tok.convert_ids_to_tokens(ids[bi][slots["item"][k][bi]].tolist()) == ["item", s.scene.items[i]]
            assert tok.convert_ids_to_tokens(ids[bi][slots["colour"][k][bi]].tolist()) == [s.scene.colours[i], "object"]


@pytest.mark.parametrize("order", ["mention", "position"])
def test_paired_scene_puts_the_same_entity_at_slot_1(random_organism, order):
    import numpy as np

    from hooked_vlm.analyses.tasks import shapes_item_prompts, paired_scene, shapes_slots, slot_objects
    from hooked_vlm.organism import ShapesGenerator

    gen, rng = ShapesGenerator(3), np.random.default_rng(0)
    scenes = [gen.scene() for _ in range(6)]
    partners = [paired_scene(s, rng, order) for s in scenes]
    for s, p in zip(scenes, partners):
        x, y = slot_objects(s, order)[0], slot_objects(p, order)[1]
        assert (s.shapes[x], s.colours[x], s.items[x]) == (p.shapes[y], p.colours[y], p.items[y])
        z = slot_objects(p, order)[0]
        assert p.shapes[z] != s.shapes[x] and p.colours[z] != s.colours[x] and p.items[z] != s.items[x]
        off = [(b[0] % 32, b[1] % 32) for b in (s.boxes[x], p.boxes[y])]
        assert off[0] == off[1]  # the same place inside its block: token j of the slot covers the same part
    model = random_organism
    a = shapes_slots(model, shapes_item_prompts(model, scenes, [0] * 6), scenes, order=order)
    b = shapes_slots(model, shapes_item_prompts(model, partners, [0] * 6), partners, order=order)
    assert a["object"][0].sum(1).tolist() == b["object"][1].sum(1).tolist() == [4] * 6


def test_shapes_mean_intervention_runs_on_a_random_organism(random_organism):
    from hooked_vlm.analyses.tasks import shapes_mean_intervention

    res = shapes_mean_intervention(random_organism, conditions=("O+I",), n_fit=3, n_eval=2, scales=(1, 2))
    assert set(res.rates) == {("O+I", s, q) for s in (1.0, 2.0) for q in ("slot 0", "slot 1", "both")}
    assert res.get("O+I", 2, "both")["swapped"].n == 4
    assert len(res.delta_norm["object"]) == random_organism.cfg.n_layers
