"""`charlm serve`: load the model, bind the port, start the batching engine and the HTTP app
(charlm/server/), and say where it listens.

The web stack (the `serve` extra) is imported inside the command, so the rest of charlm runs without it.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.markup import escape

from charlm.cli.common import check
from charlm.errors import CharlmError
from charlm.runs import is_item_model, item_list, load_model, model_summary


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(checkpoint: Optional[Path], host: str, port: int, device_name: str, max_batch: int, threads: int,
              console: Console) -> None:
    try:
        import uvicorn

        from charlm.server.app import Limits, create_app
    except ImportError as exc:
        raise CharlmError(f"charlm serve needs the web stack ({exc.name} is missing): "
                          "pip install 'charlm[serve]'")
    from charlm.server.engine import Engine

    check(0 <= port <= 65535, f"--port must be between 0 and 65535, got {port}")
    check(max_batch >= 1, f"--max-batch must be at least 1, got {max_batch}")
    check(threads >= 0, f"--threads must be 0 (automatic) or positive, got {threads}")
    # The event loop (HTTP, JSON, server-sent events) needs a core of its own: when every core runs the
    # model's OpenMP threads, each step waits for a thread the event loop has displaced (on a busy 2-core
    # machine, 16-31 ms instead of 3.6 ms for the default model's step; BENCHMARKS.md section 7).
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - 1))
    payload, model, vocab, device = load_model(checkpoint, device_name)
    sock = _listen(host, port)  # before anything starts: a taken port is one line, and --port 0 is known
    port = sock.getsockname()[1]
    limits = Limits(max_rows=max_batch)
    engine = Engine(model, vocab, device, max_rows=limits.max_rows, max_queued=limits.max_queued)
    items = None
    if is_item_model(payload):  # /v1/items tells new items from copies of the training list
        try:
            items = item_list(payload, vocab)
        except CharlmError as exc:
            console.print(f"[dim]note:[/dim] {escape(str(exc))}: /v1/items can only answer \"new_only\": false")
    app = create_app(engine, model_summary(payload, model, vocab), limits, items)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2,  # open streams get 2 s to end, then are cut
                            lifespan="on")
    server = uvicorn.Server(config)
    uvicorn_exit = server.handle_exit

    def handle_exit(sig, frame):  # end the open streams now rather than after the graceful timeout
        engine.stop()
        uvicorn_exit(sig, frame)

    server.handle_exit = handle_exit
    mc = model.config
    console.print(f"serving {escape(str(payload['path']))} ({mc.layers} x {mc.hidden} {mc.cell}, {vocab.size} "
                  f"characters, {device}) at http://{host}:{port}/  (Ctrl-C stops)")
    if not _is_loopback(host):
        console.print(f"[yellow]warning:[/yellow] listening on {escape(host)}: anyone who can reach this "
                      "machine can use the model (there is no authentication); --host 127.0.0.1 keeps it local")
    # uvicorn catches SIGINT/SIGTERM, shuts down gracefully, then raises the signal again for the handlers
    # that were there before it: these, which only note it, so a deliberate stop exits 0 with no traceback.
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    console.print("stopped")


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn (it listens on it), or one line saying why there cannot be one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise CharlmError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
                          "(0 = any free one) or --host")
    return sock
