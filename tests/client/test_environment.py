"""Client environments: where .ini files come from, and errors that name the file and the key."""
from __future__ import annotations

import pytest

from k2eg.client import environment as E
from k2eg.client.environment import EnvironmentConfigError, load


@pytest.fixture
def env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(tmp_path))
    return tmp_path


def write(folder, name, text):
    path = folder / f"{name}.ini"
    path.write_text(text)
    return path


def test_the_package_ships_a_local_environment(monkeypatch):
    """``dml('local', ...)`` works out of the box against k2eg-stack's default port."""
    monkeypatch.delenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", raising=False)
    env = load("local")
    assert env.path == E.PACKAGED / "local.ini" and env.path.is_file()
    assert env.kafka_broker_url == "127.0.0.1:9092" and env.cmd_topic == "k2eg-cmd"
    assert env.kafka == {}


def test_the_packaged_ini_is_package_data():
    """An installed wheel must carry the .ini: pyproject declares it as package data."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "environment/*.ini" in pyproject["tool"]["setuptools"]["package-data"]["k2eg"]


def test_the_folder_variable_overrides_the_package(env_dir):
    write(env_dir, "local", "[DEFAULT]\nkafka_broker_url=10.0.0.1:9093\nk2eg_cmd_topic=other-cmd\n")
    env = load("local")
    assert (env.kafka_broker_url, env.cmd_topic, env.path) == ("10.0.0.1:9093", "other-cmd", env_dir / "local.ini")


def test_a_missing_environment_names_the_file_and_the_variable(env_dir):
    write(env_dir, "prod", "[DEFAULT]\nkafka_broker_url=a:1\nk2eg_cmd_topic=c\n")
    with pytest.raises(EnvironmentConfigError) as e:
        load("nowhere")
    msg = str(e.value)
    assert str(env_dir / "nowhere.ini") in msg
    assert "K2EG_PYTHON_CONFIGURATION_PATH_FOLDER" in msg and "prod" in msg  # what is available


def test_a_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(tmp_path / "absent"))
    with pytest.raises(EnvironmentConfigError, match="absent"):
        load("local")


@pytest.mark.parametrize("key, text", [
    ("kafka_broker_url", "[DEFAULT]\nk2eg_cmd_topic=c\n"),
    ("k2eg_cmd_topic", "[DEFAULT]\nkafka_broker_url=a:1\n"),
    ("k2eg_cmd_topic", "[DEFAULT]\nkafka_broker_url=a:1\nk2eg_cmd_topic=   \n"),
])
def test_a_missing_key_names_the_file_and_the_key(env_dir, key, text):
    path = write(env_dir, "broken", text)
    with pytest.raises(EnvironmentConfigError) as e:
        load("broken")
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value)


def test_errors_are_value_errors_as_in_0_3_0(env_dir):
    """0.3.0 raised ValueError for an incomplete environment; scripts catch that."""
    write(env_dir, "broken", "[DEFAULT]\n")
    with pytest.raises(ValueError):
        load("broken")


def test_an_unparsable_file_names_the_file(env_dir):
    path = write(env_dir, "garbage", "this is not an ini file\n")
    with pytest.raises(EnvironmentConfigError, match=str(path)):
        load("garbage")


@pytest.mark.parametrize("bad", [None, "", 3])
def test_the_environment_id_must_be_a_name(bad):
    with pytest.raises(EnvironmentConfigError):
        load(bad)


def test_kafka_keys_become_librdkafka_settings(env_dir):
    write(env_dir, "secure", "[DEFAULT]\nkafka_broker_url=b:9094\nk2eg_cmd_topic=c\n"
                              "kafka.security.protocol=SASL_SSL\nkafka.sasl.mechanism=SCRAM-SHA-512\n"
                              "kafka.sasl.password=Pa%ss=word\nother=ignored\n")
    env = load("secure")
    assert env.kafka == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                         "sasl.password": "Pa%ss=word"}  # no interpolation: '%' stays


def test_librdkafka_sees_the_kafka_keys(env_dir):
    """A setting librdkafka rejects proves it was passed; the error names the environment file."""
    from k2eg.dml import dml

    path = write(env_dir, "typo", "[DEFAULT]\nkafka_broker_url=127.0.0.1:1\nk2eg_cmd_topic=c\n"
                                  "kafka.sasl.mechanisms.typo=PLAIN\n")
    with pytest.raises(EnvironmentConfigError) as e:
        dml("typo", "app", startup_timeout=1)
    assert str(path) in str(e.value) and "sasl.mechanisms.typo" in str(e.value)
