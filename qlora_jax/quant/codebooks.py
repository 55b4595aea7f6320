"""The 4-bit codebooks and the signed 8-bit dynamic map used by bitsandbytes.

Everything here is a float32 numpy constant, computed once at import. The NF4
and FP4 tables are the exact float32 values bitsandbytes (>= 0.50) stores in a
checkpoint's ``quant_map``; the dynamic map is computed the way
``create_dynamic_map(signed=True)`` builds it and checked against its SHA-256.
"""

from __future__ import annotations

import hashlib

import numpy as np

QTYPES = ("nf4", "fp4", "int4")

# NF4: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, Dettmers et al.).
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)

# FP4 (E2M1 with bitsandbytes' exponent bias): bit 3 is the sign, bits 0..2 index a magnitude.
_FP4_MAGNITUDES = np.array(
    [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
     0.3333333432674408, 0.5, 0.1666666716337204, 0.25],
    dtype=np.float32,
)
# Code 8 is +0.0 (not -0.0) in bitsandbytes' table, so it decodes to +0.0 there.
FP4 = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]).astype(np.float32) + np.float32(0.0)

# Int4: symmetric absmax integer levels -7..7 (code 0..14); code 15 is unused and decodes to 0.
INT4 = np.concatenate([np.arange(-7, 8, dtype=np.float32) / 7.0, np.zeros(1, np.float32)])


def codebook(qtype: str) -> np.ndarray:
    """Returns the 16 float32 values that codes 0..15 decode to."""
    if qtype == "nf4":
        return NF4
    if qtype == "fp4":
        return FP4
    if qtype == "int4":
        return INT4
    raise ValueError(f"unknown qtype {qtype!r}; expected one of {QTYPES}")


def _dynamic_map_signed() -> np.ndarray:
    """The signed 8-bit dynamic map of bitsandbytes: 256 sorted float32 values.

    For exponent i in 0..6 there are 2**i linearly spaced fractions between 0.1
    and 1 (the midpoints of ``linspace(0.1, 1, 2**i + 1)``), scaled by
    ``10**(i - 6)``, with both signs; then 0 and 1. The float32 arithmetic
    follows torch's CPU ``linspace`` (see ``_torch_linspace_f32``), which is
    what makes the table bit-exact; the result is checked against its SHA-256.
    """
    max_exponent_bits = 7
    values: list[np.ndarray] = []
    for i in range(max_exponent_bits):
        n = 2**i + 1
        bounds = _torch_linspace_f32(0.1, 1.0, n)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2.0)).astype(np.float32)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        values.append((scale * means).astype(np.float32))
        values.append((-(scale * means)).astype(np.float32))
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    table = np.sort(np.concatenate(values)).astype(np.float32)
    assert table.shape == (256,), table.shape
    return table


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace computed the way torch's CPU kernel does it.

    torch computes ``start + step * k`` for the lower half and
    ``end - step * (steps - 1 - k)`` for the upper half, each as one fused
    multiply-add (a single rounding to float32). The product of two float32
    values is exact in float64, so float64 arithmetic then one cast reproduces it.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    k = np.arange(steps, dtype=np.float64)
    lower = np.float64(start32) + step * k
    upper = np.float64(end32) - step * (steps - 1 - k)
    return np.where(k < steps // 2, lower, upper).astype(np.float32)


DYNAMIC_MAP_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
DYNAMIC_MAP = _dynamic_map_signed()


def dynamic_map_sha256(table: np.ndarray) -> str:
    """SHA-256 of a map's little-endian float32 bytes."""
    return hashlib.sha256(np.asarray(table, dtype="<f4").tobytes()).hexdigest()


if dynamic_map_sha256(DYNAMIC_MAP) != DYNAMIC_MAP_SHA256:  # pragma: no cover - guards numpy changes
    raise RuntimeError("the computed 8-bit dynamic map does not match bitsandbytes' (SHA-256 differs)")
