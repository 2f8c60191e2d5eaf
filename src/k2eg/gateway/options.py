"""Gateway options under the C++ gateway's names (PROTOCOL section 9).

A deployment can swap binaries without touching its launch line: each
option comes from the command line, else ``EPICS_K2EG_<NAME>``, else a
``key=value`` configuration file.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("k2eg.gateway")


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got '{text}'")


@dataclass(frozen=True)
class Spec:
    name: str
    convert: Callable[[str], Any] = str
    default: Any = None
    help: str = ""
    repeat: bool = False
    required: bool = False

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "EPICS_K2EG_" + self.dest.upper()


SPECS: tuple[Spec, ...] = (
    Spec("cmd-input-topic", required=True, help="command topic"),
    Spec("sub-server-address", required=True, help="Kafka bootstrap of the command consumer"),
    Spec("pub-server-address", required=True, help="Kafka bootstrap of the producer"),
    Spec("sub-group-id", default="k2eg-default-group", help="consumer group of the gateway"),
    Spec("sub-impl-kv", repeat=True, default=(), help="extra librdkafka consumer setting key:value"),
    Spec("pub-impl-kv", repeat=True, default=(), help="extra librdkafka producer setting key:value"),
    Spec("log-level", default="info", help="trace, debug, info, error, fatal"),
    Spec("log-format", default="text", help="text or json (ext)"),
    Spec("nc-monitor-expiration-timeout", int, 3600, "seconds without consumers before a monitor stops"),
    Spec("nc-purge-queue-on-exp-timeout", _bool, True, "delete an expired monitor's topic if the gateway created it"),
    Spec("nc-monitor-consumer-filterout-regex", repeat=True, default=(), help="consumer groups to ignore"),
    Spec("metric-enable", _bool, False, "serve Prometheus metrics"),
    Spec("metric-server-http-port", int, 8080, "port of /metrics"),
    Spec("node-type", default="gateway", help="only 'gateway' is supported"),
    # ext
    Spec("pv-connection-timeout", float, 5.0, "seconds to wait for a PV to connect before an error reply (ext)"),
    Spec("command-workers", int, 32, "threads executing blocking EPICS operations (ext)"),
    Spec("state-topic", default="", help="compacted topic keeping monitors and snapshots across restarts; "
                                         "default <cmd-input-topic>-gateway-state (ext)"),
    Spec("access-rules", default="", help="put access rules file (ext)"),
    Spec("read-only", _bool, False, "refuse every put (ext)"),
)

# Options of the C++ gateway's own internals: accepted so launch lines keep working.
IGNORED = (
    "scheduler-check-delay-seconds", "scheduler-thread-number", "storage-path", "cmd-max-fecth-element",
    "cmd-max-fetch-time-out", "pub-flush-trimeout-ms", "configuration-server-host", "configuration-server-port",
    "configuration-server-reset-on-start", "monitor-worker-cron-schedule", "snapshot-repeating-scheduler-thread",
    "snapshot-archive-enable", "nc-monitor-expiration-checker-thread", "epics-monitor-thread-count",
)


@dataclass
class Options:
    values: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def __getattr__(self, item: str) -> Any:
        try:
            return self.values[item]
        except KeyError:
            raise AttributeError(item) from None

    def kv(self, which: str) -> dict[str, str]:
        """``--sub-impl-kv``/``--pub-impl-kv`` entries as a librdkafka config dict."""
        out = {}
        for item in self.values[f"{which}_impl_kv"]:
            k, sep, v = item.partition(":")
            if not sep or not k:
                raise ValueError(f"--{which}-impl-kv expects key:value, got '{item}'")
            out[k.strip()] = v.strip()
        return out


class OptionError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2eg-gateway", argument_default=argparse.SUPPRESS,
                                description="Kafka to EPICS gateway")
    for s in SPECS:
        p.add_argument(f"--{s.name}", dest=s.dest, action="append" if s.repeat else "store", help=s.help)
    p.add_argument("--conf-file", dest="conf_file", nargs="?", const="true", help="read --conf-file-name")
    p.add_argument("--conf-file-name", dest="conf_file_name", help="key=value configuration file")
    for name in IGNORED:
        p.add_argument(f"--{name}", dest=f"ignored__{name}", help=argparse.SUPPRESS)
    return p


def _read_file(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise OptionError(f"cannot read configuration file {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise OptionError(f"{path}:{n}: expected key=value, got '{line}'")
        out.setdefault(key.strip().lstrip("-"), []).append(value.strip())
    return out


def parse(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Options:
    environ = dict(os.environ if environ is None else environ)
    ns = vars(_parser().parse_args(argv))
    file_values: dict[str, list[str]] = {}
    conf_name = ns.get("conf_file_name") or environ.get("EPICS_K2EG_CONF_FILE_NAME")
    use_file = _bool(ns.get("conf_file") or environ.get("EPICS_K2EG_CONF_FILE") or ("true" if conf_name else "false"))
    if use_file:
        if not conf_name:
            raise OptionError("--conf-file needs --conf-file-name PATH")
        file_values = _read_file(Path(conf_name))
    known = {s.name for s in SPECS} | set(IGNORED) | {"conf-file", "conf-file-name"}
    for key in file_values:
        if key not in known:
            raise OptionError(f"unknown option '{key}' in {conf_name}")
    opts = Options()
    for name in IGNORED:
        if f"ignored__{name}" in ns or name in file_values:
            opts.ignored.append(name)
    for s in SPECS:
        raw: Any
        if s.dest in ns:
            raw = ns[s.dest]
        elif s.env in environ:
            raw = [x for x in environ[s.env].split(",") if x] if s.repeat else environ[s.env]
        elif s.name in file_values:
            raw = file_values[s.name] if s.repeat else file_values[s.name][-1]
        elif s.required:
            raise OptionError(f"missing required option --{s.name} (or environment {s.env})")
        else:
            opts.values[s.dest] = s.default
            continue
        try:
            opts.values[s.dest] = tuple(raw) if s.repeat else s.convert(raw)
        except ValueError as e:
            raise OptionError(f"option --{s.name}: {e}") from None
    if opts.node_type != "gateway":
        raise OptionError(f"--node-type '{opts.node_type}' is not supported: this gateway runs as 'gateway'")
    if not opts.state_topic:
        opts.values["state_topic"] = f"{opts.cmd_input_topic}-gateway-state"
    return opts
