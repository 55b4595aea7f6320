"""The train step and the eval step: pure functions, jit-compiled by their makers.

``train_step(state, batch) -> (state, metrics)``: gradients of the summed loss with respect to
``state.trainable`` only (frozen weights, possibly QTensors, enter as non-differentiated inputs);
micro-batches (gradient accumulation) run in a ``lax.scan`` inside the step; the loss and the
gradients are normalised by the loss weight of the whole batch, so accumulation changes nothing
but memory. The state is donated.

On a device mesh the makers take `StepShardings` (see qlora_jax.train.distributed.Placement):
the step is then jitted with the state's shardings in and out, the batch's rows split over the
batch mesh axes and the metrics replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from qlora_jax import sharding
from qlora_jax.lora import params as lora_params
from qlora_jax.train import optim as train_optim
from qlora_jax.train.state import TrainState
from qlora_jax.train.task import Batch, Task, batch_tokens

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """How a jitted step's arguments and results lie on a mesh.

    Attributes:
      state: a `TrainState` whose leaves are the shardings of the state's arrays.
      batch: the sharding of every batch array (rows split over the batch mesh axes; a
        PartitionSpec of one entry, so it fits arrays of any rank).
      metrics: the sharding of the metrics (replicated).
      rules: the logical-to-mesh rules; the steps are traced under ``jax.set_mesh(mesh)``
        and ``flax.linen.logical_axis_rules(rules)`` so the model's activation hints and
        per-use weight gathers apply (None: the default rules).
    """

    state: Any
    batch: NamedSharding
    metrics: NamedSharding
    rules: Optional[tuple] = None

    def in_mesh(self, jitted: Callable[..., Any]) -> Callable[..., Any]:
        """``jitted`` called and traced under this mesh and these rules (``sharding.in_mesh``)."""
        return sharding.in_mesh(jitted, self.batch.mesh, self.rules or sharding.DEFAULT_RULES)

    def micro(self) -> NamedSharding:
        """Micro-batches ``[A, B / A, ...]``: rows of each micro-batch split like a batch's."""
        return NamedSharding(self.batch.mesh, PartitionSpec(None, *self.batch.spec))


def split_micro(batch: Batch, accum_steps: int) -> Batch:
    """[B, ...] -> [A, B / A, ...] for every array of the batch."""
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                             f"{accum_steps} micro-batches")
        return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])
    return {k: split(v) for k, v in batch.items()}


def train_step_fn(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                  accum_steps: int = 1, offload_state: bool = False, dropout: bool = True,
                  nan_at_step: int = -1, micro_sharding: Optional[NamedSharding] = None
                  ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure (not yet jitted) train step.

    Args:
      task: model + loss.
      tx: optimizer over the trainable subtree (clipping included).
      schedule: the learning-rate schedule (reported in the metrics).
      accum_steps: micro-batches per step (A); the batch's row count must divide by it.
      offload_state: the optimizer state arrives and leaves in pinned host memory; it is moved
        to the device for the update only.
      dropout: run the model in train mode (dropout key ``fold_in(fold_in(rng, step), micro)``).
      nan_at_step: fault injection for tests: the loss of this step becomes NaN (-1: never).
      micro_sharding: on a mesh, the sharding of the micro-batches ``[A, B / A, ...]`` (rows of
        each one split over the batch axes, not whole micro-batches a device).
    """

    def grads_of(trainable, frozen, micro, key):
        def total(t):
            return_sums = task.sums(lora_params.combine(t, frozen), micro, key)
            return return_sums[0], return_sums
        grads, sums = jax.grad(total, has_aux=True)(trainable)
        return grads, sums

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        base_key = jax.random.fold_in(state.rng, state.step)
        key = lambda i: jax.random.fold_in(base_key, i) if dropout else None  # noqa: E731
        if accum_steps == 1:
            grads, (loss_sum, weight, correct) = grads_of(state.trainable, state.frozen, batch,
                                                          key(0))
        else:
            micro = split_micro(batch, accum_steps)
            if micro_sharding is not None:
                micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)

            def body(carry, xs):
                i, mb = xs
                g, s = grads_of(state.trainable, state.frozen, mb, key(i))
                acc_g, acc_s = carry
                acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
                return (acc_g, tuple(a + b for a, b in zip(acc_s, s))), None

            zero = jnp.zeros((), jnp.float32)
            (grads, (loss_sum, weight, correct)), _ = jax.lax.scan(
                body, (zeros, (zero, zero, zero)), (jnp.arange(accum_steps), micro))
        denom = jnp.maximum(weight, 1.0)
        # Gradients in each parameter's dtype: bf16 adapters keep a bf16 optimizer state
        # step after step (a float32 gradient would promote it and force a recompile).
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.trainable)
        loss = loss_sum / denom
        if nan_at_step >= 0:
            loss = jnp.where(state.step == nan_at_step, jnp.nan, loss)
        opt_state = state.opt_state
        if offload_state:
            opt_state = train_optim.to_memory(opt_state, train_optim.DEVICE)
        updates, opt_state = tx.update(grads, opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        if offload_state:
            opt_state = train_optim.to_memory(opt_state, train_optim.HOST)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "accuracy": correct / denom,
            "loss_weight": weight,
            "tokens": batch_tokens(batch),
            "slots": jnp.asarray(batch["input_ids"].size, jnp.float32),  # tokens + padding
        }
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new, metrics

    return step


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, shardings: Optional[StepShardings] = None, **kwargs: Any
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step_fn` jit-compiled with the state donated (argument 0).

    Args:
      task, tx, schedule, **kwargs: as for `train_step_fn`.
      shardings: on a mesh, the shardings of state, batch and metrics; the state keeps its
        shardings from step to step (None: let jit follow the arguments).
    """
    if shardings is None:
        return jax.jit(train_step_fn(task, tx, schedule, **kwargs), donate_argnums=0)
    fn = train_step_fn(task, tx, schedule, micro_sharding=shardings.micro(), **kwargs)
    return shardings.in_mesh(jax.jit(fn, in_shardings=(shardings.state, shardings.batch),
                                     out_shardings=(shardings.state, shardings.metrics),
                                     donate_argnums=0))


def make_eval_step(task: Task, *, shardings: Optional[StepShardings] = None
                   ) -> Callable[[Any, Any, Batch], Metrics]:
    """Jitted ``(trainable, frozen, batch) -> sums`` (loss, weight, correct) in eval mode.

    ``shardings`` (on a mesh): the state's trainable and frozen shardings and the batch's are
    the inputs', the sums come back replicated.
    """
    def sums(trainable, frozen, batch):
        loss_sum, weight, correct = task.sums(lora_params.combine(trainable, frozen), batch)
        return {"loss_sum": loss_sum, "weight": weight, "correct": correct}
    if shardings is None:
        return jax.jit(sums)
    return shardings.in_mesh(jax.jit(sums, in_shardings=(shardings.state.trainable,
                                                         shardings.state.frozen, shardings.batch),
                                     out_shardings=shardings.metrics))


def evaluate(eval_step: Callable[[Any, Any, Batch], Metrics], state: TrainState,
             batches: Any, kind: str, max_batches: Optional[int] = None) -> dict[str, float]:
    """Runs ``eval_step`` over ``batches`` and returns loss, accuracy (and perplexity for LMs).

    Sums are added in float64 on the host; the loss is the weighted mean over every token
    (causal LM) or example (classification).
    """
    total = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        out = jax.device_get(eval_step(state.trainable, state.frozen, batch))
        for k in total:
            total[k] += float(out[k])
    if total["weight"] == 0:
        raise ValueError("evaluation saw no loss tokens or examples")
    loss = total["loss_sum"] / total["weight"]
    result = {"eval_loss": loss, "eval_accuracy": total["correct"] / total["weight"],
              "eval_count": total["weight"]}
    if kind == "causal_lm":
        result["eval_perplexity"] = float(jnp.exp(jnp.minimum(loss, 80.0)))
    return result


def host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics fetched to the host as Python floats."""
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
