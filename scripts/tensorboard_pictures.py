"""Pictures of TensorBoard as a browser shows it, for the docs: one PNG per dashboard tab.

    python scripts/tensorboard_pictures.py logs docs/tensorboard   # -> docs/tensorboard-scalars.png, ...

Serves the log folder with ``tensorboard`` on a free local port and screenshots each tab with a headless
Chromium (``apt install chromium``, or ``--browser`` for another Chromium-based one), then stops the server.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Picture name -> TensorBoard's route and window size. The scalars picture uses the SCALARS tab, which takes
# its tag filter (the groups a reviewer reads first), smoothing and axis scaling from the address.
TABS = {
    "scalars": ("scalars&tagFilter=%5E(eval%7Cval%7Ctokens)%2F&_smoothingWeight=0&_ignoreYOutliers=false", "1600,1000"),
    "hparams": ("hparams", "2100,420"),  # wide: the settings TensorBoard shows first, then every metric column
    "text": ("text", "1600,1000"),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"TensorBoard did not answer at {url} within {seconds:.0f} s") from None
            time.sleep(0.5)


def screenshot(browser: str, url: str, out: Path, size: str, wait_ms: int) -> None:
    """The page after ``wait_ms`` of its own time (TensorBoard loads its data after the page itself)."""
    command = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={size}",
        f"--virtual-time-budget={wait_ms}",
        f"--screenshot={out}",
        url,
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", type=Path, help="a folder of runs, e.g. logs")
    parser.add_argument("prefix", type=Path, help="pictures go to PREFIX-<tab>.png")
    parser.add_argument("--tabs", nargs="+", default=list(TABS), choices=list(TABS))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("google-chrome") or "chromium")
    parser.add_argument("--wait_ms", type=int, default=20000, help="page time before each picture")
    options = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(options.logdir),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        options.prefix.parent.mkdir(parents=True, exist_ok=True)
        for tab in options.tabs:
            out = options.prefix.with_name(f"{options.prefix.name}-{tab}.png")
            route, size = TABS[tab]
            screenshot(options.browser, f"http://127.0.0.1:{port}/#{route}", out, size, options.wait_ms)
            print(f"wrote {out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
