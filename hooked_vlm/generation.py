"""Text generation with a KV cache, with hooks live while generating (`HookedVLM.generate`).

The loop: one **prefill** forward over the prompt (vision tower, merge, every prompt position) that stores each
decoder block's rotated keys and values, then one **decode** forward per new token that runs the decoder blocks on
that token only, attending to the stored keys and values. Greedy output equals HF's greedy `generate` token for
token (tested on every family, left-padded batches, two images in a prompt).

Positions follow HF's `generate`: positions count real tokens only (left pads get 0), so a left-padded prompt
gets the positions it would have alone; each new token sits at (the prompt's largest position) + 1 + step, on all
three M-RoPE axes for Qwen2-VL / Qwen2.5-VL (HF's `rope_deltas`).

Hooks in decode steps see only the new token: the position axis of a [batch, pos, ...] hook has length 1, an
attention pattern is [batch, head, 1, keys] with keys = every position so far. A hook that edits a position set
must therefore know which absolute positions the current forward holds: `current_step()` says so, and the
builders `knockout_attention` and `steer` use it, so one hook list does the same edit in the prefill, in every
decode step, and in a plain full-sequence forward (`use_cache=False`, `return_cache=True`).

    from hooked_vlm.generation import knockout_attention
    out = model.generate(**inputs, max_new_tokens=8,
                         fwd_hooks=knockout_attention(queries="text", keys="all_image"))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .components.attention import knock_out
from .progress import progress_bar

# per-token image kwargs ([batch, pos], e.g. Qwen's mm_token_type_ids) are extended with this for generated tokens
_TEXT_TOKEN_TYPE = 0


@dataclass
class StepContext:
    """What the generation loop is running now (read it in a hook with `current_step()`).

    phase:      "prefill" (the prompt), "decode" (one new token) or "full" (a forward of the whole sequence so
                far: `use_cache=False` steps and the `return_cache` run).
    step:       index of the token this forward predicts (0 = the first new token).
    positions:  absolute indices [n] (in the padded prompt + generated sequence) of the positions this forward
                holds, i.e. of its position axis; keys of an attention pattern are always 0..n_keys-1.
    prompt_len: length of the (padded) prompt.
    """

    phase: str
    step: int
    positions: Tensor
    prompt_len: int
    max_len: int = 0  # prompt_len + max_new_tokens
    prompt_inputs: dict[str, Any] = field(repr=False, default_factory=dict)
    model: Any = field(repr=False, default=None)
    _memo: dict = field(repr=False, default_factory=dict)  # shared by every step of one generate call

    @property
    def layout(self) -> Any:
        """The prompt's `TokenLayout` (built on first use, once per generate call)."""
        if "layout" not in self._memo:
            self._memo["layout"] = self.model.layout(self.prompt_inputs)
        return self._memo["layout"]


_STACK: list[StepContext] = []


def current_step() -> StepContext | None:
    """The generation step now running, or None outside `generate`."""
    return _STACK[-1] if _STACK else None


@contextlib.contextmanager
def _running(ctx: StepContext) -> Iterator[StepContext]:
    _STACK.append(ctx)
    try:
        yield ctx
    finally:
        _STACK.pop()


# ---------------------------------------------------------------------------------------------- position sets
_NAMED_SETS: dict[str, Callable[[Any], Tensor]] = {
    "text": lambda layout: layout.text_after_image(),  # the prompt's text after its last image (+ every generated token, for queries)
    "all_image": lambda layout: layout.image_positions(),
    "image": lambda layout: layout.image_positions(),
    "end_of_image": lambda layout: layout.end_of_image(),
    "last_image_token": lambda layout: layout.last_image_token(),
    "final_prompt_token": lambda layout: layout.final_token(),
    "prompt": lambda layout: layout.attention_mask.bool(),
    "generated": lambda layout: torch.zeros(layout.shape, dtype=torch.bool),
    "none": lambda layout: torch.zeros(layout.shape, dtype=torch.bool),
}


def _prompt_mask(spec: Any, ctx: StepContext | None) -> Tensor:
    """A position-set spec -> bool [batch, prompt_len] (or [batch, n] as given)."""
    if isinstance(spec, Tensor):
        m = spec.bool().cpu()
        if ctx is not None and m.shape[-1] not in (ctx.prompt_len, ctx.max_len):
            raise ValueError(f"a position mask of length {m.shape[-1]} for a prompt of {ctx.prompt_len} positions "
                             f"(expected [batch, {ctx.prompt_len}] or [{ctx.prompt_len}])")
        return m[None] if m.ndim == 1 else m
    if ctx is None:
        raise ValueError(f"the position set {spec!r} is resolved from the prompt's layout, which exists only inside "
                         "`model.generate` (pass a bool mask [batch, pos] to use the hook in a plain forward)")
    if callable(spec):
        return spec(ctx.layout).bool().cpu()
    if not isinstance(spec, str) or spec not in _NAMED_SETS:
        raise ValueError(f"unknown position set {spec!r}; expected one of {sorted(_NAMED_SETS)}, a bool mask or a "
                         "callable layout -> mask")
    return _NAMED_SETS[spec](ctx.layout).bool().cpu()


def _rows_at(spec: Any, generated: bool, n: int, positions: Tensor, ctx: StepContext | None, key: Any) -> Tensor:
    """bool [batch, len(positions)]: the spec's prompt mask, with generated positions (>= its length) set to
    `generated`, read at the absolute `positions`. Memoised per generate call."""
    memo = ctx._memo if ctx is not None else {}
    full = memo.get(key)
    if full is None or full.shape[1] < n:
        base = _prompt_mask(spec, ctx)
        extra = max(n, base.shape[1], ctx.max_len if ctx is not None else 0) - base.shape[1]
        full = torch.cat([base, torch.full((base.shape[0], extra), generated, dtype=torch.bool)], dim=1)
        memo[key] = full
    return full[:, positions.cpu()]


def _positions(ctx: StepContext | None, n: int) -> Tensor:
    return ctx.positions if ctx is not None else torch.arange(n)


def _layer_names(kind: str, layers: int | Sequence[int] | None) -> Any:
    if layers is None:
        return lambda name: name.startswith("blocks.") and name.endswith(kind)
    return [f"blocks.{l}.{kind}" for l in ([layers] if isinstance(layers, int) else layers)]


def knockout_attention(
    queries: Any = "text", keys: Any = "all_image", *, layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None, renormalize: bool = False, generated_queries: bool = True,
) -> list[tuple[Any, Callable]]:
    """Forward hooks that knock out attention from `queries` to `keys` in the decoder, in the prefill, in every
    decode step and in full-sequence forwards alike (the narrow-gate knockout of arXiv 2412.06646).

    queries, keys: a named set ("text": the prompt's text after its last image; "all_image"; "end_of_image";
                   "last_image_token"; "final_prompt_token"; "prompt"; "generated"; "none"), a bool mask over the
                   prompt [batch, prompt_len] (or [prompt_len]), or a callable TokenLayout -> mask.
    generated_queries: generated tokens are queries too (default True); generated tokens are never keys.
    layers, heads: default every decoder layer and head.
    renormalize:   False (the paper's protocol): zero the post-softmax weights (`hook_pattern`), the rest keep
                   their values. True: mask the scores (`hook_attn_scores`) so the softmax renormalises.
    Named sets need `model.generate` (they are read from the prompt's layout there); masks also work in a plain
    forward, where the position axis is the mask's own.
    """
    kind = "attn.hook_attn_scores" if renormalize else "attn.hook_pattern"
    head_list = None if heads is None else [int(h) for h in ([heads] if isinstance(heads, int) else heads)]
    q_key, k_key = ("q", id(queries), object()), ("k", id(keys), object())

    def fn(pattern: Tensor, hook: Any = None) -> Tensor:
        ctx = current_step()
        b, n_heads, nq, nk = pattern.shape
        q = _rows_at(queries, generated_queries, nk, _positions(ctx, nq), ctx, q_key)
        k = _rows_at(keys, False, nk, torch.arange(nk), ctx, k_key)
        if q.shape[0] != b or k.shape[0] != b:
            q, k = q.expand(b, -1) if q.shape[0] == 1 else q, k.expand(b, -1) if k.shape[0] == 1 else k
            if q.shape[0] != b or k.shape[0] != b:
                raise ValueError(f"knockout masks for batch {q.shape[0]}/{k.shape[0]} do not fit a run of batch {b}")
        return knock_out(pattern, q, k, head_list, renormalize)

    return [(_layer_names(kind, layers), fn)]


def steer(
    hooks: str | Sequence[str], positions: Any, vectors: Tensor | dict[str, Tensor], *, mode: str = "add",
    generated: bool = False,
) -> list[tuple[str, Callable]]:
    """Forward hooks that add (`mode="add"`) or write (`mode="set"`) a vector at a position set of [batch, pos,
    d] activations (e.g. "blocks.{l}.hook_resid_pre"), wherever those positions are in the forward: in the prefill
    for prompt positions, in the decode step of a generated one.

    hooks:     hook names (no templates).
    positions: a named set, a bool mask over the prompt or a callable, as in `knockout_attention`;
               `generated=True` adds every generated token to the set (e.g. steer all of a caption).
    vectors:   [d] or [batch, d] (one per prompt), or {hook name: such a tensor}.
    """
    if mode not in ("add", "set"):
        raise ValueError(f"steer: mode must be 'add' or 'set', got {mode!r}")
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    key = ("p", id(positions), object())

    def make(name: str) -> Callable:
        vec = vectors[name] if isinstance(vectors, dict) else vectors

        def fn(act: Tensor, hook: Any = None) -> Tensor:
            ctx = current_step()
            b, p = act.shape[:2]
            m = _rows_at(positions, generated, int(_positions(ctx, p).max()) + 1, _positions(ctx, p), ctx, key)
            if not m.any():
                return act
            v = vec.to(act.device, act.dtype)
            v = v[None, None] if v.ndim == 1 else v[:, None]
            m = m.expand(b, -1) if m.shape[0] == 1 else m
            m = m.to(act.device)[..., None]
            return torch.where(m, act + v if mode == "add" else v.expand_as(act), act)

        return fn

    return [(name, make(name)) for name in names]


# ------------------------------------------------------------------------------------------------ sampling
def next_token(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> Tensor:
    """Token ids [batch] from last-position logits [batch, vocab] (float32): argmax, or a sample after HF's
    warpers in HF's order (temperature, top-k, top-p)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        ordered, index = torch.sort(logits, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(-1, index, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _check_sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_k: Any, top_p: Any) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature: expected > 0 when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k: expected an int >= 0, got {top_k!r}")


# ---------------------------------------------------------------------------------------------------- the loop
class GenerationMixin:
    """`generate` for HookedVLM (kept apart from model.py)."""

    def generation_positions(self, input_ids: Tensor, attention_mask: Tensor, **image_inputs: Any) -> Tensor:
        """Prompt positions as HF's `generate` computes them: real tokens counted from 0 (left pads get 0);
        M-RoPE families with images take the family's 3-D positions (which skip pads the same way)."""
        text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        if self.cfg.mrope_section is None:
            return text
        if image_inputs.get("pixel_values") is not None:
            plan = self.family.plan(self, input_ids, **image_inputs)
            return self.family.position_ids(self, input_ids, attention_mask, plan).to(text.device)
        return text[None].expand(3, *text.shape)

    @torch.no_grad()
    def generate(
        self, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None, *, max_new_tokens: int = 20,
        do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
        stop_strings: str | Sequence[str] | None = None, seed: int | None = None, fwd_hooks: Sequence[Any] = (),
        return_cache: bool = False, use_cache: bool = True, progress: bool | None = None, **image_inputs: Any,
    ) -> Tensor | tuple[Tensor, Any]:
        """Generate up to `max_new_tokens` tokens after each prompt. Returns token ids [batch, prompt + new], as
        HF's `generate`: rows stop independently (at an `eos_token_id`, or when the new text contains one of
        `stop_strings`) and are filled with `pad_token_id` after that; generation ends when every row has
        stopped or after `max_new_tokens`. Greedy unless `do_sample` (temperature, then top_k, then top_p, as
        HF); `seed` makes sampling reproducible without touching the global RNG.

        Inputs are the processor's (input_ids, attention_mask, pixel_values, ...; left padding). Defaults:
        eos_token_id = the tokenizer's eos (none if it has none), pad_token_id = the tokenizer's pad, else eos[0].

        Hooks are live: those already on the model (`with model.hooks(...)`) and `fwd_hooks` (added for this
        call only). With the KV cache (default) the prompt runs once (the prefill: every hook sees the prompt,
        vision hooks included) and each new token runs alone (decode steps: a [batch, pos, ...] hook sees pos
        length 1, `hook_pattern` is [batch, head, 1, keys]); `current_step()` gives the absolute positions of
        the forward a hook is in, and `knockout_attention` / `steer` build hooks that edit a position set right
        in every step. `use_cache=False` recomputes the whole sequence, images included, at every step.

        return_cache=True: also return the ActivationCache of one forward (`run_with_cache`, same hooks) over
        the prompt + generated tokens with the prompt's images: (tokens, cache). Note that positions count real
        tokens only (HF generate's convention), so that forward passes `position_ids`.
        progress: a tqdm bar (default: on for max_new_tokens >= 64; `set_progress(False)` /
        HOOKED_VLM_PROGRESS=0 silence it).
        """
        _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        position_ids = image_inputs.pop("position_ids", None)
        self._check_kwargs(input_ids, image_inputs)
        device = self.embed.weight.device
        input_ids = input_ids.to(device)
        b, n_prompt = input_ids.shape
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long())
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
        if not bool(mask[:, -1].all()):
            raise ValueError("generate needs left padding (new tokens follow each prompt's last real token): rows "
                             f"{(mask[:, -1] == 0).nonzero().flatten().tolist()} end in padding. Tokenize with "
                             "tokenizer.padding_side = 'left'")
        tok = self.tokenizer
        eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(tok, "eos_token_id", None))
        pad = pad_token_id if pad_token_id is not None else getattr(tok, "pad_token_id", None)
        pad = int(pad if pad is not None else (eos[0] if eos else 0))
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if stops and tok is None:
            raise ValueError("stop_strings need a tokenizer to decode the new tokens: this model has no processor")
        prompt_pos = (self.generation_positions(input_ids, mask, **image_inputs) if position_ids is None
                      else position_ids.to(device))
        total = n_prompt + max_new_tokens
        start = prompt_pos.amax(dim=-1)  # [batch] or [3, batch]: new tokens continue after the largest position
        start = start.amax(dim=0) if start.ndim == 2 else start
        new_pos = start[:, None] + 1 + torch.arange(max_new_tokens, device=device)[None]
        positions = torch.cat([prompt_pos, new_pos.expand(*prompt_pos.shape[:-1], -1)], dim=-1)
        tokens = torch.cat([input_ids, input_ids.new_full((b, max_new_tokens), pad)], dim=1)
        full_mask = torch.cat([mask, mask.new_ones(b, max_new_tokens)], dim=1)
        padded = not bool(mask.all())
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        prompt_inputs = dict(image_inputs, input_ids=input_ids, attention_mask=mask)
        memo: dict = {}

        def ctx(phase: str, step: int, pos: Tensor) -> StepContext:
            return StepContext(phase, step, pos.cpu(), n_prompt, total, prompt_inputs, self, memo)

        def extended(n: int) -> dict[str, Any]:  # image kwargs for a forward over the first n tokens
            out = dict(image_inputs)
            for k, v in image_inputs.items():
                if isinstance(v, Tensor) and v.ndim == 2 and tuple(v.shape) == (b, n_prompt):
                    out[k] = torch.cat([v, v.new_full((b, n - n_prompt), _TEXT_TOKEN_TYPE)], dim=1)
            return out

        def full_forward(n: int, **kw: Any) -> Any:
            return dict(input_ids=tokens[:, :n], attention_mask=full_mask[:, :n], position_ids=positions[..., :n],
                        **extended(n), **kw)

        cache = _KVCache(self, b, total) if use_cache else None
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        show = progress if progress is not None else max_new_tokens >= 64
        bar = progress_bar(total=max_new_tokens, desc="generate", progress=bool(show))
        n_new = 0
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            stack.enter_context(self.hooks(fwd_hooks=list(fwd_hooks)))
            if cache is not None:
                stack.enter_context(cache.capturing())
            for step in range(max_new_tokens):
                cur = n_prompt + step  # index of the token this step predicts
                if cache is None:
                    with _running(ctx("full", step, torch.arange(cur))):
                        logits = self(**full_forward(cur, logits_to_keep=1))[:, -1]
                elif step == 0:
                    with _running(ctx("prefill", 0, torch.arange(n_prompt))):
                        logits = cache.prefill(input_ids, mask, prompt_pos, image_inputs)
                else:
                    with _running(ctx("decode", step, torch.tensor([cur - 1]))):
                        logits = cache.decode(tokens[:, cur - 1 : cur], positions[..., cur - 1 : cur],
                                              full_mask[:, :cur] if padded else None)
                chosen = next_token(logits.float(), do_sample, temperature, top_k, top_p, generator)
                chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
                tokens[:, cur] = chosen
                n_new = step + 1
                bar.update(1)
                if eos:
                    unfinished &= ~torch.isin(chosen, eos_t)
                if stops:
                    for row in unfinished.nonzero().flatten().tolist():
                        text = tok.decode(tokens[row, n_prompt : cur + 1])
                        if any(s in text for s in stops):
                            unfinished[row] = False
                if not unfinished.any():
                    break
            out = tokens[:, : n_prompt + n_new]
            if not return_cache:
                return out
            if cache is not None:
                cache.release()
            n = n_prompt + n_new
            with _running(ctx("full", n_new, torch.arange(n))):
                _, activations = self.run_with_cache(**full_forward(n))
            return out, activations


class _KVCache:
    """Per decoder block, preallocated buffers of rotated keys and values [batch, prompt + new, kv_head, d_head].
    Forward hooks on each block's `hook_rot_k` / `hook_v` (registered after any user hook, so they store what
    user hooks returned) write each forward's new keys/values at the current offset; a decode step attends to
    the buffers' filled prefix (`past`), so per step only the new token runs."""

    def __init__(self, model: Any, batch: int, total: int):
        self.model, self.offset = model, 0
        c = model.cfg
        self.keys, self.values = [], []
        for block in model.blocks:
            w = block.attn.k_proj.weight
            self.keys.append(w.new_empty(batch, total, c.n_key_value_heads, c.d_head))
            self.values.append(w.new_empty(batch, total, c.n_key_value_heads, c.d_head))

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        handles = []
        for l, block in enumerate(self.model.blocks):
            for hp, store in ((block.attn.hook_rot_k, self.keys), (block.attn.hook_v, self.values)):
                handles.append(hp.register_forward_hook(self._writer(store, l)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _writer(self, store: list[Tensor], layer: int) -> Callable:
        def write(module: Any, args: Any, out: Tensor) -> None:
            if not self.keys:  # released: a later forward (return_cache) must not write
                return
            store[layer][:, self.offset : self.offset + out.shape[1]] = out

        return write

    def _run(self, x: Tensor, rotary: Any, mask: Tensor | None, n_past: int, inject: dict[int, Tensor] | None = None
             ) -> Tensor:
        m = self.model
        for l, block in enumerate(m.blocks):
            past = (self.keys[l][:, :n_past], self.values[l][:, :n_past]) if n_past else None
            x = block(x, rotary, mask, past, inject=(inject or {}).get(l))
        return m.unembed(m.ln_final(x[:, -1:].to(m.unembed.weight.device)))[:, -1]

    def prefill(self, input_ids: Tensor, mask: Tensor, positions: Tensor, image_inputs: dict[str, Any]) -> Tensor:
        # DeepStack additions (Qwen3-VL) sit at image positions: the prompt's only; decode steps are text
        x, rotary, additive, inject = self.model.prepare(input_ids, mask, positions, **image_inputs)
        self.offset = 0
        logits = self._run(x, rotary, additive, 0, inject)
        self.offset = input_ids.shape[1]
        return logits

    def decode(self, ids: Tensor, positions: Tensor, mask: Tensor | None) -> Tensor:
        """One token per row; `mask` [batch, keys] (1 = real) when the prompt is padded, else None."""
        m = self.model
        x = m.hook_embed(m.token_embeddings(ids))
        rotary = m.rotaries(positions, x.dtype)
        additive = None
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        logits = self._run(x, rotary, additive, self.offset)
        self.offset += 1
        return logits

    def release(self) -> None:
        self.keys.clear()
        self.values.clear()
