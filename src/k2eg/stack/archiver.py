"""The archiver as a part of the local stack: a child process, ready once it prints its ready line."""
from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from .kafka import StackError, _signal_group, kill_stale_process, parent_death_prefix, terminate_group
from .ports import free_port

#: Printed on stderr by ``k2eg-archiver`` once it consumes its command topic.
ARCHIVER_READY = "k2eg archiver ready"
_HTTP = re.compile(r"k2eg archiver http on [^:]+:(\d+)")


class ArchiverProcess:
    """``python -m k2eg.archiver`` with the embedded store under ``work_dir/archive`` and HTTP retrieval."""

    def __init__(self, work_dir: Path, args: Sequence[str] = ()):
        self.work_dir = Path(work_dir)
        self.args = list(args)
        self.http_port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: threading.Thread | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "archiver.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def command(self, bootstrap: str, gateway_cmd_topic: str) -> list[str]:
        return [sys.executable, "-m", "k2eg.archiver", "--bootstrap", bootstrap,
                "--gateway-cmd-topic", gateway_cmd_topic, "--path", str(self.work_dir / "archive"),
                "--http-port", str(self.http_port or free_port()), *self.args]

    def start(self, bootstrap: str, gateway_cmd_topic: str, env: dict[str, str], timeout: float = 60) -> None:
        if self.pid is not None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        pid_file = self.work_dir / "archiver.pid"
        kill_stale_process(pid_file, ("k2eg.archiver", "--gateway-cmd-topic", gateway_cmd_topic), grace=10)
        self._ready.clear()
        self._tail.clear()
        cmd = parent_death_prefix() + self.command(bootstrap, gateway_cmd_topic)
        with open(self.log_path, "ab") as f:
            f.write(f"---- k2eg-stack: starting the archiver at {time.ctime()}: {' '.join(cmd)}\n".encode())
        self._proc = proc = subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, cwd=self.work_dir,
                                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(f"{proc.pid}\n")
        self._reader = threading.Thread(target=self._pump, args=(proc,), name="k2eg-archiver-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(5)
                why = (f"exited during startup with code {proc.returncode}" if proc.poll() is not None
                       else f"did not print '{ARCHIVER_READY}' within {timeout:g}s")
                self.stop()
                raise StackError(f"the archiver {why}; last lines of {self.log_path}:\n" + "\n".join(self._tail))

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "ab", buffering=0) as out:
            for raw in proc.stdout:
                out.write(raw)
                line = raw.decode("utf-8", "replace").rstrip()
                self._tail.append(line)
                m = _HTTP.search(line)
                if m:
                    self.http_port = int(m.group(1))
                if ARCHIVER_READY in line:
                    self._ready.set()
        proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or committed."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self, timeout: float = 30) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        terminate_group(proc, timeout, "the archiver")
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None
        with contextlib.suppress(OSError):
            (self.work_dir / "archiver.pid").unlink()
