"""analyses.patching: the mathematics of activation patching on a tiny random LLaVA (and the organism if shipped).

Identities checked: clean-into-clean changes nothing; patching a whole activation at every position recovers the
source run's logits; positions whose activations agree between the runs give exactly the baseline; the batched
sweep equals a hand-written one-forward-per-site loop; hooks never outlive a sweep, even when it raises.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from hooked_vlm.analyses import plots
from hooked_vlm.analyses.metrics import LogitDiff
from hooked_vlm.analyses.toolkit import SweepResult
from hooked_vlm.analyses.patching import (
    patch_by_layer,
    patch_heads,
    patch_resid_by_layer_and_position,
    patch_sweep,
    plot_patching,
)
from hooked_vlm import HookedVLM
from hooked_vlm.organism import ORGANISM_DIR
from hooked_vlm.vision.vit import hidden_state_index
from tiny import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf)
    clean = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    image_cf = dict(clean, pixel_values=llava_inputs(hf, batch=2, pad_left=1, seed=1)["pixel_values"])
    # text counterfactual: same length, different tokens after the image
    text_cf = dict(clean, input_ids=clean["input_ids"].clone())
    img = model.cfg.image_token_id
    after = model.layout(clean).text_positions() & (torch.arange(clean["input_ids"].shape[1]) > 5)
    text_cf["input_ids"][after] = (text_cf["input_ids"][after] + 7) % (img - 1) + 1
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    return model, clean, image_cf, text_cf, metric


def distance_to(reference):
    """A metric [batch]: the largest absolute difference of each prompt's logits from `reference`'s."""
    return lambda logits: (logits - reference.to(logits.device)).abs().flatten(1).amax(1)


def no_hooks_left(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())


def test_clean_into_clean_changes_nothing(setup):
    model, clean, _, _, metric = setup
    lay = model.layout(clean)
    sites = (
        [(f"blocks.{l}.hook_{k}", None, None) for l in range(model.cfg.n_layers) for k in ("resid_pre", "attn_out", "mlp_out")]
        + [(f"blocks.{l}.attn.hook_z", lay.final_token(), h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
        + [(f"blocks.1.attn.hook_{k}", lay.image_positions(), 0) for k in ("q", "k", "v", "result", "pattern")]
        + [("vision.blocks.0.hook_resid_post", None, None), ("vision.hook_patch_embed", None, None),
           ("projector.hook_out", None, None), ("hook_embed", lay.text_positions(), None)]
    )
    # hooking hook_pattern / hook_result switches attention (of every copy in that forward) to its explicit /
    # per-head path, equal to the fused path only to round-off: those sites are checked with rtol 1e-6 as well
    changing = [s for s in sites if s[0].endswith(("hook_pattern", "hook_result"))]
    plain = [s for s in sites if s not in changing]
    res = patch_sweep(model, clean, clean, metric, sites=plain, batch_size=11, per_prompt=True, progress=False)
    assert res.scores.shape == (len(plain), 2)
    torch.testing.assert_close(res.clean, res.corrupt, rtol=0, atol=0)
    torch.testing.assert_close(res.scores, res.clean.expand_as(res.scores), rtol=0, atol=5e-6)  # round-off: chunks resume at different points
    res = patch_sweep(model, clean, clean, metric, sites=changing, per_prompt=True, progress=False)
    torch.testing.assert_close(res.scores, res.clean.expand_as(res.scores), rtol=1e-6, atol=1e-6)
    assert no_hooks_left(model)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("cf", ["image", "text"])
def test_full_patch_recovers_source_logits(setup, direction, cf):
    """Patching the whole residual stream (every position) at any layer reproduces the source run's logits;
    so does the projector output (and every vision layer that feeds the decoder) for an image counterfactual."""
    model, clean, image_cf, text_cf, _ = setup
    corrupt = image_cf if cf == "image" else text_cf
    hooks = [f"blocks.{l}.hook_{k}" for l in range(model.cfg.n_layers) for k in ("resid_pre", "resid_post")]
    if cf == "image":
        hooks += ["projector.hook_out", "vision.hook_embed"]
    source_inputs = clean if direction == "denoise" else corrupt
    res = patch_sweep(model, clean, corrupt, distance_to(model(**source_inputs)), sites=hooks, direction=direction,
                      per_prompt=True, batch_size=4, progress=False)
    target = res.corrupt if direction == "denoise" else res.clean
    assert target.min() > 1e-2  # the counterfactual matters: the unpatched run is far from the source
    assert res.scores.abs().max() < 1e-5  # every patched run reproduces the source run's logits


def test_full_patch_normalized_is_one_and_vision_layers(setup):
    model, clean, image_cf, _, metric = setup
    res = patch_by_layer(model, clean, image_cf, metric, hook="resid_mid", progress=False)
    assert res.scores.shape == (model.cfg.n_layers,)
    torch.testing.assert_close(res.normalized(), torch.ones(model.cfg.n_layers), rtol=0, atol=1e-5)
    # vision tower: blocks up to the feature layer feed the decoder; deeper blocks never run
    n_vis = model.cfg.vision.n_layers
    used = hidden_state_index(model.cfg.vision_feature_layer, n_vis)
    with pytest.warns(UserWarning, match="did not run") if used < n_vis else contextlib.nullcontext():
        res = patch_by_layer(model, clean, image_cf, metric, hook="vision.blocks.{layer}.hook_resid_post", progress=False)
    assert res.scores.shape == (n_vis,)
    expected = torch.tensor([1.0 if layer < used else 0.0 for layer in range(n_vis)])
    torch.testing.assert_close(res.normalized(), expected, rtol=0, atol=1e-5)


def test_identical_positions_give_the_baseline(setup):
    """Image counterfactual: activations before the image are the same in both runs, so patching there is a no-op
    in both directions; after the image they differ and (somewhere) patching matters."""
    model, clean, image_cf, _, metric = setup
    lay = model.layout(clean)
    first_img = int(lay.image_positions()[1].nonzero()[0])
    for direction in ("denoise", "noise"):
        res = patch_resid_by_layer_and_position(model, clean, image_cf, metric, direction=direction, per_prompt=True,
                                                batch_size=100, progress=False)
        base = res.corrupt if direction == "denoise" else res.clean
        assert res.scores.shape == (model.cfg.n_layers, clean["input_ids"].shape[1], 2)
        torch.testing.assert_close(res.scores[:, :first_img], base.expand(model.cfg.n_layers, first_img, 2), rtol=0, atol=1e-6)
        assert (res.scores[:, first_img:] - base).abs().max() > 1e-3


def _manual_loop(model, clean, corrupt, metric, sites):
    """Reference: one forward per site, hooks written by hand."""
    wanted = {name for name, _, _ in sites}
    _, cache = model.run_with_cache(**clean, names_filter=lambda n: n in wanted)
    out = []
    for name, pos, head in sites:
        def hook(act, hook, name=name, pos=pos, head=head):
            act = act.clone()
            src = cache[name]
            if head is None:
                act[:, pos] = src[:, pos]
            else:
                act[:, pos, head] = src[:, pos, head]
            return act
        with torch.no_grad():
            out.append(metric(model.run_with_hooks(**corrupt, fwd_hooks=[(name, hook)])))
    return torch.stack(out)


def test_batched_equals_looped(setup):
    model, clean, _, text_cf, metric = setup
    n_layers, n_pos = model.cfg.n_layers, clean["input_ids"].shape[1]
    kinds = ("resid_pre", "attn_out", "mlp_out")
    for kind in kinds:
        cols = list(range(n_pos)) if kind == "resid_pre" else [0, 3, 10, n_pos - 7, n_pos - 1]
        ref = _manual_loop(model, clean, text_cf, metric,
                           [(f"blocks.{l}.hook_{kind}", p, None) for l in range(n_layers) for p in cols])
        ref = ref.reshape(n_layers, len(cols), 2)
        for bs in ((1, 7, 1000) if kind == "resid_pre" else (4, 1000)):
            scores = patch_resid_by_layer_and_position(model, clean, text_cf, metric, hook=kind, batch_size=bs,
                                                       positions=cols, per_prompt=True, progress=False).scores
            torch.testing.assert_close(scores[:, cols], ref, rtol=0, atol=1e-5)
            assert torch.isnan(scores).sum() == n_layers * (n_pos - len(cols)) * 2
    # heads at the final position (same index in both prompts here: no right padding)
    lay = model.layout(clean)
    final = lay.final_token()
    last = int(final[0].nonzero())
    assert bool(final[:, last].all())
    heads = patch_heads(model, clean, text_cf, metric, positions=final, batch_size=5, per_prompt=True, progress=False)
    assert heads.scores.shape == (n_layers, model.cfg.n_heads, 2) and heads.dims == ("layer", "head")
    ref = _manual_loop(model, clean, text_cf, metric,
                       [(f"blocks.{l}.attn.hook_z", last, h) for l in range(n_layers) for h in range(model.cfg.n_heads)])
    torch.testing.assert_close(heads.scores, ref.reshape(n_layers, model.cfg.n_heads, 2), rtol=0, atol=1e-5)
    # key/value hooks enumerate the key/value heads
    kv = patch_heads(model, clean, text_cf, metric, hook="v", layers=[-1], progress=False)
    assert kv.scores.shape == (1, model.cfg.n_key_value_heads) and kv.labels["layer"] == [n_layers - 1]


def test_heads_partition_the_attention_output(setup):
    """Patching every head's z at once is the same as patching the attention output (the o_proj is linear)."""
    model, clean, _, text_cf, metric = setup
    sites = [(f"blocks.{l}.attn.hook_z", None, list(range(model.cfg.n_heads))) for l in range(model.cfg.n_layers)]
    sites += [(f"blocks.{l}.hook_attn_out", None, None) for l in range(model.cfg.n_layers)]
    res = patch_sweep(model, clean, text_cf, metric, sites=sites, per_prompt=True, progress=False)
    n = model.cfg.n_layers
    torch.testing.assert_close(res.scores[:n], res.scores[n:], rtol=0, atol=1e-5)


def test_vision_position_sweep_and_mean(setup):
    model, clean, image_cf, _, metric = setup
    res = patch_resid_by_layer_and_position(model, clean, image_cf, metric, hook="vision.blocks.{layer}.hook_resid_post",
                                            layers=[0], positions=[0, 3, 5], progress=False)
    n_patch = (model.cfg.vision.image_size // model.cfg.vision.patch_size) ** 2 + int(model.cfg.vision.class_token)
    assert res.scores.shape == (1, n_patch)
    assert torch.isnan(res.scores[0, 1]) and not torch.isnan(res.scores[0, [0, 3, 5]]).any()
    per = patch_resid_by_layer_and_position(model, clean, image_cf, metric, hook="vision.blocks.{layer}.hook_resid_post",
                                            layers=[0], positions=[0, 3, 5], per_prompt=True, progress=False)
    torch.testing.assert_close(per.scores.mean(-1), res.scores, equal_nan=True)


def test_errors_leave_no_hooks(setup):
    model, clean, _, _, _ = setup
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]))

    calls = []

    def bad_metric(logits):  # fails inside the sweep, after the two baselines
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return metric(logits)

    with pytest.raises(RuntimeError, match="boom"):
        patch_by_layer(model, clean, clean, bad_metric, progress=False)
    assert no_hooks_left(model)
    short = {k: (v[:, 1:] if k in ("input_ids", "attention_mask") else v) for k, v in clean.items()}
    short["input_ids"] = short["input_ids"].clone()
    with pytest.raises(ValueError, match="different sequence lengths"):
        patch_by_layer(model, short, clean, metric, progress=False)
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match="no hook"):
        patch_sweep(model, clean, clean, metric, sites=["blocks.99.hook_resid_pre"], progress=False)
    with pytest.raises(ValueError, match="direction"):
        patch_sweep(model, clean, clean, metric, sites=["hook_embed"], direction="sideways", progress=False)


def test_cache_device_and_result_helpers(setup):
    model, clean, image_cf, _, metric = setup
    res = patch_by_layer(model, clean, image_cf, metric, device="cpu", positions=model.layout(clean).image_positions(),
                         progress=False)
    assert isinstance(res, SweepResult)
    torch.testing.assert_close(res.effect(), res.scores - res.corrupt)


def test_plots(setup):
    model, clean, image_cf, _, metric = setup
    lay = model.layout(clean)
    res = patch_resid_by_layer_and_position(model, clean, image_cf, metric, batch_size=100, progress=False)
    fig = plot_patching(res, lay, batch=1)
    hm = fig.data[0]
    assert hm.z.shape == res.scores.shape
    pos = int(lay.image_positions()[1].nonzero()[5])
    assert f"row {int(lay.row[1, pos])} col {int(lay.col[1, pos])}" in hm.text[0][pos]
    strs = [f"t{i}" for i in range(clean["input_ids"].shape[1])]
    fig = plots.plot_layer_position(res.scores, lay, batch=1, tokens=strs)
    assert "'t0'" in fig.data[0].text[0][0]
    # overlay: token at (row, col) is painted on grid cell (row, col)
    per_pos = torch.arange(clean["input_ids"].shape[1]).float()
    fig = plots.plot_image_overlay(per_pos, lay, clean["pixel_values"][1], batch=1)
    grid = fig.data[1].z
    r, c = int(lay.row[1, pos]), int(lay.col[1, pos])
    assert grid[r][c] == pos
    assert fig.data[0].z.shape[:2] == clean["pixel_values"].shape[-2:]
    heads = patch_heads(model, clean, image_cf, metric, progress=False)
    fig = plot_patching(heads)
    assert fig.data[0].z.shape == (model.cfg.n_layers, model.cfg.n_heads) and "L0H1" in fig.data[0].text[0][1]
    fig = plot_patching(patch_by_layer(model, clean, image_cf, metric, progress=False))
    assert len(fig.data[0].y) == model.cfg.n_layers
    fig = plots.plot_effect_table({"a": 1.0, "b": torch.tensor([1.0, 3.0])})
    assert list(fig.data[0].y) == [1.0, 2.0]


def test_qwen2_vl_mrope_and_packed_vision_tower():
    """Another family: M-RoPE position ids [3, batch, pos] and a vision tower that packs every image's patches into
    one row ([1, patches, d]); batched sweeps still equal the loop and full patches recover the clean run."""
    from tiny import qwen_inputs, tiny_qwen_vl

    model = HookedVLM.from_hf(tiny_qwen_vl())
    sizes = [[(16, 16)], [(16, 8)]]
    clean = qwen_inputs(sizes, seed=0)
    corrupt = dict(clean, pixel_values=qwen_inputs(sizes, seed=1)["pixel_values"])
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    for hook in ("resid_pre", "vision.blocks.{layer}.hook_resid_post"):
        runs = [patch_resid_by_layer_and_position(model, clean, corrupt, metric, hook=hook, batch_size=bs, per_prompt=True,
                                                  progress=False) for bs in (1, 1000)]
        torch.testing.assert_close(runs[0].scores, runs[1].scores, rtol=0, atol=1e-5)
        assert (runs[1].scores - runs[1].corrupt).abs().max() > 1e-3
    res = patch_sweep(model, clean, corrupt, metric, sites=["projector.hook_out", "vision.hook_patch_embed",
                                                      "vision.blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"],
                      progress=False)
    torch.testing.assert_close(res.normalized(), torch.ones(4), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ organism
needs_organism = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="no shipped organism")


@pytest.fixture(scope="module")
def organism():
    from hooked_vlm.analyses.tasks import encode
    from hooked_vlm.organism import ShapesGenerator

    model = HookedVLM.from_pretrained(str(ORGANISM_DIR))
    pairs = ShapesGenerator(11).pairs(8, "swap_shapes", "shape_item")
    clean, corrupt = encode(model.processor, [p[0] for p in pairs]), encode(model.processor, [p[1] for p in pairs])
    return model, clean, corrupt


@needs_organism
def test_organism_image_counterfactual(organism):
    """swap_shapes flips the answer through the image only: restoring the image (projector output) restores the
    clean logit difference, and so does the residual stream at the final token in the last layer."""
    model, clean, corrupt = organism
    metric = clean.logit_diff()
    assert torch.equal(clean.inputs["input_ids"], corrupt.inputs["input_ids"])
    res = patch_sweep(model, clean.inputs, corrupt.inputs, metric, sites=["projector.hook_out"], progress=False)
    assert res.clean > 0 > res.corrupt
    torch.testing.assert_close(res.normalized(), torch.ones(1), rtol=0, atol=1e-4)
    lay = model.layout(clean.inputs)
    by_layer = patch_by_layer(model, clean.inputs, corrupt.inputs, metric, positions=lay.final_token(),
                              hook="resid_post", progress=False)
    assert by_layer.normalized()[-1] > 0.99
    heat = patch_resid_by_layer_and_position(model, clean.inputs, corrupt.inputs, metric, batch_size=64, progress=False)
    assert heat.scores.shape == (model.cfg.n_layers, clean.inputs["input_ids"].shape[1])
    # ground truth planted in training (organism.json): at the final token the retrieval head L2H0 and the
    # image-lookup head L1H0 carry the image's answer; they are the top two heads
    heads = patch_heads(model, clean.inputs, corrupt.inputs, metric, positions=lay.final_token(), progress=False)
    n_heads = heads.scores.shape[1]
    top = heads.normalized().flatten().argsort(descending=True)[:2].tolist()
    assert top == [2 * n_heads + 0, 1 * n_heads + 0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl", "gemma3"])
def test_reuse_prefix_equals_full_reruns(setup, family):
    """Every decoder hook kind, with alpha interpolation and per-head / per-position sites: resuming from the saved
    target run (reuse_prefix=True) gives the full forwards' values; the vision tower then runs only for the
    baselines, the source cache and the one saved run, never per chunk."""
    if family == "llava":
        model, clean, _, corrupt, metric = setup
    elif family == "gemma3":  # positions inside an image: resumed from the image's first token (bidirectional)
        from tiny import gemma3_image_counterfactual

        hf, proc, clean, corrupt, metric = gemma3_image_counterfactual()  # n - 6 is inside the second image
        model = HookedVLM.from_hf(hf, proc)
    else:
        from tiny import qwen_inputs, tiny_qwen3_vl, tiny_qwen_vl

        model = HookedVLM.from_hf(tiny_qwen3_vl() if family == "qwen3_vl" else tiny_qwen_vl())  # qwen3_vl: DeepStack
        clean = qwen_inputs([[(16, 16)], [(16, 8)]], seed=0)
        corrupt = dict(clean, pixel_values=qwen_inputs([[(16, 16)], [(16, 8)]], seed=1)["pixel_values"])
        metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    n = clean["input_ids"].shape[1]
    last = model.cfg.n_layers - 1
    sites = [(f"blocks.{last}.hook_resid_pre", [n - 2]), (f"blocks.1.hook_resid_mid", [n - 5, n - 1]),
             ("blocks.0.hook_resid_post", None), (f"blocks.{last}.mlp.hook_post", [n - 1]),
             ("blocks.1.attn.hook_q", [n - 3], 1), ("blocks.1.attn.hook_k", [n - 4], 0),
             ("blocks.0.attn.hook_v", [n - 6]), ("blocks.1.attn.hook_z", [n - 1], [0, 2]),
             ("blocks.1.attn.hook_result", [n - 2], 3), ("blocks.1.attn.hook_pattern", [n - 1], 1),
             ("blocks.0.attn.hook_attn_scores", [n - 3]), ("projector.hook_out", None)]
    if family == "qwen3_vl":  # the DeepStack addition at an image position of block 1 (resume must carry block 0's)
        sites.append(("blocks.1.hook_deepstack", [int((clean["input_ids"][0] == model.cfg.image_token_id).nonzero()[2])]))
    calls = []
    handle = model.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        for alpha in (1.0, 0.5):
            calls.clear()
            fast = patch_sweep(model, corrupt, clean, metric, sites=sites, batch_size=3, per_prompt=True, alpha=alpha,
                               progress=False)
            n_fast = len(calls)
            slow = patch_sweep(model, corrupt, clean, metric, sites=sites, batch_size=3, per_prompt=True, alpha=alpha,
                               progress=False, reuse_prefix=False)
            torch.testing.assert_close(fast.scores, slow.scores, rtol=0, atol=2e-5)
            moved = ((slow.scores - slow.corrupt[None]).abs().amax(-1) > 1e-4).sum()
            assert moved >= len(sites) - 2, "the sites should matter, or the comparison proves little"
            # source baseline (1) + source cache (1) + saved target run (1, also the target baseline) + the one
            # projector chunk; without reuse: 2 baselines + the cache + one chunk per 3 sites
            assert n_fast == 4 and len(calls) - n_fast == 3 + -(-len(sites) // 3)
    finally:
        handle.remove()
    assert no_hooks_left(model)


def test_bad_arguments_name_their_cause(setup):
    """Issue 15: empty arguments, a counterfactual of another length and bad sizes are errors that say so."""
    from hooked_vlm.analyses.heads import head_scores
    from hooked_vlm.analyses.paths import path_patch
    from hooked_vlm.analyses.toolkit import transplant_sweep

    model, clean, _, _, metric = setup
    with pytest.raises(ValueError, match="no sites given"):
        patch_sweep(model, clean, clean, metric, sites=[], progress=False)
    empty = dict(clean, input_ids=clean["input_ids"][:, :0], attention_mask=clean["attention_mask"][:, :0])
    with pytest.raises(ValueError, match="corrupt inputs are empty"):
        patch_by_layer(model, clean, empty, metric, progress=False)
    longer = {k: (torch.cat([v, v[:, -1:]], 1) if k in ("input_ids", "attention_mask") else v) for k, v in clean.items()}
    with pytest.raises(ValueError, match="different sequence lengths 26 vs 27"):
        patch_resid_by_layer_and_position(model, clean, longer, metric, layers=[0], progress=False)
    with pytest.raises(ValueError, match="different sequence lengths"):
        path_patch(model, clean, longer, metric, senders=[(0, 0)], receivers="logits", progress=False)
    one = {k: v[:1] for k, v in clean.items()}
    with pytest.raises(ValueError, match="different batch sizes: 2 vs 1"):
        patch_by_layer(model, clean, one, metric, progress=False)
    with pytest.raises(ValueError, match="no patches given"):
        transplant_sweep(model, clean, {}, [], metric, positions=model.layout(clean).final_token())
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        head_scores(model, clean, clean, metric, positions=model.layout(clean).final_token(), batch_size=-1)
    with pytest.raises(TypeError, match="fraction is not a position"):
        patch_by_layer(model, clean, clean, metric, positions=[0.5], progress=False)
    assert no_hooks_left(model)
