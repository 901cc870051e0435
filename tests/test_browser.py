"""The analyze report in a real browser: headless Chromium, driven over the DevTools protocol.

The protocol runs over --remote-debugging-pipe (NUL-separated JSON on file descriptors 3 and 4), so
the test needs nothing but Debian's `chromium` (scripts/test installs it when missing; in CI a
missing browser fails the test instead of skipping it).
"""

import base64
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from vaekit.cli import main
from vaekit.data import center_crop, write_image

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe",
]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run (scripts/test) must install Debian's chromium", pytrace=False)
    pytest.skip(f"{CHROMIUM} not installed (scripts/test installs it: apt-get install chromium)", allow_module_level=True)


class Chromium:
    """Just enough of the DevTools protocol: commands, and the events that arrive meanwhile."""

    def __init__(self, user_data_dir: str):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def fds() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}"], pass_fds=(3, 4), preexec_fn=fds,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self.events: list[dict] = []
        self._buffer = b""
        self._id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        reply = self._until(lambda m: m.get("id") == self._id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, event: str) -> dict:
        return self._until(lambda m: m.get("method") == event)

    def _until(self, done, timeout: float = 30.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if done(message):
                    return message
            ready, _, _ = select.select([self._read], [], [], 0.5)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.process.poll()})")
                self._buffer += chunk
        raise TimeoutError("no answer from chromium in time")

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)


def open_page(page: Path, width: int = 1200) -> dict:
    """Load a page as a person would; what they would see and what went wrong on the way."""
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(profile)
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            browser.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                browser.send(f"{domain}.enable")
            browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
            browser.send("Page.navigate", {"url": page.resolve().as_uri()})
            browser.wait_for("Page.loadEventFired")  # after every <img> has loaded or failed
            check = "JSON.stringify({images: [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]), text: document.body.innerText.length})"
            seen = json.loads(browser.send("Runtime.evaluate", {"expression": check, "returnByValue": True})["result"]["value"])
            size = browser.send("Page.getLayoutMetrics")["cssContentSize"]
            shot = browser.send("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(size["height"], 16000), "scale": 1},
            })
        finally:
            browser.close()
    events = browser.events
    errors = [e["params"]["entry"]["text"] + " " + e["params"]["entry"].get("url", "") for e in events
              if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    errors += [json.dumps(e["params"]["args"]) for e in events if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")]
    errors += [e["params"]["exceptionDetails"]["text"] for e in events if e["method"] == "Runtime.exceptionThrown"]
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return {**seen, "errors": errors, "requests": requests, "screenshot": base64.b64decode(shot["data"])}


def problems(seen: dict) -> list[str]:
    """Everything a reader would notice: missing pictures, console errors, outside requests, a blank page."""
    from PIL import Image

    found = [f"image did not load: {src}" for src, width in seen["images"] if width == 0]
    found += [f"console error: {e}" for e in seen["errors"]]
    found += [f"request outside the report folder: {url}" for url in seen["requests"] if not url.startswith("file://")]
    pixels = np.asarray(Image.open(io.BytesIO(seen["screenshot"])).convert("L"), dtype=np.float64)
    if pixels.std() < 10 or seen["text"] < 1000:
        found.append(f"page looks blank (pixel std {pixels.std():.1f}, {seen['text']} characters of text)")
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """`vaekit analyze` on a tiny random model and three real photos."""
    from skimage import data

    root = tmp_path_factory.mktemp("browser")
    for name, image in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("chelsea", data.chelsea())):
        write_image(root / "photos" / f"{name}.png", center_crop(image, 64))
    argv = ["analyze", "preset:tiny-f8c4", str(root / "photos"), "--report", str(root / "report"),
            "--resolution", "32", "--lpips", "off", "--samples", "4", "--steps", "4", "--pairs", "1"]
    assert main(argv) == 0
    return root / "report" / "report.html"


def test_report_renders_in_chromium(report):
    seen = open_page(report)
    (report.parent / "screenshot.png").write_bytes(seen["screenshot"])  # kept with the report for a look
    assert problems(seen) == []
    from PIL import Image

    img_tags = report.read_text(encoding="utf-8").count("<img ")
    assert len(seen["images"]) == img_tags >= 10
    assert all(url.startswith("file://") for url in seen["requests"]) and len(seen["requests"]) > img_tags
    width, height = Image.open(io.BytesIO(seen["screenshot"])).size
    assert width == 1200 and height > 3000  # the whole page, not just the first screen


def test_a_missing_image_is_caught(report, tmp_path):
    copy = tmp_path / "report"
    shutil.copytree(report.parent, copy)
    (copy / "samples_prior.png").unlink()
    found = problems(open_page(copy / "report.html"))
    assert "image did not load: samples_prior.png" in found
    assert any(p.startswith("console error:") and "samples_prior.png" in p for p in found)
