"""The fixtures of tests/fault_servers.py's servers, for the test modules that load them with `pytest_plugins =
["fault_fixtures"]` (this module is imported by pytest alone, so that it can rewrite its asserts)."""

from __future__ import annotations

import time
import types

import pytest
from conftest import ThreadedUvicorn
from fault_servers import RawServer, Stub

import protege.http_client as client_module


@pytest.fixture
def stub():
    """Start a Stub with the given responder; yields a factory returning (stub, url)."""
    servers = []

    def start(respond, barrier: int = 0):
        server = Stub(respond, barrier)
        running = ThreadedUvicorn(server.app).__enter__()
        servers.append(running)
        return server, running.url

    yield start
    for running in servers:
        running.__exit__(None, None, None)


@pytest.fixture
def raw_server():
    servers = []

    def start(actions, kind=RawServer, **options):
        servers.append(kind(actions, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's backoff delays (and still sleep them)."""
    recorded = []

    def sleep(seconds):
        recorded.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    return recorded
