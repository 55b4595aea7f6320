"""Preemption: SIGTERM / Ctrl-C stop a run after a checkpoint; the resumed run is the uninterrupted one.

The launcher runs the smoke experiment in subprocesses (12 steps, a metrics record every 3 steps,
evaluation every 6, checkpoints every 4). A run that the ``QLORA_JAX_TEST_SIGNAL_AT_STEP`` hook
sends SIGTERM at step 7 (between metrics records and checkpoints) must save step 7, exit with
`preemption.EXIT_CODE` and one resume line, and resume to the uninterrupted run's adapter bytes,
metrics, evaluations and data position; two Ctrl-C inside a save (held by the pause hook) abort
with 130 and leave the previous checkpoint to resume from; an external SIGTERM at an arbitrary
moment of a long run stops it within a bound (printed). The two-process case is in
test_mesh_run.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import smoke
from qlora_jax.train import config as train_config
from qlora_jax.train import preemption
from qlora_jax.train.checkpoint import PAUSE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")
RUN = {"train.steps": 12, "train.checkpoint_every": 4, "train.log_every": 3,
       "train.eval_every": 6, "train.progress": "lines", "train.keep_checkpoints": 2}
TIMEOUT = 300  # seconds a run may take (a hang must fail, not block CI)
EXIT_BOUND_S = 30.0  # generous: one smoke step (~0.05 s) and one save (~0.2 s), on a loaded CPU

_CACHE_DIR = [""]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    _CACHE_DIR[0] = str(tmp_path_factory.mktemp("jax_cache"))


def command(workdir, extra=None):
    items = dict(RUN, **(extra or {}))
    return [sys.executable, "-m", "qlora_jax.launch", "--config", SMOKE, "--workdir",
            str(workdir), *[f"--config.{k}={v}" for k, v in items.items()]]


def start(workdir, extra=None, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_CACHE_DIR[0],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **(env or {}))
    return subprocess.Popen(command(workdir, extra), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, code=0, timeout=TIMEOUT):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"run did not finish in {timeout} s:\n{out[-3000:]}") from None
    assert proc.returncode == code, out[-3000:]
    return out


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_result(workdir):
    """Everything a resumed run must reproduce: adapter bytes, the last checkpoint's arrays and
    data position, and the training and evaluation records (without timings)."""
    import jax
    import orbax.checkpoint as ocp

    out = {}
    for name in sorted(os.listdir(workdir / "adapter")):
        out[f"adapter/{name}"] = (workdir / "adapter" / name).read_bytes()
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    last = workdir / "checkpoints" / str(steps[-1])
    tree = ocp.StandardCheckpointer().restore(last / "state")
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = np.asarray(leaf).tobytes()
    out["data_position"] = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(last / "data")
    timing = ("tokens_per_s", "steps_per_s", "peak_memory_bytes", "time")
    for name in ("metrics.jsonl", "eval.jsonl"):
        out[name] = [{k: v for k, v in r.items() if k not in timing}
                     for r in records(workdir / name)]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 12-step run."""
    wd = tmp_path_factory.mktemp("reference")
    finish(start(wd))
    return wd


def stop_lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("stopped by ")]


@pytest.mark.slow  # the launcher in subprocesses: ~10 s a run, most of it JAX's start
def test_sigterm_saves_the_step_in_flight_and_the_resumed_run_is_the_uninterrupted_one(
        reference, tmp_path):
    wd = tmp_path / "preempted"
    out = finish(start(wd, env={preemption.SIGNAL_ENV: "7"}), code=preemption.EXIT_CODE)
    (line,) = stop_lines(out)
    assert line.startswith(f"stopped by SIGTERM after step 7 of 12; checkpoint "
                           f"{wd / 'checkpoints' / '7'} saved; resume with the same command: "
                           "python -m qlora_jax.launch --config "), line
    assert f"--workdir {wd}" in line and "--config.train.steps=12" in line, line
    assert "Traceback" not in out, out[-3000:]
    assert sorted(os.listdir(wd / "checkpoints")) == ["4", "7"]
    assert not (wd / "adapter").exists()  # only a finished run exports it
    # Metrics and TensorBoard are flushed: the records up to the stop, each once.
    assert [r["step"] for r in records(wd / "metrics.jsonl")] == [3, 6]
    assert [r["step"] for r in records(wd / "eval.jsonl")] == [0, 6]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(wd))

    out = finish(start(wd))
    assert "resuming at step 7 of 12" in out, out[-3000:]
    got, ref = run_result(wd), run_result(reference)
    assert got.keys() == ref.keys()
    assert [k for k in ref if got[k] != ref[k]] == []  # bytes, position, records: all equal


@pytest.mark.slow
def test_ctrl_c_twice_during_a_save_aborts_and_the_previous_checkpoint_resumes(reference,
                                                                              tmp_path):
    wd = tmp_path / "aborted"
    proc = start(wd, env={PAUSE_ENV: "8"})  # held inside the save of step 8
    marker = wd / "checkpoints" / "PAUSED_IN_SAVE"
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None or time.time() - t0 > TIMEOUT:
            proc.kill()
            raise AssertionError("never reached the save of step 8:\n"
                                 + proc.communicate()[0][-3000:])
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the first Ctrl-C waits for the save (and the step) to end
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out = finish(proc, code=preemption.ABORT_EXIT_CODE, timeout=30)
    print(f"second Ctrl-C to exit: {time.time() - t0:.2f} s")
    assert "SIGINT received: stopping after the step in flight" in out, out[-3000:]
    assert "second SIGINT: aborting now" in out, out[-3000:]
    entries = os.listdir(wd / "checkpoints")
    assert "4" in entries and "8" not in entries, entries
    out = finish(start(wd))
    assert "resuming at step 4 of 12" in out, out[-3000:]
    got, ref = run_result(wd), run_result(reference)
    assert [k for k in ref if got[k] != ref[k]] == []


@pytest.mark.slow
def test_time_from_an_external_sigterm_to_exit_is_bounded(tmp_path):
    """A long run signalled at an arbitrary step; timed checkpoints (every step here)."""
    wd = tmp_path / "long"
    proc = start(wd, {"train.steps": 100000, "train.log_every": 1, "train.eval_every": 0,
                      "train.checkpoint_every": 0, "train.checkpoint_every_minutes": 1e-6,
                      "train.keep_checkpoints": 3})
    t0 = time.time()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3:") or time.time() - t0 > TIMEOUT:
            break
    assert lines and lines[-1].startswith("step 3:"), "".join(lines)[-3000:]
    t_signal = time.time()
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, code=preemption.EXIT_CODE, timeout=120)
    elapsed = time.time() - t_signal
    print(f"SIGTERM to exit: {elapsed:.2f} s")
    (line,) = stop_lines(out)
    step = int(re.match(r"stopped by SIGTERM after step (\d+) of 100000", line).group(1))
    assert step >= 3
    assert elapsed < EXIT_BOUND_S, (elapsed, line)
    # checkpoint_every=0 saves only at the end: these are the timed saves (and the stop's).
    assert sorted(int(s) for s in os.listdir(wd / "checkpoints")) == [step - 2, step - 1, step]


def test_signals_ask_once_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with preemption.StopSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wait(10.0) and signals.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        time.sleep(0.2)
        assert signals.signal_name == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before


def test_timed_saves_follow_the_clock_and_restart_at_each_save():
    now = [100.0]
    with preemption.StopSignals() as signals:
        policy = preemption.StopPolicy(signals, every_minutes=2.0, clock=lambda: now[0])
        assert policy.poll(1) == (False, False)
        now[0] += 119.0
        assert policy.poll(2) == (False, False)
        now[0] += 1.0
        assert policy.poll(3) == (False, True)
        policy.saved()
        assert policy.poll(4) == (False, False)
        signals.request("SIGTERM")
        assert policy.poll(5) == (True, False)
        off = preemption.StopPolicy(signals, every_minutes=0.0, clock=lambda: now[0])
        now[0] += 1e9
        assert off.poll(6) == (True, False)


@pytest.mark.parametrize("value", [-1.0, float("nan"), "10"])
def test_checkpoint_every_minutes_must_be_a_finite_number_at_least_0(value):
    import ml_collections

    c = ml_collections.ConfigDict(smoke.get_config().to_dict(), type_safe=False)
    c.train.checkpoint_every_minutes = value
    with pytest.raises(train_config.ConfigError, match="checkpoint_every_minutes"):
        train_config.validate(c)
