"""Meetecho's simple-whip-client (Debian's ``whip-client``, GStreamer) as a test publisher.

What the client does on the wire (Debian bookworm, 0.0~git20230131):
- POSTs its offer (video sendonly, no candidates in it) at once, then trickles
  every candidate it gathers with ``PATCH`` (``application/trickle-ice-sdpfrag``,
  grouped every 100 ms, the last one with ``a=end-of-candidates``); a PATCH
  answered other than 200/204 is logged as ``[trickle] <status>``;
- resolves a relative ``Location`` against the endpoint's URL *keeping the
  endpoint's query*, so its PATCH and DELETE go to ``/api/v1/whip/<id>?pipeline=…``;
- on SIGINT or SIGTERM ("hang-up") sends ``DELETE`` to that resource and exits 0
  (an answer other than 200 is logged as ``[<status>]``); it does the same when
  its DTLS transport is closed by the server; SIGKILL leaves without a word;
- offers ``a=setup:actpass`` with an RSA certificate (GStreamer 1.22's dtls
  elements): an answerer that takes the DTLS client role must offer RSA
  cipher suites (aiortc offers ECDSA ones only, and the handshake fails
  "no shared cipher"); one answering ``a=setup:passive`` is the server.

On bookworm it needs ``tests/gst_whip_shim.c`` preloaded: without it the
client aborts before gathering (libsoup 2 and 3 in one process), and libnice
would offer no candidate on a host whose only interface is ``lo``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

WHIP_CLIENT = Path("/usr/bin/whip-client")
SHIM_SOURCE = Path(__file__).with_name("gst_whip_shim.c")
# The soname libnice asks for: loaded first, the shim stands in for it.
SHIM_NAME = "libgupnp-igd-1.0.so.4"

# A white ball moving on black, 15 fps; any pipeline that inverts it shows mostly white.
TEST_PATTERN = (
    "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=15/1 ! videoconvert"
    " ! queue ! vp8enc deadline=1 ! rtpvp8pay pt=96 ssrc=2 ! queue"
    " ! application/x-rtp,media=video,encoding-name=VP8,payload=96"
)
# What the client logs (level 4) once its peer connection is up.
CONNECTED = "PeerConnection connected"
# Its warnings for a PATCH or DELETE the server refused: "[WARN]  [trickle] 405 …", "[WARN]  [404] …".
_HTTP_FAILURE = re.compile(r"\[WARN\]\s+\[(?:trickle\]\s*)?\d+.*")
_RESOURCE = re.compile(r"Resource URL: (\S+)")


def build_shim(directory: Path) -> Path:
    """Compile the shim into ``directory``; its path, for LD_PRELOAD."""
    library = directory / SHIM_NAME
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", f"-Wl,-soname,{SHIM_NAME}",
         "-o", str(library), str(SHIM_SOURCE), "-ldl"],
        check=True, capture_output=True, text=True,
    )
    return library


class WhipClient:
    """One running whip-client, its stdout and stderr in ``log_path``."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        """Until the log shows ``text``; fails with the log if the client exits or time runs out."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if self.process.poll() is not None:
                exited = self.process.returncode
                raise AssertionError(f"whip-client exited {exited} before logging {text!r}:\n{self.log_text()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"whip-client logged no {text!r} within {timeout:g}s:\n{self.log_text()}")
            time.sleep(0.05)

    @property
    def resource_url(self) -> str:
        match = _RESOURCE.search(self.log_text())
        assert match, f"whip-client logged no resource URL:\n{self.log_text()}"
        return match.group(1)

    @property
    def session_id(self) -> str:
        """The last segment of the resource's path (``/api/v1/whip/<session_id>``)."""
        return urlsplit(self.resource_url).path.rstrip("/").rsplit("/", 1)[-1]

    def http_failures(self) -> list[str]:
        """The client's warnings for PATCHes and DELETEs the server did not accept."""
        return _HTTP_FAILURE.findall(self.log_text())

    def hang_up(self, timeout: float = 10) -> int:
        """SIGTERM: the client sends its DELETE and exits; its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: gone without a DELETE or a DTLS close."""
        self.process.kill()
        self.process.wait()


@contextmanager
def publishing(url: str, token: str, log_path: Path, shim: Path, video: str = TEST_PATTERN) -> Iterator[WhipClient]:
    """whip-client publishing ``video`` to the WHIP endpoint ``url``; killed on exit if still running."""
    if not WHIP_CLIENT.exists():
        raise FileNotFoundError(f"{WHIP_CLIENT} is missing: install Debian's simple-whip-client (.ci/run does)")
    argv = [
        # Its log goes through stdio; line buffering puts each line in the file when it happens.
        "stdbuf", "-oL", "-eL",
        str(WHIP_CLIENT), "--url", url, "--token", token, "--video", video,
        "--log-level", "4", "--disable-colors", "--log-timestamps",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv, env={**os.environ, "LD_PRELOAD": str(shim)},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    client = WhipClient(process, log_path)
    try:
        yield client
    finally:
        if process.poll() is None:
            client.kill()
