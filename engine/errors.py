"""Errors the engine raises on purpose.

Every message says what went wrong and what to do about it, in one line, so the app and the
CLI can show it as-is (the app turns them into ``st.error`` in exactly one place).
"""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InputError(EngineError, ValueError):
    """Bad user input: an empty prompt, an out-of-range setting, an unknown label."""


class ModelNotFoundError(EngineError):
    """A model name that is neither embedded, in the store, a local folder nor a hub id."""


class MissingPackageError(EngineError):
    """An embedded model whose weight package is not installed."""


class OfflineError(EngineError):
    """A hub id was asked for but the hub cannot be reached."""


class UnsafeModelError(EngineError):
    """Pickled weights or remote code, refused unless the user opts in."""


class StoreError(EngineError):
    """A model-store entry that is missing files, unreadable or corrupt."""


class MemoryBudgetError(EngineError):
    """A model or a run that would not fit in the memory budget."""


class CancelledError(EngineError):
    """Work stopped because the user asked for it."""
