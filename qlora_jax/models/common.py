"""Building blocks shared by the model families: norms, RoPE, masks, KV cache, remat, quant sites.

Shape names: B batch, T query tokens, S key/value slots, D model, H heads,
G key/value heads, K head dim, F MLP, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.lora.plan import ModuleSite
from qlora_jax.models import segments
from qlora_jax.quant.config import QuantConfig

Path = tuple[str, ...]
REMAT_MODES = ("none", "full", "dots_saveable", "offload", "qkv", "attention", "full_offload")
#: ``checkpoint_name`` of a decoder layer's input (``remat="full_offload"`` keeps it on the host).
LAYER_INPUT = "layer_input"
#: Compute / float parameter dtypes a model is built with, by their config names.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
#: ``checkpoint_name`` tags the attention block puts on its post-RoPE projections.
QKV_NAMES = ("attn_q", "attn_k", "attn_v")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")


# -- normalisation ---------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm as transformers computes it: float32 statistics, ``weight * x.to(input dtype)``.

    Param ``scale`` ``[D]`` (Hugging Face ``weight``; logical axes ``axes``), initialised to ones.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axes: tuple[Optional[str], ...] = ("norm",)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 self.axes),
                           (x.shape[-1],), self.param_dtype)
        in_dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.epsilon)
        h = h.astype(in_dtype)
        out_dtype = self.dtype or jnp.promote_types(scale.dtype, in_dtype)
        return (scale.astype(out_dtype) * h.astype(out_dtype))


class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics (``scale`` and ``bias`` ``[D]``, HF weight/bias; logical
    axes ``axes``)."""

    epsilon: float = 1e-12
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axes: tuple[Optional[str], ...] = ("norm",)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 self.axes), (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               self.axes), (d,), self.param_dtype)
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.epsilon)
        h = h * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return h.astype(self.dtype or x.dtype)


# -- rotary position embeddings --------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
    """RoPE frequencies of a config (``rope_parameters`` / legacy ``rope_scaling``).

    Attributes:
      inv_freq: float32 ``[K/2]`` (for "dynamic": the unscaled frequencies).
      attention_factor: multiplies cos and sin ("yarn"; 1 otherwise).
      dynamic: (factor, max_position_embeddings) for "dynamic" NTK scaling, which
        rescales the base from the longest position in the call, as transformers does.
      theta: the base; dim: rotary dims.
    """

    inv_freq: tuple[float, ...]
    attention_factor: float = 1.0
    dynamic: Optional[tuple[float, int]] = None
    theta: float = 10000.0
    dim: int = 0


def make_rope(head_dim: int, theta: float, scaling: Mapping[str, Any],
              max_position_embeddings: int) -> Rope:
    """RoPE inverse frequencies as transformers computes them for each ``rope_type``.

    Raises:
      ValueError: an unsupported ``rope_type`` (named, with the supported ones).
    """
    scaling = dict(scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by qlora_jax's Llama family")
    dim = head_dim
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base_pow = np.power(np.float32(theta), exps, dtype=np.float32)
    inv = (np.float32(1.0) / base_pow).astype(np.float32)
    factor_attn = 1.0
    dynamic = None
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv = (inv / np.float32(scaling["factor"])).astype(np.float32)
    elif rope_type == "dynamic":
        dynamic = (float(scaling["factor"]), int(max_position_embeddings))
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        inv32 = inv.astype(np.float32)
        wavelen = (np.float32(2 * math.pi) / inv32).astype(np.float32)
        inv_l = np.where(wavelen > low_wl, inv32 / np.float32(factor), inv32).astype(np.float32)
        smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low))
        smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    elif rope_type == "yarn":
        inv, factor_attn = _yarn(dim, float(theta), scaling, max_position_embeddings)
    else:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    return Rope(tuple(float(x) for x in inv), float(factor_attn), dynamic, float(theta), dim)


def _yarn(dim: int, base: float, p: Mapping[str, Any], max_pos: int) -> tuple[np.ndarray, float]:
    factor = p.get("factor")
    orig = int(p["original_max_position_embeddings"])
    if factor is None:
        factor = max_pos / orig
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim),
                         dtype=np.float32)
    extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
    inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) /
                   np.float32(high - low), 0, 1).astype(np.float32)
    ef = (1 - ramp).astype(np.float32)
    return (inter * (1 - ef) + extra * ef).astype(np.float32), float(attn)


def rope_cos_sin(rope: Rope, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, T, K]`` for integer positions ``[B, T]`` (float32 math, cast to dtype)."""
    inv = jnp.asarray(np.asarray(rope.inv_freq, np.float32))
    if rope.dynamic is not None:
        factor, max_pos = rope.dynamic
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = rope.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (
            rope.dim / (rope.dim - 2))
        exps = jnp.arange(0, rope.dim, 2, dtype=jnp.float32) / rope.dim
        inv = 1.0 / (base ** exps)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb) * rope.attention_factor
    sin = jnp.sin(emb) * rope.attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x ``[B, T, H, K]`` rotated (rotate-half convention of transformers)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


# -- masks and positions ---------------------------------------------------------------------

def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids from a ``[B, S]`` 0/1 mask as transformers' generate computes them.

    ``cumsum(mask) - 1``, with pad slots set to 1 (left padding starts real tokens at 0).
    """
    mask = mask.astype(jnp.int32)
    pos = jnp.cumsum(mask, axis=-1) - 1
    return jnp.where(mask == 0, 1, pos)


def causal_mask(q_slots: jax.Array, kv_valid: jax.Array,
                sliding_window: Optional[int] = None) -> jax.Array:
    """Boolean ``[B, 1, T, S]``: key slot s is visible to query slot t if valid, s <= t (in window)."""
    s = jnp.arange(kv_valid.shape[-1])
    m = s[None, :] <= q_slots[:, None]
    if sliding_window is not None:
        m = m & (q_slots[:, None] - s[None, :] < sliding_window)
    return m[None, None, :, :] & kv_valid.astype(bool)[:, None, None, :]


def attention_impl(impl: str, q: jax.Array, mask: Optional[jax.Array]) -> str:
    """The attention implementation ``"auto"`` resolves to for these inputs.

    cuDNN's fused (flash) attention on GPUs for causal attention without an explicit mask, in
    bf16/f16 with a head dim that is a multiple of 8 up to 128; XLA's dot-product attention
    (which materialises the [B, H, T, S] scores) everywhere else.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention={impl!r} is not supported; use one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    fits = (mask is None and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)
    return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
                          scale: float, impl: str = "auto",
                          segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Softmax attention ``[B, T, H, K] x [B, S, G, K] -> [B, T, H, K]`` (GQA: H a multiple of G).

    Causal when ``mask`` is None, else ``mask`` (bool ``[B, 1, T, S]``) says what is visible.
    ``impl``: ``"auto"`` (see ``attention_impl``), ``"xla"`` or ``"cudnn"`` (causal, no mask).
    With ``segment_ids`` (``[B, T]``; the model chose the fused path, see
    ``models.segments.segment_attention_impl``) the Pallas kernel attends causally within
    segments (interpret mode off GPUs).
    """
    if segment_ids is not None:
        return segments.fused_segment_attention(q, k, v, segment_ids, scale,
                                                interpret=jax.default_backend() != "gpu")
    if impl == "pallas":
        raise ValueError("attention='pallas' is the packed-row (segment_ids) kernel; without "
                         "segment_ids use 'auto', 'xla' or 'cudnn'")
    impl = attention_impl(impl, q, mask)
    if impl == "cudnn" and mask is not None:
        raise ValueError("attention='cudnn' supports causal attention without an explicit mask "
                         "(no padding mask, sliding window or KV cache); use 'auto' or 'xla'")
    kw = {"is_causal": True} if mask is None else {"mask": mask}
    return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                        implementation="cudnn" if impl == "cudnn" else "xla",
                                        **kw)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding.

    Attributes:
      k, v: ``[L, B, S, G, K]`` in the compute dtype.
      valid: bool ``[B, S]``: slots holding real (non-pad) tokens so far.
      index: int32 scalar: the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype: Any) -> "KVCache":
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))



class LayerKV(NamedTuple):
    """Layer ``layer`` of the stacked caches ``k``, ``v`` ``[L, B, S, G, K]``, as the cached layer
    loop hands it to a decoder layer: the layer writes its new keys and values into the stacks
    where they lie (``write_kv``), so a decoded token copies no cache."""

    k: jax.Array
    v: jax.Array
    layer: jax.Array


def write_kv(cache_kv: Any, k: jax.Array, v: jax.Array, index: jax.Array
             ) -> tuple[Any, jax.Array, jax.Array]:
    """Writes the new keys/values ``[B, T, G, K]`` at slot ``index`` of one layer's cache.

    ``cache_kv``: a ``LayerKV`` (updated in place in its stacks) or a ``(k, v)`` pair of one
    layer ``[B, S, G, K]``. Returns the updated cache (same form) and that layer's keys and
    values ``[B, S, G, K]`` (cache dtype) for attention.
    """
    if isinstance(cache_kv, LayerKV):
        at = (cache_kv.layer, 0, index, 0, 0)
        ck = jax.lax.dynamic_update_slice(cache_kv.k, k[None].astype(cache_kv.k.dtype), at)
        cv = jax.lax.dynamic_update_slice(cache_kv.v, v[None].astype(cache_kv.v.dtype), at)
        read = [jax.lax.dynamic_index_in_dim(a, cache_kv.layer, keepdims=False) for a in (ck, cv)]
        return LayerKV(ck, cv, cache_kv.layer), read[0], read[1]
    ck, cv = cache_kv
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
    return (ck, cv), ck, cv

# -- remat -----------------------------------------------------------------------------------

def _save_attention_forward(prim: Any, *_: Any, **__: Any) -> bool:
    """Saves the outputs of a fused (cuDNN) attention forward: its output and softmax stats."""
    return "dot_product_attention_fwd" in getattr(prim, "name", "")


def remat_policy(mode: str) -> Optional[Callable[..., bool]]:
    """The ``jax.checkpoint`` policy of a remat mode (None: save nothing, recompute all).

    ``"qkv"`` keeps each layer's post-RoPE queries, keys and values (``[B, T, (H + 2G) K]``
    a layer) so the backward pass does not recompute their projections; ``"attention"`` also
    keeps the fused attention's output and softmax statistics (``[B, T, H K]`` + ``[B, H, T]``),
    so the attention forward is not run again either (XLA attention: only q, k, v are kept).
    ``"full_offload"`` is ``"full"`` with each layer's input (``LAYER_INPUT``, the residual
    stream, ``[B, T, D]`` a layer) kept in pinned host memory instead of on the device: XLA
    copies it out after the layer's forward and back before its backward.
    """
    if mode == "full":
        return None
    names = jax.checkpoint_policies.save_only_these_names(*QKV_NAMES)
    if mode == "qkv":
        return names
    if mode == "attention":
        return jax.checkpoint_policies.save_from_both_policies(names, _save_attention_forward)
    if mode == "dots_saveable":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if mode == "offload":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    if mode == "full_offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"remat={mode!r} is not supported; use one of {REMAT_MODES}")


def maybe_remat(layer_cls: type, mode: str) -> type:
    """Wraps a layer class with ``nn.remat`` for ``mode`` (``"none"``: unchanged)."""
    if mode not in REMAT_MODES:
        raise ValueError(f"remat={mode!r} is not supported; use one of {REMAT_MODES}")
    if mode == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=remat_policy(mode), prevent_cse=False)


# -- quantized sites -------------------------------------------------------------------------

def quantized_paths(quant: Optional[QuantConfig], sites: Sequence[ModuleSite]) -> tuple[Path, ...]:
    """Flax paths of the linear modules ``quant`` applies to (``QuantConfig.skips`` respected).

    Raises:
      ValueError: a skip pattern treats the stacked layers of one module differently.
    """
    if quant is None:
        return ()
    out = []
    for site in sites:
        if site.kind not in ("linear", "head"):
            continue
        skipped = [quant.skips(n) for n in site.hf_names]
        if any(skipped) and not all(skipped):
            raise ValueError(f"QuantConfig.skip treats the stacked layers of {'.'.join(site.path)} "
                             "differently; skip modules by name, not by layer index")
        if not any(skipped):
            out.append(site.path)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class HFParam:
    """One parameter of a model and the Hugging Face tensor(s) it corresponds to.

    Attributes:
      path: Flax path of the leaf, e.g. ``("model", "layers", "self_attn", "q_proj", "kernel")``.
      key: the Hugging Face key; ``{i}`` stands for the layer index when ``layered``.
      layered: stacked over layers (leading axis L) by ``nn.scan``.
      linear: a Linear weight: stored ``[out, in]`` in the file, ``[in, out]`` here
        (or a QTensor ``[out, in]``).
      optional: may be absent from a checkpoint (freshly initialised then).
      aliases: other keys the tensor may be stored under (e.g. without a ``bert.`` prefix).
    """

    path: Path
    key: str
    layered: bool = False
    linear: bool = False
    optional: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def module_path(self) -> Path:
        return self.path[:-1]

    def keys_for(self, layer: Optional[int]) -> tuple[str, ...]:
        ks = (self.key,) + self.aliases
        return tuple(k.format(i=layer) for k in ks) if layer is not None else ks
