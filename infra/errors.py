"""One small exception family: every error says what, where and what to do.

Each class carries the exit code the CLI ends with: 2 for usage and bad input (the user can fix
the command), 1 for a failure at run time (a server, a lock, the machine).
"""

__all__ = ["GsafeError", "UsageError", "StoreError", "SchemaVersionError", "InputError", "ModelRefError",
           "TrackingError", "EXIT_RUNTIME", "EXIT_USAGE"]

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class GsafeError(Exception):
    """Base of every error gsafe raises on purpose; the CLI prints it without a traceback."""

    exit_code = EXIT_RUNTIME


class UsageError(GsafeError):
    """A command asked for something that cannot work (a model that does not fit the store...)."""

    exit_code = EXIT_USAGE


class StoreError(GsafeError):
    """A survey store is missing, unreadable or inconsistent."""

    exit_code = EXIT_USAGE


class SchemaVersionError(StoreError):
    """A store was written by another schema version of gsafe."""


class InputError(GsafeError):
    """One input (file, cutout, catalog row) is unusable; ingest turns it into a quarantine row."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class ModelRefError(GsafeError):
    """A model reference (NAME, NAME@alias, NAME/version) does not resolve in the registry."""

    exit_code = EXIT_USAGE


class TrackingError(GsafeError):
    """The MLflow tracking server cannot be reached or refused a request."""
