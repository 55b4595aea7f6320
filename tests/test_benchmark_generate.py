"""benchmarks/generate.py (every row kind, tiny shape) and benchmarks/gemv_lab.py (quick) on CPU."""

from __future__ import annotations

import json

import pytest

from benchmarks import generate


def test_bad_arguments_stop_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="--adapters must be >= 2"):
        generate.main(["--shape", "tiny", "--adapters", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown system 'int8'"):
        generate.main(["--shape", "tiny", "--which", "int8", "--out", str(tmp_path)])
    assert not (tmp_path / "generate.jsonl").exists()


def test_a_failed_row_names_its_system_and_the_error(tmp_path, monkeypatch, capsys):
    """A child that dies (say out of device memory) leaves a row with its system, weights and
    the last line of its stderr, and the other rows still run."""
    import subprocess

    def fake_run(cmd, **kw):
        system = cmd[cmd.index("--system") + 1]
        if system == "nf4":
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nRESOURCE_EXHAUSTED: "
                                               "Out of memory allocating 35.24GiB\n")
        row = dict(system="transformers+bitsandbytes", weights="nf4", decode_tokens_per_s=1.0,
                   ms_per_token=1.0, batch=1, prompt=8, shape="tiny")
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(row) + "\n", "")

    monkeypatch.setattr(generate.subprocess, "run", fake_run)
    generate.main(["--shape", "tiny", "--which", "nf4", "--peer", "bnb", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "generate.jsonl").read_text().splitlines()]
    assert rows[0]["system"] == "qlora_jax" and rows[0]["weights"] == "nf4"
    assert rows[0]["error"] == ("exit code 1: RESOURCE_EXHAUSTED: Out of memory allocating "
                                "35.24GiB")
    assert rows[1]["system"] == "transformers+bitsandbytes" and "error" not in rows[1]
    assert "Traceback" in capsys.readouterr().err  # the child's stderr is shown


@pytest.mark.slow
def test_batch_prompt_and_adapter_rows_run_on_the_tiny_shape(tmp_path):
    generate.main(["--shape", "tiny", "--batch", "2", "--prompt", "8",
                   "--new", "3", "--rank", "2", "--which", "nf4,adapters", "--adapters", "2",
                   "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "generate.jsonl").read_text().splitlines()]
    assert all("error" not in r for r in rows), rows
    plain = {(r["batch"], r["prompt"]) for r in rows if "adapters" not in r}
    assert plain == {(2, 8)}  # (batch 1 runs in the adapter rows' single_b1)
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and r["total_s"] > 0 and r["prefill_s"] > 0
        # A decode time under the timer noise of a busy CPU is flagged, never hidden.
        if r.get("decode_below_noise"):
            assert r["total_s"] <= r["prefill_s"], r
        else:
            assert r["total_s"] >= r["prefill_s"], r
        if "adapters" not in r:
            assert 0 < r["fraction_of_limit"] and r["weights_gib"] > 0
    kinds = sorted((r["prompt"], r["adapters"], r["batch"]) for r in rows if "adapters" in r)
    assert kinds == sorted((p, k, 1 if k == "single_b1" else 2) for p in (8,) for k in (
        "single_b1", "one_shared", "stacked_same", "stacked_mixed"))
    for r in rows:
        if r.get("adapters") == "stacked_mixed":
            assert r["vs_single_runs"] > 0 and r["end_to_end_vs_single_runs"] > 0
            assert r["vs_one_shared"] > 0 and r["vs_stacked_same"] > 0
        if r.get("adapters") == "single_b1":
            assert r["single_runs_s"] > 0


@pytest.mark.slow
def test_gemv_lab_quick_runs(tmp_path, monkeypatch):
    """benchmarks/gemv_lab.py on tiny shapes (interpret mode): every case is timed and agrees
    with the float32 reference, and the best configs are written for QLORA_JAX_GEMV_CONFIG."""
    from benchmarks import gemv_lab, kernels

    monkeypatch.setattr(gemv_lab, "SHAPES", [(64, 128)])
    monkeypatch.setattr(kernels, "RESULTS", [])
    gemv_lab.main(["--quick", "--part", "gemv", "--part", "x_modes", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "gemv_lab.jsonl").read_text().splitlines()]
    ours = [r for r in rows if r["impl"].startswith(("gemv_rows", "gemv_tiles"))]
    assert {r["impl"] for r in ours} == {"gemv_rows", "gemv_tiles", "gemv_rows_gather",
                                         "gemv_rows_join"}
    for r in rows:
        assert "error" not in r, r
    for r in ours:
        assert "error" not in r, r
        assert r["us"] > 0 and r["rel_err"] < 1e-2, r
    spec = (tmp_path / "best_gemv_f32.txt").read_text()
    monkeypatch.setenv("QLORA_JAX_GEMV_CONFIG", spec)
    from qlora_jax.quant.kernels import gemv
    assert gemv.default_config(64).bf16_lut is False


@pytest.mark.slow
def test_gemv_lab_small_m_lut_runs(tmp_path, monkeypatch):
    """gemv_lab's small_m_lut part on a tiny shape (interpret mode): the four variants of the
    tiled kernel at 8 and 32 tokens run and agree with the float32 reference."""
    from benchmarks import gemv_lab, kernels

    monkeypatch.setattr(gemv_lab, "SHAPES", [(64, 128)])
    monkeypatch.setattr(kernels, "RESULTS", [])
    gemv_lab.main(["--quick", "--part", "small_m_lut", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "gemv_lab.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4  # 8 and 32 tokens
    assert {(r["config"]["lut"], r["config"]["num_stages"]) for r in rows} == {
        (None, 3), (None, 2), ("prmt_bf16", 3), ("prmt_bf16", 2)}
    for r in rows:
        assert "error" not in r, r
        assert r["us"] > 0 and r["rel_err"] < 1e-2, r
