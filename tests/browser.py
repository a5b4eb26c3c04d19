"""Headless Chromium against the pages, inside a private network namespace.

No Chromium flag keeps its ICE candidates on loopback, so the browser, the
server and this test process share a network namespace that holds only ``lo``:
WebRTC then has nowhere to go but 127.0.0.1. The namespace belongs to the
calling thread (``unshare(CLONE_NEWNET)``); processes it starts inherit it,
and leaving restores the thread's original namespace.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
CLONE_NEWNET = 0x40000000

# Playwright's own --disable-features list (playwright 1.64); Chromium honours
# only the last --disable-features, so ours replaces it with one more entry.
PLAYWRIGHT_DISABLED_FEATURES = (
    "AvoidUnnecessaryBeforeUnloadCheckSync", "DestroyProfileOnBrowserClose", "DialMediaRouteProvider",
    "GlobalMediaControls", "HttpsUpgrades", "LensOverlay", "MediaRouter", "PaintHolding",
    "ThirdPartyStoragePartitioning", "BlockOriginHeaderModificationOnRedirect",
    "AvoidCorsURLLoaderRestartOnRedirect", "Translate", "AutoDeElevate", "OptimizationHints",
    "NetworkTimeServiceQuerying", "AimEnabled", "msForceBrowserSignIn", "msEdgeUpdateLaunchServicesPreferredVersion",
)
# mDNS would hide the loopback candidate behind a .local name nobody can resolve here.
DISABLED_FEATURES = (*PLAYWRIGHT_DISABLED_FEATURES, "WebRtcHideLocalIpsWithMdns")

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    f"--disable-features={','.join(DISABLED_FEATURES)}",
]


def _libc_call(name: str, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)} (browser tests need root for a network namespace)")


@contextmanager
def private_network() -> Iterator[None]:
    """Move this thread into a new network namespace with only ``lo`` up; move it back after."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _libc_call("unshare", CLONE_NEWNET)
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield
        finally:
            _libc_call("setns", original, CLONE_NEWNET)
    finally:
        os.close(original)


def launch_chromium(playwright: Playwright) -> Browser:
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)")
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=CHROMIUM_ARGS,
        ignore_default_args=[f"--disable-features={','.join(PLAYWRIGHT_DISABLED_FEATURES)}"],
    )


# Mean RGB of what a <video> shows now, from a canvas copy of its current frame.
_VIDEO_MEAN_JS = """
(selector) => {
  const video = document.querySelector(selector);
  if (!video || !video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(video, 0, 0);
  const { data } = context.getImageData(0, 0, canvas.width, canvas.height);
  const sums = [0, 0, 0];
  for (let i = 0; i < data.length; i += 4) { sums[0] += data[i]; sums[1] += data[i + 1]; sums[2] += data[i + 2]; }
  const pixels = data.length / 4;
  return sums.map((sum) => sum / pixels);
}
"""


def video_mean(page: Page, selector: str) -> tuple[float, float, float] | None:
    """Mean (R, G, B) of the frame a video element shows, or None before its first frame."""
    value: Any = page.evaluate(_VIDEO_MEAN_JS, selector)
    return None if value is None else (value[0], value[1], value[2])
