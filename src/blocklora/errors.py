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
