"""The HTTP server of `charlm serve`: a Starlette app in front of the batching engine (charlm/server/engine.py).

    POST /v1/sample        {"prime", "length", "temperature", "top_k", "top_p", "greedy", "seed", "stop",
                            "num_samples", "unknown", "stream", "tag"} -> {"samples": [...], ...}, or with
                            "stream": true a text/event-stream of the characters as they are generated
    POST /v1/score         {"text", "top", "tag"} -> per-character log-probabilities (as `charlm score`)
    POST /v1/items         {"count", "prime", "new_only", "min_length", "max_length", "temperature", "top_k",
                            "top_p", "seed", "unknown", "tag"} -> {"items": [{"text", "logprob", "new"}], ...}:
                            new items from a model of a list (as `charlm sample` on one)

"tag" (a tagged model, `train --tag-by`): the tag to write or read in; an unknown one is a 422 naming the
known tags, any tag on an untagged model a 400.
    GET  /v1/model         the `charlm info` data
    GET  /healthz          liveness and load
    GET  /                 a page to type a prime and watch the text stream

Every refusal is a 4xx JSON body {"error": message, "field": name}: the body as a whole ("body": too large,
not JSON, not an object) or the one field at fault. Handlers render JSON; the engine computes.
Starlette and uvicorn are imported here only, so only `charlm serve` needs the `serve` extra.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from charlm.errors import CharlmError
from charlm.server.engine import Busy, Engine, Job
from charlm.sample import SampleConfig
from charlm.vocab import unknown_message


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for: each keeps one request's time and memory small next to the
    others'. At ~1000 characters per second per stream on a 2-core CPU, the largest sample takes seconds."""

    max_length: int = 4000  # new characters per sample
    max_num_samples: int = 16  # rows one request may take of the batch
    max_prime: int = 4000  # characters; warmed 256 at a time between steps
    max_stop: int = 200  # characters of the stop text
    max_body: int = 256 * 1024  # bytes: room for the longest prime or text in JSON-escaped UTF-8
    max_score_chars: int = 20_000  # characters per /v1/score request (the response lists each of them)
    max_top: int = 20  # alternatives listed per scored character
    max_items: int = 200  # items per /v1/items request: each round draws twice as many rows as it asks for
    max_rows: int = 64  # rows in one model step; requests beyond them wait their turn
    max_queued: int = 256  # requests waiting for rows; beyond them a 503 asks the client to retry


class ApiError(Exception):
    def __init__(self, status: int, field: Optional[str], message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def _error(status: int, field: Optional[str], message: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


# ---------------------------------------------------------------------------------------------- request bodies
async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read no further than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, "body", f"the request body is over {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, "body", f"the request body is over {limit} bytes")
    try:
        data = json.loads(bytes(body).decode("utf-8")) if body else {}
    except UnicodeDecodeError:
        raise ApiError(400, "body", "the body is not UTF-8")
    except json.JSONDecodeError as exc:
        raise ApiError(400, "body", f"the body is not valid JSON ({exc.msg} at character {exc.pos})")
    except RecursionError:
        raise ApiError(400, "body", "the body nests too deeply to be a request")
    if not isinstance(data, dict):
        raise ApiError(400, "body", "the body must be a JSON object")
    return data


class Fields:
    """Typed, bounded access to a JSON object's fields; each failure names its field."""

    def __init__(self, data: dict, known: tuple):
        extra = sorted(set(data) - set(known))
        if extra:
            raise ApiError(400, extra[0], f"unknown field {extra[0]!r}; the fields are: {', '.join(known)}")
        self.data = data

    def int(self, name: str, default, lo: int, hi: Optional[int] = None):
        value = self.data.get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, name, f"{name} must be an integer, got {json.dumps(value)}")
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ApiError(400, name, f"{name} must be {bound}, got {value}")
        return value

    def float(self, name: str, default: float, ok, rule: str) -> float:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ApiError(400, name, f"{name} must be {rule}, got {json.dumps(value)}")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(400, name, f"{name} must be true or false, got {json.dumps(value)}")
        return value

    def str(self, name: str, default, most: int, choices: Optional[tuple] = None):
        value = self.data.get(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            raise ApiError(400, name, f"{name} must be a string, got {json.dumps(value)[:40]}")
        if len(value) > most:
            raise ApiError(400, name, f"{name} must be at most {most} characters, got {len(value)}")
        if choices and value not in choices:
            raise ApiError(400, name, f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value


def known_text(vocab, text: str, field: str, unknown: str) -> str:
    """The text with characters outside the vocabulary refused (422 naming them) or dropped."""
    missing = vocab.unknown(text)
    if missing and unknown == "skip":
        return "".join(c for c in text if c in vocab)
    if missing:
        raise ApiError(422, field, unknown_message(field, missing, 'remove them or send "unknown": "skip"'))
    return text


ITEM_FIELDS = ("count", "prime", "new_only", "min_length", "max_length", "temperature", "top_k", "top_p", "seed",
               "unknown", "tag")
SAMPLE_FIELDS = ("prime", "length", "temperature", "top_k", "top_p", "greedy", "seed", "stop", "num_samples",
                 "unknown", "stream", "tag")


def tag_field(f: Fields, info: dict) -> Optional[int]:
    """The id of a body's "tag" (None when not sent): a 400 for a model without tags, a 422 for a tag the
    model does not know (the message lists the ones it does)."""
    from charlm.tags import TagSet, no_tags_message

    name = f.str("tag", None, 200)
    if name is None:
        return None
    tags = TagSet.from_payload({"corpus": info.get("corpus", {})})
    if tags is None:
        raise ApiError(400, "tag", no_tags_message("this model").replace("--tag", '"tag"'))
    try:
        return tags.id(name)
    except CharlmError as exc:
        raise ApiError(422, "tag", str(exc))


def sampling_fields(f: Fields, vocab) -> tuple:
    """(temperature, top_k, top_p, seed) of a /v1/sample or /v1/items body, with `charlm sample`'s defaults;
    without a seed, one of the server's choosing, returned so the answer can be had again."""
    temperature = f.float("temperature", 0.8, lambda t: 0 < t <= 100, "a number above 0 (at most 100)")
    top_k = min(f.int("top_k", 0, 0), vocab.size)
    top_p = f.float("top_p", 1.0, lambda p: 0 < p <= 1, "a number in (0, 1]")
    seed = f.int("seed", None, 0, 2**63 - 1)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return temperature, top_k, top_p, seed


def sample_request(data: dict, vocab, limits: Limits, info: Optional[dict] = None):
    """(prime, SampleConfig, stream, tag id or None) from a /v1/sample body; the defaults are `charlm
    sample`'s."""
    f = Fields(data, SAMPLE_FIELDS)
    tag = tag_field(f, info or {})
    unknown = f.str("unknown", "error", 5, ("error", "skip"))
    prime = f.str("prime", "", limits.max_prime)
    prime = known_text(vocab, prime, "prime", unknown)
    temperature, top_k, top_p, seed = sampling_fields(f, vocab)
    cfg = SampleConfig(
        length=f.int("length", 500, 0, limits.max_length), temperature=temperature, top_k=top_k, top_p=top_p,
        greedy=f.bool("greedy", False),
        num_samples=f.int("num_samples", 1, 1, limits.max_num_samples),
        seed=seed,
        stop=f.str("stop", None, limits.max_stop) or None,
    )
    return prime, cfg, f.bool("stream", False), tag


# ---------------------------------------------------------------------------------------------- the app
class Server:
    """Holds the engine, the model's description and the limits; its methods are the route handlers."""

    def __init__(self, engine: Engine, info: dict, limits: Limits, page: str, items=None):
        self.engine, self.info, self.limits, self.page = engine, info, limits, page
        self.items = items  # runs.ItemList of a model of a list whose training list was found, else None
        self.vocab = engine.vocab
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.engine.publish = self._publish
        self.engine.start()

    def _publish(self, events: list) -> None:
        """Engine thread -> event loop: one wake-up per engine turn, however many requests it served."""
        try:
            self.loop.call_soon_threadsafe(_deliver_all, events)
        except RuntimeError:  # the loop has closed: the server is gone
            pass

    def _job(self, **kwargs):
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(deliver=lambda kind, data: queue.put_nowait((kind, data)), **kwargs)
        try:
            self.engine.submit(job)
        except Busy as exc:
            raise ApiError(503, None, f"busy: {exc}; try again shortly")
        return job, queue

    async def sample(self, request: Request) -> Response:
        data = await read_json(request, self.limits.max_body)
        prime, cfg, stream, tag = sample_request(data, self.vocab, self.limits, self.info)
        # A JSON answer needs its text only at the end: the engine then hands it over once, not every 10 ms.
        job, queue = self._job(rows=cfg.num_samples, cfg=cfg, prime_ids=self.vocab.encode(prime), stream=stream,
                               tag=tag)
        head = {"prime": prime, "seed": cfg.seed, "num_samples": cfg.num_samples,
                **({"tag": data["tag"]} if tag is not None else {})}
        if stream:
            return StreamingResponse(self._events(job, queue, prime, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [[prime] for _ in range(cfg.num_samples)]
        done = await _until_done(request, job, queue, texts)
        return JSONResponse({"samples": ["".join(t) for t in texts], **head, **done})

    async def _events(self, job: Job, queue: asyncio.Queue, prime: str, head: dict):
        """Server-sent events: `start`, then unnamed events {"sample": i, "text": delta} as characters come
        (coalesced when the client reads slower than the model writes), then `done` with the whole samples.
        A client that goes away cancels the job: its rows leave the batch before the next step."""
        texts = [[prime] for _ in range(job.rows)]
        try:
            yield _sse(head, "start")
            while True:
                kind, data = await queue.get()
                pending = [[] for _ in range(job.rows)]
                while kind == "text":
                    for r, text in enumerate(data):
                        pending[r].append(text)
                    if queue.empty():
                        kind = None
                        break
                    kind, data = queue.get_nowait()
                for r, parts in enumerate(pending):
                    delta = "".join(parts)
                    if delta:  # a row that has stopped sends nothing more
                        texts[r].append(delta)
                        yield _sse({"sample": r, "text": delta})
                if kind == "done":
                    yield _sse({"samples": ["".join(t) for t in texts], **head, **data}, "done")
                    return
                if kind in ("error", "failed"):
                    yield _sse({"error": data, "field": None}, "error")
                    return
        finally:
            job.cancel()

    async def score(self, request: Request) -> Response:
        from charlm.score import Summary, score_stream

        data = await read_json(request, self.limits.max_body)
        f = Fields(data, ("text", "top", "unknown", "tag"))
        tag = tag_field(f, self.info)
        unknown = f.str("unknown", "error", 5, ("error", "skip"))
        text = f.str("text", None, self.limits.max_score_chars)
        if not text:
            raise ApiError(400, "text", "text is required: the text to score, at least one character")
        # As many alternatives as `charlm score` lists, or as the vocabulary has when it has fewer.
        top = f.int("top", min(5, self.vocab.size), 1, min(self.limits.max_top, self.vocab.size))
        text = known_text(self.vocab, text, "text", unknown)
        ids = self.vocab.encode(text)
        engine, vocab = self.engine, self.vocab
        model = engine.model.conditioned(tag) if tag is not None else engine.model

        def task():  # runs in the engine thread, one chunk per engine turn (~10 ms for the default model)
            chunks, summary = [], Summary(vocab)
            for chunk in score_stream(model, [ids], engine.device, top=top, vocab=vocab, chunk=512):
                chunks.append(chunk)
                summary.update(chunk)
                yield
            return chunks, summary.result()

        job, queue = self._job(task=task())
        kind, (chunks, summary) = await _until_result(request, job, queue)
        return JSONResponse({**summary, "top": top, "characters": score_json(chunks, vocab)})

    async def items_(self, request: Request) -> Response:
        from charlm.items import draw_items
        from charlm.runs import longest_item_kept

        data = await read_json(request, self.limits.max_body)
        corpus = self.info.get("corpus", {})
        if not corpus.get("items"):
            raise ApiError(400, None, "this model was not trained on a list of things, so it has no items; "
                                      "use POST /v1/sample for text")
        f = Fields(data, ITEM_FIELDS)
        tag = tag_field(f, self.info)
        count = f.int("count", 10, 1, self.limits.max_items)
        unknown = f.str("unknown", "error", 5, ("error", "skip"))
        end = corpus.get("item_end", "\n")
        prime = known_text(self.vocab, f.str("prime", "", self.limits.max_prime), "prime", unknown)
        if end == "\n" and "\n" in prime:
            raise ApiError(400, "prime", "an item prime is the start of one item: it cannot hold a line break")
        new_only = f.bool("new_only", True)
        if new_only and self.items is None:
            raise ApiError(422, "new_only", "the training list is not on this server's disk, so a copy cannot "
                                            "be told from a new item; send \"new_only\": false")
        min_length = f.int("min_length", 1, 1, self.limits.max_length)
        longest = longest_item_kept(self.items, min_length)
        max_length = f.int("max_length", min(longest, self.limits.max_length), min_length, self.limits.max_length)
        temperature, top_k, top_p, seed = sampling_fields(f, self.vocab)
        known = self.items.known if self.items else frozenset()
        engine = self.engine
        model = engine.model.conditioned(tag) if tag is not None else engine.model

        def task():  # one model step of every drawn row per engine turn, between the other requests' steps
            return (yield from draw_items(
                model, self.vocab, count, known, prime, temperature=temperature,
                top_k=top_k, top_p=top_p, min_length=max(min_length, len(prime) + 1),
                max_length=max_length, allow_copies=not new_only, seed=seed, device=engine.device, end=end,
                context=corpus.get("item_context", "")))

        job, queue = self._job(task=task())
        kind, result = await _until_result(request, job, queue)
        return JSONResponse({"items": [{"text": i.text, "logprob": round(i.logprob, 4), "new": i.new}
                                       for i in result["items"]],
                             "copies_skipped": result["copies"], "rejected": result["rejected"],
                             "drawn": result["drawn"], "complete": result["complete"], "seed": seed})

    async def model(self, request: Request) -> Response:
        return JSONResponse(self.info)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.engine.stats()})

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page)


def _deliver_all(events: list) -> None:
    for job, kind, data in events:
        job.deliver(kind, data)


def _sse(data: dict, event: Optional[str] = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body has been read, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _race_disconnect(request: Request, job: Job, work):
    """Await `work`; if the client leaves first, cancel the job and answer nothing."""
    waiting = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_watch_disconnect(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not waiting.done():  # nobody will read the answer; 499 is what proxies log for this
        waiting.cancel()
        job.cancel()
        raise ApiError(499, None, "the client closed the connection")
    return waiting.result()


def _engine_error(kind: str, message) -> ApiError:
    """The engine's end of a job that did not finish: 500 when computing it failed (that request alone), 503
    when the engine could not serve it (shutting down)."""
    return ApiError(500 if kind == "failed" else 503, None, str(message))


async def _until_done(request: Request, job: Job, queue: asyncio.Queue, texts: list) -> dict:
    async def collect():
        while True:
            kind, data = await queue.get()
            if kind == "text":
                for r, text in enumerate(data):
                    texts[r].append(text)
            elif kind == "done":
                return data
            else:
                raise _engine_error(kind, data)

    return await _race_disconnect(request, job, collect())


async def _until_result(request: Request, job: Job, queue: asyncio.Queue):
    async def wait():
        kind, data = await queue.get()
        if kind in ("error", "failed"):
            raise _engine_error(kind, data)
        return kind, data

    return await _race_disconnect(request, job, wait())


def score_json(chunks: list, vocab) -> list:
    """One entry per character, as the JSON lines of `charlm score`: its index, log-probability (nats), rank
    (0 = the model's top choice) and the model's top alternatives with their probabilities."""
    chars = vocab.chars
    out = []
    for chunk in chunks:
        for i in range(len(chunk.ids)):
            out.append({"i": chunk.start + i, "char": chars[int(chunk.ids[i])],
                        "logprob": round(float(chunk.logprob[i]), 6),
                        "rank": int(chunk.rank[i]),
                        "top": [[chars[int(c)], round(float(p), 6)] for c, p in zip(chunk.top_ids[i], chunk.top_p[i])]})
    return out


def create_app(engine: Engine, info: dict, limits: Limits = Limits(), items=None) -> Starlette:
    """The ASGI app. The engine starts with the app and stops with it (uvicorn's lifespan). `items`: the
    runs.ItemList of a model of a list, for /v1/items to tell new items from copies."""
    from contextlib import asynccontextmanager

    from charlm.server.page import PAGE

    server = Server(engine, info, limits, PAGE, items)

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    async def api_error(request, exc: ApiError):
        return _error(exc.status, exc.field, exc.message)

    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, None, f"{exc.detail}: {request.method} {request.url.path}")

    async def internal(request, exc: Exception):  # a bug: a JSON 500 with no traceback in the response
        return _error(500, None, f"internal error ({type(exc).__name__})")

    routes = [
        Route("/", server.index, methods=["GET"]),
        Route("/healthz", server.healthz, methods=["GET"]),
        Route("/v1/model", server.model, methods=["GET"]),
        Route("/v1/sample", server.sample, methods=["POST"]),
        Route("/v1/score", server.score, methods=["POST"]),
        Route("/v1/items", server.items_, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal})
