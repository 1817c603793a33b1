"""A page opened in headless Chromium, as a responder's browser opens it: what its scripts threw,
what it wrote to the console (a Content-Security-Policy refusal included), and the answers to
questions asked of its rendered DOM.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages ended by a NUL byte, commands on fd 3, answers on fd 4), so no port, no driver and no
package beyond Debian's ``chromium``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REQUIRE = "PGWARDEN_REQUIRE_BROWSER"  # set by `make test`: a missing chromium fails, not skips


def chromium() -> str:
    """The chromium executable, or a skip that says how to get it (a failure under
    ``make test``, whose ``sysdeps`` installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = (
            "chromium is not installed, so the report is not rendered in a browser: "
            "`make sysdeps` installs it (apt-get install chromium)"
        )
        if os.environ.get(REQUIRE):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@dataclass
class Rendered:
    """What a page did while loading, and what was asked of it afterwards."""

    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    console: list[str] = field(default_factory=list)  # console and browser log messages
    answer: Any = None
    screenshot: bytes | None = None


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc, self.out, self.inp = proc, to_browser, from_browser
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 10.0) -> dict[str, Any]:  # fmt: skip
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self.next_id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def wait(self, want: Any, timeout: float = 10.0) -> dict[str, Any]:
        """The next message ``want`` accepts; events passed on the way are kept."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "method" in msg:
                    self.events.append(msg)
                if want(msg):
                    return dict(msg)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                raise TimeoutError("chromium did not answer over the DevTools pipe")
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
            self.buf += chunk


def render(url: str, question: str = "null", *, screenshot: bool = False,
           width: int = 1200, height: int = 900) -> Rendered:  # fmt: skip
    """Open ``url``; once loaded, evaluate the JavaScript expression ``question`` against
    its DOM (from outside the page: the page's own policy forbids scripts)."""
    (out,) = render_pages([url], question, screenshot=screenshot, width=width, height=height)
    return out


def render_pages(urls: Sequence[str], question: str = "null", *, screenshot: bool = False,
                 width: int = 1200, height: int = 900) -> list[Rendered]:  # fmt: skip
    """:func:`render` for several pages, each in a tab of its own, in one browser."""
    exe = chromium()
    cmd_r, cmd_w = os.pipe()  # we write commands, chromium reads them on fd 3
    ans_r, ans_w = os.pipe()  # chromium writes answers on fd 4
    # Above 4, so that the redirections cannot overwrite one with the other (and bash, not
    # sh: dash takes only one-digit descriptors).
    cmd_r, ans_w = _high(cmd_r), _high(ans_w)
    with (
        tempfile.TemporaryDirectory(prefix="pgwarden-chromium-") as profile,
        tempfile.TemporaryFile() as log,
    ):
        args = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{ans_w}', exe, *args],
            pass_fds=(cmd_r, ans_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        os.close(cmd_r)
        os.close(ans_w)
        pipe = _Pipe(proc, cmd_w, ans_r)
        try:
            return [_render(pipe, url, question, screenshot) for url in urls]
        except (RuntimeError, TimeoutError) as exc:
            log.seek(0)
            said = log.read().decode(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"{exc}; chromium's last words:\n" + "\n".join(said)) from exc
        finally:
            with contextlib.suppress(RuntimeError, TimeoutError, OSError):
                pipe.send("Browser.close", timeout=5)
            os.close(cmd_w)
            os.close(ans_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _high(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def _render(pipe: _Pipe, url: str, question: str, screenshot: bool) -> Rendered:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime", "Log", "Page"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.send("Page.navigate", {"url": url}, session=session)
    pipe.wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
    answer = pipe.send(
        "Runtime.evaluate",
        {"expression": question, "returnByValue": True, "awaitPromise": True},
        session=session,
    )
    if "exceptionDetails" in answer:
        raise RuntimeError(f"the question failed: {answer['exceptionDetails']}")
    shot = None
    if screenshot:
        data = pipe.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
            session=session, timeout=30,
        )["data"]  # fmt: skip
        shot = base64.b64decode(data)
    out = Rendered(answer=answer["result"].get("value"), screenshot=shot)
    for ev in pipe.events:
        if ev.get("sessionId") != session:
            continue
        p = ev.get("params", {})
        if ev["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.errors.append(d.get("exception", {}).get("description") or d.get("text", ""))
        elif ev["method"] == "Runtime.consoleAPICalled":
            out.console.append(
                f"console.{p['type']}: " + " ".join(str(a.get("value", "")) for a in p["args"])
            )
        elif ev["method"] == "Log.entryAdded":
            e = p["entry"]
            out.console.append(f"{e['source']} {e['level']}: {e['text']}")
    return out


def file_url(path: Path) -> str:
    return path.resolve().as_uri()
