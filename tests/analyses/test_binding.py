"""analyses.binding: identities and rotary algebra on tiny models; Shapes plumbing on a random organism-shaped
model (no checkpoint needed); real effects on the trained organism when it exists."""
import pytest
import torch
from tiny import llava_inputs, tiny_llava

from hooked_vlm.analyses.binding import (binding_deltas, plot_factorizability_grid, plot_position_sweep, delta_positions,
                              factorizability, mean_intervention, plot_factorizability, plot_mean_intervention,
                              position_swap, random_deltas, read_answers, rerotate_keys, resid_names, rotation,
                              run_with_resid, slot_means, swap_slot)
from hooked_vlm.analyses.tasks import (shapes_context, shapes_factorizability, shapes_mean_intervention, shapes_position_swap,
                            shapes_slots)
from hooked_vlm.analyses.toolkit import run_cached
from hooked_vlm import HookedVLM
from hooked_vlm.components.rotary import RotaryEmbedding, apply_rotary
from hooked_vlm.organism import ORGANISM_DIR


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    inputs = llava_inputs(hf, batch=2, seed=0)
    layout = model.layout(inputs)
    text = layout.text_positions()
    # two single-token "slots" in the text after the image, and the image's first row as an object slot
    pos = torch.arange(text.shape[1])
    first_text = text & (pos > layout.last_image_token().int().argmax(1, keepdim=True))
    slot0 = first_text & (first_text.cumsum(1) == 1)
    slot1 = first_text & (first_text.cumsum(1) == 3)
    obj = layout.image_positions() & (layout.row == 0)
    with torch.no_grad():
        base = model(**inputs)
    return model, inputs, layout, slot0, slot1, obj, base


def test_mean_intervention_with_zero_delta_is_identity(setup):
    model, inputs, _, s0, s1, obj, base = setup
    zero = torch.zeros(model.cfg.n_layers, model.cfg.d_model)
    torch.testing.assert_close(mean_intervention(model, inputs, s0, s1, zero), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_intervention(model, inputs, obj, s1, zero, freeze=s0 | obj), base,
                               atol=1e-5, rtol=1e-5)


def test_swapping_a_slot_with_itself_changes_nothing(setup):
    model, inputs, layout, s0, _, obj, base = setup
    torch.testing.assert_close(swap_slot(model, inputs, inputs, slot=obj), base, atol=1e-5, rtol=1e-5)
    ctx = ~layout.final_token() & layout.attention_mask.bool()
    torch.testing.assert_close(swap_slot(model, inputs, inputs, slot=s0, freeze=ctx), base, atol=1e-5, rtol=1e-5)


def pos_before(mask):
    return ~mask.cumsum(1).bool()


def test_swap_from_another_context_takes_effect_and_freezing_holds_the_context(setup):
    model, inputs, layout, s0, _, obj, base = setup
    other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    names = resid_names(model)
    out = swap_slot(model, inputs, other, slot=obj)
    assert (out - base).abs().max() > 1e-3
    # freezing the rest of the prompt changes what the final token sees (the context is not recomputed)
    ctx = ~layout.final_token() & layout.attention_mask.bool()
    frozen = swap_slot(model, inputs, other, slot=obj, freeze=ctx)
    first = (layout.attention_mask.bool() & ~ctx.cumsum(1).bool()) | (pos_before(obj))
    torch.testing.assert_close(frozen[first], base[first], atol=1e-5, rtol=1e-5)  # causal: nothing before the slot moves
    fin = layout.final_token()
    assert (frozen[fin] - out[fin]).abs().max() > 1e-4
    assert len(names) == model.cfg.n_layers


def test_mean_intervention_with_the_exact_difference_swaps_two_single_prompts(setup):
    """Batch of one, one-token slots: Delta = x1 - x0 per layer, so slot0 := x1 and slot1 := x0 at every layer."""
    model, inputs, _, s0, s1, _, _ = setup
    one = {k: v[:1] for k, v in inputs.items()}
    a, b = s0[:1], s1[:1]
    delta = binding_deltas(model, one, a, b)
    assert delta.shape == (model.cfg.n_layers, model.cfg.d_model)
    names = resid_names(model)
    _, cache = run_cached(model, one, names)
    targets = {}
    for n in names:
        t = cache[n].clone()
        t[a], t[b] = cache[n][b], cache[n][a]
        targets[n] = t
    ref = run_with_resid(model, one, targets, a | b)
    torch.testing.assert_close(mean_intervention(model, one, a, b, delta), ref, atol=1e-4, rtol=1e-4)
    means = slot_means(model, one, [a, b])
    torch.testing.assert_close(means[1] - means[0], delta)


def test_random_deltas_keep_the_norm():
    d = torch.randn(3, 16) * torch.tensor([[1.0], [0.0], [5.0]])
    r = random_deltas(d, seed=1)
    torch.testing.assert_close(r.norm(dim=-1), d.norm(dim=-1))
    assert (r - d).abs().max() > 0.1


def test_rerotation_by_zero_is_identity_and_nonzero_moves(setup):
    model, inputs, _, s0, s1, obj, base = setup
    torch.testing.assert_close(rerotate_keys(model, inputs, [(obj, 0.0), (s0, 0)]), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(position_swap(model, inputs, s0, s1, fractions=[0.0])[0], base, atol=1e-6, rtol=1e-6)
    moved = rerotate_keys(model, inputs, [(obj, torch.tensor([3.0, -2.0]))])
    assert (moved - base).abs().max() > 1e-4


def test_frozen_context_stays_bit_identical_under_rerotation(setup):
    """2505.22200's position independence: with the context frozen, every context position (outside the moved
    slots) keeps its clean residual stream at every layer, bit for bit, while the moved keys still change the
    answer positions after it."""
    model, inputs, layout, s0, s1, obj, base = setup
    # the context: everything up to the second slot (the token between the slots reads slot 0's moved key)
    pos = torch.arange(s1.shape[1])
    context = (pos[None] <= s1.int().argmax(1, keepdim=True)) & layout.attention_mask.bool()
    # what each layer reads: its ln1 input normalised (observed downstream of the freeze's resid_pre hook)
    names = [f"blocks.{l}.ln1.hook_normalized" for l in range(model.cfg.n_layers)]
    _, clean = model.run_with_cache(**inputs, names_filter=names)
    seen = {}
    with model.hooks(fwd_hooks=[(n, lambda x, hook: seen.__setitem__(hook.name, x.clone())) for n in names]):
        frozen = position_swap(model, inputs, s0, s1, fractions=[1.0], freeze=context)[0]
    keep = context & ~(s0 | s1)
    for n in names:
        assert torch.equal(seen[n][keep], clean[n][keep]), n
    free = position_swap(model, inputs, s0, s1, fractions=[1.0])[0]
    final = layout.final_token()
    assert (frozen[final] - base[final]).abs().max() > 1e-5  # the slots still move the answer
    assert (frozen[final] - free[final]).abs().max() > 1e-5  # and the freeze changes the result


@pytest.mark.parametrize("mrope", [None, [2, 3, 3]])
def test_rerotation_composes_with_rope(mrope):
    """R(delta) applied on top of R(p) equals R(p + delta), for 1-D RoPE and for M-RoPE shifting all axes,
    with the rotary's attention_scaling divided out of the extra rotation."""
    rot = RotaryEmbedding(16, 10000.0, mrope)
    rot.attention_scaling = 1.3
    b, s = 2, 7
    pos = torch.arange(s).repeat(b, 1)
    if mrope:
        pos = torch.stack([pos, pos // 3, pos % 3])
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[:, 2:4] = True
    shifts = [(mask, torch.tensor([5.0, -1.5]))]
    d_ids = delta_positions(pos, shifts)
    assert d_ids.shape == pos.shape and d_ids[..., 0, 2].tolist() == ([5.0] * 3 if mrope else 5.0)
    k = torch.randn(b, s, 2, 16, dtype=torch.float64)
    once = apply_rotary(k, *rot(pos, torch.float64))
    twice = apply_rotary(once, *rotation(rot, d_ids, torch.float64))
    torch.testing.assert_close(twice, apply_rotary(k, *rot(pos + d_ids, torch.float64)), atol=1e-5, rtol=1e-5)
    if mrope:  # per-axis deltas
        per_axis = delta_positions(pos, [(mask, torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]]))])
        assert per_axis[:, 1, 2].tolist() == [2.0, 0.0, 3.0]


def test_read_answers_and_factorizability_baseline(setup):
    model, inputs, _, s0, _, obj, base = setup
    answers = torch.tensor([[3, 3], [7, 7], [11, 11]])
    choice = read_answers(base, answers)
    assert choice.shape == (3, 2) and torch.equal(choice.sum(0), torch.ones(2))
    m0 = factorizability(model, [inputs, inputs], answers)
    assert m0.shape == (2, 3)
    torch.testing.assert_close(m0.sum(1), torch.ones(2))
    same = factorizability(model, [inputs], answers, inputs, slots=[obj], corrupt_slot=obj, readout="logit")
    torch.testing.assert_close(same, factorizability(model, [inputs], answers, readout="logit"), atol=1e-4, rtol=1e-4)


def test_plots():
    assert plot_factorizability(torch.rand(4, 4), list("abcd"), list("wxyz")).data[0].type == "heatmap"
    assert plot_mean_intervention({"Delta_O": 0.9, "random": 0.1}).data[0].type == "bar"
    grid = plot_factorizability_grid({"none": torch.eye(4), "item": torch.rand(4, 4)}, list("abcd"), list("wxyz"))
    assert len(grid.data) == 2
    assert len(plot_position_sweep([0, 0.5, 1], {"kept": [1, 0.5, 0], "swapped": [0, 0.5, 1]}).data) == 2


# ------------------------------------------------------------------------- Shapes plumbing, random organism
@pytest.fixture(scope="module")
def random_organism():
    from hooked_vlm.organism.processing import build_processor
    from hooked_vlm.organism.train import build_model

    return HookedVLM.from_hf(build_model(seed=0), build_processor())


def test_shapes_slots_find_objects_words_and_context(random_organism):
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    model = random_organism
    samples = ShapesGenerator(0).samples(3, "shape_item")
    batch = encode(model.processor, samples)
    slots = shapes_slots(model, batch.inputs, samples)
    ids = batch.inputs["input_ids"]
    tok = model.tokenizer
    for k in range(2):
        assert slots["object"][k].sum(1).tolist() == [4, 4, 4]  # each object covers 2x2 patches
        for bi, s in enumerate(samples):
            sc = s.scene
            i = sc.mention_order[k]
            assert tok.convert_ids_to_tokens(ids[bi][slots["colour"][k][bi]].tolist()) == [sc.colours[i]]
            assert tok.convert_ids_to_tokens(ids[bi][slots["item"][k][bi]].tolist()) == [sc.items[i]]
            layout = model.layout(batch.inputs)
            patches = (layout.row[bi] * 4 + layout.col[bi])[slots["object"][k][bi]]
            assert sorted(patches.tolist()) == sorted(sc.object_patches(i))
    assert (slots["object"][0] & slots["object"][1]).sum() == 0
    ctx = shapes_context(model, batch.inputs)
    last = ctx.int().cumsum(1).argmax(1)
    assert all(tok.convert_ids_to_tokens(int(ids[b, last[b]])) == "." for b in range(3))
    assert (slots["item"][1] & ~ctx).sum() == 0 and (slots["object"][0] & ~ctx).sum() == 0


def test_shapes_factorizability_runs_on_a_random_organism(random_organism):
    out, rows, cols = shapes_factorizability(random_organism, n=3, kinds=("item",))
    assert set(out) == {"none", "item slot 0", "item slot 1", "item both slots"}
    assert rows == ["O0", "O1", "O'0", "O'1"] and len(cols) == 4
    for m in out.values():
        assert m.shape == (4, 4)
        torch.testing.assert_close(m.sum(1), torch.ones(4))


# ------------------------------------------------------------------------------------------- organism
needs_organism = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no organism checkpoint")


@pytest.fixture(scope="module")
def organism():
    return HookedVLM.from_pretrained(str(ORGANISM_DIR))


@needs_organism
def test_organism_factorizability(organism):
    """Context c, second context c' with disjoint attributes; slot 0, slot 1 or both of c swapped with c''s at all
    layers (item / colour slots padded as in the paper), context frozen. The colour slot carries no binding
    (nothing changes: the item tokens gathered their colour in layer 0, and the frozen context keeps that); the
    item slot carries it (questions about the swapped slot's object no longer get its item); the other slot's
    binding is untouched."""
    out, rows, cols = shapes_factorizability(organism, n=12, kinds=("colour", "item"))
    assert out["none"][0, 0] == 1.0 and out["none"][1, 1] == 1.0
    for swap in ("slot 0", "slot 1", "both slots"):
        torch.testing.assert_close(out[f"colour {swap}"], out["none"])
    assert out["item slot 0"][0, 0] < 0.3 and out["item slot 0"][1, 1] == 1.0
    assert out["item slot 1"][1, 1] < 0.3 and out["item slot 1"][0, 0] == 1.0
    assert out["item both slots"][0, 0] < 0.3 and out["item both slots"][1, 1] < 0.3


@needs_organism
def test_organism_position_independence(organism):
    """With the paper's frozen context, re-rotating the keys of the two objects' image tokens, the colour words or
    the item letters onto each other's positions leaves every answer unchanged: the organism's bindings are
    position-independent in the paper's sense. Without the freeze the colour words' swap does change answers (the
    layer-0 gather head re-reads the colour words by relative position in the context tokens), which is why the
    freeze is the default: it reverses the conclusion."""
    for kind in ("object", "colour", "item"):
        assert shapes_position_swap(organism, kind, n=12, fractions=[1.0])["kept"] == [1.0]
    assert shapes_position_swap(organism, "colour", n=12, fractions=[1.0], frozen_context=False)["kept"][0] < 0.9


@needs_organism
def test_organism_mean_interventions_do_not_swap(organism):
    """The paired, per-token Delta (O, C, I, O+I, O+C; 1x and 4x) swaps no answers about either object, like the
    same-norm random control: what this measures is that these Deltas, added at every layer with the context
    frozen, do not move the organism's answers. (The object slots' image tokens precede the text, so with
    mention-order slots Delta_O holds only the other object's image difference.) The pooled option agrees."""
    out = shapes_mean_intervention(organism, n_fit=16, n_eval=16, scales=(1, 4))
    assert out.baseline["both"]["kept"].value == 1.0 and out.baseline["both"]["kept"].n == 32
    for cond in ("O", "C", "I", "O+I", "O+C"):
        for scale in (1, 4):
            r = out.get(cond, scale)
            assert r["swapped"].value <= 0.1 and r["random_swapped"].value <= 0.1 and r["kept"].value >= 0.9
    assert out.delta_norm["item"][0] == 0.0 and out.delta_norm["colour"][0] == 0.0  # same word, same embedding
    pooled = shapes_mean_intervention(organism, conditions=("I",), n_fit=16, n_eval=8, scales=(1,), estimator="pooled")
    assert pooled.estimator == "pooled" and pooled.get("I", 1)["swapped"].value <= 0.1
