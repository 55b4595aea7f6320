"""In-kernel decoding helpers shared by the Triton-style Pallas kernels.

Everything here runs inside a kernel body on values loaded from refs, and uses
only operations that both the Pallas Triton lowering and interpret mode accept:
1-D and 2-D loads with ``pl.ds`` slices and masks, gathers from small 1-D
tables by an integer array, joins of two arrays along a new last axis,
reshapes of power-of-two shapes.

Numerics are those of ``blockwise.dequantize_xla`` (and bitsandbytes):
``absmax = dyn[code] * nested_absmax + offset`` as two float32 roundings (the
product is rounded before the add; on the GPU an explicit ``mul.rn`` keeps the
compiler from contracting the two into one FMA), then ``value =
codebook[code] * absmax`` in float32.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:  # JAX >= 0.4.3x: the Triton-specific load/store with masks.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - every JAX this project supports has it
    plgpu = None

LUT_MODES = ("gather", "select", "prmt")


def load(ref: Any, mask: Optional[jax.Array] = None, other: Any = None) -> jax.Array:
    """Masked load of a (sliced) ref; masked-off lanes read ``other``."""
    if mask is None:
        return ref[...]
    return plgpu.load(ref, mask=mask, other=other)


def store(ref: Any, value: jax.Array, mask: Optional[jax.Array] = None) -> None:
    """Masked store into a (sliced) ref; masked-off lanes are left untouched."""
    if mask is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=mask)


def mul_rn(a: jax.Array, b: jax.Array, exact: bool) -> jax.Array:
    """``a * b`` in float32, rounded on its own (never fused into a later add).

    With ``exact`` (GPU), an inline ``mul.rn.f32`` forbids FMA contraction, so
    ``mul_rn(a, b) + c`` rounds twice, as bitsandbytes does; without it
    (interpret mode), a select does the same for XLA.
    """
    if not exact:
        # Interpret mode compiles the kernel with XLA, whose CPU backend contracts a*b+c
        # into one FMA (an optimization barrier is removed); a select between the
        # product and the add keeps the product a rounded value of its own. It only
        # changes a NaN product, which finite scales never give.
        p = a * b
        return jnp.where(p == p, p, jnp.float32(0))
    a, b = jnp.broadcast_arrays(a, b)
    (out,) = plgpu.elementwise_inline_asm(
        "mul.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


def unpack_codes(packed: jax.Array, dtype: Any = jnp.int32) -> jax.Array:
    """uint8 ``[R, C]`` -> codes ``[R, 2C]`` of ``dtype`` (high nibble first, as stored)."""
    p = packed.astype(dtype)
    hi = jax.lax.shift_right_logical(p, jnp.asarray(4, p.dtype))
    lo = p & jnp.asarray(15, p.dtype)
    r, c = packed.shape
    return jnp.stack([hi, lo], axis=-1).reshape(r, 2 * c)


def code_dtype(mode: str, exact: bool) -> Any:
    """The integer type ``lookup`` wants its codes in."""
    return jnp.uint8 if (mode == "prmt" and exact) else jnp.int32


def _prmt_asm(table: np.ndarray) -> str:
    """PTX: four codes (bytes of one register) -> their four float32 table values.

    Byte p of every table value forms a 16-byte plane; ``prmt`` picks a byte for
    each of the four codes from the plane's low (codes 0-7) and high (8-15)
    halves at once, ``lop3`` keeps the half that bit 3 of each code names, and
    eight more ``prmt`` transpose the four planes back into four floats. About
    6.5 instructions a value instead of 23 for the select tree.
    """
    words = np.asarray(table, np.float32).view(np.uint32)
    planes = [[int((words[v] >> (8 * p)) & 0xFF) for v in range(16)] for p in range(4)]

    def word(bs):
        return bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24

    lines = [
        "{",
        ".reg .b32 t, u, sel, h, m, ka, kb, lo, hi, v0, v1, v2, v3, al, ah, bl, bh;",
        "and.b32 t, $4, 0x07070707;",
        "shr.b32 u, t, 4;",
        "or.b32 u, u, t;",
        "prmt.b32 sel, u, u, 0x0020;",   # nibble i = code_i & 7
        "shl.b32 h, $4, 4;",
        "prmt.b32 m, h, h, 0xBA98;",     # byte i = 0xFF where code_i >= 8
    ]
    for p in range(4):
        pl_ = planes[p]
        lines += [
            f"mov.b32 ka, {word(pl_[0:4]):#010x};", f"mov.b32 kb, {word(pl_[4:8]):#010x};",
            "prmt.b32 lo, ka, kb, sel;",
            f"mov.b32 ka, {word(pl_[8:12]):#010x};", f"mov.b32 kb, {word(pl_[12:16]):#010x};",
            "prmt.b32 hi, ka, kb, sel;",
            f"lop3.b32 v{p}, hi, lo, m, 0xE4;",
        ]
    lines += [
        "prmt.b32 al, v0, v1, 0x5140;", "prmt.b32 bl, v2, v3, 0x5140;",
        "prmt.b32 ah, v0, v1, 0x7362;", "prmt.b32 bh, v2, v3, 0x7362;",
        "prmt.b32 $0, al, bl, 0x5410;", "prmt.b32 $1, al, bl, 0x7632;",
        "prmt.b32 $2, ah, bh, 0x5410;", "prmt.b32 $3, ah, bh, 0x7632;",
        "}",
    ]
    return "\n".join(lines)


def lookup(codes: jax.Array, table_ref: Any, table: np.ndarray, mode: str,
           exact: bool = False) -> jax.Array:
    """float32 codebook values of ``codes`` in 0..15 (int32, or uint8 for ``"prmt"``).

    ``"gather"`` reads the 16-entry table (an input ref, cached on chip) at each
    code; ``"select"`` walks a 4-level tree of selects between constants.
    ``"prmt"`` (GPU) looks up four codes at once with byte permutes (see
    ``_prmt_asm``). ``"diagnostic_no_lut"`` returns the codes themselves (wrong values): it only
    exists to measure what the lookup costs (benchmarks/kernels.py --profile).
    """
    if mode == "gather":
        return table_ref[codes]
    if mode == "diagnostic_no_lut":
        return codes.astype(jnp.float32)
    if mode == "prmt" and exact:  # GPU: byte permutes (interpret mode: the select tree)
        (out,) = plgpu.elementwise_inline_asm(
            _prmt_asm(table), args=[codes.astype(jnp.uint8)], constraints="=r,=r,=r,=r,r",
            pack=4, result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.float32)])
        return out
    if mode == "prmt":
        mode = "select"
    if mode != "select":
        raise ValueError(f"unknown LUT mode {mode!r}; expected one of {LUT_MODES}")
    level = [jnp.float32(v) for v in np.asarray(table, np.float32)]
    for bit in range(4):
        on = (codes & (1 << bit)) != 0
        level = [jnp.where(on, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
    return level[0]


def decode_absmax(raw: jax.Array, flat_index: jax.Array, qrefs: "QRefs") -> jax.Array:
    """float32 absmax from loaded absmax values (float32, or uint8 codes with double quant).

    Args:
      raw: the loaded absmax (masked-off lanes hold 0).
      flat_index: int32 index of each absmax in the flat absmax array (any
        value for masked-off lanes: it is clamped).
      qrefs: the kernel's quantization refs.
    """
    if not qrefs.double_quant:
        return raw.astype(jnp.float32)
    dyn = qrefs.dyn_ref[raw.astype(jnp.int32)]
    nested_index = jnp.minimum(jax.lax.div(flat_index, jnp.int32(qrefs.nested_block_size)),
                               jnp.int32(qrefs.n_nested - 1))
    nested = qrefs.nested_ref[qrefs.nested_base + nested_index]
    offset = qrefs.offset_ref[qrefs.offset_index]
    return mul_rn(dyn, nested, qrefs.exact) + offset


class QRefs:
    """The refs and static facts a kernel needs to decode one 4-bit weight."""

    def __init__(self, refs: list, *, double_quant: bool, nested_block_size: Optional[int],
                 n_nested: int, table: np.ndarray, lut: str, exact: bool):
        self.double_quant = double_quant
        self.nested_block_size = nested_block_size
        self.n_nested = n_nested
        self.table = table
        self.lut = lut
        self.exact = exact
        # Where this weight starts in the nested-absmax and offset refs (a layer of a stack
        # read in place moves them; see kernels.gpu.dequantize_layer).
        self.nested_base = 0
        self.offset_index = 0
        if double_quant:
            (self.packed_ref, self.absmax_ref, self.nested_ref, self.offset_ref,
             self.table_ref, self.dyn_ref) = refs
        else:
            self.packed_ref, self.absmax_ref, self.table_ref = refs
            self.nested_ref = self.offset_ref = self.dyn_ref = None


def num_qrefs(double_quant: bool) -> int:
    return 6 if double_quant else 3


def weight_tile(qrefs: QRefs, n0: Any, k0: Any, *, bn: int, bk: int, n_rows: int, n_cols: int,
                block_size: int, masked: bool = True, row_base: Any = 0) -> jax.Array:
    """Decodes rows ``n0:n0+bn``, columns ``k0:k0+bk`` of a 2-D ``[N, K]`` weight to float32.

    The packed ref is ``[N, K // 2]`` and the absmax ref ``[N, K // block_size]``
    (rows aligned to blocks). Lanes outside ``[N, K]`` decode to exactly 0.
    ``k0`` must be a multiple of ``min(bk, block_size)``. ``masked=False`` (the
    caller knows the tile lies inside the weight) drops the bound checks.
    ``row_base`` (a layer of a stack read in place: the refs hold ``[L * N, ...]``) moves the
    loads to rows ``row_base + n0``; bounds and absmax indices stay those of the layer.
    """
    rows = n0 + jnp.arange(bn, dtype=jnp.int32)[:, None]
    row_ok = rows < n_rows
    half = bk // 2
    bcols = k0 // 2 + jnp.arange(half, dtype=jnp.int32)[None, :]
    packed = load(qrefs.packed_ref.at[pl.ds(row_base + n0, bn), pl.ds(k0 // 2, half)],
                  mask=(row_ok & (bcols < n_cols // 2)) if masked else None, other=0)
    codes = unpack_codes(packed, code_dtype(qrefs.lut, qrefs.exact))
    values = lookup(codes, qrefs.table_ref, qrefs.table, qrefs.lut, qrefs.exact)
    n_blocks_row = n_cols // block_size
    nbt = max(bk // block_size, 1)
    kb0 = k0 // block_size
    kbs = kb0 + jnp.arange(nbt, dtype=jnp.int32)[None, :]
    am_ok = row_ok & (kbs < n_blocks_row)
    raw = load(qrefs.absmax_ref.at[pl.ds(row_base + n0, bn), pl.ds(kb0, nbt)],
               mask=am_ok if masked else None, other=0)
    absmax = decode_absmax(raw, rows * n_blocks_row + kbs, qrefs)
    if masked:
        absmax = jnp.where(am_ok, absmax, jnp.float32(0))
    if nbt == 1:
        return values * absmax
    return (values.reshape(bn, nbt, block_size) * absmax[:, :, None]).reshape(bn, bk)
