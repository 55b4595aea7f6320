"""TrainState: everything a step reads and writes, as one pytree the step can donate."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qlora_jax.lora import params as lora_params

from qlora_jax.lora import tree as lora_tree
from qlora_jax.train import optim as train_optim

#: Adapter (``lora_a`` / ``lora_b``) dtypes a run may train in, by their config names.
ADAPTER_DTYPES = ("float32", "bfloat16")


@flax.struct.dataclass
class TrainState:
    """The state of a run.

    Attributes:
      step: int32 scalar, optimizer updates done.
      rng: uint32 [2] base key; the dropout key of step s is ``fold_in(rng, s)``.
      trainable: adapter and ``modules_to_save`` leaves (what gets gradients).
      frozen: every other parameter (float arrays or QTensors), never differentiated.
      opt_state: optimizer state of ``trainable`` only (in pinned host memory when offloaded).
    """

    step: jax.Array
    rng: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any

    @property
    def params(self) -> Any:
        """The full params tree (trainable and frozen together)."""
        return lora_params.combine(self.trainable, self.frozen)


def create_state(params: Any, tx: optax.GradientTransformation, seed: int,
                 adapter_dtype: Any = None, offload_state: bool = False) -> TrainState:
    """Splits ``params`` into trainable and frozen leaves and initialises the optimizer.

    Args:
      params: the model's params tree (adapters, ``Trainable`` boxes, frozen weights).
      tx: the optimizer; it only ever sees the trainable subtree.
      seed: run seed (the dropout base key is derived from it).
      adapter_dtype: cast ``lora_a`` / ``lora_b`` to this dtype (None: keep).
      offload_state: keep the optimizer state in pinned host memory.

    Raises:
      ValueError: nothing in ``params`` is trainable.
    """
    trainable, frozen = lora_params.partition(params)
    if not jax.tree.leaves(trainable):
        raise ValueError("the model has no trainable parameters: give it a LoraConfig with "
                         "target_modules or modules_to_save")
    if adapter_dtype is not None:
        trainable = lora_tree.map_leaves(
            lambda p, v: v.astype(adapter_dtype) if lora_params.is_adapter_path(p) else v,
            trainable)
    opt_state = tx.init(trainable)
    if offload_state:
        opt_state = train_optim.to_memory(opt_state, train_optim.HOST)
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed),
                      trainable=trainable, frozen=frozen, opt_state=opt_state)
