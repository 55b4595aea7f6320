"""How the training code calls a model on a batch and scores it.

A ``Task`` binds a Flax model to a loss:

- ``"causal_lm"``: ``model.apply(vars, input_ids, attention_mask=...)`` returns logits [B, T, V];
  loss = CE on ``targets`` where ``loss_mask`` is set (response-only loss). A batch that carries
  Hugging Face style ``labels`` [B, T] (-100 = ignored, not shifted) is converted to
  ``targets`` / ``loss_mask`` first. With ``loss_chunk > 0`` the model must also provide
  ``hidden_states(input_ids, attention_mask=..., ...)`` -> [B, T, D] and
  ``logits_from_hidden(hidden)`` -> [B, T, V]; the loss then never holds logits for more than
  ``loss_chunk`` positions.
- ``"classification"``: the model returns logits [B, C] (a classification head); loss = CE on
  ``labels`` [B] weighted by ``weights``.

Packed rows (``packed=True``: several examples a row, as ``qlora_jax.data`` makes them with
``data.packing``) pass the batch's ``segment_ids`` and ``position_ids`` to the model instead of the
attention mask (segment 0 is padding); the model must accept both. Unpacked batches pass neither.
The ``deterministic`` flag is passed only when the model's ``__call__`` accepts it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from qlora_jax.train import loss as losses

TASKS = ("causal_lm", "classification")
Batch = Mapping[str, jax.Array]


def _accepted(fn: Any) -> frozenset[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return frozenset({"*"})
    return frozenset(params)


@dataclasses.dataclass(frozen=True)
class Task:
    """A model and the loss it trains with.

    Attributes:
      model: the Flax module.
      kind: ``"causal_lm"`` or ``"classification"``.
      loss_chunk: > 0: chunked causal-LM loss over this many positions at a time.
      right_padded: causal-LM rows hold their tokens first and padding after (the layout of
        ``qlora_jax.data``'s loaders). The attention mask is then redundant: under causal
        attention every real token sees only earlier slots, all real, and its position is its
        slot index, so the mask is not passed to the model and the model may use fused
        attention that takes no mask (cuDNN flash attention on GPUs). Only padded positions,
        which carry no loss, see different values. Rows with left padding must not use this.
      packed: rows hold several examples; the model gets ``segment_ids`` and ``position_ids``
        (int32 [B, T]) and attends only within a segment.
    """

    model: nn.Module
    kind: str
    loss_chunk: int = 0
    right_padded: bool = False
    packed: bool = False

    def __post_init__(self):
        if self.kind not in TASKS:
            raise ValueError(f"task {self.kind!r} is not one of {TASKS}")
        if self.loss_chunk and self.kind != "causal_lm":
            raise ValueError("loss_chunk applies to causal_lm tasks only")
        if self.loss_chunk:
            missing = [m for m in ("hidden_states", "logits_from_hidden")
                       if not hasattr(self.model, m)]
            if missing:
                raise ValueError(f"train.loss_chunk={self.loss_chunk} needs model methods "
                                 f"{missing} ({type(self.model).__name__} lacks them); "
                                 "set train.loss_chunk=0")
        if self.packed:
            if self.kind != "causal_lm":
                raise ValueError("packed rows apply to causal_lm tasks only")
            ok = _accepted(self.model.__call__)
            missing = [k for k in ("segment_ids", "position_ids") if "*" not in ok and k not in ok]
            if missing:
                raise ValueError(f"packed rows need a model that takes {missing} "
                                 f"({type(self.model).__name__} does not); set "
                                 "data.packing=False")

    def _kwargs(self, fn: Any, batch: Batch, rng: jax.Array | None) -> dict[str, Any]:
        ok = _accepted(fn)
        has = lambda name: "*" in ok or name in ok  # noqa: E731
        kw: dict[str, Any] = {}
        if self.packed:  # segment 0 masks the padding; positions restart in each segment
            kw["segment_ids"] = batch["segment_ids"]
            kw["position_ids"] = batch["position_ids"]
        elif "attention_mask" in batch and not (self.right_padded and self.kind == "causal_lm"):
            kw["attention_mask"] = batch["attention_mask"]
        if has("deterministic"):
            kw["deterministic"] = rng is None
        return kw

    def logits(self, params: Any, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """The model's output for the batch (train mode with dropout when ``rng`` is given)."""
        kw = self._kwargs(self.model.__call__, batch, rng)
        rngs = {"dropout": rng} if rng is not None else {}
        return self.model.apply({"params": params}, batch["input_ids"], rngs=rngs, **kw)

    def sums(self, params: Any, batch: Batch, rng: jax.Array | None = None) -> losses.Sums:
        """(loss sum, weight sum, correct sum) of the batch, float32 scalars."""
        if self.kind == "classification":
            logits = self.logits(params, batch, rng)
            if logits.ndim != 2:
                raise ValueError(f"a classification model must return logits [B, C], got shape "
                                 f"{logits.shape}; build it with num_labels")
            weights = batch.get("weights", jnp.ones(logits.shape[:1], jnp.float32))
            return losses.classification_sums(logits, batch["labels"], weights)
        targets, mask = causal_targets(batch)
        if not self.loss_chunk:
            return losses.causal_lm_sums(self.logits(params, batch, rng), targets, mask)
        kw = self._kwargs(self.model.hidden_states, batch, rng)
        rngs = {"dropout": rng} if rng is not None else {}
        hidden = self.model.apply({"params": params}, batch["input_ids"], rngs=rngs,
                                  method="hidden_states", **kw)
        head = lambda h: self.model.apply({"params": params}, h,  # noqa: E731
                                          method="logits_from_hidden")
        return losses.chunked_causal_lm_sums(hidden, head, targets, mask, self.loss_chunk)


def causal_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T], loss_mask [B, T]) from ``targets``/``loss_mask`` or HF-style ``labels``.

    ``labels`` follow Hugging Face: aligned with ``input_ids``, -100 where no loss is taken; the
    prediction at position t is scored against ``labels[t + 1]``.
    """
    if "targets" in batch:
        return batch["targets"], batch["loss_mask"]
    if "labels" not in batch:
        raise KeyError("a causal-LM batch needs 'targets' + 'loss_mask' or 'labels' (-100 = ignore)")
    labels = batch["labels"]
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], -100)], axis=1)
    return jnp.maximum(shifted, 0), (shifted != -100).astype(jnp.float32)


def batch_tokens(batch: Batch) -> jax.Array:
    """Non-padding tokens in a batch (for tokens/s)."""
    if "attention_mask" in batch:
        return jnp.sum(batch["attention_mask"]).astype(jnp.float32)
    return jnp.asarray(batch["input_ids"].size, jnp.float32)
