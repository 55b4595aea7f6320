"""The BERT family (BERT, RoBERTa, MiniLM) as an encoder built from LoraDense layers.

    model = BertModel(BertConfig.from_hf(config_json), lora=..., dtype=jnp.float32)
    hidden = model.apply({"params": params}, input_ids, attention_mask)        # [B, T, D]
    hidden, pooled = model.apply(..., return_pooled=True)                      # pooled [B, D]

With ``num_labels > 0`` the model carries a sequence-classification head (as
``BertForSequenceClassification`` / ``RobertaForSequenceClassification``) and
``__call__`` returns logits ``[B, num_labels]``; put ``"classifier"`` in
``LoraConfig.modules_to_save`` to train it in full.

Parameters mirror the Hugging Face names; the L encoder layers are stacked
with ``nn.scan``::

    embeddings/{word,position,token_type}_embeddings/embedding
    embeddings/LayerNorm/{scale,bias}
    encoder/layer/attention/self/{query,key,value}/{kernel,bias}   [L, D, D], [L, D]
    encoder/layer/attention/output/{dense/{kernel,bias},LayerNorm/{scale,bias}}
    encoder/layer/intermediate/dense/{kernel,bias}                  [L, D, F]
    encoder/layer/output/{dense,LayerNorm}/...
    pooler/dense/{kernel,bias}                                      (BERT; not RoBERTa with a head)
    classifier/{kernel,bias}                                        (BERT head)
    classifier/{dense,out_proj}/{kernel,bias}                       (RoBERTa head)

GELU is exact (erf). Hidden dropout is applied when ``deterministic=False``;
attention-probability dropout is not (the attention runs through
``jax.nn.dot_product_attention``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from qlora_jax.lora.config import LoraConfig
from qlora_jax.lora.dense import LoraDense
from qlora_jax.lora.plan import LoraPlan, ModuleSite
from qlora_jax.models.base import LoraModelMixin
from qlora_jax.models.common import (HFParam, LAYER_INPUT, LayerNorm, maybe_remat,
                                     quantized_paths)
from qlora_jax.quant.config import QuantConfig

MODEL_TYPES = ("bert", "roberta")
#: Logical axes of the query, key and value kernels ``[D, H * K]``.
_QKV = ("embed", "heads")
_ACTS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu,
         "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
         "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT/RoBERTa ``config.json`` the model uses (``raw_json``: all of it)."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    classifier_dropout: Optional[float] = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    raw_json: str = "{}"

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "BertConfig":
        mt = d.get("model_type", "bert")
        if mt not in MODEL_TYPES:
            raise ValueError(f"BertConfig: model_type {mt!r} is not one of {MODEL_TYPES}")
        pet = d.get("position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        act = d.get("hidden_act", "gelu")
        if act not in _ACTS:
            raise ValueError(f"hidden_act {act!r} is not supported; supported: {sorted(_ACTS)}")
        return cls(model_type=mt, vocab_size=int(d["vocab_size"]),
                   hidden_size=int(d["hidden_size"]),
                   num_hidden_layers=int(d["num_hidden_layers"]),
                   num_attention_heads=int(d["num_attention_heads"]),
                   intermediate_size=int(d["intermediate_size"]), hidden_act=act,
                   hidden_dropout_prob=float(d.get("hidden_dropout_prob", 0.1)),
                   classifier_dropout=d.get("classifier_dropout"),
                   max_position_embeddings=int(d.get("max_position_embeddings", 512)),
                   type_vocab_size=int(d.get("type_vocab_size", 2)),
                   layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
                   pad_token_id=int(d.get("pad_token_id") or 0),
                   raw_json=json.dumps(dict(d), sort_keys=True))

    def to_hf(self) -> dict[str, Any]:
        d = json.loads(self.raw_json)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "raw_json"})
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class _Common(nn.Module):
    config: BertConfig
    plan: Optional[LoraPlan]
    quant: Optional[QuantConfig]
    quant_paths: tuple
    dtype: Any
    param_dtype: Any
    impl: str
    deterministic: bool

    def dense(self, features: int, name: str, axes: tuple[Optional[str], ...]) -> LoraDense:
        """Linear module ``name``; ``axes``: logical axes of its float kernel ``[in, out]``."""
        path = tuple(self.scope.path) + (name,)
        spec = None if self.plan is None else self.plan.spec_at(path)
        return LoraDense(features, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                         lora=spec, quant=self.quant if path in self.quant_paths else None,
                         impl=self.impl, kernel_init=nn.initializers.normal(0.02),
                         kernel_axes=axes, name=name)

    def kw(self) -> dict[str, Any]:
        return dict(config=self.config, plan=self.plan, quant=self.quant,
                    quant_paths=self.quant_paths, dtype=self.dtype, param_dtype=self.param_dtype,
                    impl=self.impl, deterministic=self.deterministic)

    def drop(self, x: jax.Array) -> jax.Array:
        return nn.Dropout(self.config.hidden_dropout_prob)(x, deterministic=self.deterministic)

    def norm(self, name: str) -> LayerNorm:
        return LayerNorm(self.config.layer_norm_eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)


class _SelfAttention(_Common):
    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        b, t, d = x.shape
        h, k = c.num_attention_heads, c.head_dim
        q = self.dense(d, "query", _QKV)(x, self.deterministic).reshape(b, t, h, k)
        kk = self.dense(d, "key", _QKV)(x, self.deterministic).reshape(b, t, h, k)
        v = self.dense(d, "value", _QKV)(x, self.deterministic).reshape(b, t, h, k)
        out = jax.nn.dot_product_attention(q, kk, v, mask=mask, scale=k ** -0.5)
        return out.reshape(b, t, d)


class _Output(_Common):
    """Projection back to the model width, dropout, residual, LayerNorm: ``attention.output``
    (from the heads, ``[D, D]``) and ``output`` (from the MLP, ``[F, D]``)."""

    axes: tuple[str, str] = ("heads", "embed")

    @nn.compact
    def __call__(self, x, residual):
        y = self.drop(self.dense(residual.shape[-1], "dense", self.axes)(x, self.deterministic))
        return self.norm("LayerNorm")(y + residual)


class _Attention(_Common):
    @nn.compact
    def __call__(self, x, mask):
        a = _SelfAttention(**self.kw(), name="self")(x, mask)
        return _Output(**self.kw(), name="output")(a, x)


class _Intermediate(_Common):
    @nn.compact
    def __call__(self, x):
        return _ACTS[self.config.hidden_act](
            self.dense(self.config.intermediate_size, "dense", ("embed", "mlp"))(
                x, self.deterministic))


class BertLayer(_Common):
    """One encoder layer; a scan body ``(h, mask) -> (h, None)``."""

    @nn.compact
    def __call__(self, h, mask):
        h = checkpoint_name(h, LAYER_INPUT)  # remat="full_offload" keeps it in host memory
        a = _Attention(**self.kw(), name="attention")(h, mask)
        i = _Intermediate(**self.kw(), name="intermediate")(a)
        return _Output(**self.kw(), axes=("mlp", "embed"), name="output")(i, a), None


class _Encoder(_Common):
    remat: str = "none"

    @nn.compact
    def __call__(self, h, mask):
        layer = maybe_remat(BertLayer, self.remat)
        scanned = nn.scan(layer, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast,), length=self.config.num_hidden_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        h, _ = scanned(**self.kw(), name="layer")(h, mask)
        return h


class _Embeddings(_Common):
    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        c = self.config
        def emb(rows: int, axes: tuple[Optional[str], str], name: str) -> nn.Embed:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
            return nn.Embed(rows, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            embedding_init=init, name=name)
        # Position and token-type tables are small: their rows stay whole on every device.
        x = emb(c.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + emb(c.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        x = x + emb(c.max_position_embeddings, (None, "embed"),
                    "position_embeddings")(position_ids)
        return self.drop(self.norm("LayerNorm")(x))


class _Pooler(_Common):
    @nn.compact
    def __call__(self, h):
        dense = self.dense(self.config.hidden_size, "dense", ("embed", "mlp"))
        return jnp.tanh(dense(h[:, 0], self.deterministic))


class _RobertaHead(_Common):
    num_labels: int = 2

    @nn.compact
    def __call__(self, h):
        x = self.drop(h[:, 0])
        x = jnp.tanh(self.dense(self.config.hidden_size, "dense", ("embed", "mlp"))(
            x, self.deterministic))
        return self.dense(self.num_labels, "out_proj", ("mlp", None))(self.drop(x),
                                                                      self.deterministic)


class BertModel(LoraModelMixin, nn.Module):
    """A BERT/RoBERTa/MiniLM encoder, optionally with a classification head.

    Attributes:
      config: the BertConfig.
      lora / quant: LoraConfig and QuantConfig (or None), as for the causal LMs.
      dtype / param_dtype: compute dtype and dtype of parameters created by ``init``.
      impl: 4-bit matmul implementation.
      remat: a mode of ``models.common.REMAT_MODES`` (``"none"``, ``"full"``,
        ``"dots_saveable"``, ``"offload"``, ``"full_offload"``, ...).
      num_labels: > 0 adds the sequence-classification head; ``__call__`` then
        returns logits ``[B, num_labels]``.
      add_pooling_layer: keep the pooler (default: yes, except RoBERTa with a head).
    """

    config: BertConfig
    lora: Optional[LoraConfig] = None
    quant: Optional[QuantConfig] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"
    remat: str = "none"
    num_labels: int = 0
    add_pooling_layer: Optional[bool] = None

    default_lora_targets = ("query", "value")
    family = "bert"

    @property
    def task(self) -> str:
        return "SEQ_CLS" if self.num_labels > 0 else "FEATURE_EXTRACTION"

    @property
    def has_pooler(self) -> bool:
        if self.add_pooling_layer is not None:
            return bool(self.add_pooling_layer)
        return not (self.num_labels > 0 and self.config.model_type == "roberta")

    @property
    def hf_prefix(self) -> str:
        """``"bert."`` / ``"roberta."`` in front of encoder keys of a model with a head."""
        return f"{self.config.model_type}." if self.num_labels > 0 else ""

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 token_type_ids: Optional[jax.Array] = None, deterministic: bool = True,
                 position_ids: Optional[jax.Array] = None, return_pooled: bool = False) -> Any:
        """Last hidden state ``[B, T, D]`` (with ``return_pooled``: ``(hidden, pooled [B, D])``),
        or logits ``[B, num_labels]`` when the model has a head."""
        c = self.config
        b, t = input_ids.shape
        limit = c.max_position_embeddings - (c.pad_token_id + 1 if c.model_type == "roberta" else 0)
        if position_ids is None and t > limit:  # the table lookup would give NaN rows
            raise ValueError(f"{t} tokens exceed the {limit} learned positions of this "
                             f"{c.model_type} model (max_position_embeddings="
                             f"{c.max_position_embeddings}); use at most {limit}")
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        if position_ids is None:
            if c.model_type == "roberta":
                m = (input_ids != c.pad_token_id).astype(jnp.int32)
                position_ids = jnp.cumsum(m, axis=1) * m + c.pad_token_id
            else:
                position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        kw = dict(config=c, plan=self.lora_plan(),
                  quant=self.quant, quant_paths=self.quantized_paths(),
                  dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl,
                  deterministic=deterministic)
        h = _Embeddings(**kw, name="embeddings")(input_ids, token_type_ids, position_ids)
        mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, None, :], (b, 1, t, t))
        h = _Encoder(**kw, remat=self.remat, name="encoder")(h, mask)
        pooled = _Pooler(**kw, name="pooler")(h) if self.has_pooler else None
        if self.num_labels > 0:
            if c.model_type == "roberta":
                return _RobertaHead(**kw, num_labels=self.num_labels, name="classifier")(h)
            rate = c.classifier_dropout if c.classifier_dropout is not None \
                else c.hidden_dropout_prob
            x = nn.Dropout(rate)(pooled, deterministic=deterministic)
            return LoraDense(self.num_labels, use_bias=True, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             lora=None if kw["plan"] is None else kw["plan"].spec_at(
                                 ("classifier",)),
                             kernel_init=nn.initializers.normal(0.02), impl=self.impl,
                             kernel_axes=("embed", None), name="classifier")(x, deterministic)
        return (h, pooled) if return_pooled else h

    # -- LoRA / checkpoint layout ----------------------------------------------------------------
    def _linear_modules(self) -> list[tuple[tuple[str, ...], str]]:
        """(Flax path, HF name template) of every encoder linear module."""
        out = []
        for n in ("query", "key", "value"):
            out.append((("encoder", "layer", "attention", "self", n), f"attention.self.{n}"))
        out.append((("encoder", "layer", "attention", "output", "dense"), "attention.output.dense"))
        out.append((("encoder", "layer", "intermediate", "dense"), "intermediate.dense"))
        out.append((("encoder", "layer", "output", "dense"), "output.dense"))
        return out

    def _norms(self) -> list[tuple[tuple[str, ...], str]]:
        return [(("encoder", "layer", "attention", "output", "LayerNorm"),
                 "attention.output.LayerNorm"),
                (("encoder", "layer", "output", "LayerNorm"), "output.LayerNorm")]

    def module_sites(self) -> list[ModuleSite]:
        c, p = self.config, self.hf_prefix
        layers = range(c.num_hidden_layers)
        sites = [ModuleSite(("embeddings", n), (f"{p}embeddings.{n}",), "other")
                 for n in ("word_embeddings", "position_embeddings", "token_type_embeddings",
                           "LayerNorm")]
        for path, name in self._linear_modules():
            sites.append(ModuleSite(path, tuple(f"{p}encoder.layer.{i}.{name}" for i in layers)))
        for path, name in self._norms():
            sites.append(ModuleSite(path, tuple(f"{p}encoder.layer.{i}.{name}" for i in layers),
                                    "other"))
        if self.has_pooler:
            sites.append(ModuleSite(("pooler", "dense"), (f"{p}pooler.dense",)))
        if self.num_labels > 0:
            kind = "other" if c.model_type == "roberta" else "head"
            sites.append(ModuleSite(("classifier",), ("classifier",), kind))
        return sites

    def hf_params(self) -> list[HFParam]:
        c = self.config
        p = self.hf_prefix
        alt = "" if p else f"{c.model_type}."

        def param(path, key, **kw):
            return HFParam(path, p + key, aliases=(alt + key,), **kw)

        out = [param(("embeddings", n, "embedding"), f"embeddings.{n}.weight")
               for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
        out += [param(("embeddings", "LayerNorm", "scale"), "embeddings.LayerNorm.weight"),
                param(("embeddings", "LayerNorm", "bias"), "embeddings.LayerNorm.bias")]
        for path, name in self._linear_modules():
            key = f"encoder.layer.{{i}}.{name}"
            out.append(param(path + ("kernel",), key + ".weight", layered=True, linear=True))
            out.append(param(path + ("bias",), key + ".bias", layered=True))
        for path, name in self._norms():
            key = f"encoder.layer.{{i}}.{name}"
            out.append(param(path + ("scale",), key + ".weight", layered=True))
            out.append(param(path + ("bias",), key + ".bias", layered=True))
        if self.has_pooler:
            out.append(param(("pooler", "dense", "kernel"), "pooler.dense.weight", linear=True,
                             optional=True))
            out.append(param(("pooler", "dense", "bias"), "pooler.dense.bias", optional=True))
        if self.num_labels > 0:
            heads = [("dense",), ("out_proj",)] if c.model_type == "roberta" else [()]
            for sub in heads:
                key = ".".join(("classifier",) + sub)
                out.append(HFParam(("classifier",) + sub + ("kernel",), key + ".weight",
                                   linear=True, optional=True))
                out.append(HFParam(("classifier",) + sub + ("bias",), key + ".bias",
                                   optional=True))
        return out

    def quantized_paths(self) -> tuple[tuple[str, ...], ...]:
        """Flax paths of the linear modules ``quant`` turns into QTensors (never the head)."""
        return tuple(p for p in quantized_paths(self.quant, self.module_sites())
                     if p[0] != "classifier")

    def hf_architecture(self) -> str:
        """The transformers class this model is (``config.json``'s ``architectures``)."""
        stem = "Bert" if self.config.model_type == "bert" else "Roberta"
        return f"{stem}ForSequenceClassification" if self.num_labels > 0 else f"{stem}Model"

    def dummy_inputs(self) -> tuple[jax.Array, ...]:
        return (jnp.ones((1, 2), jnp.int32),)
