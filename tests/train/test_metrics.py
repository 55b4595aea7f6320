"""Run logging: progress bar on a terminal, plain lines otherwise, jsonl + TensorBoard records."""

from __future__ import annotations

import io
import json
import os

import numpy as np

from qlora_jax.train.metrics import MetricsLogger, peak_memory, truncate_jsonl


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal(tmp_path, rng):
    stream = io.StringIO()
    log = MetricsLogger(str(tmp_path), total_steps=4, progress="auto", stream=stream)
    losses = rng.random(2) + 1.0
    log.log(2, {"loss": losses[0], "tokens_per_s": 123.0, "learning_rate": 1e-3})
    log.log(4, {"loss": losses[1], "tokens_per_s": 456.0, "learning_rate": 1e-3})
    log.log(4, {"eval_loss": 0.5, "eval_accuracy": 0.75}, evaluation=True)
    log.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step 2: loss=") and "tokens_per_s=123" in lines[0]
    assert lines[1].startswith("step 4:") and "\r" not in stream.getvalue()
    assert lines[2].startswith("step 4: eval_loss=0.5")
    evals = [json.loads(x) for x in open(tmp_path / "eval.jsonl")]
    assert len(evals) == 1 and evals[0]["eval_accuracy"] == 0.75
    records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    np.testing.assert_allclose([r["loss"] for r in records], losses)
    assert all(r["peak_memory_bytes"] > 0 for r in records)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))


def test_progress_bar_on_a_terminal(tmp_path):
    stream = FakeTTY()
    log = MetricsLogger(str(tmp_path), total_steps=10, progress="auto", stream=stream)
    log.log(5, {"loss": 2.5, "tokens_per_s": 999.0, "learning_rate": 1e-3})
    log.close()
    out = stream.getvalue()
    assert "\r" in out and "5/10" in out
    assert "loss=2.5" in out and "tokens_per_s=999" in out
    assert "step 5:" not in out


def test_peak_memory_on_cpu_is_the_process_rss():
    value, source = peak_memory()
    assert source == "host_rss" and value > 10 * 2**20


def test_truncate_drops_repeated_steps_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7))
                    + '{"step": 7, "lo')
    truncate_jsonl(str(path), 4)
    assert [json.loads(x)["step"] for x in open(path)] == [1, 2, 3, 4]
