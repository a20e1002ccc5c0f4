"""Reading the text and JSON files users hand us (lists, captions, prompts, weights) with errors that name the
file, the line and the fix. Imports nothing from the other `src` packages."""

import json
from pathlib import Path


def read_text(path, what: str) -> str:
    """The text of the UTF-8 file `path` (a leading byte-order mark is dropped); `what` names the file in errors.

    Raises FileNotFoundError for a missing file, ValueError for a folder or for bytes that are not UTF-8 (naming
    the line, the byte and its offset).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} '{path}' is a folder, not a file; give the path of the file")
    if not path.exists():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{what} '{path}', line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
            f"{error.start}); save the file as UTF-8"
        ) from None


def read_json(path, what: str):
    """The JSON content of the UTF-8 file `path` (`read_text`); ValueError naming the line and column of bad JSON."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} '{path}', line {error.lineno} column {error.colno}: not valid JSON ({error.msg})"
        ) from None
