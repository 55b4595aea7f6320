"""Tests of qlora_jax.analysis: NF4 derivation, block normalisation, errors, subspace similarity."""

import numpy as np
import pytest
from scipy import stats

import qlora_jax as qj
from qlora_jax import analysis


def test_nf4_codebook_matches_bitsandbytes_values():
    cb = analysis.nf4_codebook()
    assert cb.shape == (16,)
    # bitsandbytes stores the table in float32: agreement to float32 rounding.
    np.testing.assert_allclose(cb, qj.quant.NF4.astype(np.float64), rtol=0, atol=2e-7)
    assert cb[0] == -1.0 and cb[7] == 0.0 and cb[15] == 1.0


def test_nf4_codebook_is_normal_quantiles(rng):
    """Against scipy's normal quantiles, with a freshly drawn offset and width."""
    offset, bits = float(rng.uniform(0.9, 0.995)), int(rng.integers(2, 6))
    half = 2 ** (bits - 1)
    pos = stats.norm.ppf(np.linspace(offset, 0.5, half + 1)[:-1])
    neg = -stats.norm.ppf(np.linspace(offset, 0.5, half)[:-1])
    want = np.sort(np.concatenate([pos, [0.0], neg]))
    want /= np.abs(want).max()
    np.testing.assert_allclose(analysis.nf4_codebook(offset, bits), want, atol=1e-12,
                               err_msg=f"offset={offset}, bits={bits}")


def test_nf4_codebook_bad_input():
    with pytest.raises(ValueError, match="offset"):
        analysis.nf4_codebook(offset=1.0)
    with pytest.raises(ValueError, match="bits"):
        analysis.nf4_codebook(bits=1)


def test_block_normalized(rng):
    w = rng.normal(size=(7, 30))  # 210 values: 3 full blocks of 64 and a partial block of 18
    v = analysis.block_normalized(w, 64)
    flat = w.reshape(-1)
    want = np.concatenate([flat[i:i + 64] / np.abs(flat[i:i + 64]).max()
                           for i in range(0, 210, 64)])
    np.testing.assert_allclose(v, want, rtol=1e-12)
    assert np.max(np.abs(v)) == 1.0


def test_expected_codebook_error_of_grid(rng):
    v = rng.uniform(-1, 1, size=10_000)
    cb = np.linspace(-1, 1, 5)
    err = analysis.expected_codebook_error(cb, v)
    nearest = cb[np.argmin(np.abs(v[:, None] - cb[None]), axis=1)]
    assert err == pytest.approx(np.sqrt(np.mean((v - nearest) ** 2)), rel=1e-12)


def test_quantization_errors_and_summary(rng):
    weights = {"a": rng.normal(size=(64, 128)).astype(np.float32),
               "b": (3 * rng.standard_t(4, size=(32, 64))).astype(np.float32)}
    settings = [("nf4", True), ("int4", False)]
    rows = analysis.quantization_errors(weights, settings)
    assert [(r.name, r.label) for r in rows] == [("a", "NF4+DQ"), ("a", "INT4"), ("b", "NF4+DQ"),
                                                 ("b", "INT4")]
    for r in rows:
        w = weights[r.name].astype(np.float64)
        q = qj.quant.quantize(weights[r.name], r.qtype, 64, double_quant=r.double_quant)
        err = np.asarray(qj.quant.dequantize(q), np.float64) - w
        assert r.rel_error == pytest.approx(np.linalg.norm(err) / np.linalg.norm(w), rel=1e-9)
        assert 0 < r.rel_error < 0.2
    summary = analysis.summarize_errors(rows)
    assert [s["label"] for s in summary] == ["NF4+DQ", "INT4"]
    for s in summary:
        mine = [r for r in rows if r.label == s["label"]]
        pooled = np.sqrt(sum(r.rel_error ** 2 * r.ref_sq_norm for r in mine)
                         / sum(r.ref_sq_norm for r in mine))
        assert s["rel_error"] == pytest.approx(pooled)
        assert s["num_params"] == 64 * 128 + 32 * 64
    assert summary[0]["bits_per_param"] == pytest.approx(4.127, abs=0.02)  # small: nested overhead
    assert summary[1]["bits_per_param"] == pytest.approx(4.5, abs=0.01)


def test_subspace_similarity_known_cases(rng):
    d = 40
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a1 = np.diag([5.0, 4, 3, 2]) @ q[:, :4].T                 # rows span the first 4 directions
    a2 = rng.normal(size=(8, 8)) @ q[:, :8].T                 # spans the first 8: contains a1
    a3 = rng.normal(size=(3, 3)) @ q[:, 10:13].T              # orthogonal to both
    assert analysis.subspace_similarity(a1, a2, 4, 8) == pytest.approx(1.0)
    assert analysis.subspace_similarity(a1, a3, 4, 3) == pytest.approx(0.0, abs=1e-12)
    grid = analysis.subspace_similarity(a1, a2)
    assert grid.shape == (4, 8)
    assert np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-12)
    # phi(1, 1) = cos^2 of the angle between the top right-singular vectors.
    u1 = np.linalg.svd(a1)[2][0]
    u2 = np.linalg.svd(a2)[2][0]
    assert grid[0, 0] == pytest.approx(float(u1 @ u2) ** 2)
    with pytest.raises(ValueError, match="same d"):
        analysis.subspace_similarity(a1, a2.T)


def test_mean_pool_and_cosine(rng):
    h = rng.normal(size=(3, 5, 4))
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    pooled = analysis.mean_pool(h, mask)
    np.testing.assert_allclose(pooled[0], h[0, :2].mean(0))
    np.testing.assert_allclose(pooled[2], h[2, 0])
    c = analysis.cosine_rows(pooled, 2.5 * pooled)
    np.testing.assert_allclose(c, 1.0)
    assert analysis.cosine_rows(np.array([[1.0, 0]]), np.array([[0.0, 1]]))[0] == 0.0


def test_step_times_drops_compile_window():
    recs = [{"steps_per_s": 0.1}, {"eval_loss": 1.0}, {"steps_per_s": 2.0}, {"steps_per_s": 4.0}]
    assert analysis.step_times(recs) == [0.5, 0.25]


def test_load_config_with_argument(tmp_path):
    from qlora_jax.train.config import validate

    c = analysis.load_config("experiments/memory_small.py:full")
    validate(c)
    assert "lm_head" in c.lora.modules_to_save and not c.quant.enabled
    assert analysis.load_config("experiments/memory_small.py").quant.enabled
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.load_config(str(tmp_path / "nope.py"))


def test_adapter_matrices_reads_peft_layout(tmp_path, rng):
    from safetensors.numpy import save_file

    a, b = rng.normal(size=(4, 12)).astype(np.float32), rng.normal(size=(10, 4)).astype(np.float32)
    prefix = "base_model.model.encoder.layer.0.attention.self.query"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b,
               "base_model.model.classifier.weight": rng.normal(size=(3, 10)).astype(np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    got = analysis.adapter_matrices(str(tmp_path))
    assert list(got) == ["encoder.layer.0.attention.self.query"]
    np.testing.assert_array_equal(got["encoder.layer.0.attention.self.query"][0], a)
    np.testing.assert_array_equal(got["encoder.layer.0.attention.self.query"][1], b)
    with pytest.raises(FileNotFoundError, match="PEFT adapter"):
        analysis.adapter_matrices(str(tmp_path / "missing"))
