"""Raw LZMA2 (optionally behind the x86 BCJ filter) with sync flushes, through liblzma.

The delta stream's ``xz`` carrier (format 5) is one raw LZMA2 stream across the whole
delta, cut into ZCMDS pieces like the zstd carrier: each piece must decode on its own to
whole records while later pieces still refer back to earlier data, which is what
``LZMA_SYNC_FLUSH`` gives (the LZMA2 chunk ends, the dictionary stays). Python's
:mod:`lzma` cannot sync-flush, so this calls liblzma (``liblzma.so.5``, the library
Python's own :mod:`lzma` is built on, so present wherever it is) through :mod:`ctypes`; the
calls release the GIL, so compression runs beside the other threads. Owns only this
binding: the structures are those of ``<lzma.h>`` (liblzma 5.x, ABI-stable).

The decoder is bounded: :meth:`Lzma2Decoder.decompress` never returns more than asked for
per call, and its dictionary is the size the delta declares (at most :data:`MAX_DICT`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

from ..errors import StreamFormatError

__all__ = ["MAX_DICT", "Lzma2Decoder", "Lzma2Encoder", "available"]

#: largest dictionary a carrier may declare (what a device must be able to allocate)
MAX_DICT = 256 << 20

_LZMA_FILTER_X86 = 0x04
_LZMA_FILTER_LZMA2 = 0x21
_LZMA_VLI_UNKNOWN = (1 << 64) - 1
_LZMA_PRESET_EXTREME = 1 << 31
_RUN, _SYNC_FLUSH = 0, 1
_OK, _STREAM_END = 0, 1
_SIZE_T = ctypes.c_size_t


class _Stream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", _SIZE_T), ("total_in", ctypes.c_uint64),
        ("next_out", ctypes.c_void_p), ("avail_out", _SIZE_T),
        ("total_out", ctypes.c_uint64), ("allocator", ctypes.c_void_p),
        ("internal", ctypes.c_void_p), ("reserved_ptr", ctypes.c_void_p * 4),
        ("seek_pos", ctypes.c_uint64), ("reserved_int2", ctypes.c_uint64),
        ("reserved_int3", _SIZE_T), ("reserved_int4", _SIZE_T),
        ("reserved_enum", ctypes.c_int * 2),
    ]


class _OptionsLzma(ctypes.Structure):
    _fields_ = [
        ("dict_size", ctypes.c_uint32), ("preset_dict", ctypes.c_void_p),
        ("preset_dict_size", ctypes.c_uint32), ("lc", ctypes.c_uint32),
        ("lp", ctypes.c_uint32), ("pb", ctypes.c_uint32), ("mode", ctypes.c_int),
        ("nice_len", ctypes.c_uint32), ("mf", ctypes.c_int), ("depth", ctypes.c_uint32),
        ("ext_flags", ctypes.c_uint32), ("ext_size_low", ctypes.c_uint32),
        ("ext_size_high", ctypes.c_uint32), ("reserved_int", ctypes.c_uint32 * 5),
        ("reserved_enum", ctypes.c_int * 4), ("reserved_ptr", ctypes.c_void_p * 2),
    ]


class _Filter(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("options", ctypes.c_void_p)]


@functools.cache
def _lib() -> Any:
    name = ctypes.util.find_library("lzma") or "liblzma.so.5"
    lib = ctypes.CDLL(name)
    lib.lzma_lzma_preset.argtypes = [ctypes.POINTER(_OptionsLzma), ctypes.c_uint32]
    lib.lzma_lzma_preset.restype = ctypes.c_int
    for fn in (lib.lzma_raw_encoder, lib.lzma_raw_decoder):
        fn.argtypes = [ctypes.POINTER(_Stream), ctypes.POINTER(_Filter)]
        fn.restype = ctypes.c_int
    lib.lzma_code.argtypes = [ctypes.POINTER(_Stream), ctypes.c_int]
    lib.lzma_code.restype = ctypes.c_int
    lib.lzma_end.argtypes = [ctypes.POINTER(_Stream)]
    lib.lzma_end.restype = None
    return lib


def available() -> bool:
    """Whether liblzma can be loaded."""
    try:
        _lib()
    except OSError:
        return False
    return True


class _Coder:
    def __init__(self, dict_size: int, x86: bool, preset: int, encode: bool,
                 preset_dict: Any = None) -> None:
        if not 4096 <= dict_size <= MAX_DICT:
            raise StreamFormatError(f"LZMA2 dictionary of {dict_size} bytes is out of range")
        lib = _lib()
        self.opts = _OptionsLzma()
        if lib.lzma_lzma_preset(ctypes.byref(self.opts), preset):
            raise ValueError(f"bad LZMA preset {preset:#x}")  # pragma: no cover
        self.opts.dict_size = dict_size
        if preset_dict is not None and len(preset_dict):
            # liblzma copies it into the encoder's dictionary at init (lz_encoder.c), so
            # the caller's buffer is needed only until then
            kind = ctypes.c_char * len(preset_dict)
            pdict = (kind.from_buffer(preset_dict) if isinstance(preset_dict, bytearray)
                     else kind.from_buffer_copy(preset_dict))
            self.opts.preset_dict = ctypes.cast(pdict, ctypes.c_void_p)
            self.opts.preset_dict_size = len(preset_dict)
        chain: list[tuple[int, Any]] = [(_LZMA_FILTER_X86, None)] if x86 else []
        chain += [(_LZMA_FILTER_LZMA2, ctypes.cast(ctypes.byref(self.opts), ctypes.c_void_p)),
                  (_LZMA_VLI_UNKNOWN, None)]
        self.filters = (_Filter * len(chain))(*[_Filter(i, o) for i, o in chain])
        self.strm = _Stream()
        init = lib.lzma_raw_encoder if encode else lib.lzma_raw_decoder
        if init(ctypes.byref(self.strm), self.filters) != _OK:
            raise MemoryError("liblzma could not start a coder")
        self.opts.preset_dict = None
        self.opts.preset_dict_size = 0
        self.lib = lib

    def _code(self, data: Any, action: int, out_limit: int) -> tuple[bytes, int]:
        """Feed ``data`` (all of it, unless ``out_limit`` output bytes come first)."""
        src = (ctypes.c_char * len(data)).from_buffer_copy(data) if len(data) else None
        strm = self.strm
        strm.next_in = ctypes.cast(src, ctypes.c_void_p) if src is not None else None
        strm.avail_in = len(data)
        out: list[bytes] = []
        got = 0
        size = 1 << 20
        buf = ctypes.create_string_buffer(size)
        while True:
            room = min(size, out_limit - got)
            strm.next_out = ctypes.cast(buf, ctypes.c_void_p)
            strm.avail_out = room
            ret = self.lib.lzma_code(ctypes.byref(strm), action)
            n = room - strm.avail_out
            if n:
                out.append(buf.raw[:n])
                got += n
            if ret not in (_OK, _STREAM_END):
                raise StreamFormatError(f"LZMA2 data is corrupt (liblzma error {ret})")
            if ret == _STREAM_END or got >= out_limit:
                break
            if strm.avail_in == 0 and strm.avail_out != 0:
                break
        return b"".join(out), len(data) - strm.avail_in

    def close(self) -> None:
        if self.strm is not None:
            self.lib.lzma_end(ctypes.byref(self.strm))

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class Lzma2Encoder(_Coder):
    """Raw LZMA2 encoder (``preset`` 0..9, ``extreme`` = ``-e``).

    With ``preset_dict`` (at most ``dict_size`` bytes: the data just before what this
    encoder is given) the encoder starts with those bytes in its dictionary and its first
    chunk resets the state but not the dictionary: its output continues an LZMA2 stream
    whose decoder has produced them, matches reaching back into them.
    """

    def __init__(self, dict_size: int, *, x86: bool = False, preset: int = 9,
                 extreme: bool = True, preset_dict: Any = None) -> None:
        super().__init__(dict_size, x86, preset | (_LZMA_PRESET_EXTREME if extreme else 0),
                         True, preset_dict)

    def compress(self, data: Any) -> bytes:
        """Feed ``data``; returns what the encoder gives out so far."""
        return self._code(data, _RUN, 1 << 62)[0]

    def flush(self) -> bytes:
        """Sync flush: everything fed so far decodes from what has been returned."""
        return self._code(b"", _SYNC_FLUSH, 1 << 62)[0]


class Lzma2Decoder(_Coder):
    """Raw LZMA2 decoder for a stream made by :class:`Lzma2Encoder` with the same
    dictionary size and filter."""

    def __init__(self, dict_size: int, *, x86: bool = False) -> None:
        super().__init__(dict_size, x86, 6, False)

    def decompress(self, data: Any, max_out: int) -> tuple[bytes, int]:
        """Decode ``data``: (output, at most ``max_out`` bytes; input bytes consumed)."""
        return self._code(data, _RUN, max_out)
