"""An OpenAI-compatible HTTP server over :class:`blockq.api.LLM` (Starlette; ``blockq serve``
runs it with uvicorn; needs the ``[serve]`` extra).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health``.  Requests wait for one of N slots;
each slot has its own KV cache, and a request goes to the free slot whose cache shares the
longest prefix with its prompt (a chat's follow-up turn reuses its earlier turns).  Model steps
of different slots interleave token by token.  A client that goes away frees its slot at the
next token.  ``response_format: {"type": "json_object"}`` constrains the output to one JSON
object (:mod:`blockq.json_constraint`).  Malformed requests get a 4xx with an OpenAI-shaped error body.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping

from .api import (LLM, RESPONSE_FORMATS, _common_prefix, _stop_list, collect_chat,
                  collect_completion, make_sampler)
from .errors import BlockqError

CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


class ApiError(Exception):
    """An error answered with ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 404:
            kind = "not_found_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


# -- request checking -------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_stop(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


RESPONSE_FORMAT = (lambda v: isinstance(v, dict) and v.get("type") in RESPONSE_FORMATS,
                   '{"type": "text"} or {"type": "json_object"} (json_schema is not supported)')
# field -> (check, what it must be); fields not listed are ignored, as llama-server does
COMMON = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "max_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "top_k": (lambda v: _is_int(v), "an integer"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repeat_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "presence_penalty": (lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": (lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
    "seed": (lambda v: _is_int(v), "an integer"),
    "stop": (_is_stop, "a string or a list of strings"),
    "stream": (lambda v: isinstance(v, bool), "true or false"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "n": (lambda v: v == 1 and _is_int(v), "1 (several choices per request are not supported)"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
    "user": (lambda v: isinstance(v, str), "a string"),
}
CHAT = {
    **COMMON,
    "messages": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of messages"),
    "max_completion_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "logprobs": (lambda v: isinstance(v, bool), "true or false"),
    "top_logprobs": (lambda v: _is_int(v) and 0 <= v <= 20, "an integer in [0, 20]"),
    "response_format": RESPONSE_FORMAT,
}
COMPLETION = {
    **COMMON,
    "prompt": (lambda v: (isinstance(v, str) or (isinstance(v, list) and len(v) > 0 and (
        all(_is_int(t) for t in v) or (len(v) == 1 and isinstance(v[0], str))))),
        "a string, a list of token ids, or a list of one string"),
    "logprobs": (lambda v: v is None or (_is_int(v) and 0 <= v <= 20), "an integer in [0, 20]"),
    "echo": (lambda v: isinstance(v, bool), "true or false"),
    "response_format": RESPONSE_FORMAT,
}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                   "presence_penalty", "frequency_penalty", "seed")


def check_fields(body, schema: Mapping, required: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name in required:
        if name not in body:
            raise ApiError(400, f"'{name}' is required", name, "missing_required_parameter")
    for name, value in body.items():
        rule = schema.get(name)
        if rule is None or (value is None and name not in required):
            continue
        ok, what = rule
        if not ok(value):
            raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name,
                           "invalid_value")
    return {k: v for k, v in body.items() if k in schema and v is not None}


def _message_text(i: int, m) -> dict:
    if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
        raise ApiError(400, f"messages[{i}] must be an object with a 'role' in "
                            f"{list(CHAT_ROLES)}", "messages")
    content = m.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):  # content parts: only text ones
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or \
                    not isinstance(p.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               "messages")
            parts.append(p["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                       "messages")
    return {"role": "system" if m["role"] == "developer" else m["role"], "content": content}


def generation_kwargs(p: dict) -> dict:
    """The API keywords of a checked request (ranges checked once more by the sampler)."""
    kw = {k: p[k] for k in SAMPLING_FIELDS if k in p}
    try:
        make_sampler(**kw)
        stop = list(_stop_list(p.get("stop")))
    except BlockqError as e:
        raise ApiError(400, str(e)) from None
    if stop:
        kw["stop"] = stop
    kw["ignore_eos"] = p.get("ignore_eos", False)
    kw["response_format"] = p.get("response_format")
    return kw


# -- slots ------------------------------------------------------------------------------------

class Slot:
    def __init__(self, llm: LLM, index: int):
        self.index = index
        self.cache = llm.new_cache()
        self.last_used = 0.0


class SlotPool:
    """N slots; ``acquire`` waits for a free one, preferring the longest cached prefix."""

    def __init__(self, llm: LLM, n: int):
        self.slots = [Slot(llm, i) for i in range(n)]
        self.free = list(self.slots)
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self, prompt_ids) -> Slot:
        cond = self._cond()
        async with cond:
            await cond.wait_for(lambda: self.free)
            best = max(self.free, key=lambda s: (_common_prefix(s.cache.tokens, prompt_ids),
                                                 -s.last_used))
            self.free.remove(best)
            return best

    async def release(self, slot: Slot) -> None:
        cond = self._cond()
        async with cond:
            slot.last_used = time.monotonic()
            self.free.append(slot)
            cond.notify()

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self.free)


# -- the application --------------------------------------------------------------------------

def create_app(llm: LLM, parallel: int = 1, model_name: str | None = None):
    """The Starlette application serving ``llm`` with ``parallel`` slots."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    if parallel < 1:
        raise ApiError(500, f"--parallel {parallel}: use 1 or more")
    pool = SlotPool(llm, parallel)
    name = model_name or llm.name
    started = int(time.time())

    async def read_json(request) -> dict:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    def prompt_check(ids) -> None:
        if len(ids) >= llm.n_ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server's context holds "
                                f"{llm.n_ctx} per request (start it with a larger -c)",
                           "messages", "context_length_exceeded")

    async def steps(make, request, stream: bool):
        """Chunks of one request on a slot: each one a model step in a worker thread."""
        slot = await pool.acquire(request.state.prompt_ids)
        it = None
        try:
            it = make(slot.cache)
            while True:
                chunk = await run_in_threadpool(next, it, None)
                if chunk is None:
                    return
                yield chunk
                if not stream and await request.is_disconnected():
                    return
        finally:
            if it is not None:
                it.close()
            await pool.release(slot)

    async def respond(request, make, collect, include_usage: bool, stream: bool):
        if not stream:
            chunks = [c async for c in steps(make, request, False)]
            return JSONResponse(collect(chunks))

        async def sse():
            try:
                async for chunk in steps(make, request, True):
                    usage = chunk.pop("usage", None)
                    if usage is not None and chunk["choices"][0].get("finish_reason") is None:
                        usage = None
                    yield f"data: {json.dumps(chunk)}\n\n"
                    if usage is not None and include_usage:
                        tail = {**chunk, "choices": [], "usage": usage}
                        yield f"data: {json.dumps(tail)}\n\n"
            except BlockqError as e:
                yield f"data: {json.dumps(ApiError(400, str(e)).body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def chat_completions(request):
        p = check_fields(await read_json(request), CHAT, ("messages",))
        messages = [_message_text(i, m) for i, m in enumerate(p["messages"])]
        kw = generation_kwargs(p)
        if "top_logprobs" in p and not p.get("logprobs"):
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        max_tokens = p.get("max_completion_tokens", p.get("max_tokens"))
        try:
            ids = llm.chat_prompt_ids(messages)
        except BlockqError as e:  # the template refused the conversation
            raise ApiError(400, str(e), "messages") from None
        prompt_check(ids)
        request.state.prompt_ids = ids

        def make(cache):
            return llm.create_chat_completion(
                messages, max_tokens=max_tokens, stream=True, cache=cache, model=name,
                logprobs=p.get("logprobs", False), top_logprobs=p.get("top_logprobs"), **kw)

        return await respond(request, make, collect_chat,
                             p.get("stream_options", {}).get("include_usage", False),
                             p.get("stream", False))

    async def completions(request):
        p = check_fields(await read_json(request), COMPLETION, ("prompt",))
        prompt = p["prompt"]
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            prompt = prompt[0]
        kw = generation_kwargs(p)
        try:
            ids = llm._prompt_ids(prompt)
        except BlockqError as e:  # e.g. a token id outside the vocabulary
            raise ApiError(400, str(e), "prompt") from None
        if not ids:
            raise ApiError(400, "the prompt is empty and the model has no BOS token", "prompt")
        prompt_check(ids)
        request.state.prompt_ids = ids

        def make(cache):
            return llm.create_completion(ids, max_tokens=p.get("max_tokens", 16), stream=True,
                                         cache=cache, model=name, logprobs=p.get("logprobs"),
                                         echo=p.get("echo", False), **kw)

        return await respond(request, make, collect_completion,
                             p.get("stream_options", {}).get("include_usage", False),
                             p.get("stream", False))

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": started, "owned_by": "blockq",
             "meta": {"n_ctx": llm.n_ctx, "n_ctx_train": llm.model.args.n_ctx_train,
                      "n_params_bytes": llm.model.nbytes, "slots": parallel}}]})

    async def health(request):
        return JSONResponse({"status": "ok", "slots_idle": len(pool.free),
                             "slots_processing": pool.busy})

    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request, exc: HTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, msg).body(), status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        if isinstance(exc, BlockqError):  # a value the checks above let through
            return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}").body(),
                            status_code=500)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: api_error, HTTPException: http_error, BlockqError: server_error,
        Exception: server_error})
    app.state.pool = pool
    return app


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8080, parallel: int = 1,
          model_name: str | None = None, log_level: str = "warning", ready=None) -> None:
    """Run the server until interrupted (uvicorn); ``ready(url)`` is called once it listens."""
    import uvicorn

    app = create_app(llm, parallel, model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    if ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            if server.started:
                ready(f"http://{host}:{port}")

        server.startup = startup
    server.run()
