"""Training on several devices and hosts: ``jax.distributed`` start-up, and the placement of the
train state and batches on a device mesh (shardings, batches, gathering).

``Placement`` carries the mesh and rules of a run (``config.mesh``) and knows how to put the train
state and each batch on the devices, with which shardings to jit the step, and how to bring
arrays back to the host (all processes take part in gathers; only process 0 writes files).
One device and one process is the trivial mesh (1, 1, 1): everything still goes through here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from qlora_jax import sharding as shd
from qlora_jax.lora import tree as lora_tree
from qlora_jax.lora.trainable import Trainable
from qlora_jax.train.step import StepShardings


def _keystr(path: tuple[Any, ...]) -> tuple[str, ...]:
    out = []
    for k in path:
        name = getattr(k, "key", None)
        if name is None:
            name = getattr(k, "name", None)
        if name is None:
            name = getattr(k, "idx", None)
        out.append(str(name))
    return tuple(out)


@dataclasses.dataclass
class Placement:
    """Mesh, rules and the shardings derived from them for one run."""

    mesh: Mesh
    rules: tuple

    @classmethod
    def from_config(cls, mesh_cfg: Any, devices: Optional[Any] = None) -> "Placement":
        """The placement of ``config.mesh`` over ``devices`` (default: all devices)."""
        mesh = shd.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor),
                             devices)
        return cls(mesh, shd.rules_from_config(mesh_cfg))

    @property
    def size(self) -> int:
        return int(np.prod(list(self.mesh.shape.values())))

    @property
    def batch_divisor(self) -> int:
        """Rows a global batch must be a multiple of (the product of the batch mesh axes)."""
        return shd.batch_divisor(self.mesh, self.rules)

    def replicated(self) -> NamedSharding:
        return shd.replicated(self.mesh)

    def tree_shardings(self, tree: Any, axes: Any) -> Any:
        """Shardings of a params tree (or part of one); ``axes``: ``model.param_axes()``."""
        return shd.param_shardings(tree, axes, self.mesh, self.rules)

    def opt_state_shardings(self, opt_state: Any, trainable: Any, axes: Any) -> Any:
        """Optimizer-state leaves that mirror a trainable leaf get its sharding; others replicate.

        optax states hold trees shaped like the params (``mu``, ``nu``...), so the path of such a
        leaf ends with the path of the parameter it belongs to.
        """
        flat_sh = lora_tree.flatten(self.tree_shardings(trainable, axes))
        by_path = {}
        for p, s in flat_sh.items():
            by_path[p] = s.value if isinstance(s, Trainable) else s
        shapes = {p: np.shape(v.value if isinstance(v, Trainable) else v)
                  for p, v in lora_tree.flatten(trainable).items()}

        def pick(path, leaf):
            keys = tuple(k for k in _keystr(path) if k not in ("value",))
            for n in range(len(keys)):
                cand = keys[n:]
                if cand in by_path and shapes.get(cand) == np.shape(leaf):
                    sh = by_path[cand]
                    memory_kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
                    if memory_kind and memory_kind != sh.memory_kind:
                        sh = sh.with_memory_kind(memory_kind)
                    return sh
            memory_kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
            rep = self.replicated()
            return rep.with_memory_kind(memory_kind) if memory_kind else rep

        return jax.tree_util.tree_map_with_path(pick, opt_state)

    def state_shardings(self, state: Any, axes: Any) -> Any:
        """Shardings of a train state; ``axes``: the model's ``param_axes()``."""
        return state.replace(
            step=self.replicated(), rng=self.replicated(),
            trainable=self.tree_shardings(state.trainable, axes),
            frozen=self.tree_shardings(state.frozen, axes),
            opt_state=self.opt_state_shardings(state.opt_state, state.trainable, axes))

    def put(self, tree: Any, shardings: Any) -> Any:
        """Places host or single-device arrays onto ``shardings`` (the same values everywhere)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, shardings)

        def one(x, s):
            x = np.asarray(jax.device_get(x))
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
        return jax.tree.map(one, tree, shardings)

    def batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """A batch of this process's rows placed on the mesh (rows split over the batch axes)."""
        return shd.shard_batch(batch, self.mesh, self.rules)

    def batch_shardings(self, batch: dict[str, Any]) -> dict[str, NamedSharding]:
        return {k: shd.batch_sharding(self.mesh, self.rules, np.ndim(v)) for k, v in batch.items()}

    def step_shardings(self, state_shardings: Any) -> StepShardings:
        """Shardings to jit the train and eval steps with (see `make_train_step`)."""
        return StepShardings(state=state_shardings,
                             batch=shd.batch_sharding(self.mesh, self.rules, ndim=1),
                             metrics=self.replicated(), rules=tuple(self.rules))

    def process_rows(self, global_batch: int) -> tuple[int, int, int]:
        """(rows, shard index, shard count) of a global batch that this process loads.

        The rows are those the devices of this process hold under the batch sharding: a
        contiguous slice ``[index * rows, (index + 1) * rows)`` (every row when the batch axes do
        not split over processes), which is what the data loaders' shard arguments give.

        Raises:
          ValueError: the process's rows are not such a slice (a mesh whose batch axes interleave
            the processes' devices).
        """
        sh = shd.batch_sharding(self.mesh, self.rules, ndim=1)
        mine: set[int] = set()
        for idx in sh.addressable_devices_indices_map((global_batch,)).values():
            rows = idx[0] if idx else slice(None)
            mine.update(range(*rows.indices(global_batch)))
        lo, hi = min(mine), max(mine) + 1
        n = hi - lo
        if len(mine) != n or global_batch % n or lo % n:
            raise ValueError(f"the devices of process {jax.process_index()} hold rows "
                             f"{sorted(mine)} of a batch of {global_batch}, not one aligned "
                             "contiguous slice; order the mesh so that each process's devices "
                             "are adjacent")
        return n, lo // n, global_batch // n

    def gather(self, tree: Any) -> Any:
        """Host numpy copies of (possibly sharded, multi-process) arrays; all processes call it."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)


def distributed_initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """``jax.distributed.initialize`` from arguments or the usual environment variables.

    Arguments win; otherwise ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` are read (cluster environments such as SLURM are detected by JAX itself
    when none is given and ``QLORA_JAX_DISTRIBUTED=auto``). Returns whether it initialised.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if coordinator is None and os.environ.get("QLORA_JAX_DISTRIBUTED") != "auto":
        return False
    # CPU collectives across processes. Set unconditionally: asking for the backend here
    # (jax.default_backend()) would start it, and jax.distributed must come first.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - option name differs across JAX versions
        pass
    kwargs = {}
    if coordinator is not None:
        if n is None or pid is None:
            raise ValueError(f"coordinator {coordinator} given without the number of processes "
                             "and this process's id (--num_processes/--process_id or "
                             "JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
        n, pid = int(n), int(pid)
        if n < 1 or not 0 <= pid < n:
            raise ValueError(f"process id {pid} must lie in 0..{n - 1} (number of processes {n})")
        kwargs.update(coordinator_address=coordinator, num_processes=n, process_id=pid)
    jax.distributed.initialize(**kwargs)
    return True


def is_writer() -> bool:
    """Only process 0 writes the workdir's files (orbax coordinates its own writes)."""
    return jax.process_index() == 0


def describe_mesh(placement: Optional[Placement]) -> str:
    if placement is None:
        return "one device"
    shape = ", ".join(f"{k}={v}" for k, v in placement.mesh.shape.items())
    return f"mesh ({shape}) over {placement.size} devices in {jax.process_count()} process(es)"
