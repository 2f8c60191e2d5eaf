"""A throwaway PostgreSQL cluster for tests and benchmarks: ``initdb`` + ``pg_ctl`` on a free loopback port.

initdb refuses to run as root; as root the cluster is made and run as the
``postgres`` system user (Debian's package creates it) through ``runuser``.
Authentication is ``trust`` on 127.0.0.1 only.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from .kafka import StackError
from .ports import free_port


def pg_bin(tool: str) -> str:
    """Path of a PostgreSQL server tool: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(tool)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                    if Path(p).parent.name.isdigit() else 0, reverse=True):
        if os.access(os.path.join(d, tool), os.X_OK):
            return os.path.join(d, tool)
    raise StackError(f"PostgreSQL's {tool} is not installed (apt-get install postgresql, or run scripts/bootstrap.sh)")


class ThrowawayPostgres:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir: Path | None = None
        self._user: str | None = None

    def _run(self, args: list[str], timeout: float = 120) -> None:
        cmd = (["runuser", "-u", self._user, "--"] if self._user else []) + args
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise StackError(f"{' '.join(args[:2])} failed: {r.stderr.strip() or r.stdout.strip()}")

    def start(self) -> "ThrowawayPostgres":
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        self.dir = Path(tempfile.mkdtemp(prefix="k2eg-pg-"))
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise StackError("running as root, and there is no 'postgres' user to run PostgreSQL as") from None
            self._user = "postgres"
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        data = self.dir / "data"
        self._run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=on -c shared_buffers=64MB"
        self._run([pg_ctl, "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start"])
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_database(self, prefix: str = "k2eg") -> str:
        """A new empty database; its DSN."""
        import psycopg
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        data = self.dir / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run([pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], timeout=60)
            except (StackError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> "ThrowawayPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
