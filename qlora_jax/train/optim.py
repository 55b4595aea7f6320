"""Learning-rate schedules, the optimizer of the trainable leaves, and host offload of its state.

The optimizer only ever sees the trainable subtree (adapters and ``modules_to_save`` leaves, see
``qj.lora.partition``), so no optimizer state exists for frozen weights. With
``optim.offload_state`` the state lives in host memory (``pinned_host``) between steps and is
moved to the device only for the update, inside the jitted step: the JAX counterpart of
bitsandbytes' paged optimizers.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "sgd")
HOST = "pinned_host"
DEVICE = "device"


def warmup_steps(optim: Mapping[str, Any], total_steps: int) -> int:
    """``optim.warmup_steps`` if positive, else ``round(optim.warmup_ratio * total_steps)``."""
    if int(optim["warmup_steps"]) > 0:
        return int(optim["warmup_steps"])
    return int(round(float(optim["warmup_ratio"]) * total_steps))


def make_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant, cosine or linear decay to ``lr * end_lr_ratio``.

    Args:
      optim: the ``optim`` config section (learning_rate, schedule, warmup_steps, warmup_ratio,
        end_lr_ratio).
      total_steps: number of optimizer updates of the run.
    """
    lr = float(optim["learning_rate"])
    kind = optim["schedule"]
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r}; use one of {SCHEDULES}")
    warm = min(warmup_steps(optim, total_steps), total_steps)
    end = lr * float(optim["end_lr_ratio"])
    decay = max(total_steps - warm, 1)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=end / lr if lr else 0.0)
    else:
        after = optax.linear_schedule(lr, end, decay)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(optim: Mapping[str, Any], schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
    """Global-norm clipping (``max_grad_norm`` > 0) followed by AdamW or SGD with the schedule."""
    name = optim["name"]
    if name == "adamw":
        inner = optax.adamw(schedule, b1=float(optim["b1"]), b2=float(optim["b2"]),
                            eps=float(optim["eps"]), weight_decay=float(optim["weight_decay"]))
    elif name == "sgd":
        inner = optax.sgd(schedule, momentum=float(optim["b1"]) or None)
    else:
        raise ValueError(f"optim.name={name!r}; use one of {OPTIMIZERS}")
    clip = float(optim["max_grad_norm"])
    if clip > 0:
        return optax.chain(optax.clip_by_global_norm(clip), inner)
    return inner


def to_memory(tree: Any, kind: str) -> Any:
    """Places every array of ``tree`` in memory ``kind`` (``"device"`` or ``"pinned_host"``).

    Outside ``jax.jit`` each array keeps its sharding with the memory kind changed; inside, the
    transfer is a ``jax.memory.Space`` placement the compiler schedules (sharding kept).
    """
    space = {DEVICE: jax.memory.Space.Device, HOST: jax.memory.Space.Host}[kind]

    def move(x):
        if isinstance(x, jax.core.Tracer):
            return jax.device_put(x, space)
        if isinstance(x, jax.Array):
            return jax.device_put(x, x.sharding.with_memory_kind(kind))
        return jax.device_put(x, jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                                                    memory_kind=kind))
    return jax.tree.map(move, tree)


def memory_kinds(tree: Any) -> set[str]:
    """The memory kinds that the arrays of ``tree`` live in (for tests and logs)."""
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)}
