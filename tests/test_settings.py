"""Settings: defaults, then the YAML file, then TIMELINE_* variables."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from timeline.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_yaml_lists_every_setting_with_its_default() -> None:
    shipped = yaml.safe_load((ROOT / "configs" / "timeline.yaml").read_text())
    defaults = Settings()
    assert set(shipped) == {f.name for f in fields(Settings)}
    for name, value in shipped.items():
        assert value == getattr(defaults, name), name


def test_yaml_overrides_defaults_and_environment_overrides_yaml(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text("count_max: 500\nmongo_database: chat\nredis_url: redis://cfg:6379/0\n")
    env = {
        "TIMELINE_CONFIG": str(config),
        "TIMELINE_MONGO_DATABASE": "fromenv",
        "TIMELINE_MONGO_URI": "mongodb://m:27017",
    }
    settings = load_settings(env)
    assert settings.count_max == 500  # from the file
    assert settings.mongo_database == "fromenv"  # the environment wins
    assert settings.redis_url == "redis://cfg:6379/0"
    assert settings.store_backend == "mongo"
    assert settings.count_default == 100  # untouched default


def test_nothing_configured_means_the_embedded_default(tmp_path: Path) -> None:
    settings = load_settings({}, config_path=ROOT / "configs" / "timeline.yaml")
    assert settings.embedded_redis
    assert settings.store_backend == "sqlite"
    assert settings.sqlite_path == "var/timeline.sqlite3"
    assert settings.mongo_database == "im"


def test_an_empty_variable_unsets_an_optional_setting(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text("redis_url: redis://cfg:6379/0\n")
    assert load_settings({"TIMELINE_REDIS_URL": ""}, config_path=config).redis_url is None


@pytest.mark.parametrize(
    ("text", "env", "complaint"),
    [
        ("cuont_max: 5\n", {}, "unknown setting"),
        ("count_max: many\n", {}, "must be an integer"),
        ("- a list\n", {}, "mapping"),
        ("", {"TIMELINE_COUNT_MAX": "x"}, "TIMELINE_COUNT_MAX"),
        ("", {"TIMELINE_COUNT_MAX": "0"}, "positive"),
        ("", {"TIMELINE_COUNT_DEFAULT": "2000"}, "count_default"),
        ("", {"TIMELINE_REDIS_URL": "localhost:6379"}, "redis://"),
        ("count_max: true\n", {}, "integer"),
        ("", {"TIMELINE_SYNC_RETENTION_SECONDS": str(100 * 365 * 86_400)}, "68 years"),
        ("", {"TIMELINE_HISTORY_RETENTION_SECONDS": "2147397248"}, "at most 2147397247"),
        ("", {"TIMELINE_MONGO_OPERATION_TIMEOUT_MS": "0"}, "positive"),
    ],
)
def test_bad_settings_fail_at_start_with_a_clear_message(
    tmp_path: Path, text: str, env: dict[str, str], complaint: str
) -> None:
    config = tmp_path / "t.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=complaint):
        load_settings(env, config_path=config)


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({"TIMELINE_CONFIG": str(tmp_path / "missing.yaml")})


def test_the_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for f in fields(Settings):
        assert f"`TIMELINE_{f.name.upper()}`" in readme, f.name
