"""The published k2eg==0.3.0 client in a virtualenv of its own, cached between runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("scenario.py")


def _cache() -> Path:
    return Path(os.environ.get("K2EG_CACHE_DIR", Path.home() / ".cache" / "k2eg"))


@pytest.fixture(scope="session")
def legacy_python() -> str:
    # 0.3.0 calls Consumer.subscribe() from the user thread while its own thread polls;
    # confluent-kafka releases after 2.13 (the one current when 0.3.0 shipped) deadlock
    # there, whatever the gateway. Pin the client's contemporaries.
    venv = _cache() / "venv-k2eg-0.3.0-ck2.13.0"
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "k2eg==0.3.0", "confluent-kafka==2.13.0"], check=True)
        stamp.touch()
    return str(py)


def run_scenario(python: str, stack, app: str, steps: str, timeout: float = 240) -> dict:
    """Run tests/compat/scenario.py under ``python``; it prints one JSON object."""
    # 0.3.0 waits for its reply topic at start-up but never creates it.
    from k2eg.transport import TopicAdmin

    TopicAdmin({"bootstrap.servers": stack.bootstrap}).ensure([f"{app}-reply"])
    env = dict(os.environ, K2EG_PYTHON_CONFIGURATION_PATH_FOLDER=str(stack.env_dir))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, str(SCENARIO), stack.environment, app, steps], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scenario_pair(steps: str, name: str):
    """Module fixtures ``legacy`` and ``ours``: the same steps through 0.3.0, then through our client."""

    @pytest.fixture(scope="module")
    def legacy(legacy_python, stack):
        return run_scenario(legacy_python, stack, f"legacy-{name}", steps)

    @pytest.fixture(scope="module")
    def ours(stack, legacy):  # after the legacy run: both see the same IOC state
        return run_scenario(sys.executable, stack, f"ours-{name}", steps)

    return legacy, ours
