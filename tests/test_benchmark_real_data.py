"""benchmarks/real_data.py on CPU with the tiny shape: the layouts run and pad as they should."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import real_data
from qlora_jax.data.packing import pack_rows


def test_length_sets_have_the_stated_shapes():
    ids, learned = real_data.examples("stdlib_docstrings", 2048, 128256)
    n = np.array([len(x) for x in ids])
    assert len(ids) == 1834 and 40 <= np.median(n) <= 100 and n.max() < 400
    assert all(f[1:].any() and not f[0] for f in learned)   # loss on the response only
    ids, learned = real_data.examples("synthetic", 2048, 128256)
    n = np.array([len(x) for x in ids])
    assert 225 <= np.median(n) <= 275 and 1500 <= np.percentile(n, 99) <= 2048
    assert all(x.max() < 128256 and x.min() >= 3 for x in ids)
    with pytest.raises(SystemExit, match="unknown length set"):
        real_data.examples("alpaca", 2048, 100)


@pytest.mark.slow
def test_layouts_run_on_the_tiny_shape():
    results = {r["layout"]: r for r in real_data.run_ours(
        "tiny", "stdlib_docstrings", ("padded", "bucketed", "packed"), batch=2, seq=512, r=4,
        steps=2, remat="full", loss_chunk=0, buckets=(128, 512))}
    padded, bucketed, packed = results["padded"], results["bucketed"], results["packed"]
    for r in results.values():
        assert "error" not in r, r
        assert r["useful_tokens_per_s"] > 0 and np.isfinite(r["loss_last"])
    assert padded["examples_per_row"] == bucketed["examples_per_row"] == 1
    assert padded["row_lengths"] == [512] and 128 in bucketed["row_lengths"]
    ids, _ = real_data.examples("stdlib_docstrings", 512, 1000)
    lengths = np.array([len(x) for x in ids])
    rows = pack_rows(lengths, np.random.default_rng([0, 0]).permutation(len(ids)), 512)
    assert abs(packed["examples_per_row"] - len(ids) / len(rows)) < 2
    assert packed["padding_fraction"] < 0.1 < 0.5 < bucketed["padding_fraction"] \
        < padded["padding_fraction"]
