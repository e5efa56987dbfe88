"""A GGUF file's metadata and tensor table, read without building gguf-py's per-item arrays.

`gguf.GGUFReader` makes a numpy view for every element of every array: a 150k-token vocabulary
(tokens, types, scores, merges) takes it seconds to tens of seconds. Here each key/value is kept as
its raw bytes (equal bytes, equal value) and decoded on demand; string arrays are skipped by
reading their lengths only. Layout: github.com/ggml-org/ggml docs/gguf.md (little-endian, v2/v3).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STRING, ARRAY = 8, 9
# GGUF value type -> numpy dtype of one item (all but STRING and ARRAY)
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
           11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class Field:
    type: int  # GGUF value type
    raw: bytes  # the value's bytes as stored, type tags included (arrays: item type, count, items)

    def value(self):
        """The value: str, int/float/bool, or a list of them."""
        return _decode(self.type, self.raw, 0)[0]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (fastest-varying dimension first)
    type: int  # ggml type
    offset: int  # in the file
    nbytes: int


@dataclass(frozen=True)
class Meta:
    fields: dict[str, Field]
    tensors: list[TensorInfo]


def _decode(vtype: int, buf, pos: int):
    """(value, next position) of one value of type `vtype` at `pos`."""
    if vtype == STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n
    if vtype == ARRAY:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in SCALARS:
            arr = np.frombuffer(buf, SCALARS[item], count, pos)
            return arr.tolist(), pos + arr.nbytes
        out = []
        for _ in range(count):
            v, pos = _decode(item, buf, pos)
            out.append(v)
        return out, pos
    dt = np.dtype(SCALARS[vtype])
    return np.frombuffer(buf, dt, 1, pos)[0].item(), pos + dt.itemsize


def _skip(vtype: int, buf, pos: int) -> int:
    """The position after one value of type `vtype` at `pos`, reading lengths only."""
    if vtype == STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == ARRAY:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in SCALARS:
            return pos + count * np.dtype(SCALARS[item]).itemsize
        for _ in range(count):
            pos = _skip(item, buf, pos)
        return pos
    return pos + np.dtype(SCALARS[vtype]).itemsize


def read_meta(path: str | Path, tensors: bool = True) -> Meta:
    """Every key/value (raw) and, with `tensors`, the tensor table of the GGUF file at `path`."""
    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        if magic != gguf.GGUF_MAGIC or version < 2:
            raise ValueError(f"{path}: not a GGUF v2/v3 file")
        pos, fields = 24, {}
        for _ in range(n_kv):
            key, pos = _decode(STRING, buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            end = _skip(vtype, buf, pos + 4)
            fields[key] = Field(vtype, bytes(buf[pos + 4:end]))
            pos = end
        infos = []
        if tensors:
            align = (fields["general.alignment"].value() if "general.alignment" in fields
                     else gguf.GGUF_DEFAULT_ALIGNMENT)
            table = []
            for _ in range(n_tensors):
                name, pos = _decode(STRING, buf, pos)
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
                ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                table.append((name, shape, ttype, offset))
            start = -(-pos // align) * align
            for name, shape, ttype, offset in table:
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
                infos.append(TensorInfo(name, tuple(shape), ttype, start + offset,
                                        int(np.prod(shape, dtype=np.int64)) // block * size))
    return Meta(fields, infos)


def tensor_bytes(path: str | Path, info: TensorInfo) -> bytes:
    with open(path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.nbytes)
