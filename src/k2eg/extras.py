"""Optional parts of k2eg (pyproject ``[project.optional-dependencies]``) and the one sentence a missing one gets."""
from __future__ import annotations

import importlib.util

# What the gateway and the local stack import: EPICS clients (p4p, pyepics), the demo IOC (softioc), metrics.
GATEWAY_MODULES = ("p4p", "epics", "softioc", "prometheus_client")


def missing_extra(program: str, modules: tuple[str, ...] = GATEWAY_MODULES, extra: str = "gateway") -> str | None:
    """None when ``modules`` can be imported, else one sentence naming the extra to install.

    ``find_spec`` only looks for the modules: no EPICS library is loaded to answer.
    """
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            missing.append(name)
    if not missing:
        return None
    return (f"{program} needs the '{extra}' extra of k2eg ({', '.join(missing)} not installed): "
            f"pip install 'k2eg[{extra}]'")
