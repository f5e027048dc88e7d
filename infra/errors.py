"""One small exception family: every error says what, where and what to do."""

__all__ = ["GsafeError", "StoreError", "SchemaVersionError", "InputError", "ModelRefError", "TrackingError"]


class GsafeError(Exception):
    """Base of every error gsafe raises on purpose; the CLI prints it without a traceback."""


class StoreError(GsafeError):
    """A survey store is missing, unreadable or inconsistent."""


class SchemaVersionError(StoreError):
    """A store was written by another schema version of gsafe."""


class InputError(GsafeError):
    """One input (file, cutout, catalog row) is unusable; ingest turns it into a quarantine row."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class ModelRefError(GsafeError):
    """A model reference (NAME, NAME@alias, NAME/version) does not resolve in the registry."""


class TrackingError(GsafeError):
    """The MLflow tracking server cannot be reached or refused a request."""
