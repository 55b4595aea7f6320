"""Training: a pure jitted train step, optimizers with host offload, orbax checkpoints, the loop.

    from qlora_jax import train
    task = train.Task(model, "causal_lm")                 # or "classification"
    schedule = train.make_schedule(config.optim, steps)
    tx = train.make_optimizer(config.optim, schedule)
    state = train.create_state(params, tx, seed)          # trainable / frozen split
    step = train.make_train_step(task, tx, schedule)      # jit, state donated
    state, metrics = step(state, batch)

``python -m qlora_jax.launch --config experiments/NAME.py --workdir DIR`` runs a whole experiment
(see qlora_jax.train.loop).
"""

from qlora_jax.train.checkpoint import Checkpointer
from qlora_jax.train.config import ConfigError, validate
from qlora_jax.train.loop import TrainingDiverged, WorkdirError, run
from qlora_jax.train.optim import make_optimizer, make_schedule, memory_kinds, to_memory
from qlora_jax.train.state import TrainState, create_state
from qlora_jax.train.step import (evaluate, make_eval_step, make_train_step, train_step_fn)
from qlora_jax.train.task import Task, causal_targets

__all__ = [
    "Checkpointer", "ConfigError", "Task", "TrainState", "TrainingDiverged", "WorkdirError",
    "run", "validate", "causal_targets", "create_state", "evaluate", "make_eval_step",
    "make_optimizer", "make_schedule", "make_train_step", "memory_kinds", "to_memory",
    "train_step_fn",
]
