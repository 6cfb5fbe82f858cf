"""Reading annotation files field by field: every value is checked where it is read, and a value that
cannot be used is a ValueError naming the file, the record (its index, and its id once known) and the
field, never a Python error from deep inside (`int()`, a dict lookup) that names none of them.

What a sample's content gets wrong (an empty caption, a missing image) is not an error but a counted skip
(`vlp.datamodules.images`); what breaks the file's structure (a wrong type, a duplicate id) is an error,
since guessing would silently change the data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PathLike = str | Path


def read_json(path: PathLike) -> object:
    """Parse a JSON file; malformed JSON is a ValueError naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 at byte {error.start}") from error
    except RecursionError:
        raise ValueError(
            f"{path}: JSON nested too deeply to parse (arrays or objects inside each other)"
        ) from None


def type_name(value: object) -> str:
    """JSON's name for a parsed value's type, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, float) and not math.isfinite(value):
        return f"a non-finite number ({value})"
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def field(entry: object, key: str, path: PathLike, where: str) -> object:
    """`entry[key]`, or a ValueError naming the file, the entry and the missing field."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} must be an object with field {key!r}, got {type_name(entry)}")
    if key not in entry:
        raise ValueError(f"{path}: {where} has no field {key!r}")
    return entry[key]


def list_field(entry: object, key: str, path: PathLike, where: str) -> list:
    """`entry[key]`, which must be a JSON list."""
    value = field(entry, key, path, where)
    if not isinstance(value, list):
        raise ValueError(f"{path}: {where}: field {key!r} must be a list, got {type_name(value)}")
    return value


def as_integer(value: object, path: PathLike, where: str, key: str) -> int:
    """An id: an integer, an integral float (`3.0`) or a string of digits (`"0042"`); anything else
    (`1.5`, NaN, null, a list, `"abc"`, a boolean) is a ValueError naming file, record and field."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        return int(value.strip())
    raise ValueError(f"{path}: {where}: field {key!r} must be an integer, got {type_name(value)} {value!r}")


def integer_field(entry: object, key: str, path: PathLike, where: str) -> int:
    return as_integer(field(entry, key, path, where), path, where, key)


def as_text(value: object, path: PathLike, where: str, key: str, allow_empty: bool = False) -> str:
    """A file name or other required text: a string, non-empty unless `allow_empty`."""
    if not isinstance(value, str) or not (allow_empty or value.strip()):
        raise ValueError(
            f"{path}: {where}: field {key!r} must be a {'' if allow_empty else 'non-empty '}string, "
            f"got {type_name(value)} {value!r}"
        )
    return value


def text_field(entry: object, key: str, path: PathLike, where: str) -> str:
    return as_text(field(entry, key, path, where), path, where, key)


def as_number(value: object, path: PathLike, where: str, key: str) -> float:
    """A finite number (an image width, height)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise ValueError(
        f"{path}: {where}: field {key!r} must be a finite number, got {type_name(value)} {value!r}"
    )


class UniqueIds:
    """Ids seen so far in one file: a repeated id is a ValueError naming both records (merging them would
    give one image's captions to another, or drop one)."""

    def __init__(self, path: PathLike, key: str) -> None:
        self.path, self.key = path, key
        self.first: dict[int, str] = {}

    def add(self, value: int, where: str) -> None:
        if value in self.first:
            raise ValueError(
                f"{self.path}: {where}: {self.key} {value} repeats the {self.key} of {self.first[value]}"
            )
        self.first[value] = where
