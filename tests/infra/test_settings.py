"""Settings: defaults < settings file (TOML, pydantic-settings' source) < environment < flags."""

from __future__ import annotations

import os

import pytest

from pydantic import ValidationError
from typer.testing import CliRunner

from infra.errors import UsageError
from infra.settings import Settings, config_file, get_settings, reset_settings


@pytest.fixture
def clean_env(monkeypatch):
    saved = dict(os.environ)          # the CLI sets up Prefect's and Dask's environment: undone after
    for k in ("GSAFE_CHUNK_SIZE", "GSAFE_BANDS", "GSAFE_OBJID_KEY", "GSAFE_CONFIG", "GSAFE_HOME",
              "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(k, raising=False)
    reset_settings()
    yield monkeypatch
    reset_settings()
    os.environ.clear()
    os.environ.update(saved)


def _file(tmp_path, text: str):
    path = tmp_path / "gsafe.toml"
    path.write_text(text)
    return path


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path, clean_env):
    path = _file(tmp_path, 'chunk_size = 7\nobjid_key = "FROMFILE"\nbands = ["u", "g"]\n'
                           'mlflow_tracking_uri = "http://file:5000"\n')
    s = get_settings(config=path)
    assert (s.chunk_size, s.objid_key, s.bands, s.mlflow_tracking_uri) == (7, "FROMFILE", ("u", "g"), "http://file:5000")
    assert s.max_missing_frac == Settings.model_fields["max_missing_frac"].default    # untouched: the default
    assert config_file() == path
    clean_env.setenv("GSAFE_CHUNK_SIZE", "9")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    s = get_settings(config=path)
    assert (s.chunk_size, s.mlflow_tracking_uri, s.objid_key) == (9, "http://env:5000", "FROMFILE")
    assert get_settings(config=path, chunk_size=11).chunk_size == 11
    clean_env.setenv("GSAFE_CONFIG", str(path))                  # the file named by the environment
    assert get_settings(home=tmp_path).objid_key == "FROMFILE"


def test_the_file_is_read_only_when_settings_are_built_from_it(tmp_path, clean_env):
    get_settings(config=_file(tmp_path, "chunk_size = 7\n"))
    assert Settings().chunk_size == Settings.model_fields["chunk_size"].default   # flows rebuild from dicts


@pytest.mark.parametrize("text, match", [
    ("chunk_sise = 7\n", "unknown settings chunk_sise; known: .*chunk_size"),
    ("chunk_size = \n", "is not valid TOML"),
], ids=["typo", "not toml"])
def test_a_bad_settings_file_is_a_usage_error(text, match, tmp_path, clean_env):
    with pytest.raises(UsageError, match=match):
        get_settings(config=_file(tmp_path, text))
    with pytest.raises(UsageError, match="not found"):
        get_settings(config=tmp_path / "nope.toml")
    with pytest.raises(ValidationError):
        get_settings(config=_file(tmp_path, "chunk_size = 0\n"))


def test_gsafe_config_sets_what_the_environment_sets(tmp_path, clean_env):
    from flows.cli import app
    from infra.store import SurveyStore

    path = _file(tmp_path, f'home = "{tmp_path / "home"}"\nchunk_size = 3\nbands = ["g", "r"]\ncutout_size = 16\n'
                           "progress = false\n")
    url = str(tmp_path / "s.zarr")
    r = CliRunner().invoke(app, ["simulate", "--n", "7", "--store", url, "--config", str(path)])
    assert r.exit_code == 0, r.output
    store = SurveyStore.open(url)
    assert (store.chunk_size, store.bands, store.image_shape, store.n) == (3, ("g", "r"), (2, 16, 16), 7)
    assert (tmp_path / "home").is_dir()
    bad = _file(tmp_path, "chunk_size = 0\n")
    r = CliRunner().invoke(app, ["simulate", "--n", "7", "--store", str(tmp_path / "t.zarr"), "--config", str(bad)])
    assert r.exit_code == 2 and "settings file" in r.output and not (tmp_path / "t.zarr").exists()
