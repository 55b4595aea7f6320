"""A whole run: validate, build, resume, train with logging/eval/checkpoints, export the adapter.

Workdir layout::

    config.json        the resolved config (a workdir belongs to one experiment)
    metrics.jsonl      one JSON object a logged training step
    eval.jsonl         one JSON object a held-out evaluation (before training, every eval_every)
    events.out.tfevents.*   TensorBoard, the same scalars
    checkpoints/<step>/     orbax: trainable leaves, optimizer state, step, RNG, data position
    adapter/           the PEFT adapter (adapter_model.safetensors + adapter_config.json), at the end

metrics.jsonl records of training steps hold ``step``, ``loss`` (mean over the logged window),
``grad_norm`` (before clipping), ``accuracy`` (next-token or label accuracy on the loss positions),
``learning_rate``, ``tokens_per_s`` (non-padding tokens a second over the window, compilation
included in the first), ``padding_fraction`` (share of the window's token slots that are padding),
``steps_per_s``, ``peak_memory_bytes`` and ``peak_memory_source`` (see
qlora_jax.train.metrics); eval.jsonl records hold ``eval_loss``, ``eval_accuracy``,
``eval_perplexity`` (causal LMs) and ``eval_count``. With ``train.samples = N`` (causal LMs with
eval data) the summary also holds the greedy answers to the first N held-out prompts before and
after training (`qlora_jax.train.samples`).

Running the same config on the same workdir again resumes from the latest complete checkpoint
and continues exactly as the uninterrupted run would have (deterministic data order; dropout keys
derived from the seed and the step). The mesh may change between runs of a workdir (e.g. resume
on fewer devices): the checkpoint is restored onto the new shardings.

A SIGTERM or a first Ctrl-C (to any process) stops the run after the step in flight, which all
processes agree on, with a checkpoint of that step: `run` raises `preemption.Preempted` (see
qlora_jax.train.preemption). Checkpoints are saved every ``train.checkpoint_every`` steps, every
``train.checkpoint_every_minutes`` of wall time, at such a stop and at the end.

The run lies on the device mesh of ``config.mesh`` (data x fsdp x tensor devices, over one or
several processes joined by ``jax.distributed``; (1, 1, 1) is one device): the state is placed by
`Placement`, the step is jitted with its shardings, and each process loads only the rows of each
batch its devices hold. Every process runs the same loop and takes part in checkpoints and
gathers; only process 0 writes config.json, the logs, TensorBoard and the adapter.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any, Optional, TextIO

import jax
import numpy as np

from qlora_jax import data as qdata
from qlora_jax.lora import params as lora_params
from qlora_jax.lora import tree as lora_tree
from qlora_jax.train import build
from qlora_jax.train import config as train_config
from qlora_jax.train import preemption
from qlora_jax.train import remat as remat_auto
from qlora_jax.train.checkpoint import Checkpointer
from qlora_jax.train.distributed import Placement, describe_mesh, is_writer
from qlora_jax.train.metrics import MetricsLogger, NullLogger, peak_memory
from qlora_jax.train.state import create_state
from qlora_jax.train.step import evaluate, host_metrics, make_eval_step, make_train_step


class WorkdirError(ValueError):
    """The workdir belongs to another experiment."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


#: Test hook (not a config field): ``QLORA_JAX_TEST_NAN_AT_STEP=N`` makes the loss of step N NaN.
NAN_AT_STEP_ENV = "QLORA_JAX_TEST_NAN_AT_STEP"

#: Config sections that say where a run lies, not what it computes: a run may resume on another
#: mesh (its checkpoints are restored onto the new shardings; config.json then records the new
#: mesh).
PLACEMENT_SECTIONS = ("mesh",)

#: Key of the checkpoint's data item that holds the per-step metrics of the steps since the last
#: metrics record, so that a run resumed between records logs the uninterrupted run's means.
LOG_WINDOW_KEY = "log_window"


def check_workdir(workdir: str, resolved: dict[str, Any]) -> bool:
    """True when ``workdir`` already holds this experiment (resume); raises for another one.

    The experiment is the config without `PLACEMENT_SECTIONS`. A workdir that is a file, or
    lies under a file or a directory this process cannot write, is refused too.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} is an existing file, not a directory; give a "
                           "directory path (it is created when missing)")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WorkdirError(f"--workdir {workdir} lies under {parent}, which is a file; give a "
                           "directory path")
    if not os.path.isdir(workdir) and not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {workdir} cannot be created: {parent} is not writable")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        try:
            existing = json.load(f)
        except json.JSONDecodeError:
            raise WorkdirError(f"{path} is not valid JSON; use a new --workdir") from None

    def what(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in PLACEMENT_SECTIONS}

    if what(existing) != what(resolved):
        diff = train_config.differences(what(existing), what(resolved))
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise WorkdirError(f"workdir {workdir} holds another experiment (its config.json differs "
                           f"in {shown}); use a new --workdir, or the same config to resume")
    return True


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _bits_per_frozen_param(frozen: Any) -> tuple[float, float]:
    """(bits a frozen parameter over all frozen leaves, bits a parameter of the 4-bit leaves)."""
    from qlora_jax.quant.qtensor import QTensor

    n = lora_tree.count(frozen)
    qs = [v for v in lora_tree.flatten(frozen).values() if isinstance(v, QTensor)]
    q_bits = 8.0 * sum(q.nbytes for q in qs) / max(sum(q.size for q in qs), 1)
    return 8.0 * lora_tree.nbytes(frozen) / max(n, 1), q_bits


def run(config: Any, workdir: str, stream: Optional[TextIO] = None) -> dict[str, Any]:
    """Runs (or resumes) the experiment ``config`` in ``workdir``.

    Returns:
      A summary: steps, final train loss, evaluation before/after (when there is eval data),
      trainable parameter count, bits per frozen parameter, peak memory, wall time.

    Raises:
      ConfigError, WorkdirError, DataError, FileNotFoundError: bad input, before any file is
        written.
      TrainingDiverged: a NaN/Inf loss (the run stops; checkpoints keep the last good state).
      preemption.Preempted: a SIGTERM or Ctrl-C (to any process) stopped the run after a
        checkpoint of the step it stopped at; the same call resumes (see
        qlora_jax.train.preemption).
    """
    stream = stream or sys.stderr
    with preemption.StopSignals(stream) as signals:  # only for the run; restored after
        return _run(config, workdir, stream, signals)


def _run(config: Any, workdir: str, stream: TextIO, signals: preemption.StopSignals
         ) -> dict[str, Any]:
    t_start = time.time()
    train_config.validate(config, jax.device_count(), jax.process_count())
    resolved = train_config.resolve(config)
    check_workdir(workdir, resolved)  # a workdir of another experiment fails here
    placement = make_placement(config)
    try:  # the rows of each batch this process loads
        _, train_shard, train_shards = placement.process_rows(config.train.batch_size)
        _, eval_shard, eval_shards = placement.process_rows(config.train.eval_batch_size)
    except ValueError as e:
        raise train_config.ConfigError(f"config.mesh: {e}") from None
    build.check_paths(config)
    build.check_positions(config)
    data = build.load_data(config)
    num_labels = config.model.num_labels
    if config.model.task == "classification" and not num_labels:
        num_labels = data.train.num_labels
    try:
        model, params = build.load_model(config, num_labels)
        task = build.make_task(config, model)
    except (ValueError, KeyError) as e:  # targets matching nothing, shape mismatches, ...
        raise train_config.ConfigError(f"cannot build the model: {_one_line(e)}") from e
    tx, schedule = build.make_optimizer(config)
    adapter_dtype = build.DTYPES[config.lora.dtype]
    state = create_state(params, tx, config.train.seed, adapter_dtype, config.optim.offload_state)
    # PiSSA/OLoRA: the adapter file is converted against the initial adapters (a LoRA on the
    # original base); a resumed run rebuilds the same ones from the checkpoint and seed.
    initial = (jax.device_get(lora_params.adapters(params))
               if str(config.lora.init).startswith(("pissa", "olora")) else None)
    del params
    shardings = placement.state_shardings(state, model.param_axes())
    state = placement.put(state, shardings)
    step_shardings = placement.step_shardings(shardings)

    def make_step(task: Any) -> Any:
        return make_train_step(task, tx, schedule, shardings=step_shardings,
                               accum_steps=config.train.grad_accum,
                               offload_state=config.optim.offload_state,
                               dropout=config.lora.dropout > 0,
                               nan_at_step=int(os.environ.get(NAN_AT_STEP_ENV, -1)))

    notes = [data.train.summary()] if hasattr(data.train, "summary") else []
    if config.model.remat == "auto":  # compiles the step per policy until one fits
        rows = config.train.batch_size // train_shards
        sample = placement.batch(data.train.collate([], rows, config.train.seq_len))
        try:
            model, choice = remat_auto.resolve(config, model, make_step, state, sample)
        except remat_auto.RematError as e:
            raise train_config.ConfigError(str(e)) from None
        task = build.make_task(config, model)
        notes.append(choice.describe())
    writer = is_writer()

    # Bad input is behind us: from here on the workdir is written.
    if writer:  # also when resuming: the experiment on another mesh records the new one
        os.makedirs(workdir, exist_ok=True)
        _write_json(os.path.join(workdir, "config.json"), resolved)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    loader_state, pending = None, []
    if ckpt.latest_step() is not None:
        state, loader_state = ckpt.restore(state)
        # The metrics of the steps since the last log record (a stop between records).
        pending = list(loader_state.pop(LOG_WINDOW_KEY, []))
    start = int(state.step)
    policy = preemption.StopPolicy(signals, config.train.checkpoint_every_minutes)
    loader = qdata.TrainLoader(data.train, config.train.batch_size, config.train.seed,
                               state=loader_state, length_buckets=tuple(config.data.length_buckets)
                               or None, shard_index=train_shard, shard_count=train_shards)
    train_step = make_step(task)
    eval_step = make_eval_step(task, shardings=step_shardings)
    kind = config.model.task

    def run_eval() -> Optional[dict[str, float]]:
        if data.eval is None:
            return None
        batches = qdata.EvalLoader(data.eval, config.train.eval_batch_size,
                                   shard_index=eval_shard, shard_count=eval_shards)
        return evaluate(eval_step, state, (placement.batch(b) for b in batches), kind,
                        config.train.eval_batches or None)

    log = (MetricsLogger(workdir, config.train.steps, start, config.train.progress, stream)
           if writer else NullLogger())
    n_trainable = lora_tree.count(state.trainable)
    n_frozen = lora_tree.count(state.frozen)
    bits, q_bits = _bits_per_frozen_param(state.frozen)
    log.message(f"{'resuming at' if start else 'starting'} step {start} of {config.train.steps}: "
                f"{n_trainable:,} trainable parameters, {n_frozen:,} frozen at "
                f"{bits:.3f} bits each ({q_bits:.3f} bits in the 4-bit weights); "
                f"{describe_mesh(placement)}")
    for note in notes:
        log.message(note)
    summary: dict[str, Any] = {"trainable_params": n_trainable, "frozen_params": n_frozen,
                               "bits_per_frozen_param": bits, "bits_per_4bit_param": q_bits,
                               "start_step": start}
    samples = _sample_prompts(config, data, model)

    def run_samples(key: str) -> None:
        if not samples:
            return
        from qlora_jax.train import samples as samples_lib

        params = lora_params.combine(state.trainable, state.frozen)
        texts = samples_lib.generate_texts(model, params, data.tokenizer, samples,
                                           config.train.sample_tokens)
        rows = summary.setdefault("samples", [
            {"prompt": samples_lib.prompt_text(data.tokenizer, p),
             "reference": data.tokenizer.decode(r).strip()} for p, r in samples])
        for row, text in zip(rows, texts):
            row[key] = text

    if start == 0:
        run_samples("before")
    if config.train.eval_every and start == 0:
        before = run_eval()
        if before is not None:
            log.log(0, before, evaluation=True)
            summary["eval_before"] = before
    last_loss = math.nan
    try:
        if start < config.train.steps and policy.poll(start)[0]:  # a signal while loading
            latest = ckpt.latest_step()
            raise preemption.Preempted(start, config.train.steps, policy.signal_name, None if
                                       latest is None else os.path.join(ckpt.directory,
                                                                        str(latest)))
        window_tokens, window_t0, window_steps = 0.0, time.time(), 0
        for step in range(start, config.train.steps):
            batch = placement.batch(next(loader))
            state, metrics = train_step(state, batch)
            m = host_metrics(metrics)  # one sync a step: a NaN must never reach a checkpoint
            if not math.isfinite(m["loss"]):
                good = ckpt.latest_step()
                raise TrainingDiverged(
                    f"loss is {m['loss']} at step {step + 1}; stopping. The last good checkpoint "
                    f"(step {good}) is kept in {ckpt.directory}" if good is not None else
                    f"loss is {m['loss']} at step {step + 1}; stopping (no checkpoint yet)")
            last_loss = m["loss"]
            window_tokens += m["tokens"]
            window_steps += 1
            pending.append(m)
            done = step + 1
            if done % config.train.log_every == 0 or done == config.train.steps:
                dt = max(time.time() - window_t0, 1e-9)
                record = {k: float(np.mean([p[k] for p in pending]))
                          for k in ("loss", "grad_norm", "accuracy")}
                record["learning_rate"] = m["learning_rate"]
                record["tokens_per_s"] = window_tokens / dt
                # Over the window's steps (those restored from a checkpoint included).
                slots = sum(p.get("slots", p["tokens"]) for p in pending)
                record["padding_fraction"] = 1.0 - sum(p["tokens"] for p in pending) / max(slots,
                                                                                          1.0)
                record["steps_per_s"] = window_steps / dt
                log.log(done, record)
                window_tokens, window_t0, window_steps, pending = 0.0, time.time(), 0, []
            if config.train.eval_every and (done % config.train.eval_every == 0
                                            or done == config.train.steps):
                result = run_eval()
                if result is not None:
                    log.log(done, result, evaluation=True)
                    summary["eval_after"] = result
            stop, timed = policy.poll(done)  # the same answer on every process
            if (config.train.checkpoint_every and done % config.train.checkpoint_every == 0) \
                    or done == config.train.steps or timed or stop:
                ckpt.save(state, dict(loader.state, **{LOG_WINDOW_KEY: pending}))
                policy.saved()
            if stop and done < config.train.steps:
                raise preemption.Preempted(done, config.train.steps, policy.signal_name,
                                           os.path.join(ckpt.directory, str(done)))
        if config.train.eval_every and "eval_after" not in summary:
            result = run_eval()  # a finished run re-run: report its final metric again
            if result is not None:
                summary["eval_after"] = result
        run_samples("after")
        export_adapter(model, state, workdir, placement, initial)
    finally:
        log.close()
        ckpt.close()
    summary.update({"steps": config.train.steps, "final_loss": last_loss,
                    "wall_s": time.time() - t_start})
    summary["peak_memory_bytes"], summary["peak_memory_source"] = peak_memory()
    return summary


def _sample_prompts(config: Any, data: Any, model: Any) -> list[tuple[list[int], list[int]]]:
    """Held-out prompts to generate from before and after training (``train.samples``)."""
    count = config.train.samples
    if not count or data.eval is None or config.model.task != "causal_lm" \
            or not hasattr(model, "init_cache"):
        return []
    from qlora_jax.train import samples as samples_lib

    return samples_lib.held_out_prompts(data.eval, count)


def make_placement(config: Any) -> Placement:
    """The run's `Placement`: ``config.mesh`` over all devices ((1, 1, 1) in one process: the
    first device, whatever the machine has)."""
    sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    one = sizes == (1, 1, 1) and jax.process_count() == 1
    return Placement.from_config(config.mesh, jax.devices()[:1] if one else None)


def export_adapter(model: Any, state: Any, workdir: str,
                   placement: Optional[Placement] = None,
                   initial_adapters: Optional[Any] = None) -> str:
    """Writes the PEFT adapter of ``state`` to ``workdir/adapter`` (atomically, via a temp dir).

    ``initial_adapters``: PiSSA/OLoRA adapters at initialisation (see ``qj.save_peft``).

    Every process calls it (the trainable leaves are gathered from all of them); process 0
    writes.
    """
    from qlora_jax.checkpoints.peft import save_peft

    trainable = (placement.gather(state.trainable) if placement is not None
                 else jax.device_get(state.trainable))
    out = os.path.join(workdir, "adapter")
    if not is_writer():
        return out
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    params = lora_params.combine(trainable, state.frozen)
    save_peft(model, params, tmp, initial_adapters=initial_adapters)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
