import pytest

from . import backends


@pytest.fixture(scope="session", autouse=True)
def _stop_postgres():
    """The throwaway PostgreSQL cluster of the store and e2e tests ends with the session."""
    yield
    backends.stop_cluster()
