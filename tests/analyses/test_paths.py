"""analyses.paths (float64 tiny LLaVA): path patching from the clean run itself has no effect; with nothing
downstream frozen (last layer's heads -> logits, MLPs recomputed) it equals activation patching of those heads' z;
with frozen MLPs the receiver's input is resid_clean + sum over senders of (z_X - z_C) W_O (checked against that
formula for q receivers and for the logits); senders at or after the receiver's layer have no path; batching
equals the one-set-per-forward loop."""
from __future__ import annotations

import pytest
import torch

from hooked_vlm.analyses.lens import decode
from hooked_vlm.analyses.metrics import LogitDiff
from hooked_vlm.analyses.patching import patch_sweep
from hooked_vlm.analyses.paths import head_receivers, path_patch, path_patch_heads
from hooked_vlm import HookedVLM
from tiny import llava_inputs, tiny_llava

TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedVLM.from_hf(hf).double()
    clean = llava_inputs(hf, batch=2, pad_left=1, seed=0)
    clean["pixel_values"] = clean["pixel_values"].double()
    cf = dict(clean, input_ids=clean["input_ids"].clone())
    cf["input_ids"][:, -3:] = (cf["input_ids"][:, -3:] + 5) % 60 + 1
    cf["pixel_values"] = llava_inputs(hf, batch=2, pad_left=1, seed=1)["pixel_values"].double()
    metric = LogitDiff(torch.tensor([3, 4]), torch.tensor([5, 6]), clean["attention_mask"])
    return model, clean, cf, metric


def _caches(model, inputs):
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    return cache


def test_clean_counterfactual_has_no_effect(setup):
    model, clean, _, metric = setup
    sets = [[(0, 0)], [(0, 1), (1, 3)], [(l, h) for l in range(2) for h in range(4)]]
    for receivers in ("logits", head_receivers(model, 2, 1)):
        res = path_patch(model, clean, clean, metric, senders=sets, receivers=receivers, per_prompt=True, progress=False)
        torch.testing.assert_close(res.effect(), torch.zeros_like(res.scores), **TOL)


def test_last_layer_to_logits_is_activation_patching(setup):
    model, clean, cf, metric = setup
    last = model.cfg.n_layers - 1
    heads = [[(last, h)] for h in range(4)] + [[(last, h) for h in range(4)]]
    ours = path_patch(model, clean, cf, metric, senders=heads, receivers="logits", freeze_mlps=False, per_prompt=True, progress=False)
    sites = [(f"blocks.{last}.attn.hook_z", None, [h]) for h in range(4)] + [(f"blocks.{last}.attn.hook_z", None, None)]
    act = patch_sweep(model, clean, cf, metric, sites=sites, direction="noise", per_prompt=True, progress=False)
    torch.testing.assert_close(ours.scores, act.scores, **TOL)
    assert ours.effect().abs().max() > 1e-3


def test_matches_direct_path_formula(setup):
    model, clean, cf, metric = setup
    cc, cx = _caches(model, clean), _caches(model, cf)
    senders = [(0, 1), (1, 2), (1, 0)]

    def patched_resid(name):
        x = cc[name].clone()
        for l, h in senders:
            if name == "final" or int(name.split(".")[1]) > l:
                dz = cx[f"blocks.{l}.attn.hook_z"][:, :, h] - cc[f"blocks.{l}.attn.hook_z"][:, :, h]
                x = x + dz @ model.blocks[l].attn.W_O[h]
        return x

    # logits: the senders' direct effect through the final residual
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    cc.cache_dict["final"] = cc[final]
    expected = metric(decode(model, patched_resid("final")))
    res = path_patch(model, clean, cf, metric, senders=[senders], receivers="logits", per_prompt=True, progress=False)
    torch.testing.assert_close(res.scores[0], expected.detach(), **TOL)
    # q of head 3 and k of kv head 0 at layer 2: recomputed from the path-patched resid_pre with the layer's modules
    block = model.blocks[2]
    x = block.ln1(patched_resid("blocks.2.hook_resid_pre"))
    b, p = clean["input_ids"].shape
    q = block.attn.q_proj(x).view(b, p, 4, -1)
    k = block.attn.k_proj(x).view(b, p, 2, -1)

    def put(act, hook):
        out = act.clone()
        if hook.name.endswith("hook_q"):
            out[:, :, 3] = q[:, :, 3]
        else:
            out[:, :, 0] = k[:, :, 0]
        return out

    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.2.attn.hook_q", put), ("blocks.2.attn.hook_k", put)]):
        expected = metric(model(**clean))
    res = path_patch(model, clean, cf, metric, senders=[senders], receivers=[(2, "q", 3), (2, "k", 0)], per_prompt=True, progress=False)
    torch.testing.assert_close(res.scores[0], expected, **TOL)
    assert (res.scores[0] - res.clean).abs().max() > 1e-4


def test_no_path_backwards_and_batching(setup):
    model, clean, cf, metric = setup
    res = path_patch(model, clean, cf, metric, senders=[[(1, 0)], [(1, 2), (2, 1)]], receivers=head_receivers(model, 1, 2),
                     per_prompt=True, progress=False)
    torch.testing.assert_close(res.effect(), torch.zeros_like(res.scores), **TOL)
    recv = head_receivers(model, 2, 0) + [(1, "v", 1)]
    kw = dict(per_prompt=True, progress=False, receiver_positions=[25, 24], sender_positions=torch.arange(26) > 3)
    batched = path_patch_heads(model, clean, cf, metric, receivers=recv, batch_size=16, **kw)
    loop = path_patch_heads(model, clean, cf, metric, receivers=recv, batch_size=1, **kw)
    assert batched.scores.shape == (3, 4, 2)
    torch.testing.assert_close(batched.scores, loop.scores, **TOL)
    assert batched.effect()[:2].abs().max() > 1e-4  # layers 0, 1 reach layer 2
    torch.testing.assert_close(batched.effect()[2], torch.zeros(4, 2, dtype=torch.float64), **TOL)


# ----------------------------------------------------------------------------- MLP, embedding and image-path senders
OTHER_SENDERS = ["MLP0", "MLP2", "embed_image", "embed_text", "V0", "projector", "V.embed", ["V0", "MLP1", (1, 2)]]


def test_other_senders_from_the_clean_run_have_no_effect(setup):
    model, clean, _, metric = setup
    res = path_patch(model, clean, clean, metric, senders=OTHER_SENDERS, receivers="logits", per_prompt=True, progress=False)
    torch.testing.assert_close(res.effect(), torch.zeros_like(res.scores), **TOL)
    assert res.labels["sender"][-1] == ["L1H2", "MLP1", "V0"] and res.labels["sender"][-2] == ["V.embed"]


def test_image_path_senders_are_silent_when_only_the_text_changes(setup):
    """Same pixels: the vision blocks, the projector and the image embeddings carry nothing; MLPs and text do."""
    model, clean, cf, metric = setup
    text_cf = dict(cf, pixel_values=clean["pixel_values"])
    recv = head_receivers(model, 2, 1)
    res = path_patch(model, clean, text_cf, metric, senders=OTHER_SENDERS, receivers=recv, per_prompt=True, progress=False)
    effect = dict(zip(map(str, res.labels["sender"]), res.effect()))
    for silent in ("['embed_image']", "['V0']", "['projector']", "['V.embed']"):
        torch.testing.assert_close(effect[silent], torch.zeros(2, dtype=torch.float64), **TOL)
    assert effect["['embed_text']"].abs().max() > 1e-4 and effect["['MLP0']"].abs().max() > 1e-4
    image_cf = dict(clean, pixel_values=cf["pixel_values"])
    res = path_patch(model, clean, image_cf, metric, senders=["embed_text", "V0", "projector", "V.embed"], receivers=recv,
                     per_prompt=True, progress=False)
    torch.testing.assert_close(res.effect()[0], torch.zeros(2, dtype=torch.float64), **TOL)
    assert res.effect()[1:].abs().amin(-1).max() > 1e-5


def test_last_mlp_to_logits_is_activation_patching(setup):
    model, clean, cf, metric = setup
    last = model.cfg.n_layers - 1
    ours = path_patch(model, clean, cf, metric, senders=[f"MLP{last}"], receivers="logits", freeze_mlps=False, per_prompt=True,
                      progress=False)
    act = patch_sweep(model, clean, cf, metric, sites=[f"blocks.{last}.hook_mlp_out"], direction="noise", per_prompt=True,
                      progress=False)
    torch.testing.assert_close(ours.scores, act.scores, **TOL)
    assert ours.effect().abs().max() > 1e-4


def test_projector_sender_matches_direct_path_formula(setup):
    """Heads and MLPs frozen: the receiver's input is resid_clean + (embed_X - embed_C) at the image positions."""
    model, clean, cf, metric = setup
    image_cf = dict(clean, pixel_values=cf["pixel_values"])
    cc, cx = _caches(model, clean), _caches(model, image_cf)
    delta = cx["hook_embed"] - cc["hook_embed"]
    block = model.blocks[1]
    x = block.ln1(cc["blocks.1.hook_resid_pre"] + delta)
    b, p = clean["input_ids"].shape
    q = block.attn.q_proj(x).view(b, p, 4, -1)

    def put(act, hook):
        out = act.clone()
        out[:, :, 0] = q[:, :, 0]
        return out

    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.1.attn.hook_q", put)]):
        expected = metric(model(**clean))
    res = path_patch(model, clean, image_cf, metric, senders=["projector"], receivers=[(1, "q", 0)], per_prompt=True, progress=False)
    torch.testing.assert_close(res.scores[0], expected, **TOL)
    assert (res.scores[0] - res.clean).abs().max() > 1e-6


def test_bad_senders_are_named(setup):
    model, clean, cf, metric = setup
    with pytest.raises(ValueError, match="unknown sender 'MLPx'"):
        path_patch(model, clean, cf, metric, senders=["MLPx"], receivers="logits", progress=False)
    with pytest.raises(ValueError, match="V9 is out of range"):
        path_patch(model, clean, cf, metric, senders=["V9"], receivers="logits", progress=False)


def test_the_whole_tower_as_senders_equals_the_projector(setup):
    """With the tower's input and every running block at their counterfactual values, the tower's output (so the
    projector's) is the counterfactual one: the set ["V.embed", "V0", ...] equals the "projector" sender exactly."""
    from hooked_vlm.analyses.edge_graph import vision_depth

    model, clean, cf, metric = setup
    tower = ["V.embed"] + [f"V{k}" for k in range(vision_depth(model))]
    res = path_patch(model, clean, cf, metric, senders=[tower, "projector"], receivers=head_receivers(model, 2, 0), per_prompt=True,
                     progress=False)
    torch.testing.assert_close(res.scores[0], res.scores[1], rtol=1e-9, atol=1e-9)
    assert res.effect().abs().max() > 1e-4


def test_senders_inside_a_bidirectional_image_resume_at_its_start(monkeypatch):
    """Gemma 3: sender positions inside an image (whose tokens see each other) resume from the image's first token
    (`safe_start` in the sweep engine) and give the full reruns' values."""
    import functools

    from hooked_vlm.analyses import paths as paths
    from hooked_vlm.analyses.toolkit import run_sites
    from tiny import gemma3_image_counterfactual

    hf, proc, clean, cf, metric = gemma3_image_counterfactual()  # n - 6 is inside the second image
    model = HookedVLM.from_hf(hf, proc)
    n = clean["input_ids"].shape[1]
    kw = dict(senders=[[(0, 0)], [(0, 1), (1, 2)], ["MLP0"]], receivers=[(2, "q", 1)], sender_positions=[n - 6],
              per_prompt=True, progress=False)
    fast = path_patch(model, clean, cf, metric, **kw)
    monkeypatch.setattr(paths, "run_sites", functools.partial(run_sites, reuse_prefix=False))
    slow = path_patch(model, clean, cf, metric, **kw)
    torch.testing.assert_close(fast.scores, slow.scores, rtol=0, atol=1e-5)
    assert fast.effect().abs().max() > 1e-4
