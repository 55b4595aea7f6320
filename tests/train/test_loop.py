"""Whole runs of the smoke experiment: outputs, resume, SIGKILL at any moment, NaN stop.

The kill tests run the launcher as a subprocess, kill it with SIGKILL (once between checkpoints,
once inside a checkpoint save, held there by the QLORA_JAX_TEST_PAUSE_IN_SAVE hook), resume it,
and require the final adapter (and trainable state) to equal an uninterrupted run's to the bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import smoke
from qlora_jax.train import loop
from qlora_jax.train.checkpoint import PAUSE_ENV

# Whole runs of the smoke experiment (several in subprocesses): the slow tier.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")
# 12 steps, checkpoints at 4, 8, 12, a log line a step, no evaluation.
SHORT = {"train.steps": 12, "train.checkpoint_every": 4, "train.log_every": 1,
         "train.eval_every": 0, "train.progress": "lines", "train.keep_checkpoints": 2}


def overrides(extra=None):
    items = dict(SHORT, **(extra or {}))
    return [f"--config.{k}={v}" for k, v in items.items()]


# The subprocesses share a persistent compilation cache (the same executables, compiled once).
CACHE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def start(workdir, extra=None, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **CACHE, **(env or {}))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR[0])
    return subprocess.Popen([sys.executable, "-m", "qlora_jax.launch", "--config", SMOKE,
                             "--workdir", str(workdir), *overrides(extra)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def final_state(workdir):
    """Bytes of the exported adapter (if any) and of every array of the last checkpoint."""
    from qlora_jax.train.checkpoint import Checkpointer
    import orbax.checkpoint as ocp

    out = {}
    adapter = os.path.join(workdir, "adapter")
    if os.path.isdir(adapter):
        for name in sorted(os.listdir(adapter)):
            with open(os.path.join(adapter, name), "rb") as f:
                out[f"adapter/{name}"] = f.read()
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), 2)
    step = ck.latest_step()
    ck.close()
    tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                           "state"))
    import jax
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = np.asarray(leaf).tobytes()
    return step, out


_CACHE_DIR = [""]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    _CACHE_DIR[0] = str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step smoke run (subprocess)."""
    wd = tmp_path_factory.mktemp("reference")
    out = finish(start(wd))
    return wd, out


def test_smoke_run_writes_the_workdir_and_learns(reference):
    wd, out = reference
    names = set(os.listdir(wd))
    assert {"config.json", "metrics.jsonl", "checkpoints"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    with open(wd / "config.json") as f:
        cfg = json.load(f)
    assert cfg["train"]["steps"] == 12 and cfg["model"]["random"]["model_type"] == "llama"
    records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert {"step", "loss", "learning_rate", "tokens_per_s", "peak_memory_bytes",
                "grad_norm", "padding_fraction"} <= set(r)
        assert r["peak_memory_bytes"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["padding_fraction"] < 0.5   # packed rows (about 0.19 on average)
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert sorted(int(s) for s in os.listdir(wd / "checkpoints")) == [8, 12]  # keep 2
    assert "step 12:" in out and "Traceback" not in out
    assert "160 examples packed into 110 rows of 96 tokens" in out
    import qlora_jax as qj
    if hasattr(qj, "save_peft"):
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(
            os.listdir(wd / "adapter"))


def test_rerun_of_a_finished_run_changes_nothing(reference, tmp_path):
    wd, _ = reference
    step, before = final_state(wd)
    config = smoke.get_config()
    for k, v in SHORT.items():
        section, key = k.split(".")
        config[section][key] = v
    summary = loop.run(config, str(wd))
    assert summary["start_step"] == 12
    assert final_state(wd) == (step, before)


def wait_for(proc, predicate, what, timeout=240):
    """Reads the child's output lines until predicate(line) holds."""
    t0 = time.time()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if predicate(line):
            return lines
        if time.time() - t0 > timeout:
            break
    proc.kill()
    raise AssertionError(f"never saw {what}; output:\n{''.join(lines)[-3000:]}")


def test_sigkill_mid_run_and_mid_save_resumes_to_the_same_adapter(reference, tmp_path):
    wd = tmp_path / "killed"
    # 1. Killed inside the save of step 8 (before orbax commits it).
    proc = start(wd, env={PAUSE_ENV: "8"})
    marker = wd / "checkpoints" / "PAUSED_IN_SAVE"
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 240, "the run never reached the save of step 8"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    entries = os.listdir(wd / "checkpoints")
    assert "4" in entries and "8" not in entries
    assert any("tmp" in e for e in entries), entries  # the unfinished save is left behind
    # 2. Resumed from step 4, killed after it logged step 6 (between checkpoints).
    proc = start(wd)
    lines = wait_for(proc, lambda ln: ln.startswith("step 6:"), "step 6")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert any("resuming at step 4" in ln for ln in lines), "".join(lines)
    # 3. Resumed again (from step 4) to the end.
    out = finish(start(wd))
    assert "resuming at step 4" in out
    ref_step, ref = final_state(reference[0])
    step, got = final_state(wd)
    assert step == ref_step == 12
    assert got.keys() == ref.keys()
    assert [k for k in ref if got[k] != ref[k]] == []
    # metrics.jsonl holds each step once, as the uninterrupted run's does.
    records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 13))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    wd = tmp_path / "nan"
    config = smoke.get_config()
    for k, v in SHORT.items():
        section, key = k.split(".")
        config[section][key] = v
    monkeypatch.setenv(loop.NAN_AT_STEP_ENV, "5")
    with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 6.*step 4"):
        loop.run(config, str(wd))
    assert sorted(os.listdir(wd / "checkpoints")) == ["4"]
    assert not (wd / "adapter").exists()
    records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    assert records[-1]["step"] == 5 and all(np.isfinite(r["loss"]) for r in records)
