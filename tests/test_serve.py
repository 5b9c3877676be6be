"""`charlm serve` as users meet it: a real server process on a free loopback port, real HTTP from the
standard library, answers checked against the library's own sampling and scoring of the same checkpoint."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest

pytest.importorskip("starlette", reason="charlm serve needs the serve extra: pip install 'charlm[serve]'")
pytest.importorskip("uvicorn", reason="charlm serve needs the serve extra: pip install 'charlm[serve]'")

from charlm.runs import load_model  # noqa: E402
from conftest import TINY, run_cli, word_text  # noqa: E402
from charlm.sample import SampleConfig, sample_text  # noqa: E402
from charlm.score import score_text  # noqa: E402
from charlm.server.app import Limits  # noqa: E402

LIMITS = Limits()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, run, tmp_path):
        self.port = free_port()
        self.stderr = open(tmp_path / "serve.err", "w+")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "charlm", "serve", "-c", str(run), "--port",
                                      str(self.port), "--device", "cpu"], stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {self.errors()}")
            time.sleep(0.1)

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def conn(self, timeout=30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path):
        c = self.conn()
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.getheader("content-type"), r.read()
        finally:
            c.close()

    def post(self, path, body, raw=False):
        c = self.conn()
        try:
            c.request("POST", path, body if raw else json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.getheader("content-type"), json.loads(r.read())
        finally:
            c.close()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    served = Served(trained_run, tmp_path_factory.mktemp("serve"))
    yield served
    if served.proc.poll() is None:
        served.proc.kill()
        served.proc.wait()


@pytest.fixture(scope="module")
def loaded(trained_run):
    payload, model, vocab, device = load_model(trained_run, "cpu")
    return model, vocab


def read_events(response):
    """Yield (event, data) from a text/event-stream response as the bytes arrive."""
    event, data = "message", ""
    while True:
        line = response.readline()
        if not line:
            return
        line = line.decode("utf-8").rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and data:
            yield event, json.loads(data)
            event, data = "message", ""


def stream(served, body):
    c = served.conn()
    c.request("POST", "/v1/sample", json.dumps({**body, "stream": True}))
    r = c.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    return c, r


def streamed_text(served, body) -> tuple:
    c, r = stream(served, body)
    try:
        events = list(read_events(r))
    finally:
        c.close()
    deltas = [d["text"] for e, d in events if e == "message"]
    return events, deltas


# ---------------------------------------------------------------------------------------------- answers
def test_sample_gives_the_text_charlm_sample_gives(server, loaded):
    model, vocab = loaded
    status, ctype, got = server.post("/v1/sample", {"prime": "the ", "length": 80, "seed": 7,
                                                    "temperature": 0.9, "top_k": 10})
    assert status == 200 and ctype == "application/json"
    want = sample_text(model, vocab, "the ", SampleConfig(length=80, temperature=0.9, top_k=10, seed=7))
    assert got["samples"] == want and got["seed"] == 7
    assert len(got["samples"][0]) == len("the ") + 80


def test_several_samples_and_stop_as_on_the_command_line(server, loaded):
    model, vocab = loaded
    status, _, got = server.post("/v1/sample", {"prime": "a", "length": 120, "seed": 3, "num_samples": 3,
                                                "stop": "fox"})
    want = sample_text(model, vocab, "a", SampleConfig(length=120, seed=3, num_samples=3, stop="fox"))
    assert status == 200 and got["samples"] == want
    assert any(s.endswith("fox") and len(s) < 121 for s in got["samples"])  # the stop text ended one early


def test_without_a_seed_the_server_picks_one_and_reports_it(server):
    _, _, first = server.post("/v1/sample", {"length": 40})
    _, _, again = server.post("/v1/sample", {"length": 40, "seed": first["seed"]})
    assert again["samples"] == first["samples"]


def test_stream_sends_characters_as_they_come_then_the_whole_sample(server):
    c, r = stream(server, {"prime": "the ", "length": 1500, "seed": 11})
    try:
        events = read_events(r)
        assert next(events) == ("start", {"prime": "the ", "seed": 11, "num_samples": 1})
        first = next(events)  # the first characters arrive while the rest is still being generated
        assert first[0] == "message" and first[1]["sample"] == 0 and first[1]["text"]
        rest = list(events)
    finally:
        c.close()
    deltas = [first[1]["text"]] + [d["text"] for e, d in rest if e == "message"]
    assert len(deltas) >= 2
    kind, done = rest[-1]
    assert kind == "done" and done["samples"] == ["the " + "".join(deltas)]
    _, _, whole = server.post("/v1/sample", {"prime": "the ", "length": 1500, "seed": 11})
    assert whole["samples"] == done["samples"]


def test_score_gives_the_library_scores(server, loaded):
    model, vocab = loaded
    text = word_text(lines=25, seed=3)  # ~1200 characters: scored in pieces between other work
    status, _, got = server.post("/v1/score", {"text": text, "top": 3})
    want = score_text(model, vocab, text, "cpu", top=3)
    assert status == 200 and got["chars"] == len(text)
    assert [c["char"] for c in got["characters"]] == list(text)
    assert [c["i"] for c in got["characters"]] == list(range(len(text)))
    for c, lp, rank, top_ids in zip(got["characters"], want.logprob, want.rank, want.top_ids):
        assert c["logprob"] == pytest.approx(float(lp), abs=1e-5)
        assert c["rank"] == int(rank) and [t[0] for t in c["top"]] == [vocab.chars[i] for i in top_ids]
    assert got["nats_per_char"] == pytest.approx(-float(want.logprob.mean()), rel=1e-5)


def test_model_and_health(server, loaded, trained_run):
    model, vocab = loaded
    status, ctype, body = server.get("/v1/model")
    info = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert info["vocab"] == vocab.chars and info["parameters"] == model.num_parameters()
    assert info["model_config"]["hidden"] == model.config.hidden
    status, _, body = server.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


# ---------------------------------------------------------------------------------------------- refusals
BAD = [
    ({"length": LIMITS.max_length + 1}, 400, "length"),
    ({"length": -1}, 400, "length"),
    ({"length": "50"}, 400, "length"),
    ({"num_samples": LIMITS.max_num_samples + 1}, 400, "num_samples"),
    ({"num_samples": 0}, 400, "num_samples"),
    ({"prime": "the " * (LIMITS.max_prime // 4 + 1)}, 400, "prime"),
    ({"prime": "THE"}, 422, "prime"),
    ({"temperature": 0}, 400, "temperature"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"top_k": -2}, 400, "top_k"),
    ({"seed": -1}, 400, "seed"),
    ({"stop": "x" * (LIMITS.max_stop + 1)}, 400, "stop"),
    ({"stream": "yes"}, 400, "stream"),
    ({"checkpoint": "/etc/passwd"}, 400, "checkpoint"),  # no path is ever read from a request
    ("{not json", 400, "body"),
    ("[1, 2]", 400, "body"),
    ("\"text\"", 400, "body"),
    ("x" * (LIMITS.max_body + 1), 413, "body"),
    ("[" * 100_000, 400, "body"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(BAD)])
def test_bad_sample_requests_get_a_4xx_naming_the_field(server, body, status, field):
    got_status, ctype, got = server.post("/v1/sample", body, raw=isinstance(body, str))
    assert (got_status, got["field"]) == (status, field), got
    assert ctype == "application/json", ctype
    assert field in got["error"] and "Traceback" not in got["error"], got["error"]


@pytest.mark.parametrize("body,field", [({"text": "x" * (LIMITS.max_score_chars + 1)}, "text"),
                                        ({"text": "HELLO"}, "text"), ({}, "text"), ({"text": "a", "top": 0}, "top")])
def test_bad_score_requests_get_a_4xx_naming_the_field(server, body, field):
    status, _, got = server.post("/v1/score", body)
    assert 400 <= status < 500 and got["field"] == field


@pytest.mark.slow
def test_score_lists_every_character_of_a_vocabulary_smaller_than_the_default_top(tmp_path):
    corpus = tmp_path / "ab.txt"
    corpus.write_text("ab" * 3000, encoding="utf-8")  # two characters: fewer than the 5 alternatives by default
    result = run_cli("train", corpus, "--out", tmp_path / "run", "--max-steps", "5", "--device", "cpu", *TINY,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    served = Served(tmp_path / "run", tmp_path)
    try:
        status, _, got = served.post("/v1/score", {"text": "abba"})
        assert status == 200, got
        assert got["top"] == 2 and [len(c["top"]) for c in got["characters"]] == [2, 2, 2, 2]
        assert sorted(t[0] for t in got["characters"][0]["top"]) == ["a", "b"]
        status, _, got = served.post("/v1/score", {"text": "abba", "top": 3})  # asked for: still refused
        assert status == 400 and got["field"] == "top" and "between 1 and 2" in got["error"], got
    finally:
        served.proc.kill()
        served.proc.wait()


def test_unknown_routes_and_methods_answer_json(server):
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/sample", 405), ("POST", "/healthz", 405)):
        c = server.conn()
        c.request(method, path)
        r = c.getresponse()
        assert r.status == status and json.loads(r.read())["error"]
        c.close()


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_clients_get_their_own_seeds_text(server, loaded):
    model, vocab = loaded
    # Eight clients at once, with their own seeds and a mix of sampling rules (rows that share a temperature
    # share one softmax in the engine; top-k and top-p rows take charlm.sample.pick's path).
    bodies = [{"prime": "the ", "length": 150, "seed": s, "temperature": (0.8, 0.5)[s % 2]} for s in range(8)]
    bodies[3]["top_k"] = 5
    bodies[6]["top_p"] = 0.9
    results = {}

    def client(i):
        events, deltas = streamed_text(server, bodies[i])
        results[i] = "the " + "".join(deltas)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    for i, body in enumerate(bodies):
        cfg = SampleConfig(**{k: v for k, v in body.items() if k != "prime"})
        assert results[i] == sample_text(model, vocab, "the ", cfg)[0], body
    alone = server.post("/v1/sample", bodies[5])[2]["samples"][0]
    assert results[5] == alone
    assert len(set(results.values())) == 8


def test_extreme_values_sample_as_the_command_line_does(server, loaded):
    model, vocab = loaded
    # Sent at once, so the engine batches them: a temperature whose logits/T overflows fp32 (1e-38) must not
    # turn the shared softmax into NaN for its row or anyone else's.
    bodies = [{"temperature": 1e-38}, {"temperature": 1e-30}, {"temperature": 1e-6}, {"temperature": 100},
              {"top_p": 1e-30}, {"top_k": 1}, {"temperature": 0.8}, {"greedy": True}]
    bodies = [{"prime": "the ", "length": 100, "seed": 13 + i, **b} for i, b in enumerate(bodies)]
    results = {}

    def client(i):
        results[i] = server.post("/v1/sample", bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    greedy = sample_text(model, vocab, "the ", SampleConfig(length=100, greedy=True))[0]
    for i, body in enumerate(bodies):
        status, _, got = results[i]
        assert status == 200, (body, got)
        cfg = SampleConfig(**{k: v for k, v in body.items() if k != "prime"})
        assert got["samples"] == sample_text(model, vocab, "the ", cfg), body
        if (body.get("temperature", 1) <= 1e-30 or body.get("top_p", 1) <= 1e-30 or body.get("top_k") == 1
                or body.get("greedy")):
            assert got["samples"] == [greedy], body  # T -> 0 (or one candidate left) is the most likely character


def test_the_batched_draw_follows_each_rows_distribution_and_never_picks_an_excluded_character():
    """charlm.sample.draw is how the engine (and `charlm sample`) turn one uniform number per row into a
    character: its frequencies must be the probabilities, and a character top-k/top-p took out (probability
    0) must never come, whatever the number, the extremes included."""
    import torch

    from charlm.sample import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = draw(probs[:1].expand(n, -1), u)
    freq = torch.bincount(ids, minlength=6).double() / n
    assert freq[[0, 2, 5]].sum() == 0
    assert torch.allclose(freq, probs[0].double(), atol=0.01), freq  # 0.01 is > 4 standard errors here
    edges = torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64)  # the smallest and largest torch.rand gives
    assert draw(probs[:1].expand(2, -1), edges).tolist() == [1, 4]  # the first and the last possible one
    assert draw(probs[1:].expand(2, -1), edges).tolist() == [4, 4]


def _poisoned_run(trained_run, root, char: str):
    """The trained model with one character made poison: reading it turns that row's hidden state into NaN,
    and no sample ever writes it (its output bias is -1e4), so only a prime can bring it in. The one-hot input
    becomes an equal embedding (the identity) whose row for the character is NaN: a one-hot input's NaN
    column would reach every row through the matrix product (0 x NaN is NaN), a looked-up row only its own."""
    import torch

    from charlm import checkpoint as ckpt

    payload = ckpt.load(trained_run)
    c, size = payload["vocab"].index(char), len(payload["vocab"])
    assert payload["model_config"]["embedding"] == 0
    payload["model_config"] = {**payload["model_config"], "embedding": size}
    embed = torch.eye(size)
    embed[c] = float("nan")
    payload["model"] = {**{k: v.clone() for k, v in payload["model"].items()}, "embed.weight": embed}
    payload["model"]["decoder.bias"][c] = -1e4
    payload = {k: v for k, v in payload.items() if k not in ("path", "format", "charlm_version")}
    out = root / "poisoned"
    out.mkdir()
    ckpt.save(payload, out / "best.pt")
    return out


@pytest.mark.slow
def test_a_request_that_fails_fails_alone(trained_run, tmp_path):
    served = Served(_poisoned_run(trained_run, tmp_path, "z"), tmp_path)
    try:
        other = {"prime": "the ", "length": 600, "seed": 5}
        c, r = stream(served, other)  # in the batch before the failing requests arrive, still running after
        events = read_events(r)
        assert next(events)[0] == "start" and next(events)[0] == "message"
        status, ctype, failed = served.post("/v1/sample", {"prime": "a lazy dog", "length": 50, "seed": 1})
        assert status == 500 and ctype == "application/json" and "not finite" in failed["error"], failed
        events_failed, deltas = streamed_text(served, {"prime": "lazy", "length": 50, "num_samples": 2})
        kind, data = events_failed[-1]
        assert kind == "error" and "not finite" in data["error"] and deltas == []
        rest = list(events)
        c.close()
        assert rest[-1][0] == "done", rest[-1]
        alone = served.post("/v1/sample", other)[2]["samples"]
        assert rest[-1][1]["samples"] == alone
        assert served.get("/healthz")[0] == 200 and "Traceback" not in served.errors()
    finally:
        served.proc.kill()
        served.proc.wait()


def test_a_model_step_that_raises_for_one_request_fails_only_that_request(loaded, monkeypatch):
    import copy

    import torch

    from charlm.server.engine import Engine, Job

    model, vocab = loaded
    model = copy.deepcopy(model)
    victim_prime, other_prime = "the quick ", "a dog "
    from charlm.model import start_state
    from charlm.score import default_context_id

    # the victim's row after its prime, which every job reads after the default context
    _, victim_state = model(torch.as_tensor(vocab.encode(victim_prime)).unsqueeze(0),
                            start_state(model, 1, None, default_context_id(vocab)))
    real_step = model.step

    def step(ids, state):  # a fault at the model-step boundary, for the victim's row only
        rows = state.shape[1]
        if any(torch.allclose(state[:, r], victim_state[:, 0], atol=1e-5) for r in range(rows)):
            raise RuntimeError("injected fault for one row")
        return real_step(ids, state)

    monkeypatch.setattr(model, "step", step)

    def run(*jobs):
        ends = {}
        done = threading.Event()

        def deliver(name):
            texts = []

            def on(kind, data):
                if kind == "text":
                    texts.append(data[0])
                else:
                    ends[name] = (kind, data, "".join(texts))
                    if len(ends) == len(jobs):
                        done.set()
            return on

        engine = Engine(model, vocab, "cpu")
        for name, prime, cfg in jobs:  # queued before the engine starts: both join the same first step
            engine.submit(Job(deliver=deliver(name), rows=1, cfg=cfg, prime_ids=vocab.encode(prime)))
        engine.start()
        assert done.wait(60)
        engine.close()
        return ends

    other = ("other", other_prime, SampleConfig(length=200, seed=8))
    both = run(("victim", victim_prime, SampleConfig(length=200, seed=9)), other)
    assert both["victim"][0] == "failed" and "injected fault" in both["victim"][1]
    alone = run(other)
    assert alone["other"][0] == "done" and both["other"][:2] == alone["other"][:2]
    assert both["other"][2] == alone["other"][2] and len(alone["other"][2]) == 200


def _raw_request(server, body: dict) -> socket.socket:
    """A client that sends its request and then reads nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    data = json.dumps(body)
    sock.sendall(f"POST /v1/sample HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n{data}".encode())
    return sock


def _health(server) -> dict:
    return json.loads(server.get("/healthz")[2])


def test_clients_that_leave_have_their_rows_dropped(server):
    before = _health(server)["steps"]
    c, r = stream(server, {"length": LIMITS.max_length, "num_samples": 4, "seed": 2})
    events = read_events(r)
    next(events), next(events)
    gone = _raw_request(server, {"length": LIMITS.max_length, "num_samples": 4, "seed": 3})  # wants JSON
    time.sleep(0.1)
    c.close()  # mid-stream
    gone.close()  # before its answer
    deadline = time.monotonic() + 20
    while _health(server)["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    health = _health(server)
    assert health["active_rows"] == 0 and health["queued"] == 0
    # Had either request run to its end, the engine would have taken max_length steps.
    assert health["steps"] - before < LIMITS.max_length


def test_a_client_that_stops_reading_stalls_nobody(server):
    idle = _raw_request(server, {"length": LIMITS.max_length, "num_samples": LIMITS.max_num_samples,
                                 "stream": True, "seed": 1})
    try:
        start = time.monotonic()
        status, _, got = server.post("/v1/sample", {"prime": "the ", "length": 50, "seed": 4})
        assert status == 200 and len(got["samples"][0]) == 54
        assert time.monotonic() - start < 20
    finally:
        idle.close()


# ---------------------------------------------------------------------------------------------- the page
@pytest.fixture
def page(server, tmp_path):
    """A headless Chromium driven over the DevTools protocol, with the explain page's test client."""
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it) to load the page in")
    devtools = pytest.importorskip("test_browser", reason="the DevTools client lives in tests/test_browser.py")
    browser = devtools.Browser(tmp_path / "profile")
    yield browser
    browser.close()


def _text(browser, element_id: str) -> str:
    """The element's text; empty while the page is still loading and it does not exist yet."""
    return browser.js(f"(document.getElementById({json.dumps(element_id)}) || {{}}).textContent || ''")


def _until(browser, element_id: str, contains: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while contains not in _text(browser, element_id):
        assert time.monotonic() < deadline, f"#{element_id} never showed {contains!r}: {_text(browser, element_id)!r}"
        time.sleep(0.05)
    return _text(browser, element_id)


def test_the_page_is_self_contained(server):
    status, ctype, html = server.get("/")
    assert status == 200 and ctype.startswith("text/html")
    assert b"http://" not in html and b"https://" not in html and b"<script src" not in html


def test_typing_a_prime_and_clicking_generate_streams_the_sample(server, page):
    page.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/")
    _until(page, "model", "parameters")  # it fetched /v1/model
    page.js("document.getElementById('prime').focus()")
    page.call("Input.insertText", text="the dog")
    page.js("document.getElementById('seed').value = '21'; document.getElementById('length').value = '90'")
    x, y = page.centre("#go")
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    assert "90 characters in" in _until(page, "status", "characters in")
    _, _, want = server.post("/v1/sample", {"prime": "the dog", "length": 90, "seed": 21})
    assert _text(page, "out") == want["samples"][0]
    assert page.problems() == []


def test_a_link_fills_the_page_and_starts(server, page):
    page.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/?prime={quote('the ')}&seed=9&length=120&go")
    _until(page, "status", "characters in")
    _, _, want = server.post("/v1/sample", {"prime": "the ", "length": 120, "seed": 9})
    assert _text(page, "out") == want["samples"][0]
    page.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/?prime=THE&go")  # outside the vocabulary
    assert "not in the model's vocabulary" in _until(page, "status", "vocabulary")


def test_a_text_model_has_no_items(server):
    status, _, body = server.post("/v1/items", {"count": 3})
    assert status == 400 and "/v1/sample" in body["error"]


# ---------------------------------------------------------------------------------------------- stopping
def test_a_taken_port_is_one_line_of_error(server, trained_run):
    result = run_cli("serve", "-c", trained_run, "--port", server.port, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"cannot listen on 127.0.0.1:{server.port}" in result.stderr


def test_sigterm_stops_the_server_cleanly_mid_stream(server):
    c, r = stream(server, {"length": LIMITS.max_length, "seed": 1})
    events = read_events(r)
    next(events)
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=20)
    rest = list(events)  # the open stream was ended, not cut: its last event says why
    c.close()
    errors = server.errors()
    assert code == 0, errors
    assert "Traceback" not in errors and "stopped" in errors, errors
    assert rest[-1][0] == "error" and "shutting down" in rest[-1][1]["error"]




# ---------------------------------------------------------------------------------------------- items
@pytest.fixture(scope="module")
def item_server(tmp_path_factory):
    """A model trained on a list of names (detected as a list), served."""
    from test_items import names

    root = tmp_path_factory.mktemp("items")
    corpus = root / "names.txt"
    corpus.write_text("\n".join(names()) + "\n", encoding="utf-8")
    out = root / "run"
    trained = run_cli("train", corpus, "--out", out, "--max-steps", "120", "--lr", "1e-2", *TINY, cwd=root)
    assert trained.returncode == 0, trained.stderr
    served = Served(out, root)
    yield served, out, root, set(names())
    if served.proc.poll() is None:
        served.proc.kill()
        served.proc.wait()


def test_items_are_the_items_charlm_sample_gives_on_the_same_seed(item_server):
    served, run, root, known = item_server
    status, _, body = served.post("/v1/items", {"count": 12, "seed": 5, "prime": "Ka"})
    assert status == 200, body
    cli = run_cli("sample", "-c", run, "--num-samples", "12", "--seed", "5", "--prime", "Ka", "--json",
                  "--device", "cpu", cwd=root)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)["items"]
    assert body["items"] == expected and len(expected) == 12 and body["complete"]
    assert all(i["text"].startswith("Ka") and i["new"] and i["text"] not in known for i in body["items"])
    assert all(i["logprob"] < 0 for i in body["items"])


def test_items_with_copies_allowed_say_which_are_new(item_server):
    served, _, _, known = item_server
    status, _, body = served.post("/v1/items", {"count": 40, "seed": 1, "new_only": False, "temperature": 0.5})
    assert status == 200, body
    assert body["copies_skipped"] == 0 and len(body["items"]) == 40
    assert all(i["new"] == (i["text"] not in known) for i in body["items"])
    assert any(not i["new"] for i in body["items"])  # a model of 400 names at T=0.5 gives back some of them


def test_items_without_a_seed_report_the_one_that_gives_them_again(item_server):
    served = item_server[0]
    status, _, first = served.post("/v1/items", {"count": 5})
    assert status == 200 and isinstance(first["seed"], int)
    _, _, again = served.post("/v1/items", {"count": 5, "seed": first["seed"]})
    assert again["items"] == first["items"]


@pytest.mark.parametrize("body,status,field", [
    ({"count": 0}, 400, "count"),
    ({"count": LIMITS.max_items + 1}, 400, "count"),
    ({"prime": "Ka\nRi"}, 400, "prime"),
    ({"prime": "K@"}, 422, "prime"),
    ({"min_length": 9, "max_length": 3}, 400, "max_length"),
    ({"length": 5}, 400, "length"),
])
def test_bad_item_requests_get_a_4xx_naming_the_field(item_server, body, status, field):
    served = item_server[0]
    code, ctype, answer = served.post("/v1/items", body)
    assert (code, answer["field"]) == (status, field), answer
    assert ctype == "application/json" and answer["error"]


def test_the_page_of_a_list_model_shows_new_items(item_server, tmp_path):
    served, _, _, known = item_server
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it) to load the page in")
    devtools = pytest.importorskip("test_browser", reason="the DevTools client lives in tests/test_browser.py")
    browser = devtools.Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=f"http://127.0.0.1:{served.port}/?seed=4&length=6&go")
        assert "6 new items" in _until(browser, "status", "new items")
        _, _, want = served.post("/v1/items", {"count": 6, "seed": 4})
        shown = browser.js("[...document.querySelectorAll('#out li')].map(li => li.firstChild.textContent)")
        assert shown == [i["text"] for i in want["items"]] and not set(shown) & known
        assert _text(browser, "length-label") == "items" and browser.problems() == []
    finally:
        browser.close()
