"""Codebooks and the 8-bit dynamic map equal bitsandbytes' tables bit for bit."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from qlora_jax.quant import codebooks

# From docs/formats.md (independent of the library's own constant).
DYNAMIC_MAP_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_4bit_codebook_equals_bnb(bnb, qtype):
    ours = codebooks.codebook(qtype)
    theirs = bnb.F.get_4bit_type(qtype, device="cpu").numpy()
    bnb.assert_bits_equal(ours, theirs, f"{qtype} codebook")
    assert ours is getattr(codebooks, qtype.upper())


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_codebook_equals_quant_map_of_a_quant_state(bnb, qtype, rng):
    _, state = bnb.quantize(bnb.torch.from_numpy(rng.standard_normal(256).astype(np.float32)),
                            qtype, 64, nested=True)
    bnb.assert_bits_equal(codebooks.codebook(qtype), state.code.numpy(), "quant_map")
    bnb.assert_bits_equal(codebooks.DYNAMIC_MAP, state.state2.code.numpy(), "nested_quant_map")


def test_dynamic_map_equals_bnb_create_dynamic_map(bnb):
    theirs = bnb.F.create_dynamic_map(signed=True).numpy().astype(np.float32)
    bnb.assert_bits_equal(codebooks.DYNAMIC_MAP, theirs, "dynamic map")


def test_dynamic_map_sha256_matches_formats_md():
    table = codebooks.DYNAMIC_MAP
    assert table.dtype == np.float32 and table.shape == (256,)
    assert hashlib.sha256(table.astype("<f4").tobytes()).hexdigest() == DYNAMIC_MAP_SHA256


def test_dynamic_map_structure():
    table = codebooks.DYNAMIC_MAP
    assert np.all(np.diff(table) > 0), "sorted, no duplicates"
    assert table[127] == 0.0 and table[255] == 1.0
    assert table[0] == np.float32(-0.99296874)
    # Every non-zero magnitude below 1 appears with both signs.
    mags = table[(table != 0) & (table != 1)]
    assert np.array_equal(np.sort(mags[mags > 0]), np.sort(-mags[mags < 0]))


def test_nf4_derivation():
    """NF4 is the normalised N(0, 1) quantiles of QLoRA (Dettmers et al. 2023, eq. in sec. 3)."""
    ndtri = pytest.importorskip("scipy.special").ndtri
    offset = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)
    positive = ndtri(np.linspace(offset, 0.5, 9)[:-1])  # 8 values
    negative = -ndtri(np.linspace(offset, 0.5, 8)[:-1])  # 7 values
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    values /= np.abs(values).max()
    np.testing.assert_allclose(codebooks.NF4, values, rtol=0, atol=1e-6)


def test_nf4_sanity():
    nf4 = codebooks.NF4
    assert nf4.dtype == np.float32 and nf4.shape == (16,)
    assert np.all(np.diff(nf4) > 0)
    assert nf4[0] == -1.0 and nf4[15] == 1.0 and nf4[7] == 0.0
    assert np.sum(nf4 < 0) == 7 and np.sum(nf4 > 0) == 8
    # Symmetric-ish: 7 negative and 8 positive quantiles on [-1, 1], mean close to 0.
    assert abs(float(np.mean(nf4))) < 0.03
    # Each negative value lies between the mirrored neighbouring positive values.
    for k in range(1, 7):
        assert nf4[15 - k] < -nf4[k] < nf4[16 - k] or nf4[14 - k] < -nf4[k] < nf4[15 - k]


def test_fp4_structure():
    fp4 = codebooks.FP4
    assert fp4.dtype == np.float32 and fp4.shape == (16,)
    # Bit 3 is the sign; codes 0 and 8 are both zero (+0.0, as bitsandbytes stores it).
    np.testing.assert_array_equal(fp4[8:], -fp4[:8])
    assert fp4[0] == 0.0 and fp4[8] == 0.0
    assert fp4[3] == 1.0 and fp4[11] == -1.0
    assert np.abs(fp4).max() == 1.0


def test_int4_levels():
    int4 = codebooks.INT4
    np.testing.assert_array_equal(int4[:15] * np.float32(7), np.arange(-7, 8, dtype=np.float32))
    assert int4[15] == 0.0
    assert int4[7] == 0.0 and int4[0] == -1.0 and int4[14] == 1.0


def test_codebook_unknown_qtype():
    with pytest.raises(ValueError, match="unknown qtype 'nf3'"):
        codebooks.codebook("nf3")
