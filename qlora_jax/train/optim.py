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


def loraplus_labels(params: Any) -> Any:
    """``"b"`` on every ``lora_b`` leaf, ``"a"`` elsewhere (A, DoRA magnitudes, saved modules)."""
    def label(path, _):
        return "b" if any(getattr(k, "key", None) == "lora_b" for k in path) else "a"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim: Mapping[str, Any], schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
    """Global-norm clipping (``max_grad_norm`` > 0) followed by AdamW or SGD with the schedule.

    With ``optim.loraplus_lr_ratio`` = k != 1 (LoRA+, Hayen et al. 2024; PEFT's
    ``create_loraplus_optimizer``) the ``lora_b`` leaves get the learning rate k x the schedule
    and every other trainable leaf the schedule itself (one optax.multi_transform).
    """
    name = optim["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r}; use one of {OPTIMIZERS}")

    def inner(lr: optax.Schedule) -> optax.GradientTransformation:
        if name == "adamw":
            return optax.adamw(lr, b1=float(optim["b1"]), b2=float(optim["b2"]),
                               eps=float(optim["eps"]), weight_decay=float(optim["weight_decay"]))
        return optax.sgd(lr, momentum=float(optim["b1"]) or None)

    ratio = float(optim.get("loraplus_lr_ratio", 1.0))
    if not ratio > 0:
        raise ValueError(f"optim.loraplus_lr_ratio={ratio!r} must be > 0 (1 is plain LoRA)")
    if ratio == 1.0:
        tx = inner(schedule)
    else:
        tx = optax.multi_transform({"a": inner(schedule),
                                    "b": inner(lambda step: ratio * schedule(step))},
                                   loraplus_labels)
    clip = float(optim["max_grad_norm"])
    if clip > 0:
        return optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx


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
