"""Typed manifest fields: checking raw TOML/wire values and their canonical (float-free) wire form."""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping, Sequence

from p2pcompute.errors import InvalidManifest

# A decimal is written with at most this many characters and digits of exponent: enough for any
# hyperparameter (1e-12 .. 1e12 with 15 significant digits), small enough that parsing cannot be
# turned into a denial of service ("1e999999999").
MAX_DECIMAL_TEXT = 40
MAX_DECIMAL_EXPONENT = 18
_DECIMAL_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?$")


def canonical_decimal(value: Decimal) -> str:
    """The one text form of a decimal: no exponent, no trailing zeros, no sign on zero ("0.001", "5", "-2.5")."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


class Kind(ABC):
    """A field type: `check` turns a raw value (TOML or wire) into the typed value or raises ValueError;
    `encode` gives the value's canonical wire form (int, str, bool, bytes or a list of those)."""

    @abstractmethod
    def check(self, value: Any) -> Any:
        ...

    def encode(self, value: Any) -> Any:
        return value

    @abstractmethod
    def describe(self) -> str:
        ...


@dataclasses.dataclass(frozen=True)
class Int(Kind):
    lo: int
    hi: int

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_show(value)}")
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{value} is out of range [{self.lo}, {self.hi}]")
        return value

    def describe(self) -> str:
        return f"integer in [{self.lo}, {self.hi}]"


@dataclasses.dataclass(frozen=True)
class Dec(Kind):
    """A non-integer number. Accepted as a TOML float, an integer or a decimal string; held as a
    `decimal.Decimal`; on the wire it is its canonical decimal string (signed payloads carry no floats)."""

    lo: str
    hi: str
    lo_open: bool = False  # True: value must be strictly above lo

    def check(self, value: Any) -> Decimal:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {_show(value)}")
        if isinstance(value, float):
            text = repr(value)  # shortest text that round-trips: 0.001 -> "0.001"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, str):
            text = value.strip()
        elif isinstance(value, Decimal) and value.is_finite():
            text = canonical_decimal(value)
        else:
            raise ValueError(f"expected a number, got {_show(value)}")
        if len(text) > MAX_DECIMAL_TEXT or not _DECIMAL_TEXT.match(text):
            raise ValueError(f"{text[:MAX_DECIMAL_TEXT]!r} is not a decimal number")
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"{text!r} is not a decimal number") from None
        if number != 0 and abs(number.adjusted()) > MAX_DECIMAL_EXPONENT:
            raise ValueError(f"{text!r} is too large or too small")
        lo, hi = Decimal(self.lo), Decimal(self.hi)
        if number < lo or number > hi or (self.lo_open and number == lo):
            raise ValueError(f"{canonical_decimal(number)} is out of range {self.describe_range()}")
        return Decimal(canonical_decimal(number))

    def encode(self, value: Decimal) -> str:
        return canonical_decimal(value)

    def describe_range(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}]"

    def describe(self) -> str:
        return f"number in {self.describe_range()}"


@dataclasses.dataclass(frozen=True)
class Bool(Kind):
    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {_show(value)}")
        return value

    def describe(self) -> str:
        return "true or false"


@dataclasses.dataclass(frozen=True)
class Str(Kind):
    max_len: int
    pattern: str = ""  # a regex the whole string must match; "" allows any printable text
    what: str = "text"

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {_show(value)}")
        if len(value) > self.max_len:
            raise ValueError(f"longer than {self.max_len} characters")
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ValueError(f"{value!r} is not a valid {self.what}")
        if not self.pattern and not value.isprintable():
            raise ValueError("contains control characters")
        return value

    def describe(self) -> str:
        return f"{self.what} of at most {self.max_len} characters"


@dataclasses.dataclass(frozen=True)
class Choice(Kind):
    options: tuple[str, ...]

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.options:
            raise ValueError(f"{_show(value)} is not one of {', '.join(self.options)}")
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(self.options)


@dataclasses.dataclass(frozen=True)
class ListOf(Kind):
    """A list of values of one kind, held as a tuple."""

    item: Kind
    min_len: int
    max_len: int
    unique: bool = False

    def check(self, value: Any) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {_show(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise ValueError(f"expected {self.min_len} to {self.max_len} items, got {len(value)}")
        items = []
        for i, item in enumerate(value):
            try:
                items.append(self.item.check(item))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        if self.unique and len(set(items)) != len(items):
            raise ValueError("items must be distinct")
        return tuple(items)

    def encode(self, value: tuple) -> list:
        return [self.item.encode(v) for v in value]

    def describe(self) -> str:
        return f"list of {self.min_len}-{self.max_len} items, each {self.item.describe()}"


SHA256_HEX = Str(64, r"(|[0-9a-f]{64})", "sha256 hex digest (64 lower-case hex digits, or empty)")
FILE_NAME = Str(255, r"[A-Za-z0-9][A-Za-z0-9._-]*", "file name (no directories)")

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    default: Any = REQUIRED
    doc: str = ""


class Schema:
    """An ordered set of named fields. The wire form of a section is the list of its values in schema
    order (every field present, defaults filled in), so two equal sections always encode alike."""

    def __init__(self, *params: Param):
        self.params = params
        self.names = tuple(p.name for p in params)

    def parse(self, raw: Mapping[str, Any], where: str, ignore: Sequence[str] = ()) -> dict[str, Any]:
        """Check a TOML table: unknown keys, missing required fields and bad values are InvalidManifest
        naming the field (`where.key`)."""
        if not isinstance(raw, Mapping):
            raise InvalidManifest(f"{where} must be a table")
        for key in raw:
            if key not in self.names and key not in ignore:
                raise InvalidManifest(f"{_join(where, key)}: unknown key (expected one of: {', '.join(self.names)})")
        values = {}
        for p in self.params:
            if p.name in raw:
                values[p.name] = self._check(p, raw[p.name], where)
            elif p.default is REQUIRED:
                raise InvalidManifest(f"{_join(where, p.name)}: missing (expected {p.kind.describe()})")
            else:
                values[p.name] = p.default if p.default is None else p.kind.check(p.default)
        return values

    def encode(self, values: Mapping[str, Any]) -> list:
        return [p.kind.encode(values[p.name]) for p in self.params]

    def from_list(self, wire: Any, where: str) -> dict[str, Any]:
        """Name the values of a section's wire form (a list in schema order); `parse` then checks them."""
        if not isinstance(wire, list) or len(wire) != len(self.params):
            raise InvalidManifest(f"{where}: expected a list of {len(self.params)} values")
        return dict(zip(self.names, wire))

    @staticmethod
    def _check(p: Param, value: Any, where: str) -> Any:
        try:
            return p.kind.check(value)
        except ValueError as e:
            raise InvalidManifest(f"{_join(where, p.name)}: {e}") from None


def zoo_lookup(table: Mapping[str, Any], name: Any, where: str, what: str) -> Any:
    """The zoo entry called `name`, or InvalidManifest naming the field and listing the choices."""
    entry = table.get(name) if isinstance(name, str) else None
    if entry is None:
        raise InvalidManifest(f"{where}: unknown {what} {_show(name)} (the zoo has: {', '.join(table)})")
    return entry


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
