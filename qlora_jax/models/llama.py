"""The Llama family (Llama 1/2/3, Mistral, Qwen2) as a causal LM built from LoraDense layers.

    model = LlamaForCausalLM(LlamaConfig.from_hf(config_json), lora=..., quant=..., dtype=jnp.bfloat16)
    logits = model.apply({"params": params}, input_ids, attention_mask)          # [B, T, V]
    logits, cache = model.apply({"params": params}, ids, mask, cache=cache)      # decoding

``LlamaConfig`` (``models.llama_config``, importable from here too) holds the config.json fields.
Parameters mirror the Hugging Face module names; the L decoder layers are
stacked (one leading axis L on every layer parameter; ``init`` creates them with
``nn.scan``) and every apply runs one loop over them (``LlamaModel._layer_loop``),
so compile time does not grow with depth::

    model/embed_tokens/embedding                       [V, D]
    model/layers/self_attn/{q,k,v,o}_proj/kernel       [L, in, out] (or a QTensor [L, out, in])
    model/layers/self_attn/{q,k,v}_proj/bias           [L, out]  (Qwen2, attention_bias)
    model/layers/mlp/{gate,up,down}_proj/kernel        [L, in, out]
    model/layers/{input,post_attention}_layernorm/scale [L, D]
    model/norm/scale                                   [D]
    lm_head/kernel                                     [D, V]  (absent with tie_word_embeddings)

Adapters appear as ``lora_a`` ``[L, in, R]`` / ``lora_b`` ``[L, R, out]`` beside
the kernels the model's LoraConfig targets.

Model API (stable; the training and generation code relies on it):

- ``__call__(input_ids [B, T] int, attention_mask [B, T] 0/1 or None, deterministic=True,
  position_ids=None, cache=None, segment_ids=None)``: logits ``[B, T, V]`` (compute dtype,
  float32 with ``float32_logits``); with a ``KVCache`` it returns ``(logits, new_cache)``.
  Packed rows: ``segment_ids`` int32 ``[B, T]`` (0 = padding) and ``position_ids`` restarting
  at 0 in each segment; each example's logits equal its logits alone (``models.segments``).
- ``init_cache(batch, max_len)``: an empty KVCache for ``generate``.
- ``hidden_states(input_ids, attention_mask, deterministic, position_ids, segment_ids)``: the final
  normed hidden state ``[B, T, D]``; ``logits_from_hidden(hidden)``: the head alone, so
  ``logits_from_hidden(hidden_states(x)) == __call__(x)`` (chunked losses use the pair).
- ``module_sites()``, ``lora_plan()``, ``hf_params()`` (checkpoint layout).
- ``remat``: ``"none"``, ``"full"``, ``"dots_saveable"``, ``"offload"``, ``"qkv"``,
  ``"attention"`` or ``"full_offload"`` (see ``models.common.remat_policy``; decoder layers
  rematerialised in the backward pass with that ``jax.checkpoint`` policy).
- ``mlp_chunk``: rows longer than this run the MLP blocks in chunks (``models.chunking``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta
from jax.ad_checkpoint import checkpoint_name

from qlora_jax.lora.config import LoraConfig, LoraSpec
from qlora_jax.lora.dense import LoraDense
from qlora_jax.lora.plan import ModuleSite
from qlora_jax.models.base import LoraModelMixin
from qlora_jax.models.segments import (positions_from_segments, segment_attention_impl,
                                       segment_mask)
from qlora_jax.models.chunking import map_chunks
from qlora_jax.models.llama_config import ACTIVATIONS, ARCHITECTURES, LlamaConfig
from qlora_jax.models.common import (HFParam, KVCache, LAYER_INPUT, LayerKV, RMSNorm,
                                     apply_rope, causal_mask, QKV_NAMES, dot_product_attention,
                                     REMAT_MODES, positions_from_mask, quantized_paths,
                                     remat_policy, rope_cos_sin, write_kv)
from qlora_jax.quant import ops as qops
from qlora_jax.quant.config import QuantConfig
from qlora_jax.quant.layer_view import LayerView
from qlora_jax.quant.qtensor import QTensor
from qlora_jax.models.axes import constrain

# Logical layouts of the activations (mapped to mesh axes by qlora_jax.sharding's rules; the
# hints are no-ops without a mesh in context). The batch stays split over the batch axes.
_HIDDEN = ("batch", "length", "act_embed")

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """What every module of a decoder layer needs, in one frozen object.

    Attributes:
      config: the LlamaConfig.
      lora: ``(module name, LoraSpec)`` of the adapted layer modules (``"q_proj"``, ...; the
        names are unique within a Llama layer).
      quant: QuantConfig for ``init`` (loaded QTensors are read as they are).
      quantized: names of the layer modules whose kernels ``quant`` turns into QTensors.
      dtype / param_dtype: compute dtype, dtype of float parameters created by ``init``.
      impl: 4-bit matmul implementation; attention: attention implementation.
      deterministic: no dropout.
    """

    config: LlamaConfig
    lora: tuple[tuple[str, LoraSpec], ...] = ()
    quant: Optional[QuantConfig] = None
    quantized: tuple[str, ...] = ()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"
    deterministic: bool = True
    attention: str = "auto"

    def dense(self, features: int, name: str, bias: bool, axes: tuple[str, str]) -> LoraDense:
        """The layer's linear module ``name`` (created in the calling module's scope); ``axes``:
        the logical axes of its float kernel ``[in, out]``."""
        return LoraDense(features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                         lora=dict(self.lora).get(name),
                         quant=self.quant if name in self.quantized else None,
                         impl=self.impl, kernel_axes=axes, name=name)


class _Attention(nn.Module):
    settings: LayerSettings

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv, index, segment_ids=None, adapter_index=None):
        s = self.settings
        c, det = s.config, s.deterministic
        b, t, _ = x.shape
        h, g, k = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        ai = adapter_index
        q = s.dense(h * k, "q_proj", c.qkv_bias, ("embed", "heads"))(
            x, det, ai).reshape(b, t, h, k)
        kk = s.dense(g * k, "k_proj", c.qkv_bias, ("embed", "kv"))(
            x, det, ai).reshape(b, t, g, k)
        v = s.dense(g * k, "v_proj", c.qkv_bias, ("embed", "kv"))(
            x, det, ai).reshape(b, t, g, k)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        q = constrain(q, ("batch", "length", "heads", None))
        kk, v = (constrain(a, ("batch", "length", "kv", None)) for a in (kk, v))
        q, kk, v = (checkpoint_name(a, n) for a, n in zip((q, kk, v), QKV_NAMES))
        new_cache = None
        if cache_kv is not None:
            new_cache, ck, cv = write_kv(cache_kv, kk, v, index)
            kk, v = ck.astype(q.dtype), cv.astype(q.dtype)
        out = dot_product_attention(q, kk, v, mask, k ** -0.5, s.attention, segment_ids)
        out = constrain(out.reshape(b, t, h * k), ("batch", "length", "heads"))
        return s.dense(c.hidden_size, "o_proj", c.o_bias, ("heads", "embed"))(
            out, det, ai), new_cache


class _MLP(nn.Module):
    settings: LayerSettings

    @nn.compact
    def __call__(self, x, adapter_index=None):
        s = self.settings
        c, det, ai = s.config, s.deterministic, adapter_index
        gate = s.dense(c.intermediate_size, "gate_proj", c.mlp_bias, ("embed", "mlp"))(x, det, ai)
        up = s.dense(c.intermediate_size, "up_proj", c.mlp_bias, ("embed", "mlp"))(x, det, ai)
        act = constrain(ACTIVATIONS[c.hidden_act](gate) * up, ("batch", "length", "mlp"))
        return s.dense(c.hidden_size, "down_proj", c.mlp_bias, ("mlp", "embed"))(act, det, ai)


class LlamaDecoderLayer(nn.Module):
    """One pre-norm decoder layer: ``(h, cache_kv, shared) -> (h, new_cache_kv)``.

    Its two residual blocks are also methods of their own (``attention_block``,
    ``mlp_block``) so the layer loop can run the MLP block in sequence chunks.
    """

    settings: LayerSettings

    def setup(self):
        s = self.settings
        norm = dict(epsilon=s.config.rms_norm_eps, dtype=s.dtype, param_dtype=s.param_dtype)
        self.input_layernorm = RMSNorm(**norm)
        self.self_attn = _Attention(s)
        self.post_attention_layernorm = RMSNorm(**norm)
        self.mlp = _MLP(s)

    def __call__(self, h, cache_kv, shared):
        h, new_cache = self.attention_block(h, cache_kv, shared)
        return self.mlp_block(h, shared[-1]), new_cache

    def attention_block(self, h, cache_kv, shared):
        """``h + attention(norm(h))`` and the layer's new KV cache (or None)."""
        cos, sin, mask, index, segment_ids, adapter_index = shared
        h = constrain(h, _HIDDEN)
        a, new_cache = self.self_attn(self.input_layernorm(h), cos, sin, mask, cache_kv, index,
                                      segment_ids, adapter_index)
        return h + a, new_cache

    def mlp_block(self, h, adapter_index=None):
        """``h + mlp(norm(h))``: position-wise, so any split of the length axis gives the same."""
        h = h + self.mlp(self.post_attention_layernorm(h), adapter_index)
        return constrain(h, _HIDDEN)


class LlamaModel(nn.Module):
    """Embeddings, the decoder layers (one leading axis L on their parameters) and the final
    norm (HF ``model.*``).

    ``init`` creates the stacked layer parameters with ``nn.scan``; every apply (training,
    scoring, cached decoding) runs one explicit loop over the layers, ``_layer_loop``.
    """

    settings: LayerSettings
    remat: str = "none"
    in_place: bool = True
    mlp_chunk: int = 0

    def setup(self):
        s = self.settings
        c = s.config
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat={self.remat!r} is not supported; use one of {REMAT_MODES}")
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=s.dtype,
                                     param_dtype=s.param_dtype,
                                     embedding_init=nn.with_logical_partitioning(
                                         nn.initializers.normal(0.02), ("vocab", "embed")))
        # Only ``init`` calls the scan: it creates the params tree model/layers/... [L, ...].
        self.layers = nn.scan(LlamaDecoderLayer, variable_axes={"params": 0},
                              split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                              length=c.num_hidden_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(s)
        self.norm = RMSNorm(c.rms_norm_eps, dtype=s.dtype, param_dtype=s.param_dtype)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None,
                 adapter_index=None):
        s = self.settings
        c = s.config
        b, t = input_ids.shape
        h = constrain(self.embed_tokens(input_ids), _HIDDEN)
        fused_segments = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for training and scoring; "
                                 "decode with a KV cache one example a row, without them")
            segment_ids = segment_ids.astype(jnp.int32)
            valid = None if attention_mask is None else attention_mask.astype(bool)
            index = jnp.zeros((), jnp.int32)
            if position_ids is None:
                position_ids = positions_from_segments(segment_ids)
            if segment_attention_impl(s.attention, t, c.head_dim, s.dtype or h.dtype,
                                      c.sliding_window) == "pallas":
                mask, fused_segments = None, segment_ids
            else:
                mask = segment_mask(segment_ids, valid, c.sliding_window)
        elif cache is None:
            if attention_mask is None:
                valid = jnp.ones((b, t), bool)
            else:
                valid = attention_mask.astype(bool)
            index = jnp.zeros((), jnp.int32)
            simple = attention_mask is None and position_ids is None and c.sliding_window is None
            mask = None if simple else causal_mask(jnp.arange(t), valid, c.sliding_window)
            full_valid = valid
            slots = jnp.arange(t)
        else:
            index = cache.index
            new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
            full_valid = jax.lax.dynamic_update_slice(cache.valid, new, (0, index))
            slots = index + jnp.arange(t)
            mask = causal_mask(slots, full_valid, c.sliding_window)
        if position_ids is None:
            all_pos = positions_from_mask(full_valid)
            position_ids = jnp.take_along_axis(all_pos, jnp.broadcast_to(slots, (b, t)), axis=1)
        cos, sin = (constrain(a, ("batch", "length", None))
                    for a in rope_cos_sin(c.rope(), position_ids, h.dtype))
        shared = (cos, sin, mask, index, fused_segments, adapter_index)
        caches = None if cache is None else (cache.k, cache.v)
        if self.is_initializing():
            h, new_kv = self.layers(h, caches, shared)
        else:
            h, new_kv = self._layer_loop(h, caches, shared)
        h = constrain(self.norm(h), _HIDDEN)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_kv[0], new_kv[1], full_valid, index + t)
        return h, new_cache

    def attend(self, h):
        return self.embed_tokens.attend(h)

    # -- the layer loop ------------------------------------------------------------------------
    # A ``lax.scan`` over the layers hands each layer its slice of every stacked parameter and
    # of the KV cache. For a 4-bit kernel that feeds a Pallas kernel, XLA would materialise the
    # slice (a device copy of the layer's codes and scales, forward and backward: ~9 ms of a
    # 200 ms llama-8b step on an H100), so a stacked QTensor the kernels can read in place is
    # passed whole (a scan constant) as a ``LayerView`` of layer i instead, and the
    # dequantization kernel reads that layer where it lies. Same parameters, same numbers.

    def _stacked_4bit_in_place(self, layers: dict) -> dict:
        """The stacked QTensors of ``layers`` (flat, unboxed) the loop reads in place: {} with
        ``in_place=False``; else those ``quant.ops.reads_in_place`` accepts (the Pallas kernels;
        stacks too large for int32 offsets or split by a mesh are sliced)."""
        if not self.in_place:
            return {}
        return {k: v for k, v in layers.items()
                if isinstance(v, QTensor) and qops.reads_in_place(v, self.settings.impl)}

    def _layer_loop(self, h, caches, shared):
        """Runs the L layers on ``h``; ``caches`` ``(k, v)`` ``[L, B, S, G, K]`` or None.
        Returns ``(h, new caches or None)``.

        Caches (cached prefill and decoding) ride in the loop's carry and layer i writes its
        new keys/values into them where they lie (``common.LayerKV``), so a decoded token
        copies no cache. Without caches (training, scoring) each layer's input is named
        ``LAYER_INPUT`` (``remat="full_offload"`` keeps it on the host) and rows longer than
        ``mlp_chunk`` run the MLP block in chunks (``models.chunking``).
        """
        s = self.settings
        layer = LlamaDecoderLayer(s, parent=None)
        flat = traverse_util.flatten_dict(self.variables["params"]["layers"])
        qs = self._stacked_4bit_in_place(
            {k: meta.unbox(v) for k, v in flat.items()})
        sliced = {k: v for k, v in flat.items() if k not in qs}
        drop = None
        if not s.deterministic and self.has_rng("dropout"):
            drop = self.make_rng("dropout")
        chunk = self.mlp_chunk if caches is None else 0

        def run_layer(h, kv, params, i):
            params = {**params, **{k: LayerView(q, i) for k, q in qs.items()}}
            variables = {"params": traverse_util.unflatten_dict(params)}
            rngs = {} if drop is None else {"dropout": jax.random.fold_in(drop, i)}
            if not chunk or h.shape[1] <= chunk:
                return layer.apply(variables, h, kv, shared, rngs=rngs)
            h, new_kv = layer.apply(variables, h, kv, shared, rngs=rngs,
                                    method=LlamaDecoderLayer.attention_block)

            def mlp(x, j):
                r = {} if drop is None else {"dropout": jax.random.fold_in(rngs["dropout"], j)}
                return layer.apply(variables, x, shared[-1], rngs=r,
                                   method=LlamaDecoderLayer.mlp_block)

            return map_chunks(mlp, h, chunk), new_kv

        layers = jnp.arange(s.config.num_hidden_layers, dtype=jnp.int32)
        if caches is not None:
            def cached(carry, xs):
                h, ck, cv = carry
                h, kv = run_layer(h, LayerKV(ck, cv, xs[1]), *xs)
                return (h, kv.k, kv.v), None

            (h, ck, cv), _ = jax.lax.scan(cached, (h, *caches), (sliced, layers))
            return h, (ck, cv)

        def body(h, xs):
            h, _ = run_layer(checkpoint_name(h, LAYER_INPUT), None, *xs)
            return h, None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(self.remat), prevent_cse=False)
        return jax.lax.scan(body, h, (sliced, layers))


class LlamaForCausalLM(LoraModelMixin, nn.Module):
    """A Llama-family causal LM (see the module docstring for the API and params tree).

    Attributes:
      config: the LlamaConfig.
      lora: LoraConfig or None (adapters beside the targeted kernels).
      quant: QuantConfig or None: kernels are QTensors (init quantizes; loading builds them).
      dtype: compute dtype.
      param_dtype: dtype of float parameters created by ``init``.
      impl: 4-bit matmul implementation (``"auto"``, ``"xla"``, ``"pallas"``).
      remat: ``"none"``, ``"full"``, ``"dots_saveable"``, ``"offload"``, ``"qkv"`` (keep
        q, k, v), ``"attention"`` (q, k, v and the fused attention's output) or
        ``"full_offload"`` (``"full"`` with the layer inputs in host memory).
      float32_logits: return float32 logits.
      attention: ``"auto"`` (cuDNN flash attention on GPUs where it applies, else XLA),
        ``"xla"`` or ``"cudnn"``.
      in_place: with the Pallas kernels, the layer loop passes each stacked 4-bit kernel
        whole and the dequantization reads layer i where it lies (no per-layer copy);
        False: the loop slices every layer (see ``LlamaModel._layer_loop``).
      mlp_chunk: rows longer than this many tokens run each layer's MLP block in chunks of
        this many positions, each rematerialised (``models.chunking``): no ``[B, T, F]``
        activation of a whole long row is alive; same numbers. 0: whole rows always.
    """

    config: LlamaConfig
    lora: Optional[LoraConfig] = None
    quant: Optional[QuantConfig] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"
    remat: str = "none"
    float32_logits: bool = False
    attention: str = "auto"
    in_place: bool = True
    mlp_chunk: int = 8192

    default_lora_targets = ("q_proj", "v_proj")
    family = "llama"
    task = "CAUSAL_LM"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 deterministic: bool = True, position_ids: Optional[jax.Array] = None,
                 cache: Optional[KVCache] = None, return_hidden: bool = False,
                 hidden: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None,
                 adapter_index: Optional[jax.Array] = None) -> Any:
        """Logits ``[B, T, V]``; ``(logits, new_cache)`` when a cache is given.

        With ``return_hidden`` the final normed hidden state ``[B, T, D]`` replaces the
        logits; with ``hidden`` (``[B, T, D]``) only the output head runs (``input_ids`` unused).
        ``segment_ids`` (int32 ``[B, T]``, 0 = padding) packs several examples a row: a token
        attends only to earlier tokens of its segment, and ``position_ids`` default to restart
        at 0 in each segment (``models.segments``); not with a cache.
        ``adapter_index`` (int32 ``[B]``) picks each row's adapter when the params hold several
        stacked by ``qj.lora.stack_adapters``.
        """
        backbone = self._backbone(deterministic)
        if hidden is not None:
            return self._head(backbone, hidden, deterministic, adapter_index)
        h, new_cache = backbone(input_ids, attention_mask, position_ids, cache, segment_ids,
                                adapter_index)
        out = h if return_hidden else self._head(backbone, h, deterministic, adapter_index)
        return out if cache is None else (out, new_cache)

    def _backbone(self, deterministic: bool) -> LlamaModel:
        if self.mlp_chunk < 0:
            raise ValueError(f"mlp_chunk must be >= 0 (0: whole rows), got {self.mlp_chunk}")
        return LlamaModel(self.layer_settings(deterministic), self.remat, self.in_place,
                          self.mlp_chunk, name="model")

    def layer_settings(self, deterministic: bool = True) -> LayerSettings:
        """The settings every decoder layer module receives (adapters and 4-bit kernels by
        module name, from ``lora_plan()`` and ``quantized_paths()``)."""
        prefix = ("model", "layers")
        plan = self.lora_plan()
        specs = () if plan is None else tuple(
            (p[-1], spec) for p, spec in plan.specs if p[:2] == prefix)
        quantized = tuple(p[-1] for p in self.quantized_paths() if p[:2] == prefix)
        return LayerSettings(self.config, specs, self.quant, quantized, self.dtype,
                             self.param_dtype, self.impl, deterministic, self.attention)

    def _head(self, backbone, h, deterministic, adapter_index=None):
        c = self.config
        h = constrain(h, _HIDDEN)
        if c.tie_word_embeddings:
            logits = backbone.attend(h)
        else:
            plan = self.lora_plan()
            quant = self.quant if ("lm_head",) in self.quantized_paths() else None
            logits = LoraDense(c.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                               lora=None if plan is None else plan.spec_at(("lm_head",)),
                               quant=quant, impl=self.impl, kernel_axes=("embed", "vocab"),
                               name="lm_head")(h, deterministic, adapter_index)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32) if self.float32_logits else logits

    def hidden_states(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                      deterministic: bool = True,
                      position_ids: Optional[jax.Array] = None,
                      segment_ids: Optional[jax.Array] = None) -> jax.Array:
        """The final normed hidden state ``[B, T, D]`` (``apply(..., method="hidden_states")``)."""
        return self(input_ids, attention_mask, deterministic, position_ids, return_hidden=True,
                    segment_ids=segment_ids)

    def logits_from_hidden(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        """The output head alone: ``[B, T, D]`` -> logits ``[B, T, V]`` (for chunked losses)."""
        return self(None, deterministic=deterministic, hidden=hidden)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty cache of ``max_len`` slots for ``batch`` sequences."""
        c = self.config
        return KVCache.create(c.num_hidden_layers, batch, max_len, c.num_key_value_heads,
                              c.head_dim, dtype or self.dtype)

    # -- LoRA / checkpoint layout ----------------------------------------------------------------
    def module_sites(self) -> list[ModuleSite]:
        c = self.config
        layers = range(c.num_hidden_layers)
        sites = [ModuleSite(("model", "embed_tokens"), ("model.embed_tokens",), "other")]
        for group, names in (("self_attn", ATTN_PROJ), ("mlp", MLP_PROJ)):
            for n in names:
                sites.append(ModuleSite(("model", "layers", group, n),
                                        tuple(f"model.layers.{i}.{group}.{n}" for i in layers)))
        for n in ("input_layernorm", "post_attention_layernorm"):
            sites.append(ModuleSite(("model", "layers", n),
                                    tuple(f"model.layers.{i}.{n}" for i in layers), "other"))
        sites.append(ModuleSite(("model", "norm"), ("model.norm",), "other"))
        if not c.tie_word_embeddings:
            sites.append(ModuleSite(("lm_head",), ("lm_head",), "head"))
        return sites

    def hf_params(self) -> list[HFParam]:
        """Every parameter of the base model with its Hugging Face key."""
        c = self.config
        out = [HFParam(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight")]
        biases = {"q_proj": c.qkv_bias, "k_proj": c.qkv_bias, "v_proj": c.qkv_bias,
                  "o_proj": c.o_bias}
        for group, names in (("self_attn", ATTN_PROJ), ("mlp", MLP_PROJ)):
            for n in names:
                base = ("model", "layers", group, n)
                key = f"model.layers.{{i}}.{group}.{n}"
                out.append(HFParam(base + ("kernel",), key + ".weight", True, True))
                if biases.get(n, c.mlp_bias if group == "mlp" else False):
                    out.append(HFParam(base + ("bias",), key + ".bias", True))
        for n in ("input_layernorm", "post_attention_layernorm"):
            out.append(HFParam(("model", "layers", n, "scale"), f"model.layers.{{i}}.{n}.weight",
                               True))
        out.append(HFParam(("model", "norm", "scale"), "model.norm.weight"))
        if not c.tie_word_embeddings:
            out.append(HFParam(("lm_head", "kernel"), "lm_head.weight", linear=True))
        return out

    def quantized_paths(self) -> tuple[tuple[str, ...], ...]:
        """Flax paths of the linear modules ``quant`` turns into QTensors."""
        return quantized_paths(self.quant, self.module_sites())

    def hf_architecture(self) -> str:
        """The transformers class this model is (``config.json``'s ``architectures``)."""
        return ARCHITECTURES[self.config.model_type]

    def dummy_inputs(self) -> tuple[jax.Array, ...]:
        return (jnp.ones((1, 2), jnp.int32),)
