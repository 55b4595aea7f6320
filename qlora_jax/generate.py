"""Text generation with a KV cache: a prefill (in chunks for long prompts), then a jit-compiled
decode step in a while loop.

    out = qj.generate(model, params, input_ids, max_new_tokens=32)             # greedy
    out = qj.generate(model, params, ids, 32, temperature=0.7, top_p=0.9, seed=1,
                      attention_mask=mask, eos_token_id=2)

Prompts of different lengths are left-padded (pad slots have mask 0), as in
transformers. Greedy decoding picks the argmax of the last position's logits,
so it equals the argmax continuation of ``model.apply``. A row stops at its
first EOS; later slots of that row hold ``pad_token_id``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.lora.stack import adapter_count
from qlora_jax.lora.tree import flatten, unflatten

TokenIds = Union[int, Sequence[int], None]


def _token_list(ids: TokenIds) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    return [int(i) for i in ids]


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array,
                  top_p: jax.Array, use_top_p: bool) -> jax.Array:
    """Draws one token a row from ``logits`` ``[B, V]`` at ``temperature`` with nucleus ``top_p``."""
    logits = logits.astype(jnp.float32) / temperature
    if use_top_p:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked higher
        keep_sorted = before < top_p  # the top token always stays
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


#: Bytes the float32 attention scores of one prefill chunk may take (``prefill_chunk_for``).
PREFILL_SCORES_BUDGET = 2 << 30


def prefill_chunk_for(batch: int, heads: int, prompt: int, max_new_tokens: int) -> int:
    """Prompt tokens a prefill step takes (0: the whole prompt at once).

    The cached prefill attends with XLA's attention, whose float32 scores are
    ``[B, H, chunk, S]`` for a cache of S slots: a 32k-token prompt at one row would need
    128 GiB in one piece. The chunk is the largest power of two (at least 64) whose scores
    fit ``PREFILL_SCORES_BUDGET``; prompts within one chunk run whole.
    """
    slots = prompt + max_new_tokens

    def scores(c: int) -> int:
        return batch * heads * c * slots * 4

    if scores(prompt) <= PREFILL_SCORES_BUDGET:
        return 0
    chunk = 64
    while chunk * 2 < prompt and scores(chunk * 2) <= PREFILL_SCORES_BUDGET:
        chunk *= 2
    return chunk if chunk < prompt else 0


def _prefill(model: Any, params: Any, ids: jax.Array, mask: jax.Array, cache: Any,
             extra: dict, chunk: int) -> tuple[jax.Array, Any]:
    """Fills the cache with the prompt; returns the last position's hidden state ``[B, 1, D]``.

    With ``chunk`` (which divides the prompt length: ``generate`` left-pads it with masked
    slots to whole chunks), the prompt runs ``chunk`` tokens a step in a scan, each step
    attending to the cache written so far: the same attention, in pieces. Only the last
    position's hidden state is kept (the prompt's logits are never built).
    """
    if not chunk:
        hidden, cache = model.apply({"params": params}, ids, mask, cache=cache,
                                    return_hidden=True, **extra)
        return hidden[:, -1:], cache
    b, t = ids.shape
    n = t // chunk

    def step(cache, xs):
        ids_c, mask_c = xs
        hidden, cache = model.apply({"params": params}, ids_c, mask_c, cache=cache,
                                    return_hidden=True, **extra)
        return cache, hidden[:, -1]

    steps = [a.reshape(b, n, chunk).transpose(1, 0, 2) for a in (ids, mask)]  # [n, B, chunk]
    cache, last = jax.lax.scan(step, cache, tuple(steps))
    return last[-1][:, None], cache


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sample", "use_top_p",
                                             "prefill_chunk"))
def _generate(model: Any, params: Any, ids: jax.Array, mask: jax.Array, key: jax.Array,
              temperature: jax.Array, top_p: jax.Array, eos: jax.Array, pad: jax.Array,
              adapter_index: Optional[jax.Array], *,
              max_new_tokens: int, sample: bool, use_top_p: bool,
              prefill_chunk: int = 0) -> jax.Array:
    b, t = ids.shape
    params = adapters_in_compute_dtype(model, params)
    extra = {} if adapter_index is None else {"adapter_index": adapter_index}
    cache = model.init_cache(b, t + max_new_tokens)
    # Only the last position goes through the head: the whole prompt's logits, [B, T, V],
    # would be 34 GB at 32 rows of 2,048 tokens and a 128k vocabulary.
    hidden, cache = _prefill(model, params, ids, mask, cache, extra, prefill_chunk)
    logits = model.apply({"params": params}, None, hidden=hidden, **extra)
    out = jnp.full((b, max_new_tokens), pad, ids.dtype)
    done = jnp.zeros((b,), bool)

    def choose(step_logits, k):
        if sample:
            return sample_logits(step_logits, k, temperature, top_p, use_top_p)
        return jnp.argmax(step_logits, axis=-1)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, last, cache, out, done, k = state
        k, sub = jax.random.split(k)
        tok = choose(last, sub).astype(ids.dtype)
        tok = jnp.where(done, pad, tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
        step_logits, cache = model.apply({"params": params}, tok[:, None],
                                         jnp.ones((b, 1), mask.dtype), cache=cache, **extra)
        return i + 1, step_logits[:, -1], cache, out, done, k

    state = (jnp.zeros((), jnp.int32), logits[:, -1], cache, out, done, key)
    out = jax.lax.while_loop(cond, body, state)[3]
    return jnp.concatenate([ids, out], axis=1)


def adapters_in_compute_dtype(model: Any, params: Any) -> Any:
    """``params`` with the LoRA matrices cast once to the model's compute dtype.

    ``LoraDense`` casts its adapters to the compute dtype at every call (float32 adapters in a
    bfloat16 model); inside the decode loop that is a convert kernel per projection and layer
    a token, which XLA cannot hoist out of the layer loop. The values are the same. DoRA
    modules keep theirs (their weight norm reads the stored values).
    """
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        return params
    flat = flatten(params)
    dora = {p[:-1] for p in flat if p[-1] == "lora_magnitude"}

    def cast(path, v):
        if (path[-1] in ("lora_a", "lora_b") and path[:-1] not in dora
                and isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating)
                and v.dtype != dtype):
            return v.astype(dtype)
        return v

    return unflatten({p: cast(p, v) for p, v in flat.items()})


def generate(model: Any, params: Any, input_ids: Any, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             attention_mask: Optional[Any] = None, eos_token_id: TokenIds = None,
             pad_token_id: Optional[int] = None, adapter_index: Optional[Any] = None,
             prefill_chunk: Optional[int] = None, pad_to_multiple_of: int = 64) -> jax.Array:
    """Decodes ``max_new_tokens`` tokens after each (left-padded) prompt.

    Args:
      model, params: a causal LM (``init_cache`` and ``cache=`` support) and its params.
      input_ids: ``[B, T]`` int prompt ids, left-padded.
      max_new_tokens: tokens to add.
      temperature: 0 for greedy decoding; > 0 samples from ``softmax(logits / temperature)``.
      top_p: nucleus sampling mass (1.0: off); used only when sampling.
      seed: seed of the sampling key.
      attention_mask: ``[B, T]`` 1 for tokens, 0 for left padding (default: all ones).
      eos_token_id: id or ids that end a row (default: every end id the checkpoint names:
        config.json's eos_token_id, an id or a list, and generation_config.json's).
      pad_token_id: fills a row after its EOS (default: config pad, else the first EOS, else 0).
      adapter_index: int ``[B]``: row b decodes with adapter ``adapter_index[b]`` of params made
        by ``qj.lora.stack_adapters`` (required for such params, refused for others). Params
        of other adapters with the same shapes reuse the compiled program.
      prefill_chunk: prompt tokens a prefill step (0: the whole prompt at once; default: whole
        prompts unless the attention scores of one step would pass 2 GiB, see
        ``prefill_chunk_for``: long prompts are prefilled in pieces).
      pad_to_multiple_of: prompts are left-padded (masked slots) to a multiple of this many
        tokens before compiling, so prompts of nearby lengths share one compiled program (an
        8B model compiles for seconds); 1: exact lengths. The tokens are the same.

    Returns:
      ``[B, T + max_new_tokens]``: the prompts followed by the generated tokens.

    Raises:
      ValueError: bad arguments, or right-padded prompts.
    """
    if not hasattr(model, "init_cache"):
        raise ValueError(f"{type(model).__name__} is not a causal LM; generate needs one")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk is not None and prefill_chunk < 0:
        raise ValueError(f"prefill_chunk must be >= 0 (0: the whole prompt), got {prefill_chunk}")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an int array [B, T], got {ids.dtype}{ids.shape}")
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(
        attention_mask).astype(jnp.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
    if not bool(jnp.all(mask[:, -1] == 1)):
        raise ValueError("generate expects left-padded prompts: every row's last token must be "
                         "real (attention_mask[:, -1] == 1)")
    cfg = model.config
    eos = _token_list(eos_token_id if eos_token_id is not None else
                      getattr(cfg, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    eos_arr = jnp.asarray(eos if eos else [-1], ids.dtype)
    sample = temperature > 0
    index = _adapter_index(model, params, adapter_index, ids.shape[0])
    # One left pad of masked slots: to a multiple of pad_to_multiple_of (a shared compile) and
    # of the prefill chunk (whole chunks).
    b, t0 = ids.shape
    t = t0 - t0 % -pad_to_multiple_of
    if prefill_chunk is None:
        prefill_chunk = prefill_chunk_for(b, getattr(cfg, "num_attention_heads", 1), t,
                                          int(max_new_tokens))
    chunk = int(prefill_chunk) if prefill_chunk < t else 0
    lead = -t0 % (math.lcm(pad_to_multiple_of, chunk) if chunk else pad_to_multiple_of)
    out = _generate(model, params, jnp.pad(ids, ((0, 0), (lead, 0))),
                    jnp.pad(mask, ((0, 0), (lead, 0))), jax.random.PRNGKey(seed),
                    jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), eos_arr,
                    jnp.asarray(pad_token_id, ids.dtype), index, max_new_tokens=int(max_new_tokens),
                    sample=sample, use_top_p=bool(sample and top_p < 1.0), prefill_chunk=chunk)
    return out[:, lead:] if lead else out


def _adapter_index(model: Any, params: Any, adapter_index: Optional[Any],
                   batch: int) -> Optional[jax.Array]:
    """Checks ``adapter_index`` against the params' stacked adapters; int32 ``[B]`` or None."""
    n = adapter_count(params, _plain_shapes(model))
    if adapter_index is None:
        if n:
            raise ValueError(f"params hold {n} stacked adapters (qj.lora.stack_adapters): pass "
                             "adapter_index, an int [B] naming each row's adapter")
        return None
    if not n:
        raise ValueError("adapter_index given, but the params hold one adapter set; stack several "
                         "with qj.lora.stack_adapters([params_a, params_b, ...])")
    idx = np.asarray(adapter_index)
    if idx.shape != (batch,) or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"adapter_index must be int [B] = [{batch}], got {idx.dtype}{list(idx.shape)}")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"adapter_index values must lie in [0, {n}), got {idx.tolist()}")
    return jnp.asarray(idx, jnp.int32)


@functools.lru_cache(maxsize=16)
def _plain_shapes(model: Any) -> Any:
    """The params shapes of ``model`` with one adapter set (abstract: nothing is allocated)."""
    dummy = model.dummy_inputs() if hasattr(model, "dummy_inputs") else (
        jnp.ones((1, 2), jnp.int32),)
    return jax.eval_shape(model.init, jax.random.key(0), *dummy)["params"]
