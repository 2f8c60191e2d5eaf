"""Client environments: ``<name>.ini`` files naming the Kafka broker and command topic.

The folder is ``K2EG_PYTHON_CONFIGURATION_PATH_FOLDER`` or the one shipped in
the package. Keys ``kafka.<setting>`` pass librdkafka settings (SASL, TLS)
to both the producer and the consumer.
"""
from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, field
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent.parent / "environment"
SECTION = "DEFAULT"


class EnvironmentConfigError(ValueError):
    """A missing or incomplete environment; the message names the file and key."""


@dataclass(frozen=True)
class Environment:
    name: str
    path: Path
    kafka_broker_url: str
    cmd_topic: str
    kafka: dict[str, str] = field(default_factory=dict)


def folder() -> Path:
    env = os.environ.get("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER")
    return Path(env) if env else PACKAGED


def load(name: str) -> Environment:
    if not isinstance(name, str) or not name:
        raise EnvironmentConfigError("environment_id must be a non-empty string such as 'local'")
    base = folder()
    path = base / f"{name}.ini"
    if not path.is_file():
        known = sorted(p.stem for p in base.glob("*.ini")) if base.is_dir() else []
        raise EnvironmentConfigError(
            f"environment '{name}' not found: no file {path}"
            + (f" (available: {', '.join(known)})" if known else "")
            + "; set K2EG_PYTHON_CONFIGURATION_PATH_FOLDER to the folder holding your .ini files")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as e:
        raise EnvironmentConfigError(f"{path}: cannot be parsed: {e}") from None
    values = parser[SECTION]

    def need(key: str) -> str:
        v = values.get(key, "").strip()
        if not v:
            raise EnvironmentConfigError(f"{path}: missing key '{key}' in [{SECTION}]")
        return v

    kafka = {k[len("kafka."):]: v for k, v in values.items() if k.startswith("kafka.")}
    return Environment(name, path, need("kafka_broker_url"), need("k2eg_cmd_topic"), kafka)
