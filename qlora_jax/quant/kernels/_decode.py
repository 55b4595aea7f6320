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
codebook[code] * absmax`` in float32. The one-token GEMV may use the codebook rounded
to bfloat16 (``bf16_table``, ``lookup_words(bf16=True)``) for bfloat16 inputs.

The GEMV's word lookup returns 8 arrays from one inline-asm call: ``_multi_asm_p`` (a small
primitive, since Pallas's own inline asm lowers only one result) emits the same Triton op.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:  # JAX >= 0.4.3x: the Triton-specific load/store with masks.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - every JAX this project supports has it
    plgpu = None

LUT_MODES = ("gather", "select", "prmt", "prmt_bf16")
PRMT_MODES = ("prmt", "prmt_bf16")  # byte permutes on a GPU, the select tree in interpret mode


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
    return jnp.uint8 if (mode in PRMT_MODES and exact) else jnp.int32


def _prmt_asm(table: np.ndarray, bf16: bool = False) -> str:
    """PTX: four codes (bytes of one register ``$4``) -> their four float32 table values.

    Byte p of every table value forms a 16-byte plane; ``prmt`` picks a byte for
    each of the four codes from the plane's low (codes 0-7) and high (8-15)
    halves at once, ``lop3`` keeps the half that bit 3 of each code names, and
    eight more ``prmt`` transpose the four planes back into four floats. About
    6.5 instructions a value instead of 23 for the select tree.
    """
    return "\n".join(_lookup4_ptx(table, "$4", ["$0", "$1", "$2", "$3"], bf16=bf16))


def lookup(codes: jax.Array, table_ref: Any, table: np.ndarray, mode: str,
           exact: bool = False) -> jax.Array:
    """float32 codebook values of ``codes`` in 0..15 (int32, or uint8 for ``"prmt"``).

    ``"gather"`` reads the 16-entry table (an input ref, cached on chip) at each
    code; ``"select"`` walks a 4-level tree of selects between constants.
    ``"prmt"`` (GPU) looks up four codes at once with byte permutes (see
    ``_prmt_asm``). ``"prmt_bf16"`` does the same in the codebook rounded to bfloat16 (two byte
    planes instead of four; values differ from the exact ones by up to 2**-9 relative, as the
    GEMV's ``bf16_lut``). ``"diagnostic_no_lut"`` returns the codes themselves (wrong values): it
    only exists to measure what the lookup costs (benchmarks/kernels.py --profile).
    """
    if mode == "gather":
        return table_ref[codes]
    if mode == "diagnostic_no_lut":
        return codes.astype(jnp.float32)
    if mode == "prmt_bf16":
        table = bf16_table(table)
    if mode in PRMT_MODES and exact:  # GPU: byte permutes (interpret: select tree)
        (out,) = plgpu.elementwise_inline_asm(
            _prmt_asm(table, bf16=mode == "prmt_bf16"), args=[codes.astype(jnp.uint8)],
            constraints="=r,=r,=r,=r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.float32)])
        return out
    if mode in PRMT_MODES:
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


def join8(vals: list) -> jax.Array:
    """8 arrays ``[R, C]`` -> ``[R, C, 8]`` (array j last), by pairwise joins along a new last
    axis (the only join Triton has; the joined values stay in their thread's registers)."""
    s1 = [jnp.stack([vals[m], vals[m + 4]], axis=-1) for m in range(4)]
    s2 = [jnp.stack([s1[n], s1[n + 2]], axis=-1) for n in range(2)]
    s3 = jnp.stack([s2[0], s2[1]], axis=-1)  # [R, C, i2, i1, i0] = vals[4 i2 + 2 i1 + i0]
    return s3.reshape(s3.shape[:2] + (8,))


def bf16_table(table: np.ndarray) -> np.ndarray:
    """The codebook rounded to bfloat16 (nearest, ties to even), as float32."""
    bits = np.asarray(table, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _lookup4_ptx(table: np.ndarray, src: str, outs: list, bf16: bool) -> list:
    """PTX lines: the four codes in the bytes of register ``src`` (each 0..15) -> float32 table
    values in registers ``outs`` (byte order). ``bf16``: only the two high byte planes are
    looked up (the table must be bf16-rounded: its low bytes are 0), 4.5 instead of 6.5
    instructions a value."""
    words = np.asarray(table, np.float32).view(np.uint32)
    plane_ids = (2, 3) if bf16 else (0, 1, 2, 3)
    planes = {p: [int((words[v] >> (8 * p)) & 0xFF) for v in range(16)] for p in plane_ids}

    def word(bs):
        return bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24

    lines = ["{", ".reg .b32 t, u, sel, h, m, ka, kb, lo, hi, v0, v1, v2, v3, al, ah, bl, bh;",
             f"and.b32 t, {src}, 0x07070707;", "shr.b32 u, t, 4;", "or.b32 u, u, t;",
             "prmt.b32 sel, u, u, 0x0020;",       # nibble i = code_i & 7
             f"shl.b32 h, {src}, 4;", "prmt.b32 m, h, h, 0xBA98;"]  # 0xFF where code_i >= 8
    for p in plane_ids:
        pl_ = planes[p]
        lines += [f"mov.b32 ka, {word(pl_[0:4]):#010x};", f"mov.b32 kb, {word(pl_[4:8]):#010x};",
                  "prmt.b32 lo, ka, kb, sel;",
                  f"mov.b32 ka, {word(pl_[8:12]):#010x};",
                  f"mov.b32 kb, {word(pl_[12:16]):#010x};",
                  "prmt.b32 hi, ka, kb, sel;", f"lop3.b32 v{p}, hi, lo, m, 0xE4;"]
    if bf16:  # bytes [v2_i, v3_i] are code i's bfloat16: shift into the high half
        lines += ["prmt.b32 al, v2, v3, 0x5140;", "prmt.b32 ah, v2, v3, 0x7362;",
                  f"shl.b32 {outs[0]}, al, 16;", f"and.b32 {outs[1]}, al, 0xFFFF0000;",
                  f"shl.b32 {outs[2]}, ah, 16;", f"and.b32 {outs[3]}, ah, 0xFFFF0000;"]
    else:
        lines += ["prmt.b32 al, v0, v1, 0x5140;", "prmt.b32 bl, v2, v3, 0x5140;",
                  "prmt.b32 ah, v0, v1, 0x7362;", "prmt.b32 bh, v2, v3, 0x7362;",
                  f"prmt.b32 {outs[0]}, al, bl, 0x5410;", f"prmt.b32 {outs[1]}, al, bl, 0x7632;",
                  f"prmt.b32 {outs[2]}, ah, bh, 0x5410;", f"prmt.b32 {outs[3]}, ah, bh, 0x7632;"]
    return lines + ["}"]


def word_lookup_ptx(table: np.ndarray, bf16: bool) -> str:
    """PTX: one 32-bit word of packed codes (4 bytes, 2 codes a byte, high nibble first) ->
    its 8 table values; output ``$j`` is the code at column ``j`` of the word (byte j // 2,
    high nibble for even j), input ``$8``."""
    lines = ["{", ".reg .b32 c;", "shr.b32 c, $8, 4;", "and.b32 c, c, 0x0F0F0F0F;"]
    lines += _lookup4_ptx(table, "c", ["$0", "$2", "$4", "$6"], bf16)    # high nibbles
    lines += ["and.b32 c, $8, 0x0F0F0F0F;"]
    lines += _lookup4_ptx(table, "c", ["$1", "$3", "$5", "$7"], bf16)    # low nibbles
    return "\n".join(lines + ["}"])


def lookup_words(words: jax.Array, table: np.ndarray, exact: bool, bf16: bool) -> list:
    """uint32 words of packed codes (any shape) -> 8 float32 arrays of that shape: element
    ``j`` holds the value of column ``j`` of each word (see ``word_lookup_ptx``). ``bf16``
    uses the bf16-rounded codebook. Interpret mode: shifts and the select tree."""
    tab = bf16_table(table) if bf16 else np.asarray(table, np.float32)
    if exact:
        return list(_multi_asm_p().bind(
            words, asm=word_lookup_ptx(tab, bf16), constraints=",".join(["=r"] * 8 + ["r"]),
            n_out=8))
    out = []
    for j in range(8):
        shift = 8 * (j // 2) + (4 if j % 2 == 0 else 0)
        codes = jax.lax.shift_right_logical(words, jnp.uint32(shift)) & jnp.uint32(15)
        out.append(lookup(codes.astype(jnp.int32), None, tab, "select"))
    return out


@functools.cache
def _multi_asm_p() -> Any:
    """A Triton inline-asm primitive with several float32 results (``pack=1``).

    ``plgpu.elementwise_inline_asm`` declares several results but its Triton lowering (JAX
    0.10-0.11) wraps the op's result list as one value, so it only works with one result. This
    primitive lowers to the same ``tt.elementwise_inline_asm`` op and returns its results.
    GPU only (interpret mode computes the lookups with shifts and selects instead).
    """
    from jax._src import core as jax_core
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax.interpreters import mlir

    prim = jax_core.Primitive("qlora_multi_inline_asm")
    prim.multiple_results = True

    @prim.def_abstract_eval
    def _abstract(x, *, asm, constraints, n_out):
        del asm, constraints
        return [jax_core.ShapedArray(x.shape, jnp.float32)] * n_out

    @triton_lowering.register_lowering(prim)
    def _lower(ctx, x, *, asm, constraints, n_out):
        types = [mlir.aval_to_ir_type(ctx.context.mlir_ctx, a) for a in ctx.avals_out]
        res = tt_dialect.elementwise_inline_asm(types, asm, constraints=constraints, pure=True,
                                                packed_element=1, args=[x])
        return list(res) if n_out > 1 else [res]

    return prim
