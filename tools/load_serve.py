"""Load test of ``blockq serve`` beside llama-cpp-python on the same GGUF file and threads.

Each engine gets the same workload over HTTP: C concurrent clients x R requests, a fixed mix of
chat / completion, streamed / not, some streams cut off after a few chunks, some malformed
(bad JSON, a wrong type, n=2, a prompt longer than the context).  It prints, per engine:
requests/s, p50/p95 latency of the well-formed requests, aggregate generated tokens/s, and the
checks: 0 failed well-formed requests, every malformed one a 4xx, the server alive at the end.

    python tools/load_serve.py [MODEL] [--clients 8] [--requests 25] [-t 2] [--engines blockq,llama]

The llama-cpp-python side is ``python -m llama_cpp.server`` when its server extra is installed;
otherwise a minimal HTTP wrapper around ``llama_cpp.Llama``'s own ``create_completion`` /
``create_chat_completion`` (one request at a time under a lock, as llama_cpp.server does),
written below.  Run it under ``flock /work/bench.lock`` on a shared machine.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?",
             "Write a haiku about the sea.", "Who wrote Hamlet?", "Say hello in Spanish.",
             "What is the boiling point of water?", "List two planets."]
KINDS = (["chat"] * 8 + ["chat_stream"] * 5 + ["completion"] * 3 + ["completion_stream"] * 2
         + ["cut"] * 3 + ["malformed"] * 4)  # 25 per client: 21 well-formed, 4 malformed
MALFORMED = [
    ("/v1/chat/completions", b"{this is not json"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                         "temperature": "warm"}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                         "n": 2}).encode()),
    ("/v1/completions", json.dumps({"prompt": "word " * 3000, "max_tokens": 4}).encode()),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- engines ----------------------------------------------------------------------------------

LLAMA_SHIM = r'''
import json, sys, threading
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.concurrency import run_in_threadpool
import llama_cpp

path, port, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                      verbose=False)
lock = threading.Lock()
KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
        "presence_penalty", "frequency_penalty")

def bad(msg):
    return JSONResponse({"error": {"message": msg, "type": "invalid_request_error"}}, 400)

async def handle(request, chat):
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        return bad(f"invalid JSON: {e}")
    if not isinstance(body, dict) or body.get("n", 1) != 1:
        return bad("bad request")
    for k in ("temperature", "top_p"):
        if k in body and not isinstance(body[k], (int, float)):
            return bad(f"{k} must be a number")
    kw = {k: body[k] for k in KEYS if k in body}
    if chat:
        fn, arg = llm.create_chat_completion, body.get("messages")
    else:
        fn, arg = llm.create_completion, body.get("prompt")
        if len(llm.tokenize(arg.encode())) >= n_ctx:
            return bad("prompt longer than the context")
    if not kw.get("stream"):
        def run():
            with lock:
                return fn(arg, **kw)
        return JSONResponse(await run_in_threadpool(run))
    def start():
        lock.acquire()
        try:
            return fn(arg, **kw)
        except BaseException:
            lock.release()
            raise
    it = await run_in_threadpool(start)
    async def sse():
        try:
            while True:
                chunk = await run_in_threadpool(next, it, None)
                if chunk is None:
                    break
                yield "data: " + json.dumps(chunk) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            it.close()
            lock.release()
    return StreamingResponse(sse(), media_type="text/event-stream")

async def chat(request): return await handle(request, True)
async def completion(request): return await handle(request, False)
async def health(request): return JSONResponse({"status": "ok"})
app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                        Route("/v1/completions", completion, methods=["POST"]),
                        Route("/health", health)])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


def start_engine(engine: str, model: Path, threads: int, n_ctx: int, parallel: int):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if engine == "blockq":
        cmd = [sys.executable, "-m", "blockq", "serve", "-m", str(model), "--port", str(port),
               "-t", str(threads), "-c", str(n_ctx), "--parallel", str(parallel)]
        label = f"blockq serve --parallel {parallel}"
    else:
        try:
            import llama_cpp.server.app  # noqa: F401
            # NOTE: --interrupt_requests False: by default llama_cpp.server ends a stream as
            # soon as another request arrives, which would cut most streams of this workload
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port",
                   str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]
            label = "llama_cpp.server"
        except ImportError:
            cmd = [sys.executable, "-c", LLAMA_SHIM, str(model), str(port), str(threads),
                   str(n_ctx)]
            label = "llama_cpp.Llama behind a minimal HTTP wrapper (llama_cpp.server absent)"
    # NOTE: stderr goes to a file, not a pipe: llama_cpp.server logs every request (and
    # llama.cpp its load) there, and a full pipe nobody reads would stall the server
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
                            text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{engine} server exited: {log.read()[-4000:]}")
        if health(port, "/health" if engine == "blockq" or "wrapper" in label else "/v1/models"):
            return proc, port, label
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{engine} server did not start")


def health(port: int, path: str) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", path)
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except OSError:
        return False


# -- clients ----------------------------------------------------------------------------------

def one_request(port: int, kind: str, rng: random.Random, max_tokens: int) -> dict:
    """Send one request; returns {kind, ok, status, latency, tokens}."""
    q = rng.choice(QUESTIONS)
    stream = kind in ("chat_stream", "completion_stream", "cut")
    if kind == "malformed":
        path, body = rng.choice(MALFORMED)
    elif kind.startswith("completion"):
        path = "/v1/completions"
        body = json.dumps({"prompt": f"Question: {q}\nAnswer:", "max_tokens": max_tokens,
                           "temperature": 0.7, "seed": rng.randrange(1000), "stream": stream})
    else:
        path = "/v1/chat/completions"
        body = json.dumps({"messages": [{"role": "user", "content": q}],
                           "max_tokens": max_tokens, "temperature": 0.7,
                           "seed": rng.randrange(1000), "stream": stream})
    body = body if isinstance(body, bytes) else body.encode()
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        c.request("POST", path, body, {"content-type": "application/json"})
        r = c.getresponse()
        if kind == "malformed":
            r.read()
            return {"kind": kind, "ok": 400 <= r.status < 500, "status": r.status,
                    "latency": time.perf_counter() - t0, "tokens": 0}
        if r.status != 200:
            return {"kind": kind, "ok": False, "status": r.status, "error": r.read()[:200],
                    "latency": time.perf_counter() - t0, "tokens": 0}
        if not stream:
            out = json.loads(r.read())
            ch = out["choices"][0]
            text = ch["message"]["content"] if "message" in ch else ch["text"]
            return {"kind": kind, "ok": ch["finish_reason"] in ("stop", "length") and
                    text is not None, "status": 200, "latency": time.perf_counter() - t0,
                    "tokens": out["usage"]["completion_tokens"]}
        tokens, done, finish = 0, False, None
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            ch = json.loads(line[6:])["choices"]
            if ch:
                piece = ch[0].get("delta", {}).get("content") if "delta" in ch[0] \
                    else ch[0].get("text")
                tokens += bool(piece)
                finish = ch[0].get("finish_reason") or finish
            if kind == "cut" and tokens >= 3:
                break  # the client goes away mid-stream
        ok = kind == "cut" or (done and finish in ("stop", "length"))
        return {"kind": kind, "ok": ok, "status": 200, "latency": time.perf_counter() - t0,
                "tokens": tokens}
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {"kind": kind, "ok": False, "status": None, "error": repr(e),
                "latency": time.perf_counter() - t0, "tokens": 0}
    finally:
        c.close()


def load(port: int, clients: int, requests: int, max_tokens: int, seed: int) -> tuple[list, float]:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i):
        rng = random.Random(seed * 1000 + i)
        kinds = (KINDS * (requests // len(KINDS) + 1))[:requests]
        rng.shuffle(kinds)
        for kind in kinds:
            res = one_request(port, kind, rng, max_tokens)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def report(label: str, results: list, wall: float, alive: bool) -> dict:
    good = [r for r in results if r["kind"] not in ("malformed", "cut")]
    lat = sorted(r["latency"] for r in good)
    bad = [r for r in results if r["kind"] == "malformed"]
    failed = [r for r in results if r["kind"] != "malformed" and not r["ok"]]
    row = {
        "engine": label, "requests": len(results), "wall_s": round(wall, 1),
        "req_per_s": round(len(results) / wall, 3),
        "p50_s": round(statistics.median(lat), 2) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2) if lat else None,
        "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
        "failed_well_formed": len(failed),
        "malformed": len(bad), "malformed_4xx": sum(r["ok"] for r in bad),
        "server_alive": alive,
    }
    if failed:
        row["first_failures"] = failed[:3]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="per client")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx", type=int, default=1024)
    ap.add_argument("--parallel", type=int, default=4, help="blockq serve slots")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--engines", default="blockq,llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.model is None:
        sys.path.insert(0, str(ROOT))
        from blockq.fetch import smollm2_path
        a.model = smollm2_path()
    rows = []
    for engine in a.engines.split(","):
        proc, port, label = start_engine(engine, a.model, a.threads, a.ctx, a.parallel)
        try:
            results, wall = load(port, a.clients, a.requests, a.max_tokens, a.seed)
            alive = proc.poll() is None and health(
                port, "/health" if "llama_cpp.server" != label else "/v1/models")
            rows.append(report(label, results, wall, alive))
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{a.model.name}: {a.clients} clients x {a.requests} requests, max_tokens "
          f"{a.max_tokens}, -t {a.threads}, -c {a.ctx}")
    cols = ["engine", "req_per_s", "p50_s", "p95_s", "tokens_per_s", "failed_well_formed",
            "malformed_4xx", "malformed", "server_alive", "wall_s"]
    for r in rows:
        print("  " + " | ".join(f"{c}={r[c]}" for c in cols))
        for f in r.get("first_failures", []):
            print("    failure:", f)
    if len(rows) == 2 and rows[1]["tokens_per_s"]:
        print(f"  ratio blockq / llama-cpp-python: requests/s "
              f"{rows[0]['req_per_s'] / rows[1]['req_per_s']:.2f}x, tokens/s "
              f"{rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
