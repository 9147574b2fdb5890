"""Hooks and state: no hook survives an exception (in a hook, in a patching sweep's metric, in run_with_cache), two
models in one process do not interfere, a forward mutates no module-level state; the run_with_cache memory guard;
peak RSS does not grow across repeated sweeps; seeded sweeps are deterministic."""
import copy
import resource
import sys
import types

import pytest
import torch
from tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen_vl

from hooked_vlm import HookedVLM


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model, inputs = HookedVLM.from_hf(hf), llava_inputs(hf, batch=2, pad_left=2)
    with torch.no_grad():
        base = model(**inputs)
    return model, inputs, base


def _clean(model):
    return not any(hp.has_hooks(including_permanent=True) for hp in model.hook_dict.values()) and not model._bound


def _metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 4]


def _corrupt(inputs):
    return dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))


# ------------------------------------------------------------------------------------------- exceptions
def test_exception_in_hook_leaves_no_hooks(setup):
    model, inputs, base = setup

    def boom(x, hook):
        raise RuntimeError("boom")

    for name in ("blocks.1.attn.hook_pattern", "vision.blocks.0.hook_resid_post", "projector.hook_out"):
        with pytest.raises(RuntimeError, match="boom"):
            model.run_with_hooks(**inputs, fwd_hooks=[(name, boom)])
        with pytest.raises(RuntimeError, match="boom"):
            with model.bind_inputs(pixel_values=inputs["pixel_values"]):
                model.run_with_hooks(inputs["input_ids"], attention_mask=inputs["attention_mask"], fwd_hooks=[(name, boom)])
        assert _clean(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), base)


def test_exception_in_patching_metric_leaves_no_hooks(setup):
    from hooked_vlm.analyses.patching import patch_by_layer

    model, inputs, base = setup
    calls = []

    def bad_metric(logits):
        calls.append(logits.shape[0])
        if len(calls) > 2:  # the two baselines succeed, the first patched batch fails
            raise RuntimeError("metric failed")
        return _metric(logits)

    with pytest.raises(RuntimeError, match="metric failed"):
        patch_by_layer(model, inputs, _corrupt(inputs), bad_metric, positions=None, batch_size=2, progress=False)
    assert len(calls) == 3 and _clean(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), base)


def test_exception_in_run_with_cache_leaves_no_hooks(setup):
    model, inputs, base = setup
    with pytest.raises(ValueError):  # fails inside the forward, after the caching hooks are added
        model.run_with_cache(**dict(inputs, pixel_values=inputs["pixel_values"][:, :, :16]))
    assert _clean(model)

    def boom(x, hook):
        raise RuntimeError("boom")

    model.add_hook("blocks.2.hook_resid_post", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    model.reset_hooks()
    assert _clean(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), base)


def test_exception_in_knockout_leaves_no_hooks(setup):
    from hooked_vlm.analyses.narrow_gate import knockout_table

    model, inputs, base = setup

    calls = []

    def bad_metric(logits):
        calls.append(1)
        if len(calls) > 1:  # the baseline succeeds, the first knockout batch fails
            raise RuntimeError("metric failed")
        return _metric(logits)

    with pytest.raises(RuntimeError, match="metric failed"):
        knockout_table(model, inputs, bad_metric, progress=False)
    assert _clean(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), base)


# ------------------------------------------------------------------------------------------ two models
def test_two_models_do_not_interfere(setup):
    model, inputs, base = setup
    other = HookedVLM.from_hf(tiny_llava(seed=1))
    with torch.no_grad():
        other_base = other(**inputs)
    fired = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: fired.append("a") or torch.zeros_like(x))]):
        with torch.no_grad():
            assert torch.equal(other(**inputs), other_base)
        assert fired == []
    with model.bind_inputs(pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"]):
        assert other._bound == {}
        with pytest.raises(ValueError, match="no pixel_values"):
            other(inputs["input_ids"])  # other's forward does not see model's bound image
        with torch.no_grad():
            assert torch.equal(model(inputs["input_ids"]), base)
    qwen = HookedVLM.from_hf(tiny_qwen_vl())
    q_inputs = qwen_inputs([[(16, 16)]])
    with torch.no_grad():
        q_base = qwen(**q_inputs)
        with model.hooks(fwd_hooks=[(lambda n: True, lambda x, hook: fired.append(hook.name))]):
            assert torch.equal(qwen(**q_inputs), q_base)
    assert fired == [] and _clean(model) and _clean(other) and _clean(qwen)
    with torch.no_grad():
        assert torch.equal(model(**inputs), base)


def test_copies_do_not_share_hooks(setup):
    model, inputs, base = setup
    twin = copy.deepcopy(model)
    fired = []
    twin.add_hook("blocks.0.hook_resid_pre", lambda x, hook: fired.append(1))
    with torch.no_grad():
        assert torch.equal(model(**inputs), base)
    assert fired == []
    twin.reset_hooks()


# ------------------------------------------------------------------------------------- module-level state
def _snapshot():
    import hooked_vlm.analyses  # noqa: F401  (analyses modules are covered too, once imported)

    out = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith(("hooked_vlm", "analyses")) or not isinstance(mod, types.ModuleType):
            continue
        for k, v in vars(mod).items():
            if k.startswith("__") or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                continue
            if not type(v).__module__.startswith(("builtins", "torch", "hooked_vlm", "analyses", "__future__")):
                continue  # third-party objects imported by name (e.g. transformers' ACT2FN) are not ours
            try:
                out[(name, k)] = copy.deepcopy(v)
            except Exception:  # noqa: BLE001  (un-copyable objects: compare by repr)
                out[(name, k)] = repr(v)
    return out


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is not type(b):
        return False
    if hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:  # plain objects (families...): their attributes
        return _same(vars(a), vars(b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return repr(a) == repr(b)


def test_forward_mutates_no_module_state(setup):
    from hooked_vlm.analyses.patching import patch_by_layer

    import hooked_vlm.families as fam

    model, inputs, _ = setup
    families_before = {k: dict(vars(v)) for k, v in fam.FAMILIES.items()}  # families are stateless objects
    before = _snapshot()
    with torch.no_grad():
        model(**inputs)
        model.run_with_cache(**inputs)
        model.layout(inputs)
    patch_by_layer(model, inputs, _corrupt(inputs), _metric, layers=[0], progress=False)
    after = _snapshot()
    changed = sorted(k for k in before if k in after and not _same(before[k], after[k]))
    assert changed == [], changed
    assert {k: dict(vars(v)) for k, v in fam.FAMILIES.items()} == families_before


# ----------------------------------------------------------------------------------------- memory guard
def test_cache_guard_refuses_large_request_and_allows_override(setup):
    model, inputs, base = setup
    patterns = lambda n: n.endswith("hook_pattern")  # noqa: E731
    estimate = model.estimate_cache_bytes(inputs, patterns)
    _, cache = model.run_with_cache(**inputs, names_filter=patterns)
    actual = sum(t.numel() * t.element_size() for t in cache.cache_dict.values())
    assert actual <= estimate <= 1.5 * actual  # an upper bound, and a tight one
    with pytest.raises(ValueError, match=r"run_with_cache: .*GiB.*max_cache_bytes=1000.*names_filter.*device=\"cpu\""):
        model.run_with_cache(**inputs, names_filter=patterns, max_cache_bytes=1000)
    assert _clean(model)  # refused before any hook was added
    logits, cache = model.run_with_cache(**inputs, names_filter=patterns, max_cache_bytes=None)
    assert len(cache.cache_dict) > 0 and torch.allclose(logits, base, atol=1e-5)
    # a narrower request fits the same small limit
    one = model.estimate_cache_bytes(inputs, ["blocks.0.hook_resid_post"])
    _, cache = model.run_with_cache(**inputs, names_filter=["blocks.0.hook_resid_post"], max_cache_bytes=one)
    assert list(cache.cache_dict) == ["blocks.0.hook_resid_post"]
    # the instance default applies to every call (e.g. analyses that call run_with_cache themselves)
    model.max_cache_bytes = 1000
    try:
        with pytest.raises(ValueError, match="max_cache_bytes=1000"):
            model.run_with_cache(**inputs)
    finally:
        del model.max_cache_bytes
    assert model.max_cache_bytes == 8 * 2**30


def test_cache_guard_estimates_scale_with_pos_squared(setup):
    model, inputs, _ = setup
    patterns = lambda n: n.endswith("hook_pattern") and not n.startswith("vision")  # noqa: E731
    ids = inputs["input_ids"]
    small = model.estimate_cache_bytes({"input_ids": ids}, patterns)
    big = model.estimate_cache_bytes({"input_ids": ids.repeat(1, 4)}, patterns)
    assert big == 16 * small
    # a 7B-like request is refused by the default limit before anything runs
    cfg = model.cfg
    assert (2 * cfg.n_heads * 4096**2 * 32 * 4) > 8 * 2**30


def test_sweep_twice_does_not_grow_peak_rss(setup):
    from hooked_vlm.analyses.patching import patch_resid_by_layer_and_position

    model, inputs, _ = setup
    args = (model, inputs, _corrupt(inputs), _metric)
    patch_resid_by_layer_and_position(*args, layers=[0, 1], progress=False)
    first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(2):
        patch_resid_by_layer_and_position(*args, layers=[0, 1], progress=False)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - first) / 1024
    assert grown_mb < 50, grown_mb


# ---------------------------------------------------------------------------------------------- numerics
def test_seeded_sweeps_are_deterministic(setup):
    from hooked_vlm.analyses.narrow_gate import knockout_table
    from hooked_vlm.analyses.patching import patch_heads, patch_resid_by_layer_and_position

    model, inputs, _ = setup
    corrupt = _corrupt(inputs)
    a = patch_resid_by_layer_and_position(model, inputs, corrupt, _metric, layers=[0, 2], batch_size=3, progress=False,
                                          per_prompt=True)
    b = patch_resid_by_layer_and_position(model, inputs, corrupt, _metric, layers=[0, 2], batch_size=3, progress=False,
                                          per_prompt=True)
    assert torch.equal(a.scores.nan_to_num(-1), b.scores.nan_to_num(-1)) and torch.equal(a.clean, b.clean)
    h1 = patch_heads(model, inputs, corrupt, _metric, progress=False)
    h2 = patch_heads(model, inputs, corrupt, _metric, progress=False)
    assert torch.equal(h1.scores, h2.scores)
    t1 = knockout_table(model, inputs, _metric, seed=3, per_prompt=True, progress=False)
    torch.manual_seed(123)  # the global RNG does not matter: the sweep's own seed does
    t2 = knockout_table(model, inputs, _metric, seed=3, per_prompt=True, progress=False)
    assert t1.labels["condition"] == t2.labels["condition"] and torch.equal(t1.scores, t2.scores)
    assert torch.equal(t1.clean, t2.clean)
