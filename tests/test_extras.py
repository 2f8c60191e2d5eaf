"""Installed without the gateway extra: the gateway and the stack say which extra to install, exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from k2eg.extras import GATEWAY_MODULES, missing_extra

# Makes the EPICS modules unimportable in the child, as in an environment without the extra.
BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


def run_without(mods: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(mods=mods) + code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("code", [
    # an unreachable broker: without the guard the gateway would first wait for it, then fail on an import
    "from k2eg.gateway.__main__ import main\n"
    "sys.exit(main(['--cmd-input-topic', 'c', '--sub-server-address', '127.0.0.1:1', "
    "'--pub-server-address', '127.0.0.1:1']))",
    "sys.argv = ['k2eg-stack', 'run', '--state-dir', '/nonexistent/k2eg-extras-test']\n"
    "from k2eg.stack.__main__ import main\nmain(prog_name='k2eg-stack')",
    "sys.argv = ['k2eg-stack', 'start', '--state-dir', '/nonexistent/k2eg-extras-test']\n"
    "from k2eg.stack.__main__ import main\nmain(prog_name='k2eg-stack')",
], ids=["gateway", "stack-run", "stack-start"])
def test_without_the_gateway_extra_one_sentence_names_it_and_exit_2(code):
    proc = run_without(("p4p", "epics", "softioc"), code)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'k2eg[gateway]'" in lines[0] and "p4p" in lines[0], proc.stderr


def test_missing_extra_names_only_what_is_missing():
    assert missing_extra("x", ("json", "sys")) is None
    why = missing_extra("prog", ("json", "k2eg_no_such_module", "k2eg_none.sub"))
    assert why == ("prog needs the 'gateway' extra of k2eg (k2eg_no_such_module, k2eg_none.sub not installed): "
                   "pip install 'k2eg[gateway]'")
    assert set(GATEWAY_MODULES) >= {"p4p", "epics", "softioc"}
