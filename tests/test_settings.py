"""Settings: defaults, then the YAML file, then TIMELINE_* variables."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from timeline.embedded import SOCKET_PATH_MAX
from timeline.settings import NOT_SETTINGS, Settings, SettingsError, load_settings

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
        ("", {"TIMELINE_REDIS_MODE": "clustered"}, "standalone, cluster, sentinel"),
        ("", {"TIMELINE_REDIS_MODE": "cluster"}, "needs redis_url"),
        (
            "",
            {"TIMELINE_REDIS_MODE": "cluster", "TIMELINE_REDIS_URL": "unix:///tmp/r.sock"},
            "needs redis_url",
        ),
        (
            "redis_mode: cluster\nredis_url: redis://h:7000/0\nredis_key_prefix: 'a{b}:'\n",
            {},
            "must not contain { or }",
        ),
        (
            "redis_mode: cluster\nredis_url: redis://h:7000/0\n",
            {"TIMELINE_REDIS_BUCKETS": "16385"},
            "between 1 and 16384",
        ),
        ("", {"TIMELINE_REDIS_MODE": "sentinel"}, "needs redis_sentinels"),
        (
            "redis_mode: sentinel\nredis_sentinel_master: m\n",
            {"TIMELINE_REDIS_SENTINELS": "h1:26379,h2"},
            "'h2' is not host:port",
        ),
        (
            "redis_mode: sentinel\nredis_sentinel_master: m\nredis_url: redis://h:1/0\n",
            {"TIMELINE_REDIS_SENTINELS": "h1:26379"},
            "not used in sentinel mode",
        ),
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


def test_an_unknown_variable_is_refused_with_the_closest_name() -> None:
    shipped = ROOT / "configs" / "timeline.yaml"
    with pytest.raises(SettingsError) as refused:
        load_settings({"TIMELINE_COUNT_DEFALT": "5"}, config_path=shipped)
    assert str(refused.value) == (
        "TIMELINE_COUNT_DEFALT is not a timeline setting; did you mean TIMELINE_COUNT_DEFAULT?"
    )
    with pytest.raises(SettingsError) as refused:
        load_settings({"TIMELINE_XYZZY": "1"}, config_path=shipped)
    assert str(refused.value) == "TIMELINE_XYZZY is not a timeline setting"


def test_an_unknown_yaml_name_gets_the_closest_name_too(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text("cuont_max: 5\n")
    with pytest.raises(SettingsError, match="did you mean count_max"):
        load_settings({}, config_path=config)


def test_variables_that_are_not_settings_are_let_through(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("count_max: 700\n")
    env = {name: "x" for name in NOT_SETTINGS} | {"TIMELINE_CONFIG": str(tmp_path / "t.yaml")}
    assert load_settings(env).count_max == 700


def test_every_timeline_variable_read_anywhere_is_a_setting_or_listed() -> None:
    # A TIMELINE_* variable the code or the tests read for themselves, unknown to the loader,
    # would stop the service: each must be a setting or be listed in NOT_SETTINGS.
    settings = {f"TIMELINE_{f.name.upper()}" for f in fields(Settings)}
    read: set[str] = set()
    sources = [*ROOT.glob("timeline/**/*.py"), *ROOT.glob("tests/*.py"), ROOT / "gunicorn.conf.py"]
    for source in sources:
        text = source.read_text(encoding="utf-8")
        read |= set(
            re.findall(r"(?:environ\.get\(|environ\[|getenv\()\s*[\"'](TIMELINE_\w+)", text)
        )
    assert read - settings <= NOT_SETTINGS
    assert {"TIMELINE_TEST_MONGO_URI", "TIMELINE_TEST_REDIS_URL"} <= read


@pytest.mark.parametrize(
    ("text", "env", "complaint"),
    [
        ("", {"TIMELINE_COUNT_MAX": "0"}, "TIMELINE_COUNT_MAX: count_max must be positive"),
        ("", {"TIMELINE_LOG_LEVEL": "loud"}, "TIMELINE_LOG_LEVEL: log_level must be debug"),
        ("count_max: 0\n", {}, "{config}: count_max must be positive"),
        (
            "count_default: 20\n",
            {"TIMELINE_COUNT_MAX": "10"},
            "{config}, TIMELINE_COUNT_MAX: count_default must not exceed count_max",
        ),
    ],
)
def test_a_bad_value_names_where_it_was_set(
    tmp_path: Path, text: str, env: dict[str, str], complaint: str
) -> None:
    config = tmp_path / "t.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError) as refused:
        load_settings(env, config_path=config)
    assert str(refused.value).startswith(complaint.format(config=config))


def test_a_data_dir_too_deep_for_the_redis_socket_is_refused(tmp_path: Path) -> None:
    none = tmp_path / "none.yaml"
    none.write_text("")
    base = tmp_path.resolve()
    # base/ddd.../redis.sock, one byte over the limit.
    deep = base / ("d" * (SOCKET_PATH_MAX + 1 - len(f"{base}//redis.sock")))
    with pytest.raises(SettingsError) as refused:
        load_settings({"TIMELINE_DATA_DIR": str(deep)}, config_path=none)
    message = str(refused.value)
    assert message.startswith("TIMELINE_DATA_DIR: data_dir is too deep")
    assert f"{SOCKET_PATH_MAX + 1} bytes, over the {SOCKET_PATH_MAX}" in message
    # One byte less fits; and with an external Redis there is no socket to place.
    fits = deep.with_name(deep.name[1:])
    assert load_settings({"TIMELINE_DATA_DIR": str(fits)}, config_path=none)
    external = {"TIMELINE_DATA_DIR": str(deep), "TIMELINE_REDIS_URL": "redis://r:6379/0"}
    assert load_settings(external, config_path=none).data_dir == str(deep)


def test_the_process_s_settings_are_read_once_until_their_sources_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A gunicorn worker's front and its app both ask: one read, one object.
    config = tmp_path / "timeline.yaml"
    config.write_text("count_default: 7\n")
    monkeypatch.setenv("TIMELINE_CONFIG", str(config))
    first = load_settings()
    assert load_settings() is first
    assert first.count_default == 7
    # A changed variable, or a changed file, is read again.
    monkeypatch.setenv("TIMELINE_COUNT_MAX", "999")
    second = load_settings()
    assert second is not first
    assert second.count_max == 999
    config.write_text("count_default: 8\n# longer, so that the size changes too\n")
    assert load_settings().count_default == 8
