"""One settings object for gsafe: defaults, then a TOML settings file, then `GSAFE_*` environment
variables, then CLI flags (each overrides the one before).

The settings file (``gsafe --config gsafe.toml``, or ``GSAFE_CONFIG=gsafe.toml``) holds the same
settings as the environment variables, by field name, at the top level::

    home = "/data/gsafe"
    chunk_size = 2048
    bands = ["g", "r", "i", "z", "y"]
    mlflow_tracking_uri = "http://mlflow:5000"
    prefect_api_url = "http://prefect:4200/api"
    dask_address = "tcp://scheduler:8786"
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from infra.errors import UsageError

__all__ = ["Settings", "config_file", "get_settings", "settings_file_keys"]

_reading: Path | None = None     # the settings file, only while get_settings builds the settings from it
_config_file: Path | None = None     # the settings file the current settings were built from


class Settings(BaseSettings):
    """Everything gsafe reads from the outside world, in one place.

    Environment variables use the prefix ``GSAFE_`` (``GSAFE_HOME``, ``GSAFE_CHUNK_SIZE``...);
    ``MLFLOW_TRACKING_URI`` and ``PREFECT_API_URL`` are read under their own, standard names. A
    settings file (see the module's docstring) gives the same settings by field name, below the
    environment and the flags.
    """

    model_config = SettingsConfigDict(env_prefix="GSAFE_", extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # first wins: flags (init values) > environment > settings file > defaults
        sources = (init_settings, env_settings)
        if _reading is not None:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=_reading),)
        return sources

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


def config_file() -> Path | None:
    """The settings file in use, if any."""
    return _config_file


def settings_file_keys() -> list[str]:
    """The keys a settings file may hold: every setting's field name."""
    return sorted(Settings.model_fields)


def _check_config_file(path: str | Path) -> Path:
    """The settings file, checked: it exists, is TOML and names known settings only."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"settings file {path} not found; give an existing TOML file to --config (or GSAFE_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"settings file {path} cannot be read ({type(e).__name__}: {e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"settings file {path} is not valid TOML ({e}); fix that line, or leave out --config") from None
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise UsageError(f"settings file {path}: unknown settings {', '.join(unknown)}; "
                         f"known: {', '.join(settings_file_keys())}")
    return path


def get_settings(config: str | Path | None = None, **overrides) -> Settings:
    """The process-wide settings; `overrides` (from CLI flags) replace fields that are not None.

    Precedence: flags (`overrides`) > environment variables > the settings file `config` (TOML;
    default: ``GSAFE_CONFIG``, else none) > defaults. Overrides and the file are validated like
    the environment (``--chunk-size 0`` fails here, not in a flow).

    Raises:
        pydantic.ValidationError: a value (flag, ``GSAFE_*`` variable or file entry) out of its range.
        UsageError: the settings file is missing, not TOML, or names an unknown setting.
    """
    global _settings, _reading, _config_file
    if _settings is None or overrides or config is not None:
        path = config if config is not None else os.environ.get("GSAFE_CONFIG") or None
        _config_file = _reading = None if path is None else _check_config_file(path)
        upd = {k: v for k, v in overrides.items() if v is not None}
        try:
            _settings = Settings(**upd)   # init values win over the environment and the file, and are validated
        finally:
            _reading = None               # Settings(...) elsewhere (flows, workers) read no file
    return _settings


def reset_settings() -> None:
    """Forget the cached settings and the settings file (tests change the environment between cases)."""
    global _settings, _config_file
    _settings = None
    _config_file = None
