"""The `charlm explain --html` page in a real headless Chromium, driven over the DevTools protocol.

No network and no new dependency: Chromium listens on a local debugging port and a few lines of standard
library (a minimal WebSocket client) send it protocol commands. Real input events move the mouse and the
keyboard focus; the page's console and uncaught exceptions are collected and must stay empty.

Set CHARLM_SCREENSHOT=path to keep the screenshot of the hovered page (docs/explain.png is made this way).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from conftest import invoke, word_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the HTML page's browser tests "
                                 "need Debian's chromium package (apt-get install chromium; .ci/run installs it)"),
              pytest.mark.usefixtures("one_thread")]


# ============================================================================================== a tiny DevTools client
class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames out (masked), frames in."""

    def __init__(self, url: str):
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head.decode(errors="replace")

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = self.sock.recv(n - len(data))
            if not part:
                raise ConnectionError("the browser closed the DevTools connection")
            data += part
        return data

    def send(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                  if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode in (0x1, 0x2, 0x0):
                message += payload
                if b0 & 0x80:
                    return message.decode()


class Browser:
    """A headless Chromium with one page, and the protocol events it has sent so far."""

    def __init__(self, profile: Path):
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                "--remote-debugging-port=0", "--window-size=1000,720", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port, deadline = None, time.time() + 60
        while port is None and time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            port = int(found.group(1)) if found else None
        assert port, "chromium did not open its debugging port"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = WebSocket(page["webSocketDebuggerUrl"])
        self.next_id, self.events = 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, (method, message["error"])
                return message.get("result", {})
            self.events.append(message)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, path: Path) -> None:
        self.call("Page.navigate", url=path.resolve().as_uri())
        deadline = time.time() + 60
        while self.js("document.readyState") != "complete" and time.time() < deadline:
            time.sleep(0.05)

    def problems(self) -> list:
        """Console errors and warnings, uncaught exceptions and error log entries seen so far."""
        self.call("Runtime.evaluate", expression="0")  # drain what is queued
        found = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                found.append(p["exceptionDetails"].get("text"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                found.append(p)
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                found.append(p["entry"])
        return found

    def centre(self, selector: str) -> tuple:
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView("
                      "{block: 'center'}); const r = e.getBoundingClientRect(); return [r.left + r.width / 2, "
                      "r.top + r.height / 2]; })()")
        return tuple(box)

    def hover(self, selector: str) -> None:
        x, y = self.centre(selector)
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def _rows(runner, checkpoint, text: str) -> list:
    result = invoke(runner, "score", "-", "-c", checkpoint, input=text)
    return [json.loads(line) for line in result.stdout.splitlines()]


# ============================================================================================== tests
def test_hover_focus_and_unit_picker_in_a_real_browser(browser, runner, trained_run, tmp_path):
    text = "the quick brown fox runs into the dark green forest\nand over a lazy dog\n" * 3
    page = tmp_path / "explain.html"
    result = invoke(runner, "explain", text, "-c", trained_run, "--html", page, "--neurons")
    assert result.exit_code == 0, result.stderr
    browser.open(page)
    assert browser.js("document.querySelectorAll('#text span.c').length") == len(text)
    assert browser.js("getComputedStyle(document.getElementById('tip')).display") == "none"
    assert browser.js("getComputedStyle(document.getElementById('pager')).display") == "none"  # one page only

    # hovering a character shows its probability and the model's top 5, the numbers `charlm score` gives
    rows = _rows(runner, trained_run, text)
    i = 4  # the 'q' of quick: a real choice for the model
    browser.hover(f'#text span.c[data-i="{i}"]')
    assert browser.js("getComputedStyle(document.getElementById('tip')).display") != "none"
    tip = browser.js("document.getElementById('tip').innerText")
    assert tip.startswith(f"#{i} {json.dumps(text[i])}") and f"rank {rows[i]['rank'] + 1}" in tip
    assert float(re.search(r"p=([0-9.e-]+)", tip).group(1)) == pytest.approx(math.exp(rows[i]["logprob"]), rel=5e-3)
    shown = browser.js("[...document.querySelectorAll('#tip .row.top')].map(r => [r.children[0].textContent, "
                       "r.children[2].textContent])")
    assert [c for c, _ in shown] == [c if c != "\n" else "\u21b5" for c, _ in rows[i]["top"]]
    assert [float(p) for _, p in shown] == pytest.approx([p for _, p in rows[i]["top"]], abs=1.5e-3)
    tops = [c for c, _ in rows[i]["top"]]  # the scored character is marked when it is among the predictions
    assert browser.js("document.querySelectorAll('#tip .row.hit').length") == (1 if text[i] in tops else 0)

    # keyboard: focus a character, the arrow key moves focus and the tooltip follows
    browser.js('document.querySelector(\'#text span.c[data-i="10"]\').focus()')
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="ArrowRight", code="ArrowRight",
                 windowsVirtualKeyCode=39)
    browser.call("Input.dispatchKeyEvent", type="keyUp", key="ArrowRight", code="ArrowRight",
                 windowsVirtualKeyCode=39)
    assert browser.js("document.activeElement.dataset.i") == "11"
    assert browser.js("document.getElementById('tip').innerText").startswith(f"#11 {json.dumps(text[11])}")

    # the unit picker recolours the text by the chosen unit: red where it is high, blue where it is low
    before = browser.js("[...document.querySelectorAll('#text span.c')].map(s => s.style.backgroundColor)")
    options = browser.js("[...document.getElementById('mode').options].map(o => o.textContent)")
    assert options[0] == "surprisal" and len(options) > 1 and "layer 1 unit" in options[1]
    browser.js("(() => { const s = document.getElementById('mode'); s.value = '0'; "
               "s.dispatchEvent(new Event('change')); })()")
    after = browser.js("[...document.querySelectorAll('#text span.c')].map(s => s.style.backgroundColor)")
    assert after != before
    unit = int(re.search(r"unit (\d+)", options[1]).group(1))
    from charlm import checkpoint as ckpt
    from charlm.runs import model_from_payload
    from charlm.neurons import unit_values
    from charlm.score import default_context_id

    model, vocab = model_from_payload(ckpt.load(trained_run))
    values = unit_values(model.eval(), vocab.encode(text), [unit], "cpu", default_context_id(vocab))[:, 0]
    rgb = lambda s: tuple(int(v) for v in re.findall(r"\d+", s)[:3])  # noqa: E731
    colours = [rgb(c) for c in after]
    assert len(colours) == len(values) and values.max() > values.min()
    for v, (r, g, b) in zip(values, colours):  # every character: red above zero, blue below, white at it
        assert (r == 255 and g == b) if v > 0 else (b == 255 and r == g), (float(v), (r, g, b))
    # and the colour follows the value: ordered by activation, red - blue never falls
    warmth = [colours[i][0] - colours[i][2] for i in np.argsort(values, kind="stable")]
    assert warmth == sorted(warmth) and warmth[-1] > warmth[0]
    assert "unit" in browser.js("document.getElementById('legend').innerText")
    assert browser.problems() == []


def test_korean_emoji_and_a_long_paged_text(browser, runner, tmp_path):
    # an untrained model over a vocabulary with Hangul and emoji: this test is about drawing, not learning
    from charlm import checkpoint as ckpt
    from charlm.model import CharRNN, ModelConfig

    chars = "".join(sorted(set("안녕하세요 세계 😀 hello 🎉\n" + word_text(40))))
    torch.manual_seed(0)
    config = ModelConfig(len(chars), hidden=16, layers=1)
    run = tmp_path / "mixed.pt"
    ckpt.save({"model_config": config.to_dict(), "vocab": chars, "model": CharRNN(config).state_dict()}, run)
    text = "안녕하세요 😀 the fox 🎉\n"
    page = tmp_path / "mixed.html"
    assert invoke(runner, "explain", text, "-c", run, "--html", page).exit_code == 0
    browser.open(page)
    spans = browser.js("[...document.querySelectorAll('#text span.c')].map(s => s.textContent)")
    assert spans == [c if c != "\n" else "\u21b5" for c in text]  # one element per code point, emoji whole
    browser.hover('#text span.c[data-i="6"]')
    assert browser.js("document.getElementById('tip').innerText").startswith('#6 "😀"')

    long_text = word_text(3000, seed=7)  # about 117,000 characters: drawn a page at a time
    assert len(long_text) > 100_000
    big = tmp_path / "long.html"
    assert invoke(runner, "explain", "--file", _write(tmp_path / "long.txt", long_text), "-c", run,
                  "--html", big).exit_code == 0
    browser.open(big)
    pages = browser.js("window.charlmExplain.pages()")
    assert pages == -(-len(long_text) // 20_000)
    assert browser.js("getComputedStyle(document.getElementById('pager')).display") != "none"
    assert browser.js("document.querySelectorAll('#text span.c').length") == 20_000
    browser.js("document.getElementById('next').click()")
    assert browser.js("document.querySelector('#text span.c').dataset.i") == "20000"
    browser.js(f"window.charlmExplain.focusChar({len(long_text) - 1})")
    assert browser.js("document.activeElement.dataset.i") == str(len(long_text) - 1)
    assert browser.problems() == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _pixels(png: bytes) -> np.ndarray:
    """An 8-bit RGB(A) PNG (what Chromium captures) as a height x width x channels array: zlib and the five
    row filters of the PNG spec, enough to look at a screenshot without an imaging library."""
    import zlib

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pos, idat, head = 8, b"", None
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, colour = head[:4]
    assert depth == 8 and colour in (2, 6), head
    ch = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * ch)
    out = np.zeros((height, width * ch), dtype=np.int32)
    for y in range(height):
        f, row = raw[y, 0], raw[y, 1:].astype(np.int32)
        up = out[y - 1] if y else np.zeros_like(row)
        if f in (0, 2):
            out[y] = (row + (up if f == 2 else 0)) % 256
            continue
        line = np.zeros(width * ch + ch, dtype=np.int32)  # ch leading zeros stand for "left of the row"
        upl = np.concatenate([np.zeros(ch, dtype=np.int32), up])
        for x in range(width * ch):
            a, b, c = line[x], upl[x + ch], upl[x]
            if f == 1:
                pred = a
            elif f == 3:
                pred = (a + b) // 2
            else:  # Paeth
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            line[x + ch] = (row[x] + pred) % 256
        out[y] = line[ch:]
    return out.reshape(height, width, ch)


def test_screenshot_of_a_hovered_page(browser, runner, trained_run, tmp_path):
    """A picture of the page with a tooltip open (kept as docs/explain.png when CHARLM_SCREENSHOT is set)."""
    checkpoint = os.environ.get("CHARLM_SCREENSHOT_MODEL", str(trained_run))
    source = os.environ.get("CHARLM_SCREENSHOT_TEXT")
    text = Path(source).read_text(encoding="utf-8") if source else word_text(12, seed=1)
    page = tmp_path / "shot.html"
    assert invoke(runner, "explain", "--file", _write(tmp_path / "t.txt", text), "-c", checkpoint,
                  "--html", page, "--unknown", "skip").exit_code == 0
    browser.open(page)
    plain = _pixels(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    browser.hover(f'#text span.c[data-i="{min(len(text) - 1, int(os.environ.get("CHARLM_SCREENSHOT_AT", 30)))}"]')
    shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    hovered = _pixels(shot)
    view = tuple(browser.js("[window.innerHeight, window.innerWidth]"))
    assert hovered.shape[:2] == plain.shape[:2] == view  # the whole viewport, as the page lays it out
    # the picture shows the tooltip where the page put it: its box changed, the page far from it did not
    left, top, width, height = browser.js("(() => { const r = document.getElementById('tip')"
                                          ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
    assert width > 20 and height > 20
    box = (slice(int(top) + 2, int(top + height) - 2), slice(int(left) + 2, int(left + width) - 2))
    changed = (hovered != plain).any(axis=2)
    assert changed[box].mean() > 0.3, "the tooltip's box looks as it did before the hover"
    away = np.ones_like(changed)
    away[max(0, int(top) - 40):int(top + height) + 40, max(0, int(left) - 40):int(left + width) + 40] = False
    assert changed[away].mean() < 0.05, "the hover repainted the page outside the tooltip"
    if os.environ.get("CHARLM_SCREENSHOT"):
        Path(os.environ["CHARLM_SCREENSHOT"]).write_bytes(shot)
    assert browser.problems() == []
