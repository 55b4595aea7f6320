"""The README's first command: python -m qlora_jax.demo (quantization demo on real MiniLM)."""

from __future__ import annotations

import pytest

from qlora_jax import demo


def test_demo_main(minilm_dir, capsys):
    rows = demo.main(["--model-dir", minilm_dir])
    out = capsys.readouterr().out
    by = {(r.qtype, r.double_quant): r for r in rows}
    assert set(by) == set(demo.SETTINGS)
    n = by["nf4", True].num_params
    # 6 layers x (4 x 384 x 384 + 2 x 384 x 1536) + the 384 x 384 pooler.
    assert n == 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384
    # NF4 + double quant: 4 + 8/64 + 32/(64*256) bits, plus one float32 offset a tensor (37).
    assert by["nf4", True].bits_per_param == pytest.approx(
        4 + 8 / 64 + 32 / (64 * 256) + 32 * 37 / n, abs=1e-12)
    assert abs(by["nf4", True].bits_per_param - 4.127) < 1e-3
    for qtype in ("nf4", "fp4", "int4"):
        assert by[qtype, False].bits_per_param == 4.5
        assert by[qtype, True].nbytes == by["nf4", True].nbytes
    # Measured ordering on MiniLM (both metrics): NF4 < Int4 < FP4. (bitsandbytes' FP4 spends
    # codes on +-0 and +-0.0052 and leaves a wide gap below 1, so symmetric Int4 beats it.)
    for dq in (False, True):
        for metric in ("rel_frobenius_error", "mean_abs_error"):
            nf4, fp4, int4 = (getattr(by[t, dq], metric) for t in ("nf4", "fp4", "int4"))
            assert nf4 < int4 < fp4, (metric, dq, nf4, int4, fp4)
    # Double quantization costs almost nothing in accuracy (< 0.5% relative more error).
    for qtype in ("nf4", "fp4", "int4"):
        plain, nested = by[qtype, False], by[qtype, True]
        assert plain.rel_frobenius_error <= nested.rel_frobenius_error
        assert nested.rel_frobenius_error < 1.005 * plain.rel_frobenius_error
    assert 0.05 < by["nf4", True].rel_frobenius_error < 0.15
    # The table names every data type and the total line.
    for label in ("NF4 + double quant", "FP4", "INT4", "bits/param", "total: 37 linear weights"):
        assert label in out
    assert "4.127" in out
