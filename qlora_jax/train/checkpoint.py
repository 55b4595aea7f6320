"""Orbax checkpoints of a run: trainable leaves, optimizer state, step, RNG and data position.

Frozen weights are not saved (the run rebuilds them from the model config); a checkpoint holds
what changes during training. Saves are atomic: orbax writes into a temporary directory and
renames it when complete, so a run killed at any moment (also during a save) leaves only complete
checkpoints behind, and ``latest_step`` ignores (and cleans up) unfinished ones. The last
``keep`` checkpoints are kept.

Arrays are saved as they lie (sharded over a mesh, possibly over several processes: orbax writes
each shard once and coordinates the processes) and restored straight onto the shardings and
memory kinds of the arrays of a freshly placed state, so a state whose optimizer lives in pinned
host memory restores there, and each process reads only the shards its devices hold. Every
process calls `save` and `restore`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from qlora_jax.train.state import TrainState

#: Test hook: when this environment variable names a step, the save of that step writes
#: ``<workdir>/checkpoints/PAUSED_IN_SAVE`` and sleeps inside the save (before it is committed),
#: so that tests can kill the process in the middle of a save.
PAUSE_ENV = "QLORA_JAX_TEST_PAUSE_IN_SAVE"


class _PausableJson(ocp.JsonCheckpointHandler):
    """The JSON handler, with the test hook of `PAUSE_ENV`."""

    pause_marker: Optional[str] = None

    async def async_save(self, directory, *args, **kwargs):
        if self.pause_marker is not None:
            with open(self.pause_marker, "w") as f:
                f.write(str(directory))
            while True:  # killed here by the test
                time.sleep(60)
        return await super().async_save(directory, *args, **kwargs)


@ocp.args.register_with_handler(_PausableJson, for_save=True)
class _DataSave(ocp.args.JsonSave):
    """Save args of the data-position item."""


@ocp.args.register_with_handler(_PausableJson, for_restore=True)
class _DataRestore(ocp.args.JsonRestore):
    """Restore args of the data-position item."""


def _saved(state: TrainState) -> dict[str, Any]:
    """The parts of the state a checkpoint holds (jax arrays stay where they are)."""
    tree = {"step": state.step, "rng": state.rng, "trainable": state.trainable,
            "opt_state": state.opt_state}
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)


def _abstract(x: Any) -> Any:
    """Restore target of one leaf: its shape, dtype and sharding (numpy for host leaves)."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.asarray(x)


class Checkpointer:
    """Saves and restores `TrainState` + data-loader position under ``directory``.

    Args:
      directory: the run's ``checkpoints/`` folder (created on first save).
      keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self._json = _PausableJson()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": self._json})

    def latest_step(self) -> Optional[int]:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, data_state: dict[str, Any]) -> None:
        """Saves (synchronously) the checkpoint of ``state.step``."""
        step = int(state.step)
        pause = os.environ.get(PAUSE_ENV)
        self._json.pause_marker = (os.path.join(self.directory, "PAUSED_IN_SAVE")
                                   if pause is not None and int(pause) == step else None)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_saved(state)), data=_DataSave(data_state)))
        self._manager.wait_until_finished()

    def restore(self, like: TrainState, step: Optional[int] = None
                ) -> tuple[TrainState, dict[str, Any]]:
        """(state, data position) of checkpoint ``step`` (default: the latest).

        ``like`` is a freshly created (and placed) state of the same run: it gives the
        structure, dtypes, shardings and memory kinds; its frozen weights are kept.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        target = jax.tree.map(_abstract, _saved(like))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=_DataRestore()))
        tree = restored["state"]

        def place(new, old):
            if isinstance(old, jax.Array):
                if isinstance(new, jax.Array):  # (a memory kind orbax did not keep, if any)
                    return new if new.sharding == old.sharding else jax.device_put(
                        new, old.sharding)
                return jax.device_put(np.asarray(new, dtype=old.dtype), old.sharding)
            return np.asarray(new)
        placed = jax.tree.map(place, tree, {"step": like.step, "rng": like.rng,
                                            "trainable": like.trainable,
                                            "opt_state": like.opt_state})
        state = like.replace(step=placed["step"], rng=placed["rng"],
                             trainable=placed["trainable"], opt_state=placed["opt_state"])
        return state, dict(restored["data"])

    def close(self) -> None:
        self._manager.close()
