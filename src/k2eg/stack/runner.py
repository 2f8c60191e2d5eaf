"""The local stack: Kafka, the demo IOC and the gateway, started and stopped as one.

``Stack`` is what the ``k2eg-stack`` command and the pytest fixtures share, so
the stack a developer pokes at by hand is the one the end-to-end tests run.
Each part can also be stopped and started on its own, which is how fault
tests simulate a broker, IOC or gateway outage.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from .kafka import (KafkaBroker, Security, StackError, _alive, _signal_group, kill_stale_process,
                    parent_death_prefix, terminate_group)

__all__ = ["Stack", "StackError", "CMD_TOPIC", "ENVIRONMENT", "GATEWAY_READY", "read_state", "write_state",
           "remove_state", "state_path", "runner_alive"]

log = logging.getLogger("k2eg.stack")

CMD_TOPIC = "k2eg-cmd"
ENVIRONMENT = "local"
GATEWAY_GROUP = "k2eg-gateway"
#: The gateway prints this on stderr once it consumes its command topic.
GATEWAY_READY = "k2eg gateway ready"
STATE_FILE = "stack.json"
#: Logins of a secured stack: the gateway and clients get their own.
GATEWAY_USER = "k2eg-gateway"
CLIENT_USER = "k2eg-client"


class Stack:
    """Kafka (embedded unless ``kafka_bootstrap`` is given), the demo IOC and the gateway under ``state_dir``.

    A new ``Stack`` starts from an empty embedded broker; ``stop_kafka()`` then
    ``start_kafka()`` keeps its port and its data, like a restarted broker.

    ``secure=True`` makes the broker require a SASL login (``mechanism``) over
    TLS (unless ``tls=False``), with fresh passwords for ``GATEWAY_USER`` and
    ``CLIENT_USER``. Passwords stay out of command lines: the gateway gets its
    librdkafka settings through ``EPICS_K2EG_{PUB,SUB}_IMPL_KV``, the client
    through the environment file (mode 600).
    """

    def __init__(self, state_dir: Path, kafka_bootstrap: str | None = None, bulk: int = 0,
                 gateway_args: Sequence[str] = (), *, gateway_cmd: Sequence[str] | None = None,
                 ioc_factory: Any = None, gateway_timeout: float = 60, secure: bool = False, tls: bool = True,
                 mechanism: str = "SCRAM-SHA-256", archiver: bool = False,
                 archiver_args: Sequence[str] = ()) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.external_bootstrap = kafka_bootstrap
        self.bulk = int(bulk)
        self.gateway_args = list(gateway_args)
        # Overridable so tests of the orchestration need neither EPICS nor the real gateway.
        self.gateway_cmd = list(gateway_cmd) if gateway_cmd else [sys.executable, "-m", "k2eg.gateway"]
        self.gateway_timeout = gateway_timeout
        self.environment = ENVIRONMENT
        self.cmd_topic = CMD_TOPIC
        self.env_dir = self.state_dir / "environment"
        security = None
        if secure:
            if kafka_bootstrap:
                raise StackError("a secured stack runs its own broker: drop --kafka-bootstrap, or put the "
                                 "external broker's SASL settings in EPICS_K2EG_PUB_IMPL_KV/SUB_IMPL_KV yourself")
            if any(a.split("=", 1)[0] in ("--pub-impl-kv", "--sub-impl-kv") for a in self.gateway_args):
                # The command line would replace the settings the stack passes in the environment.
                raise StackError("a secured stack passes the gateway's Kafka login in EPICS_K2EG_PUB_IMPL_KV and "
                                 "EPICS_K2EG_SUB_IMPL_KV: give extra librdkafka settings there (one key:value "
                                 "per line) instead of --pub-impl-kv/--sub-impl-kv")
            security = Security(mechanism, {GATEWAY_USER: secrets.token_urlsafe(18),
                                            CLIENT_USER: secrets.token_urlsafe(18)}, tls=tls)
        self.kafka: KafkaBroker | None = (None if kafka_bootstrap else
                                          KafkaBroker(self.state_dir / "kafka", security=security))
        if ioc_factory is None:
            from .ioc import DemoIOC as ioc_factory
        self.ioc = ioc_factory(self.state_dir / "ioc", bulk=self.bulk)
        self._gateway: subprocess.Popen | None = None
        self._gateway_reader: threading.Thread | None = None
        self._gateway_ready = threading.Event()
        self._gateway_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._fresh = True
        from .archiver import ArchiverProcess
        self.archiver = ArchiverProcess(self.state_dir, archiver_args) if archiver else None

    # ---------------------------------------------------------------- addresses

    @property
    def bootstrap(self) -> str:
        return self.external_bootstrap or self.kafka.bootstrap  # type: ignore[union-attr]

    @property
    def security(self) -> Security | None:
        return self.kafka.security if self.kafka else None

    def kafka_config(self, user: str = GATEWAY_USER) -> dict[str, str]:
        """librdkafka settings reaching this stack's broker, logged in as ``user`` when it is secured."""
        if self.kafka is None or self.kafka.security is None:
            return {"bootstrap.servers": self.bootstrap}
        return self.kafka.client_config(user)

    @property
    def env_file(self) -> Path:
        return self.env_dir / f"{self.environment}.ini"

    @property
    def gateway_log(self) -> Path:
        return self.state_dir / "gateway.log"

    @property
    def gateway_pid(self) -> int | None:
        return self._gateway.pid if self._gateway and self._gateway.poll() is None else None

    def client_env(self) -> dict[str, str]:
        """What a client process needs: the IOC's EPICS_* and where the k2eg environment files are."""
        env = dict(self.ioc.client_env())
        env["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] = str(self.env_dir)
        env["K2EG_ENVIRONMENT"] = self.environment
        return env

    # ---------------------------------------------------------------- whole stack

    def start(self) -> "Stack":
        """Bring everything up in dependency order; on any failure, take down what was started and raise."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            # The IOC does not need Kafka: start it while the JVM boots.
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="k2eg-ioc") as pool:
                ioc = pool.submit(self.start_ioc)
                try:
                    self.start_kafka()
                finally:
                    ioc_error = ioc.exception()  # waits: nothing may be left starting behind our back
                if ioc_error is not None:
                    raise ioc_error
            self.write_env_file()
            self.create_topic(self.cmd_topic)
            # The archiver needs only Kafka: it starts while the gateway does.
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="k2eg-archiver") as pool:
                arch = pool.submit(self.start_archiver) if self.archiver is not None else None
                try:
                    self.start_gateway()
                finally:
                    arch_error = arch.exception() if arch is not None else None
                if arch_error is not None:
                    raise arch_error
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Reverse order: the gateway must not see its broker vanish first. Safe to call twice."""
        errors = []
        for step in (self.stop_archiver, self.stop_gateway, self.stop_ioc, self.stop_kafka):
            try:
                step()
            except Exception as e:  # keep going: one stuck part must not leave the others running
                errors.append(e)
        if errors:
            raise StackError(f"stopping the stack: {errors[0]}") from errors[0]

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def failed(self) -> str | None:
        """Name of a part that was started and has died since, for the foreground runner's watchdog."""
        if self._gateway is not None and self._gateway.poll() is not None:
            return f"the gateway exited with code {self._gateway.returncode} (log: {self.gateway_log})"
        if self.archiver is not None and self.archiver.returncode is not None:
            return f"the archiver exited with code {self.archiver.returncode} (log: {self.archiver.log_path})"
        if self.kafka is not None and self.kafka.returncode is not None:
            return f"the Kafka broker exited with code {self.kafka.returncode} (log: {self.kafka.log_path})"
        if getattr(self.ioc, "pid", None) is not None and not self.ioc.running:
            return f"the demo IOC exited (log: {Path(self.ioc.work_dir) / 'ioc.log'})"
        return None

    # ---------------------------------------------------------------- Kafka

    def start_kafka(self, timeout: float = 90) -> str:
        if self.kafka is None:
            self._check_external()
            return self.bootstrap
        if self._fresh:
            self.kafka.reset()
            self._fresh = False
        return self.kafka.start(timeout)

    def stop_kafka(self) -> None:
        if self.kafka is not None:
            self.kafka.stop()

    def _admin(self):
        from confluent_kafka.admin import AdminClient
        return AdminClient({**self.kafka_config(), "log_level": 0,
                            "logger": logging.getLogger("k2eg.stack.kafka.probe")})

    def _check_external(self) -> None:
        from confluent_kafka import KafkaException
        try:
            self._admin().list_topics(timeout=15)
        except KafkaException as e:
            raise StackError(f"no Kafka broker answers at {self.bootstrap}: {e.args[0].str()}") from None

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        """Topics the gateway consumes must exist first: consumers do not auto-create them."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        # replication_factor=-1: the broker's default, so an external multi-node cluster gets its usual one.
        admin = self._admin()  # must outlive the future: destroying it fails the request
        fs = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1)],
                                 request_timeout=30)
        try:
            fs[topic].result(timeout=60)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise StackError(f"cannot create topic {topic} on {self.bootstrap}: {e.args[0].str()}") from None

    def write_env_file(self) -> Path:
        """The k2eg client's configuration for environment ``local``: which broker, which command topic,
        and on a secured stack the ``kafka.*`` login and CA (so the file is private to its owner)."""
        self.env_dir.mkdir(parents=True, exist_ok=True)
        lines = ["[DEFAULT]", f"kafka_broker_url={self.bootstrap}", f"k2eg_cmd_topic={self.cmd_topic}"]
        if self.security is not None:
            lines += [f"kafka.{k}={v}" for k, v in self.kafka_config(CLIENT_USER).items() if k != "bootstrap.servers"]
        self.env_file.touch(0o600)
        self.env_file.chmod(0o600)
        self.env_file.write_text("\n".join(lines) + "\n")
        return self.env_file

    # ---------------------------------------------------------------- IOC

    def start_ioc(self, timeout: float = 30) -> None:
        try:
            self.ioc.start(timeout=timeout)
        except StackError:
            raise
        except (RuntimeError, TimeoutError, OSError) as e:
            raise StackError(f"the demo IOC did not start: {e}") from e

    def stop_ioc(self) -> None:
        self.ioc.stop()

    # ---------------------------------------------------------------- gateway

    def _gateway_env(self) -> dict[str, str]:
        # The user's own EPICS_CA_*/EPICS_PVA_* would point the gateway at other IOCs;
        # EPICS_K2EG_* are gateway options and stay.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_") or k.startswith("EPICS_K2EG_")}
        env.update(self.ioc.client_env())
        env["PYTHONUNBUFFERED"] = "1"
        if self.security is not None:
            # The environment, not argv: /proc/<pid>/environ is private to the owner, the command line is not.
            login = "\n".join(f"{k}:{v}" for k, v in self.kafka_config(GATEWAY_USER).items()
                               if k != "bootstrap.servers")
            for name in ("EPICS_K2EG_PUB_IMPL_KV", "EPICS_K2EG_SUB_IMPL_KV"):
                env[name] = login + (f"\n{env[name]}" if env.get(name) else "")  # the user's own lines win
        return env

    def gateway_command(self) -> list[str]:
        return [*self.gateway_cmd, "--cmd-input-topic", self.cmd_topic,
                "--sub-server-address", self.bootstrap, "--pub-server-address", self.bootstrap,
                "--sub-group-id", GATEWAY_GROUP, "--log-level", "info", *self.gateway_args]

    def start_gateway(self, timeout: float | None = None) -> None:
        """Start the gateway and wait for its ready line (it consumes the command topic from then on)."""
        if self.gateway_pid is not None:
            return
        timeout = self.gateway_timeout if timeout is None else timeout
        pid_file = self.state_dir / "gateway.pid"
        kill_stale_process(pid_file, ("k2eg", "--cmd-input-topic", self.cmd_topic), grace=10)
        self._gateway_ready.clear()
        self._gateway_tail.clear()
        cmd = parent_death_prefix() + self.gateway_command()
        with open(self.gateway_log, "ab") as f:
            f.write(f"---- k2eg-stack: starting the gateway at {time.ctime()}: {' '.join(cmd)}\n".encode())
        # Own session: Ctrl-C on the terminal reaches only the runner, which stops the parts in order.
        self._gateway = proc = subprocess.Popen(cmd, env=self._gateway_env(), cwd=self.state_dir,
                                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(f"{proc.pid}\n")
        self._gateway_reader = threading.Thread(target=self._pump_gateway_output, args=(proc,),
                                                name="k2eg-gateway-log", daemon=True)
        self._gateway_reader.start()
        deadline = time.monotonic() + timeout
        try:
            while not self._gateway_ready.wait(0.1):
                if proc.poll() is not None:
                    self._gateway_reader.join(5)  # the last lines explain the exit
                    raise StackError(f"the gateway exited during startup with code {proc.returncode}; "
                                     f"last lines of {self.gateway_log}:\n" + "\n".join(self._gateway_tail))
                if time.monotonic() > deadline:
                    raise StackError(f"the gateway did not print '{GATEWAY_READY}' within {timeout:g}s; "
                                     f"last lines of {self.gateway_log}:\n" + "\n".join(self._gateway_tail))
        except BaseException:
            self.stop_gateway()
            raise

    def _pump_gateway_output(self, proc: subprocess.Popen) -> None:
        """Forward the gateway's output to its log file, watching for the ready line on the way."""
        assert proc.stdout is not None
        with open(self.gateway_log, "ab", buffering=0) as out:
            for raw in proc.stdout:
                out.write(raw)
                line = raw.decode("utf-8", "replace").rstrip()
                self._gateway_tail.append(line)
                if GATEWAY_READY in line:
                    self._gateway_ready.set()
        proc.stdout.close()

    def stop_gateway(self, timeout: float = 15) -> None:
        proc, self._gateway = self._gateway, None
        if proc is None:
            return
        terminate_group(proc, timeout, "the gateway")
        if self._gateway_reader is not None:
            self._gateway_reader.join(5)
            self._gateway_reader = None
        with contextlib.suppress(OSError):
            (self.state_dir / "gateway.pid").unlink()

    # ---------------------------------------------------------------- archiver

    def start_archiver(self, timeout: float = 60) -> None:
        if self.archiver is None:
            raise StackError("this stack was made without an archiver")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        if self.security is not None:   # the login in the environment, not argv
            env["K2EG_ARCHIVER_KAFKA_KV"] = "\n".join(f"{k}:{v}" for k, v in self.kafka_config(GATEWAY_USER).items()
                                                      if k != "bootstrap.servers")
        self.archiver.start(self.bootstrap, self.cmd_topic, env, timeout)

    def stop_archiver(self) -> None:
        if self.archiver is not None:
            self.archiver.stop()

    # ---------------------------------------------------------------- description

    def describe(self) -> dict[str, Any]:
        """Everything a client or ``k2eg-stack stop/env`` needs to know, JSON-ready."""
        ioc_env = self.ioc.client_env()
        return {
            "state_dir": str(self.state_dir),
            "bootstrap": self.bootstrap,
            "environment": self.environment,
            "cmd_topic": self.cmd_topic,
            "env_dir": str(self.env_dir),
            "env_file": str(self.env_file),
            "client_env": self.client_env(),
            "security": None if self.security is None else {
                "protocol": self.security.protocol,
                "mechanism": self.security.mechanism,
                "ca": str(self.kafka.ca_path) if self.kafka and self.kafka.ca_path else None,
                "users": [GATEWAY_USER, CLIENT_USER],  # passwords: in env_file and the gateway's environment only
            },
            "kafka": {
                "embedded": self.kafka is not None,
                "bootstrap": self.bootstrap,
                "pid": self.kafka.pid if self.kafka else None,
                "port": self.kafka.port if self.kafka else None,
                "controller_port": self.kafka.controller_port if self.kafka else None,
                "config": str(self.kafka.config_path) if self.kafka else None,
                "log": str(self.kafka.log_path) if self.kafka else None,
            },
            "ioc": {
                "pid": getattr(self.ioc, "pid", None),
                "ca": f"127.0.0.1:{ioc_env.get('EPICS_CA_SERVER_PORT', '?')}",
                "pva": ioc_env.get("EPICS_PVA_ADDR_LIST", ""),
                "log": str(Path(self.ioc.work_dir) / "ioc.log") if hasattr(self.ioc, "work_dir") else None,
            },
            "gateway": {
                "pid": self.gateway_pid,
                "group_id": GATEWAY_GROUP,
                "log": str(self.gateway_log),
            },
            "archiver": None if self.archiver is None else {
                "pid": self.archiver.pid,
                "http": f"http://127.0.0.1:{self.archiver.http_port}/retrieval" if self.archiver.http_port else None,
                "path": str(self.archiver.work_dir / "archive"),
                "log": str(self.archiver.log_path),
            },
        }


# ---------------------------------------------------------------------------- state file


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def write_state(state_dir: Path, state: dict[str, Any]) -> Path:
    """Atomic, so ``k2eg-stack start`` polling for the file never reads half of it."""
    path = state_path(state_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(state_dir).read_text())
    except (OSError, ValueError):
        return None


def remove_state(state_dir: Path, pid: int | None = None) -> None:
    """Remove the state file, but only our own when ``pid`` is given (a newer runner may have replaced it)."""
    path = state_path(state_dir)
    if pid is not None:
        st = read_state(state_dir)
        if st is not None and st.get("pid") != pid:
            return
    with contextlib.suppress(OSError):
        path.unlink()


def runner_alive(state: dict[str, Any] | None) -> bool:
    """The runner of a state file still runs (checked by command line too: pids get reused)."""
    pid = (state or {}).get("pid")
    if not pid or not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "k2eg.stack" in cmdline or "k2eg-stack" in cmdline


def kill_leftovers(state: dict[str, Any]) -> list[str]:
    """SIGKILL the parts a dead or stuck runner left behind; returns what was killed."""
    killed = []
    parts = (("archiver", ("k2eg.archiver",)), ("gateway", ("--cmd-input-topic",)), ("ioc", ("k2eg.stack.ioc",)), ("kafka", ("kafka.Kafka",)))
    for name, markers in parts:
        pid = (state.get(name) or {}).get("pid")
        if not pid or not _alive(pid):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(m in cmdline for m in markers):
            _signal_group(pid, signal.SIGKILL)
            killed.append(f"{name} (pid {pid})")
    return killed


def wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)
