"""Lazy, tensor-by-tensor safetensors reading and streaming writing (numpy, bfloat16 included).

The safetensors layout is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``) and the
raw little-endian bytes. ``safetensors.safe_open(framework="numpy")`` cannot
return bfloat16 tensors (numpy has no bfloat16), so this module reads the
header itself and copies one tensor's bytes at a time into an array of
``ml_dtypes.bfloat16`` (or the plain numpy dtype): nothing but the requested
tensor is ever in memory. Headers are validated up front, so a truncated or
corrupt file fails with its name before any weight is read.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CorruptCheckpointError(ValueError):
    """A safetensors file is truncated or malformed (the message names the file)."""


class SafetensorsFile:
    """One safetensors file, opened lazily: the header is parsed and checked, no tensor read.

    Raises:
      FileNotFoundError: the file does not exist.
      CorruptCheckpointError: a short or malformed header, or tensor data past the end of the file.
    """

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._corrupt(f"only {size} bytes (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise self._corrupt(f"header length {n} does not fit in the file's {size} bytes")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"the header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise self._corrupt("the header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise self._corrupt(f"bad header entry for tensor {name!r}: {info!r}") from e
            expect = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - start != expect or start < 0:
                raise self._corrupt(f"tensor {name!r} has {end - start} bytes for shape {shape} "
                                    f"{info['dtype']} ({expect} expected)")
            if end > data_len:
                raise self._corrupt(f"tensor {name!r} ends at byte {end} of the data section, "
                                    f"which holds only {data_len} bytes (truncated file?)")
            self._entries[name] = (dtype, shape, start, end)

    def _corrupt(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: truncated or corrupt safetensors file: {why}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, start, end = self._entries[name]
        return end - start

    def get(self, name: str) -> np.ndarray:
        """Reads one tensor (only its bytes) into a new numpy array."""
        dtype, shape, start, end = self._entries[name]
        out = np.empty(shape, dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            got = f.readinto(buf) if end > start else 0
        if got != end - start:
            raise self._corrupt(f"tensor {name!r}: read {got} of {end - start} bytes")
        return out


class CheckpointReader(Mapping[str, np.ndarray]):
    """All tensors of a Hugging Face model directory (one file, or shards with an index).

    A read-only Mapping: ``reader[key]`` reads that one tensor. Shapes and
    dtypes are known without reading (``shape(key)``, ``dtype(key)``).
    """

    def __init__(self, directory: str, prefix: str = "model"):
        self.directory = str(directory)
        index = os.path.join(self.directory, f"{prefix}.safetensors.index.json")
        single = os.path.join(self.directory, f"{prefix}.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CorruptCheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            names = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            names = [os.path.basename(single)]
        else:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".safetensors"))
        if not names:
            raise FileNotFoundError(f"{self.directory} holds no *.safetensors weights (expected "
                                    f"{prefix}.safetensors or {prefix}.safetensors.index.json)")
        self.files = [SafetensorsFile(os.path.join(self.directory, n)) for n in names]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                self._where[k] = f

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)

    def file_of(self, key: str) -> str:
        return self._where[key].path


TensorSource = Callable[[], np.ndarray]


def write_safetensors(path: str, specs: Iterable[tuple[str, np.dtype, tuple[int, ...],
                                                      TensorSource]],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
    """Writes tensors one at a time: ``specs`` = (name, dtype, shape, produce) with a lazy producer.

    Returns the number of data bytes written. Each producer is called once, in
    order, and its array dropped after writing, so memory holds one tensor.
    """
    specs = list(specs)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, _ in specs:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, produce in specs:
            a = np.ascontiguousarray(produce())
            if a.dtype != np.dtype(dtype) or tuple(a.shape) != tuple(shape):
                raise ValueError(f"write_safetensors: {name} produced {a.dtype}{a.shape}, "
                                 f"declared {np.dtype(dtype)}{tuple(shape)}")
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
    return offset
