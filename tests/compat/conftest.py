"""The published k2eg==0.3.0 client in a virtualenv of its own, cached between runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

SCENARIO = Path(__file__).with_name("scenario.py")


def _cache() -> Path:
    return Path(os.environ.get("K2EG_CACHE_DIR", Path.home() / ".cache" / "k2eg"))


@pytest.fixture(scope="session")
def legacy_python() -> str:
    venv = _cache() / "venv-k2eg-0.3.0"
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "k2eg==0.3.0"], check=True)
        stamp.touch()
    return str(py)


def run_scenario(python: str, stack, app: str, steps: str, timeout: float = 240) -> dict:
    """Run tests/compat/scenario.py under ``python``; it prints one JSON object."""
    # 0.3.0 waits for its reply topic at start-up but never creates it.
    AdminClient({"bootstrap.servers": stack.bootstrap}).create_topics([NewTopic(f"{app}-reply", 1, 1)])
    env = dict(os.environ, K2EG_PYTHON_CONFIGURATION_PATH_FOLDER=str(stack.env_dir))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, str(SCENARIO), stack.environment, app, steps], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
