"""Tiny models following the qlora_jax model protocol, for the training tests.

``ToyLM``: embedding -> scanned residual blocks of LoraDense layers -> LM head, with
``hidden_states`` / ``logits_from_hidden`` (chunked loss) and a ``remat`` attribute.
``ToyClassifier``: the same trunk, mean-pooled, then a ``classifier`` head (modules_to_save).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax.lora import LoraDense, ModuleSite, Trainable
from qlora_jax.models.base import LoraModelMixin
from qlora_jax.quant.config import QuantConfig

REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class _Block(nn.Module):
    plan: Any
    quant: Optional[QuantConfig]
    dtype: Any

    @nn.compact
    def __call__(self, x, deterministic):
        d = x.shape[-1]
        spec = lambda n: None if self.plan is None else self.plan.spec_at(  # noqa: E731
            ("trunk", "layers", n))
        h = LoraDense(2 * d, name="up_proj", lora=spec("up_proj"), quant=self.quant,
                      dtype=self.dtype, impl="xla")(x, deterministic)
        h = LoraDense(d, name="down_proj", lora=spec("down_proj"), quant=self.quant,
                      dtype=self.dtype, use_bias=True, impl="xla")(nn.gelu(h), deterministic)
        return x + h, None


class _Trunk(nn.Module):
    plan: Any
    quant: Optional[QuantConfig]
    layers: int
    dtype: Any
    remat: str

    @nn.compact
    def __call__(self, x, deterministic):
        block = _Block
        if self.remat != "none":
            block = nn.remat(_Block, policy=REMAT[self.remat], static_argnums=(2,))
        scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                          "dropout": True},
                          in_axes=nn.broadcast, length=self.layers)
        x, _ = scanned(self.plan, self.quant, self.dtype, name="layers")(x, deterministic)
        return x


class ToyLM(nn.Module, LoraModelMixin):
    """input_ids [B, T] -> logits [B, T, V]."""

    vocab: int = 64
    width: int = 32
    layers: int = 2
    lora: Any = None
    quant: Optional[QuantConfig] = None
    dtype: Any = jnp.float32
    remat: str = "none"
    default_lora_targets = ("up_proj", "down_proj")

    def module_sites(self):
        names = lambda n: tuple(f"model.layers.{i}.{n}" for i in range(self.layers))  # noqa
        return [ModuleSite(("trunk", "layers", n), names(n)) for n in ("up_proj", "down_proj")] + [
            ModuleSite(("lm_head",), ("lm_head",), "head"),
            ModuleSite(("embed",), ("model.embed_tokens",), "other")]

    def setup(self):
        plan = self.lora_plan()
        self.embed = nn.Embed(self.vocab, self.width)
        self.trunk = _Trunk(plan, self.quant, self.layers, self.dtype, self.remat)
        self.lm_head = LoraDense(self.vocab, lora=None if plan is None else plan.spec_at(
            ("lm_head",)), dtype=self.dtype, impl="xla")

    def hidden_states(self, input_ids, attention_mask=None, deterministic=True):
        x = self.embed(input_ids).astype(self.dtype)
        if attention_mask is not None:  # a causal prefix mean, so padding has an effect
            m = attention_mask[..., None].astype(x.dtype)
            x = x + jnp.cumsum(x * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1)
        return self.trunk(x, deterministic)

    def logits_from_hidden(self, hidden):
        return self.lm_head(hidden)

    def __call__(self, input_ids, attention_mask=None, deterministic=True):
        return self.logits_from_hidden(self.hidden_states(input_ids, attention_mask,
                                                          deterministic))


class ToyClassifier(nn.Module, LoraModelMixin):
    """input_ids [B, T] -> logits [B, C]; ``classifier`` is trained in full (modules_to_save)."""

    vocab: int = 64
    width: int = 32
    layers: int = 2
    num_labels: int = 3
    lora: Any = None
    quant: Optional[QuantConfig] = None
    dtype: Any = jnp.float32
    remat: str = "none"
    default_lora_targets = ("up_proj", "down_proj")

    def module_sites(self):
        names = lambda n: tuple(f"layers.{i}.{n}" for i in range(self.layers))  # noqa
        return [ModuleSite(("trunk", "layers", n), names(n)) for n in ("up_proj", "down_proj")] + [
            ModuleSite(("classifier",), ("classifier",), "head")]

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, deterministic=True):
        plan = self.lora_plan()
        x = nn.Embed(self.vocab, self.width, name="embed")(input_ids).astype(self.dtype)
        x = _Trunk(plan, self.quant, self.layers, self.dtype, self.remat, name="trunk")(
            x, deterministic)
        m = (jnp.ones(input_ids.shape) if attention_mask is None else attention_mask)
        m = m[..., None].astype(x.dtype)
        pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
        return nn.Dense(self.num_labels, name="classifier")(pooled)


def box_saved(model: Any, params: Any) -> Any:
    """Boxes the ``modules_to_save`` leaves in ``Trainable`` (what the real loaders do)."""
    plan = model.lora_plan()
    from qlora_jax.lora import tree as lora_tree

    return lora_tree.map_leaves(lambda p, v: Trainable(v) if plan is not None and plan.saves(p) else v,
                         params)


def random_params(model: Any, rng: Any, seq_len: int = 8, scale: float = 0.2) -> Any:
    """Host (numpy) params for ``model`` with fresh random values, without compiling its init.

    Float leaves get N(0, scale^2) values; a model with ``quant`` is initialised for real (jit)
    since its kernels must be QTensors. Returning numpy keeps the tree reusable after a step
    donates the device copies.
    """
    import numpy as np

    ids = jnp.zeros((1, seq_len), jnp.int32)
    if getattr(model, "quant", None) is not None:
        key = jax.random.key(int(rng.integers(1 << 30)))
        return jax.device_get(jax.jit(model.init)(key, ids)["params"])
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
