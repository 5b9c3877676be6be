"""Load test of `charlm serve`: 1, 8 and 32 concurrent clients on loopback, against the same
model served without batching (--max-batch 1: one request at a time, the others wait), in one run;
with --all-cores also against a server whose model uses every core (--threads N).

Each client POSTs /v1/sample with "stream": true and its own seed, and reads the server-sent events as they
arrive (with --no-stream: a plain JSON request, whose first character comes with the whole answer). Reported
per configuration: total characters per second (all clients' characters / the time from the first request
to the last `done`), characters per second per client (its characters / its own time), and the time to the
first character (request sent -> first text event), p50 and p99 over every client of every round. Rounds
run the configurations interleaved (1, 8, 32, unbatched 8, then again), so the machine's drift and other
people's jobs fall on all of them alike.

The model is the default size (2 x 512 GRU, one-hot input, 65 characters) with untrained weights: the cost
of a step does not depend on what the weights are (--hidden serves a smaller one). Before the servers, the
script times a step with the picks, and the batching engine alone with no HTTP, in its own process.
Bounded: loopback only, at most --rounds x 4 batches of clients, each asking for --length characters, and a
--timeout per batch.

    .venv/bin/python bench/serve_load.py
    .venv/bin/python bench/serve_load.py --all-cores --length 300 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from charlm import checkpoint as ckpt
from charlm.model import CharRNN, ModelConfig

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65


def write_model(folder: Path, hidden: int = 512) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(SHAKESPEARE_CHARS), hidden=hidden)  # 2 layers, GRU, one-hot
    model = CharRNN(config)
    path = folder / "best.pt"
    ckpt.save({"model_config": config.to_dict(), "vocab": SHAKESPEARE_CHARS, "model": model.state_dict(),
               "step": 0}, path)
    return path


def step_costs(model: Path) -> list:
    """(threads, batch, ms per CharRNN.step + picks) in this process: what bounds the server's rates. The
    picks as the engine makes them: one distribution for the batch, one number per row from that row's own
    generator, one batched draw."""
    from charlm.runs import load_model
    from charlm.sample import SampleConfig, Uniforms, distribution, draw

    _, net, _, _ = load_model(model, "cpu")
    cfg, rows = SampleConfig(), []
    for threads in (1, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        for batch in (1, 8, 32):
            state, ids = net.init_state(batch), torch.zeros(batch, dtype=torch.long)
            numbers = [Uniforms(torch.Generator().manual_seed(i), 1) for i in range(batch)]
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(50):
                    logits, state = net.step(ids, state)
                    u = [x for n in numbers for x in n.take()]
                    ids = draw(distribution(logits, cfg), torch.tensor(u, dtype=torch.float64))
                best = min(best, (time.perf_counter() - start) / 50)
            rows.append((threads, batch, 1e3 * best))
    torch.set_num_threads(1)
    return rows


def engine_rates(model: Path, levels: list, length: int) -> list:
    """(clients, model steps per second) of the batching engine itself, in this process with no HTTP: n
    jobs of `length` characters at once, best of 3. Its gap to the server's rate is the HTTP side's cost."""
    from charlm.runs import load_model
    from charlm.sample import SampleConfig
    from charlm.server.engine import Engine, Job

    _, net, vocab, _ = load_model(model, "cpu")
    engine = Engine(net, vocab, "cpu", publish=lambda events: None).start()
    out = []
    try:
        for n in levels:
            best = float("inf")
            for round_ in range(3):
                jobs = [Job(deliver=None, cfg=SampleConfig(length=length, seed=round_ * 100 + i), stream=False,
                            prime_ids=vocab.encode("ROMEO:")) for i in range(n)]
                steps, start = engine.steps, time.perf_counter()
                for job in jobs:
                    engine.submit(job)
                while engine.stats()["active_rows"] or engine.stats()["warming"] or engine.stats()["queued"] \
                        or engine.steps - steps < length:
                    time.sleep(0.001)
                best = min(best, (time.perf_counter() - start) / (engine.steps - steps))
            out.append((n, 1 / best))
    finally:
        engine.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int, threads: int = 0) -> tuple:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "charlm", "serve", "-c", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--threads", str(threads), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start: {proc.stderr.read()}")


def client(port: int, seed: int, length: int, timeout: float, out: list, stream: bool = True) -> None:
    body = json.dumps({"prime": "ROMEO:", "length": length, "seed": seed, "stream": stream})
    sent = time.perf_counter()
    first, chars = None, 0
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/v1/sample", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        event = "message"
        if not stream:
            chars = sum(len(t) - len("ROMEO:") for t in json.loads(r.read())["samples"])
            first = time.perf_counter()
        for raw in (r if stream else ()):
            line = raw.decode("utf-8")
            if line.startswith("event: "):
                event = line[7:].strip()
            elif line.startswith("data: ") and event == "message":
                if first is None:
                    first = time.perf_counter()
                chars += len(json.loads(line[6:])["text"])
            elif line.startswith("data: ") and event in ("done", "error"):
                break
            elif line == "\n":
                event = "message"
    finally:
        c.close()
    out.append({"ttfc": (first or time.perf_counter()) - sent, "chars": chars,
                "seconds": time.perf_counter() - sent, "start": sent, "end": time.perf_counter()})


def run_batch(port: int, clients: int, length: int, timeout: float, seed0: int, stream: bool = True) -> list:
    out: list = []
    threads = [threading.Thread(target=client, args=(port, seed0 + i, length, timeout, out, stream), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


def summarise(results: list) -> dict:
    """results: one list of client records per batch run of this configuration."""
    totals = [sum(r["chars"] for r in batch) / (max(r["end"] for r in batch) - min(r["start"] for r in batch))
              for batch in results]
    records = [r for batch in results for r in batch]
    ttfc = sorted(r["ttfc"] for r in records)
    q = lambda p: ttfc[min(len(ttfc) - 1, int(round(p * (len(ttfc) - 1))))]  # noqa: E731
    return {"total_chars_per_s": statistics.median(totals), "per_client_chars_per_s":
            statistics.median(r["chars"] / r["seconds"] for r in records), "ttfc_p50_ms": 1e3 * q(0.5),
            "ttfc_p99_ms": 1e3 * q(0.99), "clients_done": len(records), "chars": sum(r["chars"] for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--length", type=int, default=400, help="characters each client asks for")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one batch of clients may take")
    parser.add_argument("--all-cores", action="store_true", help="also serve with --threads = every core "
                        "(the model's threads then compete with the event loop)")
    parser.add_argument("--no-stream", action="store_true", help="clients ask for a JSON answer instead of "
                        "a stream (the time to the first character is then the time to the whole answer)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--hidden", type=int, default=512, help="units per layer of the 2-layer GRU served "
                        "(512: the default model; 128: a small one, where per-request work weighs most)")
    args = parser.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    torch.set_num_threads(1)  # while the servers run, this process (the clients) leaves them the cores
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp), args.hidden)
        steps = step_costs(model)
        engine = engine_rates(model, levels, args.length)
        servers = [start_server(model, 64), start_server(model, 1)]
        (_, bport), (_, pport) = servers
        configs = [(f"batched, {n} clients", bport, n) for n in levels] + [("unbatched, 8 clients", pport, 8)]
        if args.all_cores:
            servers.append(start_server(model, 64, threads=os.cpu_count() or 1))
            configs += [(f"batched, {n} clients, --threads {os.cpu_count()}", servers[-1][1], n) for n in (1, 8)]
        results = {name: [] for name, _, _ in configs}
        try:
            for _, port in servers:
                run_batch(port, 2, 50, args.timeout, 10_000)  # warm up
            for round_ in range(args.rounds):
                for name, port, n in configs:
                    results[name].append(run_batch(port, n, args.length, args.timeout, 1000 * round_,
                                                   not args.no_stream))
                    print(f"round {round_ + 1}: {name} done", file=sys.stderr)
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(30)
    summary = {name: summarise(batches) for name, batches in results.items()}
    one = summary.get("batched, 1 clients", {}).get("total_chars_per_s")
    for row in summary.values():
        row["ratio_to_1_client"] = row["total_chars_per_s"] / one if one else None
    if args.json:
        print(json.dumps({"length": args.length, "rounds": args.rounds, "cpus": os.cpu_count(),
                          "stream": not args.no_stream, **summary,
                          "step_ms": [{"threads": t, "batch": b, "ms": ms} for t, b, ms in steps],
                          "engine_steps_per_s": [{"clients": n, "steps_per_s": r} for n, r in engine]}, indent=1))
        return
    print("| step + picks (in-process) | " + " | ".join(f"{t} thread(s), {b} rows" for t, b, _ in steps) + " |")
    print("| --- |" + " ---: |" * len(steps))
    print("| ms per step | " + " | ".join(f"{ms:.2f}" for _, _, ms in steps) + " |")
    print()
    one_engine = engine[0][1] if engine and engine[0][0] == 1 else None
    print("| engine alone (in-process, no HTTP) | " + " | ".join(f"{n} clients" for n, _ in engine) + " |")
    print("| --- |" + " ---: |" * len(engine))
    print("| steps per second | " + " | ".join(f"{r:,.0f}" for _, r in engine) + " |")
    if one_engine:
        print("| chars/s x 1 client | " + " | ".join(f"{n * r / one_engine:.2f}" for n, r in engine) + " |")
    print()
    print("| configuration | total chars/s | per-client chars/s | TTFC p50 | TTFC p99 | x 1 client |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in summary.items():
        print(f"| {name} | {row['total_chars_per_s']:,.0f} | {row['per_client_chars_per_s']:,.0f} | "
              f"{row['ttfc_p50_ms']:.0f} ms | {row['ttfc_p99_ms']:.0f} ms | {row['ratio_to_1_client']:.2f} |")


if __name__ == "__main__":
    main()
