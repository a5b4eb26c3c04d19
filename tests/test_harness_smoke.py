"""The harness can start the embedded server and a client can reach it."""

from tests.harness import ScopeServer
from tests.peer import ScopeClient


async def test_embedded_server_is_healthy_and_an_authenticated_socket_gets_ready(embedded_server: ScopeServer) -> None:
    assert embedded_server.api("GET", "/healthz", user=None).status_code == 200
    await embedded_server.wait_until_async(
        lambda: embedded_server.api("GET", "/readyz", user=None).status_code == 200, 10, what="/readyz 200"
    )

    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        ready = await client.expect("ready")

    assert ready["connection_id"]
