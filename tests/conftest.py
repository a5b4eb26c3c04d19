"""Fixtures that start real servers and a real browser, and the hook that attaches logs to failures."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import ExitStack
from typing import Any, Literal

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from tests.browser import launch_chromium, private_network
from tests.harness import LOG_TAIL_CHARS, ScopeServer, start_embedded, start_scaled

Mode = Literal["embedded", "scaled"]


class ServerFactory:
    """Starts servers with special settings for one test; all are stopped after it."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, stack: ExitStack) -> None:
        self._tmp_path_factory = tmp_path_factory
        self._stack = stack
        self.servers: list[ScopeServer] = []

    def __call__(
        self, mode: Mode = "embedded", *, workers: int = 2, worker_env: dict[str, Any] | None = None, **env: Any
    ) -> ScopeServer:
        tmp_path = self._tmp_path_factory.mktemp(mode)
        if mode == "embedded":
            server = self._stack.enter_context(start_embedded(tmp_path, **env))
        else:
            server = self._stack.enter_context(start_scaled(tmp_path, workers=workers, worker_env=worker_env, **env))
        self.servers.append(server)
        return server


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """The embedded default, shared by a module's tests (their sessions must not overlap in slots)."""
    with start_embedded(tmp_path_factory.mktemp("embedded")) as server:
        yield server


@pytest.fixture(scope="module")
def scaled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """Redis + PostgreSQL + daphne + two media workers, shared by a module's tests."""
    with start_scaled(tmp_path_factory.mktemp("scaled"), workers=2) as server:
        yield server


@pytest.fixture
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """``server_factory("embedded", SCOPE_WORKER_CAPACITY=1)``, ``server_factory("scaled", workers=3)``."""
    with ExitStack() as stack:
        yield ServerFactory(tmp_path_factory, stack)


# --- in-process tests (pytest-django): users and the in-memory channel layer ---


@pytest.fixture
def empty_channel_layer():
    """The in-memory layer outlives a test; leftovers must not reach the next one."""
    layer = get_channel_layer()
    async_to_sync(layer.flush)()
    yield
    async_to_sync(layer.flush)()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw-bob")


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("staff", password="pw-staff", is_staff=True)


def _servers_used_by(item: pytest.Item) -> list[ScopeServer]:
    servers: list[ScopeServer] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, ScopeServer):
            servers.append(value)
        elif isinstance(value, ServerFactory):
            servers.extend(value.servers)
    return servers


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report carries the logs of every server it used."""
    report = yield
    if report.failed:
        for server in _servers_used_by(item):
            report.sections.append((f"server logs ({server.logs_dir})", server.log_text()[-LOG_TAIL_CHARS:]))
    return report


# --- the browser: a module's server, Playwright and Chromium share one private network ---


@pytest.fixture(scope="module")
def namespace() -> Iterator[None]:
    with private_network():
        yield


@pytest.fixture(scope="module")
def playwright(namespace: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Any]:
    browser = launch_chromium(playwright)
    yield browser
    browser.close()


@pytest.fixture
def contexts(browser: Any) -> Iterator[list[Any]]:
    """Browser profiles opened by a test; all closed after it."""
    opened: list[Any] = []
    yield opened
    for context in opened:
        context.close()
