"""Helpers for the quantization tests: bitsandbytes (CPU) as the oracle.

``bnb`` is a session fixture exposing a few thin wrappers around
``bitsandbytes.functional`` that take and return numpy arrays, plus
``make_input``, which builds the same values as a JAX array and a torch tensor.
"""

from __future__ import annotations

import copy
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

DTYPES = ("float32", "bfloat16", "float16")


def bits(a: Any) -> np.ndarray:
    """The raw bits of a float array (uint view), so that -0.0 != 0.0 and NaNs compare."""
    a = np.asarray(a)
    if a.dtype == jnp.bfloat16:
        return a.view(np.uint16)
    if not np.issubdtype(a.dtype, np.floating):
        return a
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(actual: Any, expected: Any, what: str = "values",
                      ignore_zero_sign: bool = False) -> None:
    """Asserts two arrays are identical bit for bit (same dtype, shape and bits).

    ``ignore_zero_sign`` treats -0.0 and +0.0 as equal (bitsandbytes' CPU kernel
    decodes FP4 code 8 to -0.0 on one of its paths and to +0.0 on the others).
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = bits(actual) != bits(expected)
    if ignore_zero_sign:
        diff &= ~((actual == 0) & (expected == 0))
    if diff.any():
        idx = np.argwhere(diff)[:5]
        examples = ", ".join(f"{tuple(i)}: {actual[tuple(i)]!r} vs {expected[tuple(i)]!r}"
                             for i in idx)
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.size} differ, e.g. {examples}")


class Bnb:
    """bitsandbytes.functional on CPU, with numpy in and out."""

    def __init__(self):
        self.torch = pytest.importorskip("torch")
        self.F = pytest.importorskip("bitsandbytes.functional")

    def torch_dtype(self, name: str):
        return getattr(self.torch, name)

    def make_input(self, values: np.ndarray, dtype: str) -> tuple[jnp.ndarray, Any]:
        """The same values (rounded once to ``dtype``) as a JAX array and a torch tensor."""
        t = self.torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        t = t.to(self.torch_dtype(dtype))
        exact = t.float().numpy()
        return jnp.asarray(exact).astype(dtype), t

    def quantize(self, t, qtype: str, block_size: int, nested: bool):
        """bitsandbytes quantize_4bit: (packed uint8 [ceil(n/2)], QuantState)."""
        packed, state = self.F.quantize_4bit(t, blocksize=block_size, compress_statistics=nested,
                                             quant_type=qtype)
        return packed, state

    def dequantize(self, packed, state, flatten: bool = True) -> np.ndarray:
        """bitsandbytes dequantize_4bit, as numpy in the state's dtype.

        ``flatten`` dequantizes the flattened tensor, then reshapes: bitsandbytes'
        CPU kernel (0.50.2) is wrong when a row is shorter than the block.
        """
        shape = tuple(state.shape)
        if flatten:
            state = copy.copy(state)
            state.shape = self.torch.Size([int(np.prod(shape))])
        out = self.F.dequantize_4bit(packed, state)
        return self.to_numpy(out).reshape(shape)

    def to_numpy(self, t) -> np.ndarray:
        if t.dtype == self.torch.bfloat16:
            return np.asarray(jnp.asarray(t.float().numpy()).astype(jnp.bfloat16))
        return t.detach().cpu().numpy()

    bits = staticmethod(bits)
    assert_bits_equal = staticmethod(assert_bits_equal)

    def state_dict(self, packed, state, prefix: str = "weight") -> dict[str, Any]:
        """What ``Linear4bit`` writes for this weight: ``prefix`` plus ``prefix.<quant state>``."""
        sd = {prefix: packed}
        for k, v in state.as_dict(packed=True).items():
            sd[f"{prefix}.{k}"] = v
        return sd


@pytest.fixture(scope="session")
def bnb() -> Bnb:
    return Bnb()
