"""An embedded, real Apache Kafka 4.x broker for the local stack and the tests.

Mocks of Kafka hide exactly the behaviour a gateway depends on (group
rebalances, topic auto-creation, broker restarts), so the stack runs the real
broker: jars come from Maven Central once (``resolve_classpath``), and each
``KafkaBroker`` is a single-node KRaft JVM bound to 127.0.0.1 on free ports.
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .ports import free_ports

__all__ = ["KAFKA_VERSION", "StackError", "KafkaBroker", "Security", "resolve_classpath", "default_cache_dir",
           "kill_stale_process", "parent_death_prefix"]

KAFKA_VERSION = "4.1.1"

log = logging.getLogger("k2eg.stack.kafka")

_JAVA_HINT = ("Java 17+ is required to run the embedded Kafka broker: install a JDK "
              "(e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME")
_MVN_HINT = ("Apache Maven is required to download the embedded Kafka broker from Maven Central: "
             "install it (e.g. apt-get install maven)")

# Small-machine JVM: Kafka's own defaults ask for 1 GB of heap.
DEFAULT_JVM_OPTS = (
    "-Xms64m", "-Xmx512m",
    "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent", "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)


class StackError(RuntimeError):
    """The local stack could not be brought up; the message says what to fix."""


# --------------------------------------------------------------------------- tools


def _java() -> str:
    """Path of a Java 17+ executable; the broker itself refuses older JVMs with a less helpful message."""
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home, "bin", "java") if home else None
    java = str(candidate) if candidate and candidate.is_file() else shutil.which("java")
    if not java:
        raise StackError(_JAVA_HINT + ".")
    major = _java_major(java)
    if major is not None and major < 17:
        raise StackError(f"{_JAVA_HINT} (found Java {major} at {java}).")
    return java


@lru_cache(maxsize=None)
def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        raise StackError(f"{_JAVA_HINT} ({java} does not run).") from None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def _mvn() -> str:
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError(_MVN_HINT + ".")
    return mvn


def _resource_text(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _tail(path: Path, lines: int = 30, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    # Java stack frames would crowd out the one line that says what went wrong.
    keep = [ln for ln in data.decode("utf-8", "replace").splitlines()
            if not ln.startswith(("\tat ", "\t... ")) and ln.strip()]
    return "\n".join(keep[-lines:])


# --------------------------------------------------------------------------- classpath


def default_cache_dir() -> Path:
    """``$K2EG_CACHE_DIR``, else ``~/.cache/k2eg``: jars survive virtualenv rebuilds and are shared by checkouts."""
    env = os.environ.get("K2EG_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "k2eg"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialises downloads: parallel test workers must not copy jars into the same folder."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_classpath(cache_dir: Path | None = None) -> list[Path]:
    """Jars of the broker, downloaded by Maven on first use only.

    A marker written after a complete copy makes later calls pure file listing
    (no Maven, no network), and a half-finished download is never mistaken for
    a good one.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    home = root / f"kafka-{KAFKA_VERSION}"
    lib, marker = home / "lib", home / ".resolved"

    def cached() -> list[Path] | None:
        if marker.is_file():
            jars = sorted(lib.glob("*.jar"))
            if jars:
                return jars
        return None

    jars = cached()
    if jars:
        return jars
    mvn = _mvn()
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / ".lock"):
        jars = cached()  # another process finished while we waited
        if jars:
            return jars
        # A private copy of the pom: the installed package may be read-only, and Maven writes beside it.
        pom = home / "pom.xml"
        pom.write_text(_resource_text("pom.xml"), encoding="utf-8")
        partial = home / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [mvn, "-B", "-q", "dependency:copy-dependencies",
               f"-DoutputDirectory={partial}", "-Dmdep.useRepositoryLayout=false",
               f"-Dkafka.version={KAFKA_VERSION}", "-f", str(pom)]
        log.info("downloading Apache Kafka %s with Maven into %s", KAFKA_VERSION, lib)
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, cwd=home, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise StackError(f"{_MVN_HINT} ({mvn} does not run: {e}).") from None
        if r.returncode != 0 or not any(partial.glob("*.jar")):
            out = "\n".join((r.stdout + r.stderr).strip().splitlines()[-25:])
            raise StackError(f"Maven could not download Apache Kafka {KAFKA_VERSION} "
                             f"(is Maven Central reachable?): {' '.join(cmd)}\n{out}")
        shutil.rmtree(lib, ignore_errors=True)
        partial.rename(lib)
        marker.write_text(f"kafka {KAFKA_VERSION} resolved in {time.monotonic() - t0:.1f}s\n")
    jars = cached()
    assert jars
    return jars


# --------------------------------------------------------------------------- security

MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
BROKER_USER = "k2eg-broker"  # the broker's own login on its inter-broker listener
_UNSAFE = re.compile(r'[\s",\[\]\\=]')  # would break --add-scram's "[name=..,password=..]" or the JAAS line


@dataclass(frozen=True)
class Security:
    """SASL (SCRAM or PLAIN) and optionally TLS on the broker's client listener.

    ``users`` (name -> password) are the logins clients may use. SCRAM users
    are written into the KRaft metadata when the storage is formatted, so they
    are fixed until ``KafkaBroker.reset()``; PLAIN users live in the broker's
    configuration and follow every start.
    """

    mechanism: str = "SCRAM-SHA-256"
    users: Mapping[str, str] = field(default_factory=dict)
    tls: bool = True

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"SASL mechanism {self.mechanism!r} is not supported; use one of {', '.join(MECHANISMS)}")
        if not self.users:
            raise ValueError("a secured broker needs at least one user (name -> password)")
        for name, password in self.users.items():
            if name == BROKER_USER:
                raise ValueError(f"user name {BROKER_USER!r} is reserved for the broker itself")
            if not name or not password or _UNSAFE.search(name) or _UNSAFE.search(password):
                raise ValueError(f"user {name!r}: names and passwords must be non-empty, without spaces, "
                                 "quotes, commas, brackets, backslashes or '='")

    @property
    def protocol(self) -> str:
        """librdkafka's ``security.protocol`` and the listener's name."""
        return "SASL_SSL" if self.tls else "SASL_PLAINTEXT"


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if not openssl:
        raise StackError("openssl is required to make the TLS certificates of a secured broker "
                         "(e.g. apt-get install openssl), or start it with tls=False")
    r = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=60)
    if r.returncode != 0:
        raise StackError(f"openssl {args[0]} failed: {(r.stdout + r.stderr).strip()[-800:]}")


def make_certificates(tls_dir: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A private CA and a broker certificate for ``host`` (PEM), made once; returns (CA, broker key+chain).

    Kafka reads PEM key stores directly (``ssl.keystore.type=PEM``), so no
    keytool/PKCS12 step is needed; librdkafka trusts the CA via ``ssl.ca.location``.
    """
    ca, broker = tls_dir / "ca.pem", tls_dir / "broker.pem"
    if ca.is_file() and broker.is_file():
        return ca, broker
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
             "-subj", "/CN=k2eg local stack CA", cwd=tls_dir)
    _openssl("req", "-new", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", f"/CN={host}", cwd=tls_dir)
    (tls_dir / "broker.ext").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "3650", "-extfile", "broker.ext", "-out", "broker.crt", cwd=tls_dir)
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.p8", cwd=tls_dir)
    partial = tls_dir / "broker.pem.partial"
    partial.write_text((tls_dir / "broker.p8").read_text() + (tls_dir / "broker.crt").read_text())
    os.chmod(partial, 0o600)
    partial.replace(broker)  # last: its presence means the set is complete
    return ca, broker


# --------------------------------------------------------------------------- broker

_LIVE: set["KafkaBroker"] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Last guard against orphan JVMs: an interpreter that exits without ``stop()`` still takes its brokers down."""
    with _LIVE_LOCK:
        brokers = list(_LIVE)
    for b in brokers:
        with contextlib.suppress(Exception):
            b.stop(timeout=10)


def _quiet_logger() -> logging.Logger:
    """librdkafka would print 'Connection refused' on stderr for every probe made before the broker listens."""
    lg = logging.getLogger("k2eg.stack.kafka.probe")
    lg.addHandler(logging.NullHandler())
    lg.propagate = False
    return lg


def _random_cluster_id() -> str:
    """Same format as ``StorageTool random-uuid`` (url-safe base64 of 16 bytes), without a second JVM start."""
    while True:
        s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not s.startswith("-"):  # Kafka rejects ids that look like command-line flags
            return s


class KafkaBroker:
    """One single-node KRaft broker (broker + controller in one JVM) owning ``data_dir``.

    Ports are fixed at construction, so ``stop()`` then ``start()`` brings the
    broker back at the same bootstrap address with the same data, like a
    restarted production broker.
    """

    def __init__(self, data_dir: Path, port: int | None = None, controller_port: int | None = None, *,
                 cache_dir: Path | None = None, jvm_opts: Sequence[str] | None = None,
                 security: Security | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        if port is None or controller_port is None:
            picked = iter(p for p in free_ports(3) if p not in (port, controller_port))
            port = port if port is not None else next(picked)
            controller_port = controller_port if controller_port is not None else next(picked)
        if port == controller_port:
            raise ValueError("the broker and the controller need distinct ports")
        self.port = int(port)
        self.controller_port = int(controller_port)
        self.cache_dir = cache_dir
        self.jvm_opts = tuple(DEFAULT_JVM_OPTS if jvm_opts is None else jvm_opts)
        self.security = security
        self._proc: subprocess.Popen | None = None

    # ---------------------------------------------------------------- layout

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def tls_dir(self) -> Path:
        """CA and broker certificate of a TLS broker; kept across ``reset()`` so clients keep trusting it."""
        return self.data_dir / "tls"

    @property
    def ca_path(self) -> Path | None:
        """The PEM CA clients pass as ``ssl.ca.location``; None without TLS."""
        return self.tls_dir / "ca.pem" if self.security and self.security.tls else None

    def client_config(self, user: str | None = None) -> dict[str, str]:
        """librdkafka settings that log in as ``user`` (default: the first one); bootstrap included."""
        config = {"bootstrap.servers": self.bootstrap}
        sec = self.security
        if sec is None:
            return config
        user = next(iter(sec.users)) if user is None else user
        if user not in sec.users:
            raise KeyError(f"no user {user!r} on this broker (users: {', '.join(sec.users)})")
        config.update({"security.protocol": sec.protocol, "sasl.mechanism": sec.mechanism,
                       "sasl.username": user, "sasl.password": sec.users[user]})
        if self.ca_path is not None:
            config["ssl.ca.location"] = str(self.ca_path)
        return config

    def _broker_secret(self) -> str:
        """The broker's own password: made once per data dir, since SCRAM keeps it from the format on."""
        path = self.data_dir / "broker.secret"
        try:
            return path.read_text().strip()
        except OSError:
            secret = secrets.token_hex(16)
            path.touch(0o600)
            path.write_text(secret + "\n")
            return secret

    @property
    def log_dir(self) -> Path:
        """Kafka's ``log.dirs``: the partitions and the KRaft metadata log."""
        return self.data_dir / "data"

    @property
    def log_path(self) -> Path:
        """The JVM's stdout and stderr (WARN and above, see ``log4j2-kafka.xml``)."""
        return self.data_dir / "kafka.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "kafka.pid"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def returncode(self) -> int | None:
        """Exit code of a broker that died on its own (``stop()`` forgets the process, so this stays None)."""
        return self._proc.poll() if self._proc else None

    def __repr__(self) -> str:
        return f"KafkaBroker({str(self.data_dir)!r}, port={self.port}, pid={self.pid})"

    def server_properties(self) -> str:
        host = "127.0.0.1"
        listener = self.security.protocol if self.security else "PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{host}:{self.controller_port}",
            # The controller listener stays PLAINTEXT on loopback: KRaft controllers cannot use SCRAM,
            # and only this JVM talks to it.
            "listeners": f"{listener}://{host}:{self.port},CONTROLLER://{host}:{self.controller_port}",
            "advertised.listeners": f"{listener}://{host}:{self.port}",
            "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:PLAINTEXT",
            # A secured broker talks to itself over the secured listener, logged in as BROKER_USER:
            # no unauthenticated port is left open besides the loopback controller.
            "inter.broker.listener.name": listener,
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(self.log_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # One node: internal topics cannot have more replicas than that.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",  # 50 partitions make the first group join slow
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # auto.create.topics.enable stays at its default (true), as on most clusters; the
            # gateway and our client never rely on it (PROTOCOL 1: they create their topics).
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        if self.security:
            props.update(self._security_properties(listener))
        lines = ["# Written by k2eg.stack.kafka on every start; edits are lost."]
        lines += [f"{k}={v}" for k, v in props.items()]
        return "\n".join(lines) + "\n"

    def _security_properties(self, listener: str) -> dict[str, str]:
        sec = self.security
        assert sec is not None
        mech, secret = sec.mechanism, self._broker_secret()
        if mech == "PLAIN":
            users = " ".join(f'user_{n}="{p}"' for n, p in {BROKER_USER: secret, **sec.users}.items())
            jaas = (f'org.apache.kafka.common.security.plain.PlainLoginModule required '
                    f'username="{BROKER_USER}" password="{secret}" {users};')
        else:
            jaas = (f'org.apache.kafka.common.security.scram.ScramLoginModule required '
                    f'username="{BROKER_USER}" password="{secret}";')
        props = {
            "sasl.enabled.mechanisms": mech,
            "sasl.mechanism.inter.broker.protocol": mech,
            f"listener.name.{listener.lower()}.{mech.lower()}.sasl.jaas.config": jaas,
        }
        if sec.tls:
            ca, keystore = make_certificates(self.tls_dir)
            props.update({"ssl.keystore.type": "PEM", "ssl.keystore.location": str(keystore),
                          "ssl.truststore.type": "PEM", "ssl.truststore.location": str(ca),
                          "ssl.client.auth": "none"})
        return props

    def _scram_args(self) -> list[str]:
        """``--add-scram`` entries for the format step (SCRAM users live in the KRaft metadata)."""
        sec = self.security
        if sec is None or not sec.mechanism.startswith("SCRAM"):
            return []
        users = {BROKER_USER: self._broker_secret(), **sec.users}
        return [a for n, p in users.items() for a in ("--add-scram", f"{sec.mechanism}=[name={n},password={p}]")]

    # ---------------------------------------------------------------- lifecycle

    def _java_cmd(self, java: str, classpath: list[Path], main: str, *args: str) -> list[str]:
        return [java, *self.jvm_opts,
                f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.xml'}",
                f"-Dkafka.logs.dir={self.data_dir}",
                "-cp", os.pathsep.join(str(p) for p in classpath), main, *args]

    def start(self, timeout: float = 90) -> str:
        """Start the JVM and return the bootstrap address once the broker serves metadata.

        ``timeout`` covers the JVM only; a first-time jar download is not counted.
        """
        if self.running:
            return self.bootstrap
        java = _java()
        classpath = resolve_classpath(self.cache_dir)
        deadline = time.monotonic() + timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._kill_stale()
        self.config_path.touch(0o600)  # a secured broker's file holds its own password
        self.config_path.chmod(0o600)
        self.config_path.write_text(self.server_properties())
        (self.data_dir / "log4j2.xml").write_text(_resource_text("log4j2-kafka.xml"))
        self._format(java, classpath, deadline)

        with open(self.log_path, "ab") as out:
            out.write(f"---- k2eg: starting Kafka {KAFKA_VERSION} at {time.ctime()} on {self.bootstrap}\n".encode())
            out.flush()
            log_start = out.tell()
            cmd = parent_death_prefix() + self._java_cmd(java, classpath, "kafka.Kafka", str(self.config_path))
            # Own process group: a Ctrl-C in the terminal must not kill the broker before the
            # gateway has been stopped, and stop() can signal the JVM and anything it forks at once.
            self._proc = subprocess.Popen(cmd, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self.pid_path.write_text(f"{self._proc.pid}\n")
        try:
            self._wait_ready(deadline, log_start)
        except BaseException:
            self.stop()
            raise
        log.info("Kafka %s ready on %s (pid %d)", KAFKA_VERSION, self.bootstrap, self._proc.pid)
        return self.bootstrap

    def _format(self, java: str, classpath: list[Path], deadline: float) -> None:
        """KRaft refuses to start on unformatted storage; already formatted storage is kept (restarts keep data)."""
        if (self.log_dir / "meta.properties").is_file():
            return
        cmd = self._java_cmd(java, classpath, "kafka.tools.StorageTool", "format", "--ignore-formatted",
                             "-t", _random_cluster_id(), "-c", str(self.config_path), *self._scram_args())
        # Through a java @argfile: SCRAM passwords must not show in the process list.
        argfile = self.data_dir / "format.args"
        argfile.touch(0o600)
        argfile.write_text("\n".join(f'"{a}"' for a in cmd[1:]) + "\n")
        try:
            r = subprocess.run([cmd[0], f"@{argfile}"], cwd=self.data_dir, capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise StackError(f"formatting Kafka storage in {self.log_dir} timed out") from None
        finally:
            argfile.unlink(missing_ok=True)
        if r.returncode != 0:
            out = "\n".join((r.stdout + r.stderr).strip().splitlines()[-20:])
            raise StackError(f"formatting Kafka storage in {self.log_dir} failed:\n{out}")

    def _check_alive(self, log_start: int) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise StackError(f"the Kafka broker exited during startup with code {code}; "
                             f"last lines of {self.log_path}:\n{_tail(self.log_path, 30, log_start)}")

    def _wait_ready(self, deadline: float, log_start: int) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        def expired() -> None:
            if time.monotonic() > deadline:
                raise StackError(f"the Kafka broker did not answer on {self.bootstrap} in time; "
                                 f"last lines of {self.log_path}:\n{_tail(self.log_path, 30, log_start)}")

        # Plain TCP first: librdkafka backs off between reconnects, which would add seconds after the port opens.
        while True:
            self._check_alive(log_start)
            expired()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        admin = AdminClient({**self.client_config(), "logger": _quiet_logger(), "log_level": 0,
                             "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 200})
        while True:
            self._check_alive(log_start)
            expired()
            try:
                md = admin.list_topics(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
                if md.brokers:  # KRaft lists a broker only once it is unfenced, i.e. able to host partitions
                    return
            except KafkaException:
                pass
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (Kafka shuts down cleanly and flushes its logs), then SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if proc is None:
            return
        terminate_group(proc, timeout, "Kafka")
        with contextlib.suppress(OSError), open(self.log_path, "ab") as out:
            out.write(f"---- k2eg: Kafka stopped at {time.ctime()} (exit code {proc.returncode})\n".encode())
        with contextlib.suppress(OSError):
            self.pid_path.unlink()

    def _kill_stale(self) -> None:
        """A broker orphaned by a crashed run still holds the lock on ``log.dirs``: end it before starting anew."""
        kill_stale_process(self.pid_path, ("kafka.Kafka", str(self.config_path)))

    def reset(self) -> None:
        """Drop all topics and the cluster identity, so the next start is a brand-new broker."""
        if self.running:
            raise StackError("stop the Kafka broker before resetting its data")
        self._kill_stale()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "KafkaBroker":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kill_stale_process(pid_path: Path, markers: Sequence[str], grace: float = 20.0) -> None:
    """End the process recorded in ``pid_path`` if it is still alive and its command line has every marker.

    The markers guard against pid reuse: an unrelated process that inherited the
    pid is left alone.
    """
    try:
        pid = int(pid_path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return
    if not all(m in cmdline for m in markers):
        return
    log.warning("stopping a process left running by an earlier run (pid %d: %s)", pid, cmdline[:120])
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        _signal_group(pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _alive(pid):
                return
            time.sleep(0.1)


def parent_death_prefix() -> list[str]:
    """Command prefix that SIGTERMs the child when this process dies, even by SIGKILL (where atexit cannot run).

    Linux delivers the signal when the *thread* that spawned the child ends, so it
    is only used from the main thread, whose end is the end of the process.
    """
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():
        return [setpriv, "--pdeathsig", "TERM", "--"]
    return []


def terminate_group(proc: subprocess.Popen, timeout: float, what: str) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not stop within %.0fs: killing it", what, proc.pid, timeout)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid``; fall back to the process when it has no group of its own."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent's wait() is missing
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True
