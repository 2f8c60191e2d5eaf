"""Gateway options under the C++ gateway's names (PROTOCOL section 9).

A deployment can swap binaries without touching its launch line: each
option comes from the command line, else the environment, else a
``key=value`` configuration file (``--conf-file --conf-file-name PATH``).

Environment names: ``EPICS_K2EG_CMD_INPUT_TOPIC`` (upper case, ``_`` for
``-``) and the C++ gateway's own spelling ``EPICS_k2eg_cmd-input-topic``.
A repeatable option takes one entry per line of its variable (the C++
gateway takes the whole value as one entry, which a one-line value still is).
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "fatal")
ENV_PREFIX = "EPICS_K2EG_"


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got '{text}'")


def _log_level(text: str) -> str:
    t = text.strip().lower()
    if t not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got '{text}'")
    return t


def _positive(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        v = convert(text)
        if v <= 0:
            raise ValueError(f"must be greater than 0, got {text}")
        return v
    return check


def _not_negative(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        v = convert(text)
        if not v >= 0:
            raise ValueError(f"must be 0 or more, got {text}")
        return v
    return check


def _port(text: str) -> int:
    v = int(text)
    if not 0 < v < 65536:
        raise ValueError(f"expected a TCP port (1-65535), got {text}")
    return v


def _kv(item: str) -> str:
    """A librdkafka setting ``key:value``; the value may itself hold ':' (the C++ gateway refuses that)."""
    k, sep, v = item.partition(":")
    if not sep or not k.strip():
        raise ValueError(f"expected key:value, got '{item}'")
    return item


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise ValueError(f"invalid regular expression '{text}': {e}") from None
    return text


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
        return ENV_PREFIX + self.dest.upper()


SPECS: tuple[Spec, ...] = (
    Spec("cmd-input-topic", required=True, help="command topic"),
    Spec("sub-server-address", required=True, help="Kafka bootstrap of the command consumer"),
    Spec("pub-server-address", required=True, help="Kafka bootstrap of the producer"),
    Spec("sub-group-id", default="k2eg-default-group", help="consumer group of the gateway"),
    Spec("sub-impl-kv", _kv, (), "extra librdkafka consumer setting key:value (repeatable)", repeat=True),
    Spec("pub-impl-kv", _kv, (), "extra librdkafka producer setting key:value (repeatable)", repeat=True),
    Spec("log-level", _log_level, "info", "trace, debug, info, warning, error, fatal"),
    Spec("log-format", default="text", help="text or json (ext)"),
    Spec("nc-monitor-expiration-timeout", int, 3600, "seconds without consumers before a monitor stops"),
    Spec("nc-purge-queue-on-exp-timeout", _bool, True, "delete an expired monitor's topic if the gateway created it"),
    Spec("nc-monitor-consumer-filterout-regex", _regex, (),
         "consumer groups (ids matching this regex in full) that do not keep a monitor alive (repeatable)",
         repeat=True),
    Spec("metric-enable", _bool, False, "serve Prometheus metrics"),
    Spec("metric-server-http-port", _port, 8080, "port of /metrics"),
    Spec("node-type", default="gateway", help="only 'gateway' is supported"),
    # ext
    Spec("pv-connection-timeout", _positive(float), 5.0,
         "seconds to wait for a PV to connect before an error reply (ext)"),
    Spec("command-workers", _positive(int), 32, "threads executing blocking EPICS operations (ext)"),
    Spec("command-backlog", _positive(int), 1000,
         "commands waiting for a worker before the gateway stops reading its command topic; "
         "the rest wait in Kafka (ext)"),
    Spec("state-topic", default="", help="compacted topic keeping monitors and snapshots across restarts; "
                                         "default <cmd-input-topic>-gateway-state; one gateway per topic (ext)"),
    Spec("command-drain-timeout", _positive(float), 10.0,
         "seconds a stopping gateway (SIGTERM) gives the commands it has read to finish; the others stay "
         "uncommitted and the next gateway of its group runs them (ext)"),
    Spec("put-journal-topic", default="", help="compacted topic recording each put started and finished, so that "
                                               "no put is applied twice after a crash; default "
                                               "<cmd-input-topic>-gateway-journal (ext)"),
    Spec("access-rules", default="", help="put access rules file (ext)"),
    Spec("read-only", _bool, False, "refuse every put (ext)"),
    Spec("snapshot-max-buffered", _positive(int), 50_000,
         "values a timedbuffered snapshot holds until its next push; beyond, the iteration's Tail "
         "counts those left out in 'truncated' (ext)"),
    # monitors and channels (ext)
    Spec("monitor-max-events-per-second", _not_negative(float), 0.0,
         "at most this many events a second per monitored PV and destination, the newest value of each "
         "interval winning; a monitor command's max_events_per_second may lower it; 0: no cap (ext)"),
    Spec("monitor-refresh-period", _not_negative(float), 0.0,
         "seconds: a monitored PV that published nothing for this long publishes its current value again "
         "(the ESS forwarder's pv-update-period); 0: off (ext)"),
    Spec("channel-idle-timeout", _positive(float), 300.0,
         "seconds after which an EPICS channel nothing used (get, put, info, snapshot read) is closed; "
         "a monitor keeps its channel (ext)"),
    Spec("max-reply-topics", _positive(int), 1000,
         "reply topics the gateway creates for senders; beyond it a command whose reply topic does not exist "
         "is not run, only logged and counted (ext)"),
    Spec("epics-realtime", _bool, False,
         "keep the real-time priority (SCHED_FIFO) EPICS gives its threads when the process may use it "
         "(root, CAP_SYS_NICE, RLIMIT_RTPRIO); off: dropped at start, see README (ext)"),
)

# Options of the C++ gateway's own internals (its ProgramOptions.h, plus spellings of
# other releases): accepted, with or without a value, and ignored with a warning.
IGNORED = (
    "log-on-console", "log-on-file", "log-file-name", "log-file-max-size", "log-on-syslog", "debug-info-in-log",
    "syslog-server", "syslog-port",
    "cmd-max-fecth-element", "cmd-max-fecth-time-out", "cmd-max-fetch-time-out",
    "pub-group-id", "pub-flush-trimeout-ms",
    "storage-path", "monitor-worker-cron-schedule", "scheduler-check-delay-seconds", "scheduler-thread-number",
    "snapshot-repeating-scheduler-thread", "snapshot-archive-enable", "nc-monitor-expiration-checker-thread",
    "epics-monitor-thread-count", "epics-monitor-channel-poll-max",
    "configuration-server-host", "configuration-server-port", "configuration-reset-on-start",
    "configuration-server-reset-on-start",
)
_FILE_ONLY = ("conf-file", "conf-file-name")


@dataclass
class Options:
    values: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # logged by main once logging is set up

    def __getattr__(self, item: str) -> Any:
        try:
            return self.values[item]
        except KeyError:
            raise AttributeError(item) from None

    def kv(self, which: str) -> dict[str, str | bool]:
        """``--sub-impl-kv``/``--pub-impl-kv`` entries as a librdkafka config dict (later entries win)."""
        out: dict[str, str | bool] = {}
        for item in self.values[f"{which}_impl_kv"]:
            k, _, v = _kv(item).partition(":")
            k, v = k.strip(), v.strip()
            if k in _PYTHON_BOOLS:
                try:
                    out[k] = _bool(v)
                except ValueError as e:
                    raise OptionError(f"--{which}-impl-kv {k}: {e}") from None
            else:
                out[k] = v
        return out


# Settings confluent-kafka reads itself and wants as a bool (a string stops the gateway with a TypeError).
_PYTHON_BOOLS = frozenset({"delivery.report.only.error"})


class OptionError(ValueError):
    """A launch line, environment or file the gateway cannot run with; the message says what to fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit(2); callers want one clear message
        raise OptionError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="k2eg-gateway", argument_default=argparse.SUPPRESS, allow_abbrev=False,
                description="Kafka to EPICS gateway. Every option may also come from the environment "
                            "(EPICS_K2EG_<NAME>) or a configuration file (--conf-file --conf-file-name PATH); "
                            "command line beats environment beats file.")
    for s in SPECS:
        p.add_argument(f"--{s.name}", dest=s.dest, action="append" if s.repeat else "store", help=s.help)
    p.add_argument("--conf-file", dest="conf_file", nargs="?", const="true", help="read --conf-file-name")
    p.add_argument("--conf-file-name", dest="conf_file_name", help="key=value configuration file")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    for name in IGNORED:
        p.add_argument(f"--{name}", dest=f"ignored__{name}", nargs="?", const="", help=argparse.SUPPRESS)
    return p


def _read_file(path: Path) -> dict[str, list[str]]:
    """Boost program_options' config format: ``name=value``, '#' starts a comment, ``[section]`` prefixes names."""
    out: dict[str, list[str]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise OptionError(f"cannot read configuration file {path}: {e.strerror}") from None
    section = ""
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{path}:{n}: expected name=value, got '{line}'")
        key = key.strip().lstrip("-")
        out.setdefault(f"{section}.{key}" if section else key, []).append(value.strip())
    return out


def _environment(environ: dict[str, str]) -> dict[str, str]:
    """Option name -> value from ``EPICS_K2EG_NAME`` or the C++ spelling ``EPICS_k2eg_name``.

    The PROTOCOL spelling wins when both are set.
    """
    out: dict[str, str] = {}
    exact: set[str] = set()
    for key, value in environ.items():
        if key[:len(ENV_PREFIX)].upper() != ENV_PREFIX or len(key) == len(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower().replace("_", "-")
        is_exact = key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):] == key[len(ENV_PREFIX):].upper()
        if name in exact and not is_exact:
            continue
        out[name] = value
        if is_exact:
            exact.add(name)
    return out


def parse(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Options:
    """Command line > environment > file, for every option; raises OptionError naming the problem."""
    environ = dict(os.environ if environ is None else environ)
    ns = vars(_parser().parse_args(argv))
    env = _environment(environ)
    opts = Options()
    if ns.get("version"):
        opts.values["version"] = True
        return opts
    for name in env:
        if name not in {s.name for s in SPECS} | set(IGNORED) | set(_FILE_ONLY):
            opts.warnings.append(f"environment variable for unknown option '{name}' is ignored")
    conf_name = ns.get("conf_file_name") or env.get("conf-file-name")
    conf_flag = ns.get("conf_file") if "conf_file" in ns else env.get("conf-file")
    try:
        use_file = _bool(conf_flag) if conf_flag not in (None, "") else bool(conf_name)
    except ValueError as e:
        raise OptionError(f"option --conf-file: {e}") from None
    file_values: dict[str, list[str]] = {}
    if use_file:
        if not conf_name:
            raise OptionError("--conf-file needs --conf-file-name PATH (or EPICS_K2EG_CONF_FILE_NAME)")
        file_values = _read_file(Path(conf_name))
    known = {s.name for s in SPECS} | set(IGNORED) | set(_FILE_ONLY)
    for key in file_values:
        if "." in key:  # a [section] of the C++ storage node
            opts.ignored.append(key)
        elif key not in known:
            raise OptionError(f"unknown option '{key}' in {conf_name}")
    for name in IGNORED:
        if f"ignored__{name}" in ns or name in env or name in file_values:
            opts.ignored.append(name)
    for name in opts.ignored:
        opts.warnings.append(f"option --{name} belongs to the C++ gateway's internals and is ignored")
    for s in SPECS:
        raw: Any
        if s.dest in ns:
            raw, where = ns[s.dest], f"--{s.name}"
        elif s.name in env:
            raw = [x for x in env[s.name].splitlines() if x.strip()] if s.repeat else env[s.name]
            where = f"environment {s.env}"
        elif s.name in file_values:
            raw = file_values[s.name] if s.repeat else file_values[s.name][-1]
            where = f"{s.name} in {conf_name}"
        elif s.required:
            raise OptionError(f"missing required option --{s.name} (or environment {s.env}, "
                              f"or '{s.name}=' in a --conf-file)")
        else:
            opts.values[s.dest] = s.default
            continue
        try:
            opts.values[s.dest] = tuple(s.convert(x) for x in raw) if s.repeat else s.convert(raw)
        except ValueError as e:
            raise OptionError(f"option {where}: {e}") from None
        if s.required and not opts.values[s.dest]:
            raise OptionError(f"option {where} must not be empty")
    if opts.node_type != "gateway":
        raise OptionError(f"--node-type '{opts.node_type}' is not supported: this gateway runs as 'gateway'")
    if not opts.state_topic:
        opts.values["state_topic"] = f"{opts.cmd_input_topic}-gateway-state"
    if not opts.put_journal_topic:
        opts.values["put_journal_topic"] = f"{opts.cmd_input_topic}-gateway-journal"
    opts.kv("pub"), opts.kv("sub")  # a setting the Kafka client would refuse fails here, with its name
    return opts
