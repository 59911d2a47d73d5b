"""Errors a user can fix. The CLI prints them as one line ("error: ...") and exits non-zero, no traceback.

Everything else (a bug in blocklora or a library) keeps its traceback.
"""

from __future__ import annotations


class BlockLoRAError(Exception):
    """Base class: a problem with the user's input, configuration or files; the message says what to do."""


class ConfigError(BlockLoRAError, ValueError):
    """An impossible or unknown configuration value."""


class AdapterMismatchError(BlockLoRAError, ValueError):
    """An adapter file that does not fit the model it is loaded into."""


class DataError(BlockLoRAError):
    """A missing or malformed dataset, split file or image."""


class BackboneError(BlockLoRAError):
    """A model that cannot be built or loaded (unknown name, missing checkpoint, no network)."""


def one_line(e: BaseException) -> str:
    """The first line of a user error; for one re-raised by a DataLoader worker ("Caught DataError in DataLoader
    worker process 0.\nOriginal Traceback ...\nblocklora.errors.DataError: the message"), the original message."""
    text = str(e)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return lines[0] if lines else type(e).__name__


def printable(text: str) -> str:
    """`text` as valid UTF-8 for JSON, logs and terminals: the bytes of a file name that is not UTF-8 (which Python
    holds as lone surrogates, os.fsdecode) are shown as \\xNN escapes, as Python's own messages show them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: its code point, escaped
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
