"""Pages as a person sees them: the real Dagster webserver rendered by a real headless Chromium."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it


def rendered_page(url: str, tmp_path: Path) -> str:
    """The DOM of a page after a real headless Chromium has run its JavaScript."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={tmp_path}", "--virtual-time-budget=20000", "--dump-dom"]
    proc = subprocess.run(
        [str(CHROMIUM), *flags, url], capture_output=True, text=True, timeout=120, check=True
    )
    return proc.stdout


class Browser:
    """A real headless Chromium driven through its DevTools protocol, for what a person does on
    a page beyond reading it: wait until it shows something, click, take a screenshot.

    The protocol is spoken over a WebSocket with `websockets`, which dagster-webserver brings
    (uvicorn[standard]). One tab; `open` navigates it."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1000) -> None:
        if not CHROMIUM.exists():
            pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
        self.profile, self.size = profile, (width, height)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        self.profile.mkdir(parents=True, exist_ok=True)
        port_file = self.profile / "DevToolsActivePort"  # written once it listens
        port_file.unlink(missing_ok=True)  # an earlier browser's on this profile
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
        flags += ["--disable-background-networking", "--disable-component-update"]
        flags += ["--disable-sync", "--hide-scrollbars"]
        flags += [f"--user-data-dir={self.profile}", "--remote-debugging-port=0"]
        flags += [f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        self._proc = subprocess.Popen(
            [str(CHROMIUM), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            port = _until(
                "Chromium's DevTools port",
                lambda: port_file.exists() and port_file.read_text().split()[:1],
                60,
            )[0]
            pages = _until("Chromium's tab", lambda: _tabs(port), 60)
            self._ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=60)
            # The page gets exactly `size` (the window's own frame would take some of it).
            width, height = self.size
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command's result (events arriving meanwhile are dropped)."""
        request_id = next(self._ids)
        self._ws.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=120))
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Load `url` in the tab; returns once the new document is there (waits on its text
        then cannot be answered by the page before)."""
        self.evaluate("window.__leaving = true")
        self.call("Page.navigate", url=url)
        self.wait_for(url, "!window.__leaving && document.readyState !== 'loading'", 120)

    def text(self) -> str:
        """What the page shows as text (the body's innerText)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, what: str, expression: str, timeout: float = 180) -> Any:
        """The first truthy value of `expression`, polled while the page loads and renders."""

        def value() -> Any:
            try:
                return self.evaluate(expression)
            except RuntimeError:  # no page yet (navigating): ask again
                return None

        try:
            return _until(what, value, timeout)
        except TimeoutError:
            raise AssertionError(
                f"the page never showed {what}; it shows:\n{self.text()}"
            ) from None

    def wait_for_text(self, *texts: str, timeout: float = 180) -> str:
        """The page's text once it shows every one of `texts`."""
        wanted = json.dumps(list(texts))
        self.wait_for(
            f"{texts}",
            f"{wanted}.every(t => document.body && document.body.innerText.includes(t))",
            timeout,
        )
        return self.text()

    def click_text(self, text: str) -> None:
        """Click the innermost element whose whole text is `text` (the last, if several)."""
        clicked = self.evaluate(
            f"""(() => {{
                const hits = [...document.querySelectorAll('body *')].filter(
                    e => e.textContent.trim() === {json.dumps(text)} &&
                    ![...e.children].some(c => c.textContent.trim() === {json.dumps(text)}));
                if (!hits.length) return false;
                hits[hits.length - 1].click();
                return true;
            }})()"""
        )
        if not clicked:
            raise AssertionError(f"nothing to click shows {text!r}; the page shows:\n{self.text()}")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the window as a person would see it."""
        shot = self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def _until(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not there after {timeout:.0f} s")


def _tabs(port: str) -> list[dict[str, Any]]:
    try:
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
    except httpx.HTTPError:  # not listening yet
        return []
    return [t for t in targets if t["type"] == "page"]
