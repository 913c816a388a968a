"""Canonical msgpack for signed records: the one encoder, strict decoding with limits, typed field checks."""

from __future__ import annotations

from typing import Any, ClassVar

import msgpack

from p2pcompute.errors import InvalidMessage

# msgpack arrays with at most 15 elements have a one-byte header (fixarray 0x90 | n).
FIXARRAY = 0x90


def pack(obj: Any) -> bytes:
    """Encode nested lists of int, bytes and str canonically.

    msgpack-python always picks the shortest form for ints, strings, bytes and arrays, so for these
    types the encoding is unique; `unpack_canonical` enforces that on the way in by re-encoding.
    """
    return msgpack.packb(obj, use_bin_type=True)


def unpack_canonical(data: Any, *, max_size: int, what: str, error: type[InvalidMessage] = InvalidMessage) -> Any:
    """Decode `data` or raise `error` naming why: too big, not msgpack, trailing bytes, maps, ext or floats
    in a non-shortest form, or any encoding that is not the canonical one of the decoded value."""
    if not isinstance(data, bytes):
        raise error(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise error(f"{what} is {len(data)} bytes, over the {max_size}-byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            max_map_len=0,  # no maps anywhere: their key order could vary
            max_ext_len=0,  # no extension types (timestamps, custom)
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=max_size,
        )
    except msgpack.ExtraData:
        raise error(f"{what} has trailing bytes after the record") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise error(f"{what} is not well-formed msgpack ({type(e).__name__}: {e})") from None
    if pack(obj) != data:
        raise error(f"{what} is not canonically encoded (re-encoding gives different bytes)")
    return obj


class WireRecord:
    """Mixin for records encoded as one canonical array: `to_wire`/`from_wire` from the subclass's
    `to_obj()` (the array) and `from_obj(array)` (checks and builds the record).

    Subclasses set WIRE_NAME (named in errors) and MAX_WIRE_SIZE (decoding refuses anything larger).
    """

    WIRE_NAME: ClassVar[str]
    MAX_WIRE_SIZE: ClassVar[int]

    def to_wire(self) -> bytes:
        return pack(self.to_obj())

    @classmethod
    def from_wire(cls, data: bytes):
        """Decode untrusted bytes strictly; raise InvalidMessage naming the first problem."""
        return cls.from_obj(unpack_canonical(data, max_size=cls.MAX_WIRE_SIZE, what=cls.WIRE_NAME))


# ---- typed field checks: each raises `error` naming the field -------------------------------------


def array(value: Any, length: int, what: str, error: type[InvalidMessage] = InvalidMessage) -> list:
    if type(value) is not list:
        raise error(f"{what} must be an array, got {type(value).__name__}")
    if len(value) != length:
        raise error(f"{what} must have {length} fields, got {len(value)}")
    return value


def versioned(value: Any, length: int, version: int, what: str, error: type[InvalidMessage] = InvalidMessage) -> list:
    """The fields after the leading version number of an array of `length` items (version included)."""
    found, *fields = array(value, length, what, error)
    if type(found) is not int or found != version:
        raise error(f"unknown {what} version {found!r}")
    return fields


def sequence(value: Any, max_len: int, what: str, error: type[InvalidMessage] = InvalidMessage) -> list:
    if type(value) is not list:
        raise error(f"{what} must be an array, got {type(value).__name__}")
    if len(value) > max_len:
        raise error(f"{what} has {len(value)} items, over the limit of {max_len}")
    return value


def uint(value: Any, lo: int, hi: int, what: str, error: type[InvalidMessage] = InvalidMessage) -> int:
    if type(value) is not int:  # bool is excluded on purpose
        raise error(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise error(f"{what} = {value} is out of range [{lo}, {hi}]")
    return value


def fixed_bytes(value: Any, size: int, what: str, error: type[InvalidMessage] = InvalidMessage) -> bytes:
    if type(value) is not bytes:
        raise error(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != size:
        raise error(f"{what} must be {size} bytes, got {len(value)}")
    return value


def var_bytes(value: Any, lo: int, hi: int, what: str, error: type[InvalidMessage] = InvalidMessage) -> bytes:
    if type(value) is not bytes:
        raise error(f"{what} must be bytes, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise error(f"{what} is {len(value)} bytes, outside [{lo}, {hi}]")
    return value


def strictly_increasing(values: list[bytes], what: str, error: type[InvalidMessage] = InvalidMessage) -> None:
    """Sets travel sorted and without repeats, so each set has exactly one encoding."""
    for i in range(1, len(values)):
        if values[i - 1] >= values[i]:
            raise error(f"{what} must be sorted in increasing byte order without repeats (item {i})")
