"""Runs an experiment: ``python -m qlora_jax.launch --config experiments/NAME.py --workdir DIR``.

Overrides: ``--config.train.steps=200 --config.model.path=/models/llama``. A misspelled key or a
value of the wrong type fails while the flags are parsed; a value out of range, a missing model
path or bad data fails right after, before anything is written. User errors are one line on
stderr and exit code 2; a NaN/Inf loss stops the run with exit code 3.

Preemption: a SIGTERM or a first Ctrl-C (to any of the processes) finishes the step in flight,
saves its checkpoint, prints one line naming the step and the command that resumes (this same
command), and exits with code 75 (EX_TEMPFAIL: run it again); a second Ctrl-C aborts at once
with code 130, leaving the last complete checkpoint (qlora_jax.train.preemption).

Several devices: ``--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2`` lays the
run on a data x fsdp x tensor mesh whose product must be the number of devices (of all
processes); ``train.batch_size`` must split over the batch axes (data x fsdp) and the micro-batches.

Several processes (hosts): start the same command once a process, with

    --coordinator HOST:PORT --num_processes N --process_id I

(``HOST:PORT`` of process 0, reachable from all; or the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). ``jax.distributed`` is
initialised before anything touches the devices; every process loads only the rows of each batch
its devices hold, and only process 0 writes the workdir's files and prints the report (the
workdir must be on a file system all processes share: they write the checkpoints together).
"""

from __future__ import annotations

import json
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file (experiments/NAME.py, with get_config())",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; re-use it to resume)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "several processes: HOST:PORT of process 0's jax.distributed "
    "coordinator (default: $JAX_COORDINATOR_ADDRESS; neither: one process)")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "several processes: how many (default: $JAX_NUM_PROCESSES)",
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "several processes: this one's index, 0..N-1 (default: $JAX_PROCESS_ID)",
    lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; overrides look like "
              "--config.train.steps=100", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from qlora_jax.data import DataError
    import jax

    from qlora_jax.train import loop, preemption
    from qlora_jax.train.config import ConfigError
    from qlora_jax.train.distributed import distributed_initialize

    # The run agrees on a stop step itself (preemption.StopPolicy); JAX's preemption service
    # would install a C++ SIGTERM handler that swallows the signal.
    jax.config.update("jax_enable_preemption_service", False)
    try:  # before anything touches the devices
        distributed_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = loop.run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, loop.WorkdirError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except preemption.Preempted as e:
        if jax.process_index() == 0:
            print(f"{e}; resume with the same command: {resume_command()}", file=sys.stderr,
                  flush=True)
        return preemption.EXIT_CODE
    if jax.process_index() == 0:
        print(report(summary))
    return 0


def resume_command() -> str:
    """The command line of this process (re-running it resumes the run)."""
    return shlex.join(["python", "-m", "qlora_jax.launch", *sys.argv[1:]])


def report(summary: dict) -> str:
    """The lines a finished run prints (and the summary as JSON, last)."""
    lines = []
    before, after = summary.get("eval_before"), summary.get("eval_after")
    for name, res in (("before training", before), ("after training", after)):
        if res:
            extra = (f", perplexity {res['eval_perplexity']:.3f}" if "eval_perplexity" in res
                     else "")
            lines.append(f"held-out {name}: accuracy {res['eval_accuracy']:.4f}, "
                         f"loss {res['eval_loss']:.4f}{extra}")
    for i, row in enumerate(summary.get("samples", ()), start=1):
        lines.append(f"held-out prompt {i}: {row['prompt']}")
        for key in ("reference", "before", "after"):
            if key in row:
                text = row[key].replace("\n", "\n      ")
                lines.append(f"  {key:>9}: {text}")
    lines.append(f"trainable parameters: {summary['trainable_params']:,}; frozen parameters: "
                 f"{summary['frozen_params']:,} at {summary['bits_per_frozen_param']:.3f} bits "
                 f"each on average, {summary['bits_per_4bit_param']:.3f} bits in the 4-bit "
                 "linear weights (embeddings and norms stay float)")
    lines.append(f"peak memory: {summary['peak_memory_bytes'] / 2**20:.0f} MiB "
                 f"({summary['peak_memory_source']}); wall time {summary['wall_s']:.1f} s")
    lines.append(json.dumps(summary, sort_keys=True, default=float))
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
