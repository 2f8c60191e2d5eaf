"""Without k2eg[bluesky], importing k2eg.ophyd says in one sentence what to install."""
from __future__ import annotations

import importlib
import sys

import pytest


def test_import_without_ophyd_async_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ophyd_async.core", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "k2eg.ophyd", raising=False)
    with pytest.raises(ImportError) as e:
        importlib.import_module("k2eg.ophyd")
    assert "pip install 'k2eg[bluesky]'" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback
