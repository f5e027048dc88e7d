"""One settings object for gsafe: defaults, then `GSAFE_*` environment variables, then CLI flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Everything gsafe reads from the outside world, in one place.

    Environment variables use the prefix ``GSAFE_`` (``GSAFE_HOME``, ``GSAFE_CHUNK_SIZE``...);
    ``MLFLOW_TRACKING_URI`` and ``PREFECT_API_URL`` are read under their own, standard names.
    """

    model_config = SettingsConfigDict(env_prefix="GSAFE_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".gsafe",
                       description="where gsafe keeps MLflow's database, artifacts and Prefect's state")
    chunk_size: int = Field(1024, ge=1, description="cutouts per store chunk and per Dask task")
    bands: tuple[str, ...] = ("g", "r", "i", "z", "y")
    cutout_size: int = Field(64, ge=8, description="H = W of a cutout, pixels")
    pixel_scale: float = Field(0.2, gt=0, description="arcsec per pixel")
    objid_key: str = Field("OBJID", description="FITS header keyword holding the object id")
    max_missing_frac: float = Field(0.25, ge=0, le=1,
                                    description="cutouts with more non-finite pixels than this are quarantined")
    # HSC/LSST mask planes whose pixels hold no usable data; a MASK HDU's MP_<NAME> keywords number
    # them (HSC's bit numbers without them); bit numbers as text ("12") work for other surveys' masks
    mask_bits: tuple[str, ...] = Field(("BAD", "SAT", "INTRP", "CR", "EDGE", "NO_DATA"),
                                       description="mask planes (or bit numbers) that make a pixel missing")
    ingest_workers: int | None = Field(None, ge=1, description="processes reading input during ingest (default: "
                                                               "cores - 1 on 3+ cores for 256+ inputs, else 1)")
    dask_address: str | None = Field(None, description="tcp://host:port of an existing Dask scheduler")
    n_workers: int | None = Field(None, ge=1, description="workers of the LocalCluster (default: one per core)")
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "GSAFE_MLFLOW_TRACKING_URI"))
    prefect_api_url: str | None = Field(
        None, validation_alias=AliasChoices("PREFECT_API_URL", "GSAFE_PREFECT_API_URL"))
    verbose: bool = False
    progress: bool = True

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: the user's server, else SQLite under `home`."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.home.resolve() / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return (self.home.resolve() / "mlartifacts").as_uri()

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"


_settings: Settings | None = None


def get_settings(**overrides) -> Settings:
    """The process-wide settings; `overrides` (from CLI flags) replace fields that are not None.

    Overrides are validated like the environment (``--chunk-size 0`` fails here, not in a flow).

    Raises:
        pydantic.ValidationError: a value (flag or ``GSAFE_*`` variable) out of its range.
    """
    global _settings
    if _settings is None or overrides:
        upd = {k: v for k, v in overrides.items() if v is not None}
        _settings = Settings(**upd)   # init values win over the environment, and are validated
    return _settings


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    global _settings
    _settings = None
