"""The behaviours TransformerLens's own acceptance and unit tests check (ActivationCache methods, hooks and their
removal, backward hooks, pos_slice caching, stop_at_layer, the patching helpers, return_type), checked here on the
shipped Shapes organism with an image in every prompt. Our own tests of the same behaviours; what is left out and
why is listed in docs/coming_from_transformerlens.md."""
import pytest
import torch
import transformer_lens.patching as tl_patching
from transformer_lens.utilities import Slice, get_act_name

from hooked_vlm.organism import ORGANISM_DIR, ShapesGenerator, load_organism

pytestmark = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no shipped organism")
EMBED = "hook_embed"


@pytest.fixture(scope="module")
def organism():
    model = load_organism("shapes_llava")
    samples = ShapesGenerator(0).samples(4, "shape_item")
    inputs = dict(model.processor(images=[s.image for s in samples], text=[s.prompt for s in samples],
                                  return_tensors="pt", padding=True))
    answers = torch.tensor([[model.to_single_token(s.answer), model.to_single_token(s.wrong)] for s in samples])
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    assert (inputs["input_ids"] == model.cfg.image_token_id).sum(1).min() > 0  # an image in every prompt
    return model, inputs, answers, logits, cache


@pytest.fixture()
def clean(organism):
    model = organism[0]
    yield organism
    model.reset_hooks(including_permanent=True)
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


# ------------------------------------------------------------------------------------------ ActivationCache
def test_logit_attrs_match_the_reference_computation(organism):
    model, inputs, answers, logits, cache = organism
    resid = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    directions = model.tokens_to_residual_directions(answers)
    diff_dir = directions[:, 0] - directions[:, 1]
    scaled = cache.apply_ln_to_stack(resid, layer=-1, pos_slice=-1)
    reference = torch.einsum("cbd,bd->cb", scaled, diff_dir)
    attrs = cache.logit_attrs(resid, pos_slice=-1, tokens=answers[:, 0], incorrect_tokens=answers[:, 1])
    torch.testing.assert_close(attrs, reference, rtol=0, atol=1e-5)
    # the last accumulated residual, scaled by the final norm, gives the logit difference itself
    torch.testing.assert_close(attrs[-1], logits[:, -1, answers[:, 0]].diagonal() - logits[:, -1, answers[:, 1]].diagonal(),
                               rtol=0, atol=1e-4)
    # every input form TL accepts
    b = -1
    for batch_slice, tok, wrong in ((b, answers[b, 0], answers[b, 1]), (Slice(b), int(answers[b, 0]), int(answers[b, 1])),
                                    (b, model.to_string(answers[b, 0]), model.to_string(answers[b, 1]))):
        got = cache.logit_attrs(resid, batch_slice=batch_slice, pos_slice=-1, tokens=tok, incorrect_tokens=wrong)
        torch.testing.assert_close(got, reference[:, b], rtol=0, atol=1e-5)
    got = cache.logit_attrs(resid[:, b], has_batch_dim=False, batch_slice=b, pos_slice=-1, tokens=answers[b, 0],
                            incorrect_tokens=answers[b, 1])
    torch.testing.assert_close(got, reference[:, b], rtol=0, atol=1e-5)
    rows = [0, 2, 3]
    got = cache.logit_attrs(resid, batch_slice=rows, pos_slice=-1, tokens=answers[rows, 0], incorrect_tokens=answers[rows, 1])
    torch.testing.assert_close(got, reference[:, rows], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        cache.logit_attrs(resid[:, rows], has_batch_dim=False, batch_slice=rows, pos_slice=-1, tokens=answers[rows, 0],
                          incorrect_tokens=answers[rows, 0:1][:1])
    alone = cache.logit_attrs(resid, pos_slice=-1, tokens=answers[:, 0])
    torch.testing.assert_close(alone, torch.einsum("cbd,bd->cb", scaled, directions[:, 0]), rtol=0, atol=1e-5)


def test_accumulated_resid_variants_and_labels(organism):
    model, _, _, _, cache = organism
    n = model.cfg.n_layers
    base = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    assert torch.equal(base, cache.accumulated_resid(layer=n, incl_mid=True, pos_slice=-1))
    assert torch.equal(base, cache.accumulated_resid(layer=None, incl_mid=True, pos_slice=-1))
    stack, labels = cache.accumulated_resid(layer=-1, incl_mid=False, pos_slice=-1, return_labels=True)
    assert len(labels) == stack.shape[0] and not any("mid" in lab for lab in labels)
    scaled, labels = cache.accumulated_resid(layer=None, incl_mid=True, pos_slice=Slice(-1), apply_ln=True, return_labels=True)
    # TransformerLens 4.3 recomputes the final norm on each accumulated residual (a logit lens), where older
    # versions (and apply_ln_to_stack) divide by the cached final scale; both are checked
    torch.testing.assert_close(scaled, model.ln_final(base), rtol=0, atol=1e-6)
    cached_scale = cache.apply_ln_to_stack(base, layer=-1, pos_slice=-1)
    torch.testing.assert_close(cached_scale, base / cache["ln_final.hook_scale"][:, -1], rtol=0, atol=1e-6)
    torch.testing.assert_close(scaled[-1], cached_scale[-1], rtol=0, atol=1e-5)  # the final residual: the same
    assert labels == [f"{l}_{k}" for l in range(n) for k in ("pre", "mid")] + ["final_post"]


def test_decompose_resid_and_head_and_neuron_stacks(organism):
    model, _, _, _, cache = organism
    n = model.cfg.n_layers
    per_layer = cache.decompose_resid(layer=-1, pos_slice=-1)
    torch.testing.assert_close(cache.decompose_resid(layer=None, pos_slice=Slice(-1), apply_ln=True),
                               cache.apply_ln_to_stack(per_layer, layer=-1, pos_slice=-1), rtol=0, atol=1e-6)
    attn = cache.decompose_resid(layer=n - 1, pos_slice=Slice(-1), mlp_input=True, apply_ln=False, incl_embeds=False, mode="attn")
    torch.testing.assert_close(attn, torch.stack([cache["attn_out", l][:, -1] for l in range(n)]), rtol=0, atol=0)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)
    torch.testing.assert_close(cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True),
                               cache.apply_ln_to_stack(heads, layer=None, pos_slice=Slice(-1)), rtol=0, atol=1e-6)
    heads, labels = cache.stack_head_results(layer=1, pos_slice=-1, incl_remainder=True, return_labels=True)
    torch.testing.assert_close(heads[-1], cache["resid_post", 0][:, -1] - heads[:-1].sum(0), rtol=0, atol=1e-6)
    assert labels == [f"L0H{h}" for h in range(model.cfg.n_heads)] + ["remainder"]
    neurons, labels = cache.stack_neuron_results(layer=1, pos_slice=Slice(-1), incl_remainder=True, return_labels=True)
    torch.testing.assert_close(neurons[:-1].sum(0) + neurons[-1], cache["resid_post", 0][:, -1], rtol=0, atol=1e-5)
    assert labels[:-1] == [f"L0N{i}" for i in range(model.cfg.d_mlp)] and labels[-1] == "remainder"
    _, labels = cache.stack_neuron_results(layer=1, pos_slice=-1, neuron_slice=Slice([0, 1, 2]), return_labels=True)
    assert labels == ["L0N0", "L0N1", "L0N2"]
    want = cache["blocks.1.mlp.hook_post"][:, -1, :2, None] * model.blocks[1].mlp.W_out[:2]
    torch.testing.assert_close(cache.get_neuron_results(1, neuron_slice=[0, 1], pos_slice=-1), want)


def test_full_resid_decomposition_sums_to_the_residual(organism):
    """Heads + MLPs + embed (tokens and image features) + biases = the last residual, image positions included."""
    model, _, _, _, cache = organism
    stack, labels = cache.get_full_resid_decomposition(layer=-1, expand_neurons=False, return_labels=True)
    assert labels[-2:] == ["embed", "bias"] and "pos_embed" not in labels  # rotary: no positional embedding
    torch.testing.assert_close(stack.sum(0), cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"], rtol=0, atol=1e-4)
    expanded = cache.get_full_resid_decomposition(layer=1, pos_slice=Slice(-1), expand_neurons=True)
    torch.testing.assert_close(expanded.sum(0), cache["resid_pre", 1][:, -1], rtol=0, atol=1e-4)


def test_batch_dim_slicing_and_removal(organism):
    model, inputs, _, _, cache = organism
    part = cache.apply_slice_to_batch_dim(Slice((1, 3)))
    rows = cache["projector.hook_out"].shape[0] // inputs["input_ids"].shape[0]  # one image per prompt
    batched = [k for k in cache.cache_dict if k != "projector.hook_out"]  # [n_image_tokens, d]: rows by prompt
    assert part.has_batch_dim and all(torch.equal(cache[k][1:3], part[k]) for k in batched)
    assert torch.equal(part["projector.hook_out"], cache["projector.hook_out"][rows : 3 * rows])
    one = cache.apply_slice_to_batch_dim(2)
    assert not one.has_batch_dim and all(torch.equal(cache[k][2], one[k]) for k in batched)
    assert torch.equal(one["projector.hook_out"], cache["projector.hook_out"][2 * rows : 3 * rows])
    with pytest.raises(AssertionError):
        cache.remove_batch_dim()
    with pytest.raises(ValueError, match="batch of one"):
        model.run_with_cache(**inputs, remove_batch_dim=True)
    with torch.no_grad():
        _, single = model.run_with_cache(**{k: v[:1] for k, v in inputs.items()}, names_filter=lambda n: n.startswith("blocks.0"))
    before = {k: v.shape for k, v in single.items()}
    single.remove_batch_dim()
    single.remove_batch_dim()  # a second call changes nothing
    assert not single.has_batch_dim and all(single[k].shape == before[k][1:] for k in before)


def test_cache_lookup_forms_and_dict_views(organism):
    model, _, _, _, cache = organism
    n = model.cfg.n_layers
    assert torch.equal(cache[("scale", 1, "ln1")], cache[get_act_name("scale", 1, "ln1")])
    assert torch.equal(cache[("scale", -1, "ln1")], cache[f"blocks.{n - 1}.ln1.hook_scale"])
    assert torch.equal(cache[("k", -1, None)], cache[f"blocks.{n - 1}.attn.hook_k"])
    assert torch.equal(cache["embed"], cache[EMBED]) and torch.equal(cache[("embed", None)], cache[EMBED])
    assert list(cache.keys()) == list(cache.cache_dict.keys())
    assert all(torch.equal(a, b) for a, b in zip(cache.values(), cache.cache_dict.values()))
    stack = cache.stack_activation("scale", -1, "ln1")
    assert all(torch.equal(cache[("scale", l, "ln1")], stack[l]) for l in range(n))
    with torch.no_grad():
        assert not torch.is_grad_enabled()
        cache.toggle_autodiff(mode=True)
        assert torch.is_grad_enabled()
    torch.set_grad_enabled(True)


def test_compute_head_results_computes_once(organism):
    model, inputs, *_ = organism
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("blocks.") and not n.endswith("hook_result"))
    assert "blocks.0.attn.hook_result" not in cache.cache_dict
    cache.compute_head_results()
    torch.testing.assert_close(cache["blocks.0.attn.hook_result"].sum(-2) + model.blocks[0].attn.b_O,
                               cache["blocks.0.hook_attn_out"], rtol=0, atol=1e-5)
    cache.cache_dict["blocks.0.attn.hook_result"][0, 0, 0, 0] = float("inf")
    cache.compute_head_results()
    assert cache.cache_dict["blocks.0.attn.hook_result"][0, 0, 0, 0] == float("inf")


# ------------------------------------------------------------------------------------------------- hooks
class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


def n_hooks(model, name=EMBED):
    return len(model.hook_dict[name].fwd_hooks)


def test_hooks_attach_and_come_off(clean):
    model, inputs, *_ = clean
    c = Counter()
    with torch.no_grad():
        model.run_with_hooks(**inputs, fwd_hooks=[(lambda name: name == EMBED, c.inc)])
        assert c.count == 1 and all(not hp.fwd_hooks for hp in model.hook_dict.values())
        model.add_perma_hook(EMBED, c.inc)
        model.run_with_hooks(**inputs, fwd_hooks=[])
        assert n_hooks(model) == 1 and c.count == 2
        with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
            assert n_hooks(model) == 2
            model(**inputs)
            with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
                assert n_hooks(model) == 3
                model.run_with_cache(**inputs)
                assert n_hooks(model) == 3  # run_with_cache keeps the context's hooks
            assert n_hooks(model) == 2
        assert n_hooks(model) == 1 and c.count == 2 + 2 + 3
        model.remove_all_hook_fns()
        assert n_hooks(model) == 1  # permanent hooks stay without the flag
        model.remove_all_hook_fns(including_permanent=True)
        assert n_hooks(model) == 0
        with model.hooks(fwd_hooks=[(EMBED, c.inc)]):
            model.reset_hooks()
            assert n_hooks(model) == 0


def test_hooks_come_off_after_an_exception(clean):
    model, inputs, *_ = clean
    c = Counter()

    def fail(x, hook):
        raise RuntimeError("fail")

    with torch.no_grad(), model.hooks(fwd_hooks=[(EMBED, c.inc)]):
        with pytest.raises(RuntimeError, match="fail"):
            with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", fail)]):
                model(**inputs)
        assert n_hooks(model) == 1 and c.count == 1 and n_hooks(model, "blocks.1.hook_resid_pre") == 0
        v0 = "vision.blocks.0.hook_resid_pre"
        with pytest.raises(RuntimeError, match="fail"):
            model.run_with_hooks(**inputs, fwd_hooks=[(v0, fail)])
        assert n_hooks(model, v0) == 0 and n_hooks(model) == 1
        model.add_hook(v0, fail)  # a hook added by hand, failing inside run_with_cache
        with pytest.raises(RuntimeError, match="fail"):
            model.run_with_cache(**inputs)
        assert n_hooks(model, v0) == 1  # not run_with_cache's to remove; its caching hooks are gone
        assert sum(len(hp.fwd_hooks) for hp in model.hook_dict.values()) == 2
        model.remove_all_hook_fns()
    assert n_hooks(model) == 0


def test_prepended_hooks_run_first(clean):
    model, inputs, *_ = clean
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def zero(x, hook):
        return torch.zeros_like(x)

    def noise(x, hook):
        return torch.randn_like(x) * 0.1

    with torch.no_grad():
        for zero_first in (True, False):
            model.reset_hooks()
            model.add_hook(last, zero if zero_first else noise, prepend=True)
            model.add_hook(last, noise if zero_first else zero, prepend=True)
            out = model(**inputs)
            # a zero residual gives the unembedding bias: only when the zero hook ran last (it was added first)
            assert torch.allclose(out, model.unembed.b_U.expand_as(out)) == zero_first


# ---------------------------------------------------------------------------------------- backward hooks
def test_backward_hooks_see_the_gradients(clean):
    model, inputs, *_ = clean
    name = "blocks.2.hook_resid_pre"
    kept, grads = {}, []

    def keep(x, hook):
        x.retain_grad()
        kept["x"] = x

    model.run_with_hooks(**inputs, return_type="loss", fwd_hooks=[(name, keep)],
                         bwd_hooks=[(name, lambda g, hook: grads.append(g.clone()))], reset_hooks_end=False).backward()
    model.reset_hooks()
    assert len(grads) == 1 and grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], kept["x"].grad, rtol=0, atol=0)
    assert all(not hp.bwd_hooks for hp in model.hook_dict.values())
    model.zero_grad(set_to_none=True)


def test_run_with_cache_incl_bwd_caches_gradients(clean):
    model, inputs, *_ = clean
    loss, cache = model.run_with_cache(**inputs, return_type="loss", incl_bwd=True)
    model.zero_grad(set_to_none=True)
    assert loss.ndim == 0
    for name in (EMBED, "blocks.1.attn.hook_z", "vision.blocks.0.hook_resid_post", "projector.hook_out"):
        assert cache[name + "_grad"].shape == cache[name].shape and cache[name + "_grad"].abs().max() > 0, name
    # the loss scores text only, but the gradient reaches the image positions through attention
    is_image = inputs["input_ids"] == model.cfg.image_token_id
    assert cache[EMBED + "_grad"][is_image].abs().max() > 0
    # gradients equal autograd's
    x = cache["blocks.2.hook_resid_pre"].clone().requires_grad_(True)
    again = model(x, start_at_layer=2, tokens=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_type="loss")
    (grad,) = torch.autograd.grad(again, x)
    torch.testing.assert_close(cache["blocks.2.hook_resid_pre_grad"], grad, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="scalar"):
        model.run_with_cache(**inputs, incl_bwd=True)
    with torch.no_grad(), pytest.raises(ValueError, match="gradients are off"):
        model.run_with_cache(**inputs, return_type="loss", incl_bwd=True)


# ------------------------------------------------------------------------------------------- pos_slice
@pytest.mark.parametrize("remove_batch_dim", [False, True])
def test_pos_slice_caches_the_same_activations(organism, remove_batch_dim):
    model, inputs, *_ = organism
    one = {k: v[:1] for k, v in inputs.items()}
    s = one["input_ids"].shape[1]
    with torch.no_grad():
        _, full = model.run_with_cache(**one, return_type=None, remove_batch_dim=remove_batch_dim)
        for i in (0, 5, s // 2, s - 1, -1):
            _, part = model.run_with_cache(**one, return_type=None, remove_batch_dim=remove_batch_dim, pos_slice=i)
            lead = () if remove_batch_dim else (0,)
            assert part["embed"].shape == (1,) * len(lead) + (1, model.cfg.d_model)
            assert part["q", 0].shape == (1,) * len(lead) + (1, model.cfg.n_heads, model.cfg.d_head)
            for name in ("embed", ("resid_pre", 1), ("resid_mid", 2), ("resid_post", 3), ("scale", 1, "ln1"),
                         ("normalized", 2, "ln2"), ("q", 1), ("k", 2), ("v", 3), ("z", 0), ("attn_out", 1), ("pre", 2),
                         ("post", 3), ("mlp_out", 0)):
                assert torch.equal(full[name][lead + (i,)], part[name][lead + (0,)]), name
            for name in (("attn_scores", 1), ("pattern", 3)):  # the query axis
                assert torch.equal(full[name][lead + (slice(None), i)], part[name][lead + (slice(None), 0)]), name
            for name in full.keys():  # the vision tower and projector: whole
                if name.startswith(("vision.", "projector.")):
                    assert torch.equal(full[name], part[name]), name


# ------------------------------------------------------------------------------------------- stop_at_layer
def test_stop_at_layer_in_cache_and_hooks(clean):
    model, inputs, *_ = clean
    c = Counter()
    with torch.no_grad():
        out, cache = model.run_with_cache(**inputs, stop_at_layer=1)
        assert out.shape == (*inputs["input_ids"].shape, model.cfg.d_model)
        assert EMBED in cache.keys() and "blocks.0.hook_resid_post" in cache.keys()
        assert not any(k.startswith(("blocks.1", "blocks.2", "blocks.3", "ln_final")) for k in cache.keys())
        _, cache = model.run_with_cache(**inputs, stop_at_layer=0)
        assert EMBED in cache.keys() and not any(k.startswith(("blocks.", "ln_final")) for k in cache.keys())
        model.run_with_hooks(**inputs, stop_at_layer=1, fwd_hooks=[(EMBED, c.inc), ("blocks.0.attn.hook_k", c.inc),
                                                                    ("blocks.1.mlp.hook_pre", c.inc)])
        assert c.count == 2
        out, cache = model.run_with_cache(**inputs, return_type=None)
        assert out is None and "ln_final.hook_normalized" in cache.keys()


# ---------------------------------------------------------------------------------- patching helpers, loss
def test_patching_helpers_with_the_image_bound(organism):
    model, inputs, answers, _, cache = organism
    corrupt = dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))  # objects swap sides
    rows = torch.arange(len(answers))

    def metric(lg):
        return (lg[rows, -1, answers[:, 0]] - lg[rows, -1, answers[:, 1]]).mean()

    image = {k: v for k, v in corrupt.items() if k != "input_ids"}
    with torch.no_grad(), model.bind_inputs(**image):
        attn = tl_patching.get_act_patch_attn_out(model, corrupt["input_ids"], cache, metric)
        heads = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupt["input_ids"], cache, metric)
    assert attn.shape == (model.cfg.n_layers, inputs["input_ids"].shape[1])
    assert heads.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert model._bound == {}

    def put(name, index):
        def hook(x, hook):
            x = x.clone()
            x[index] = cache[name][index]
            return x
        return [(name, hook)]

    with torch.no_grad():
        layer, pos = 2, inputs["input_ids"].shape[1] - 1
        got = metric(model.run_with_hooks(**corrupt, fwd_hooks=put(f"blocks.{layer}.hook_attn_out", (slice(None), pos))))
        torch.testing.assert_close(attn[layer, pos], got, rtol=0, atol=1e-5)
        got = metric(model.run_with_hooks(**corrupt, fwd_hooks=put("blocks.2.attn.hook_z", (slice(None), slice(None), 0))))
        torch.testing.assert_close(heads[2, 0], got, rtol=0, atol=1e-5)
        assert (heads - metric(model(**corrupt))).abs().max() > 1e-2  # some head matters


def test_return_types(organism):
    model, inputs, _, logits, _ = organism
    with torch.no_grad():
        loss = model(**inputs, return_type="loss")
        per_token = model(**inputs, return_type="loss", loss_per_token=True)
        both_logits, both_loss = model(**inputs, return_type="both")
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert per_token.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] - 1)
    torch.testing.assert_close(loss, model.loss_fn(logits, inputs["input_ids"], inputs["attention_mask"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(both_logits, logits, rtol=0, atol=1e-4)  # fused vs explicit attention (the cache's)
    torch.testing.assert_close(both_loss, loss)
    text = inputs["input_ids"] != model.cfg.image_token_id
    torch.testing.assert_close(per_token.sum() / (text[:, 1:] & text[:, :-1]).sum(), loss)
