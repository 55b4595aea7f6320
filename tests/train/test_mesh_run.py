"""The launcher on device meshes: the one-device losses on 8 fake CPU devices and on two processes.

Each run is ``python -m qlora_jax.launch`` in a subprocess (the fake devices,
``--xla_force_host_platform_device_count``, must be set before JAX starts): the smoke experiment,
6 steps with gradient accumulation, a log line and a metrics record every step, checkpoints at
steps 3 and 6, evaluation before and after. A 2x2x2 mesh in one process and the same mesh over
two processes joined by ``jax.distributed`` (gloo collectives on CPU) must log the one-device
run's losses, resume after a SIGKILL to the uninterrupted adapter's bytes, and only process 0
writes the workdir's files. A checkpoint of the one-process mesh run resumes on another mesh over
two processes. When a SIGTERM reaches only one of two processes, both stop after the same step
with one consistent checkpoint, and the resumed run ends with the uninterrupted run's adapter.
Bad meshes fail before any file is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import smoke
from qlora_jax.train import config as train_config
from qlora_jax.train import preemption
from qlora_jax.train.checkpoint import PAUSE_ENV

# Launcher runs on 8 fake devices and over two processes: the slow tier.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")
RUN = {"train.steps": 6, "train.grad_accum": 2, "train.log_every": 1, "train.checkpoint_every": 3,
       "train.eval_every": 6, "train.progress": "lines", "train.keep_checkpoints": 2}
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
TIMEOUT = 400  # seconds a run may take before the test fails (a hang must not block CI)


def command(workdir, extra=None, flags=()):
    items = dict(RUN, **(extra or {}))
    return [sys.executable, "-m", "qlora_jax.launch", "--config", SMOKE, "--workdir",
            str(workdir), *[f"--config.{k}={v}" for k, v in items.items()], *flags]


DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def environ(devices, extra=None):
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(JAX_PLATFORMS="cpu", **(extra or {}))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={devices}")
    # One persistent compilation cache for all runs of the module (a resumed run compiles
    # the executables of the run it resumes).
    env.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR[0],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def start(workdir, devices, extra=None, flags=(), env=None):
    return subprocess.Popen(command(workdir, extra, flags), cwd=ROOT, env=environ(devices, env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=TIMEOUT):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"run did not finish in {timeout} s:\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, RUN["train.steps"] + 1)), records
    return np.array([r["loss"] for r in records])


def eval_losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "eval.jsonl"))]
    assert [r["step"] for r in records] == [0, RUN["train.steps"]], records
    return np.array([r["eval_loss"] for r in records])


def adapter(workdir):
    """{name: array} of the exported PEFT adapter, and the bytes of its files."""
    from safetensors.numpy import load_file

    folder = os.path.join(workdir, "adapter")
    files = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            files[name] = f.read()
    return load_file(os.path.join(folder, "adapter_model.safetensors")), files


_CACHE_DIR = [""]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    _CACHE_DIR[0] = str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    wd = tmp_path_factory.mktemp("one_device")
    return wd, finish(start(wd, 1))


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("mesh_2x2x2")
    return wd, finish(start(wd, 8, MESH))


def test_2x2x2_mesh_gives_the_one_device_losses(one_device, mesh_run):
    (ref_wd, _), (wd, out) = one_device, mesh_run
    assert "mesh (data=2, fsdp=2, tensor=2) over 8 devices in 1 process(es)" in out, out[-2000:]
    ref = losses(ref_wd)
    assert ref[-1] < ref[0]  # it trains
    np.testing.assert_allclose(losses(wd), ref, rtol=1e-3)
    np.testing.assert_allclose(eval_losses(wd), eval_losses(ref_wd), rtol=1e-3)
    got, ref_tensors = adapter(wd)[0], adapter(ref_wd)[0]
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
        k: (v.shape, v.dtype) for k, v in ref_tensors.items()}


def test_mesh_run_killed_mid_save_resumes_to_the_same_adapter(mesh_run, tmp_path):
    ref_wd, _ = mesh_run
    wd = tmp_path / "killed"
    # Killed inside the save of the last step (step 3's checkpoint is complete).
    proc = start(wd, 8, MESH, env={PAUSE_ENV: str(RUN["train.steps"])})
    marker = wd / "checkpoints" / "PAUSED_IN_SAVE"
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None or time.time() - t0 > TIMEOUT:
            proc.kill()
            raise AssertionError("the run never reached the last save:\n"
                                 + proc.communicate()[0][-3000:])
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert "3" in os.listdir(wd / "checkpoints")
    out = finish(start(wd, 8, MESH))
    assert "resuming at step 3" in out, out[-2000:]
    assert adapter(wd)[1] == adapter(ref_wd)[1]  # the same bytes
    np.testing.assert_array_equal(losses(wd), losses(ref_wd))


def free_port():
    """A free port below Linux's ephemeral range (where other connections may take it first).

    Unseeded on purpose: a port, not a test input; concurrent runs must not all try the same one.
    """
    rng = np.random.default_rng()
    for _ in range(100):
        port = int(rng.integers(20000, 32000))
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000..31999")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    wd = tmp_path_factory.mktemp("two_processes")
    return wd, run_two_processes(wd)


def test_two_processes_give_the_one_device_losses_and_only_process_0_writes(one_device,
                                                                              two_processes):
    ref_wd, _ = one_device
    wd, outs = two_processes
    assert "over 8 devices in 2 process(es)" in outs[0], outs[0][-2000:]
    np.testing.assert_allclose(losses(wd), losses(ref_wd), rtol=1e-3)
    np.testing.assert_allclose(eval_losses(wd), eval_losses(ref_wd), rtol=1e-3)
    got, ref_tensors = adapter(wd)[0], adapter(ref_wd)[0]
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref_tensors.items()}
    # Process 1 logged, printed and wrote nothing of its own: one event file, each step once.
    lines = [ln for ln in outs[1].splitlines() if ln.startswith(("step ", "starting", "held-out",
                                                                 "{"))]
    assert lines == [], outs[1][-2000:]
    assert len([n for n in os.listdir(wd) if n.startswith("events.out.tfevents")]) == 1
    assert sorted(int(s) for s in os.listdir(wd / "checkpoints")) == [3, 6]


def test_a_mesh_run_resumes_on_another_mesh_over_two_processes(one_device, mesh_run, tmp_path):
    (ref_wd, _), (mesh_wd, _) = one_device, mesh_run
    wd = tmp_path / "moved"
    shutil.copytree(mesh_wd, wd)
    # Back to the state after step 3 of the 2x2x2 run in one process (as if stopped there),
    # then resumed on a 1x4x2 mesh over two processes: each restores its own shards.
    shutil.rmtree(wd / "checkpoints" / "6")
    shutil.rmtree(wd / "adapter")
    other = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}
    outs = run_two_processes(wd, other)
    assert "resuming at step 3" in outs[0] and "fsdp=4, tensor=2" in outs[0], outs[0][-2000:]
    np.testing.assert_allclose(losses(wd), losses(ref_wd), rtol=1e-3)
    with open(wd / "config.json") as f:
        assert json.load(f)["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2, "rules": []}
    got, ref_tensors = adapter(wd)[0], adapter(ref_wd)[0]
    for k, v in ref_tensors.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-3, atol=3e-5, err_msg=k)


@pytest.mark.slow  # two runs of two processes
def test_a_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(
        two_processes, tmp_path):
    ref_wd, _ = two_processes
    wd = tmp_path / "preempted"
    # Only process 1 is signalled, when its step 4 is done (between the checkpoints 3 and 6).
    outs = run_two_processes(wd, envs=({}, {preemption.SIGNAL_ENV: "4"}),
                             codes=(preemption.EXIT_CODE, preemption.EXIT_CODE))
    assert "SIGTERM received" in outs[1], outs[1][-2000:]
    stops = [ln for ln in outs[0].splitlines() if ln.startswith("stopped by")]
    assert len(stops) == 1 and stops[0].startswith(
        "stopped by a signal to another process after step 4 of 6; checkpoint "), outs[0][-2000:]
    assert "--process_id 0" in stops[0], stops[0]  # the resume command is this process's
    assert not [ln for ln in outs[1].splitlines() if ln.startswith("stopped by")]
    assert sorted(os.listdir(wd / "checkpoints")) == ["3", "4"]
    outs = run_two_processes(wd)
    assert "resuming at step 4" in outs[0], outs[0][-2000:]
    assert adapter(wd)[1] == adapter(ref_wd)[1]  # the same bytes
    np.testing.assert_array_equal(losses(wd), losses(ref_wd))


def run_two_processes(workdir, mesh=MESH, attempts=2, envs=({}, {}), codes=(0, 0)):
    """Outputs of the two processes of a run over 2 x 4 fake devices (exit codes ``codes``).

    Process 0 is told about the other by ``--coordinator/--num_processes/--process_id``,
    process 1 by ``JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID``.

    When one process fails the other is killed (it would wait for its peer); a coordinator that
    cannot bind its port (taken between the check and the bind) is tried again on another port.
    """
    address = f"127.0.0.1:{free_port()}"
    # Process 0 gets the launcher's flags, process 1 the environment variables.
    how = [(["--coordinator", address, "--num_processes", "2", "--process_id", "0"],
            dict(envs[0])),
           ([], {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": "1", **envs[1]})]
    logs = [os.path.join(_CACHE_DIR[0], f"process_{i}.log") for i in (0, 1)]
    procs = []
    for (flags, env), log in zip(how, logs):
        with open(log, "w") as f:  # files, not pipes: nobody reads while polling
            procs.append(subprocess.Popen(
                command(workdir, mesh, flags), cwd=ROOT, env=environ(4, env), stdout=f,
                stderr=subprocess.STDOUT, text=True))
    t0 = time.time()
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, c) for p, c in zip(procs, codes))
        if failed or time.time() - t0 > TIMEOUT:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.5)
    outs = []
    for log in logs:
        with open(log) as f:
            outs.append(f.read())
    if attempts > 1 and "Failed to add port" in outs[0]:
        return run_two_processes(workdir, mesh, attempts - 1, envs, codes)
    assert [p.returncode for p in procs] == list(codes), "\n".join(
        f"--- process {i} (exit {p.returncode}, {time.time() - t0:.0f} s):\n{out[-2500:]}"
        for i, (p, out) in enumerate(zip(procs, outs)))
    return outs


@pytest.mark.parametrize("devices, extra, words", [
    (1, {"mesh.data": 2}, ["2 x 1 x 1 = 2 devices", "1 devices"]),
    (8, {"mesh.data": 2, "mesh.fsdp": 2}, ["2 x 2 x 1 = 4 devices", "8 devices"]),
    (8, dict(MESH, **{"train.batch_size": 12}), ["batch_size=12", "data x fsdp = 2 x 2",
                                                 "multiple of 8"]),
])
def test_bad_mesh_is_one_line_exit_2_before_any_file(tmp_path, devices, extra, words):
    wd = tmp_path / "run"
    proc = start(wd, devices, extra)
    out = finish_failed(proc)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert not wd.exists()


def finish_failed(proc, timeout=120):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("a bad config did not fail quickly") from None
    assert proc.returncode == 2, out[-3000:]
    return out


def test_coordinator_without_process_count_is_refused(tmp_path):
    wd = tmp_path / "run"
    out = finish_failed(start(wd, 1, flags=["--coordinator", "127.0.0.1:1"]))
    assert "--num_processes" in out and "--process_id" in out, out[-2000:]
    assert not wd.exists()


def config_with(**fields):
    c = smoke.get_config()
    for k, v in fields.items():
        section, key = k.split("__")
        c[section][key] = v
    return c


@pytest.mark.parametrize("fields, devices, processes, words", [
    ({"mesh__data": 2, "mesh__tensor": 2}, 8, 1, ["2 x 1 x 2 = 4 devices", "8 devices"]),
    ({"mesh__fsdp": 0}, 1, 1, ["mesh.fsdp=0", ">= 1"]),
    ({"mesh__data": 4, "mesh__fsdp": 2, "train__grad_accum": 2}, 8, 1,
     ["batch_size=8", "grad_accum=2", "multiple of 16"]),
    ({"mesh__data": 8, "train__eval_batch_size": 12}, 8, 1, ["eval_batch_size=12",
                                                             "multiple of 8"]),
    ({"mesh__tensor": 8, "train__batch_size": 9}, 8, 2, ["batch_size=9", "2 processes"]),
])
def test_validate_names_the_mesh_problem(fields, devices, processes, words):
    with pytest.raises(train_config.ConfigError) as e:
        train_config.validate(config_with(**fields), devices, processes)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_validate_accepts_meshes_that_fit():
    train_config.validate(config_with(mesh__data=2, mesh__fsdp=2, mesh__tensor=2), 8, 2)
    # Batch rows split over data x fsdp only: tensor parallelism needs no batch divisor.
    train_config.validate(config_with(mesh__tensor=8, train__batch_size=2,
                                      train__eval_batch_size=2), 8, 2)
    # The trivial mesh runs on the first device of a bigger machine.
    train_config.validate(config_with(), 8, 1)
