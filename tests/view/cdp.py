"""Headless Chromium driven over the Chrome DevTools Protocol: just what the browser tests need.

Selenium is not a dependency; Chromium speaks CDP over a websocket itself, so a
small client on ``websockets`` (sync API) starts the browser, opens a page,
evaluates JS, moves the mouse and takes screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class CdpError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page; ``close()`` stops the process it started."""

    def __init__(self, executable: str, width: int = 1100, height: int = 900, start_timeout_s: float = 60):
        self._profile = tempfile.TemporaryDirectory(prefix="atman-chromium-")
        # --no-sandbox: the tests run as root in containers, where Chromium's sandbox cannot start.
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-dev-shm-usage",
             f"--window-size={width},{height}", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + start_timeout_s
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise CdpError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self._exit = contextlib.ExitStack()  # websockets wants its connection used as a context manager
        self._ws = self._exit.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
        self._next_id = 0
        self.console: list[str] = []  # console messages and uncaught exceptions of the page
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, timeout_s: float = 60, **params: Any) -> dict:
        self._next_id += 1
        call_id = self._next_id
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise CdpError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._note_event(msg)

    def _note_event(self, msg: dict) -> None:
        if msg.get("method") == "Runtime.consoleAPICalled":
            args = msg["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif msg.get("method") == "Runtime.exceptionThrown":
            self.console.append("exception: " + json.dumps(msg["params"]["exceptionDetails"])[:500])

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def evaluate(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise CdpError(f"{expression[:80]}: {r['exceptionDetails'].get('exception', r['exceptionDetails'])}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 120, poll_s: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CdpError(f"timed out waiting for {expression}")
            time.sleep(poll_s)

    def hover(self, selector: str) -> None:
        """Move the mouse onto the centre of the first element matching ``selector`` (a real mouse event)."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        exit_stack = getattr(self, "_exit", None)
        if exit_stack is not None:
            exit_stack.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._profile.cleanup()
