"""``blockq.load()``: generate, chat, tokenize and the OpenAI-shaped completions on a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest

import blockq
from blockq.errors import BadArgument
from blockq.generate import generate
from tiny_model import greedy_ids, write_tiny


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("api") / "tiny.gguf", qtype="Q8_0", tied=False)
    return blockq.load(path, n_ctx=128)


GREEDY = dict(temperature=0, ignore_eos=True)


def test_generate_is_the_greedy_continuation(llm):
    ids = llm.tokenize("the fox")
    want = llm.detokenize(greedy_ids(llm.model, ids, 8))
    assert "".join(llm.generate("the fox", max_tokens=8, **GREEDY)) == want
    assert llm.detokenize(llm.tokenize("the sun and the fox")) == "the sun and the fox"


def test_completion_dict_and_stream_agree(llm):
    r = llm.create_completion("the sun", max_tokens=6, **GREEDY)
    assert r["object"] == "text_completion" and r["model"] == "tiny.gguf"
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "length"
    n_prompt = len(llm.tokenize("the sun"))
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6,
                          "total_tokens": n_prompt + 6}
    chunks = list(llm.create_completion("the sun", max_tokens=6, stream=True, **GREEDY))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == r["usage"]


def test_stop_string_cuts_the_text(llm):
    full = llm.create_completion("the", max_tokens=24, **GREEDY)["choices"][0]["text"]
    stop = full[10:13]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        r = llm.create_completion("the", max_tokens=24, stop=[stop, "never-there"],
                                  stream=stream, **GREEDY)
        if stream:
            r = list(r)
            text = "".join(c["choices"][0]["text"] for c in r)
            finish = r[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = r["choices"][0]["text"], r["choices"][0]["finish_reason"]
        assert text == cut and finish == "stop"


def test_seed_repeats_and_differs(llm):
    kw = dict(max_tokens=12, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True)
    a = llm.create_completion("a", seed=3, **kw)["choices"][0]["text"]
    assert llm.create_completion("a", seed=3, **kw)["choices"][0]["text"] == a
    others = {llm.create_completion("a", seed=s, **kw)["choices"][0]["text"] for s in (4, 5, 6)}
    assert others - {a}


def test_logprobs(llm):
    r = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4,
                                   logprobs=True, top_logprobs=3, **GREEDY)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for c in content:
        assert c["logprob"] <= 0 and len(c["top_logprobs"]) == 3
        assert c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"])  # greedy: the best
        assert c["bytes"] == list(c["token"].encode())
    r = llm.create_completion("hi", max_tokens=3, logprobs=2, **GREEDY)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]


def test_chat_completion_and_chat(llm):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = llm.create_chat_completion(msgs, max_tokens=5, **GREEDY)
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"]["role"] == "assistant"
    assert "".join(llm.chat(msgs, max_tokens=5, **GREEDY)) == r["choices"][0]["message"]["content"]
    chunks = list(llm.create_chat_completion(msgs, max_tokens=5, stream=True, **GREEDY))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        r["choices"][0]["message"]["content"]
    assert r["usage"]["prompt_tokens"] == len(llm.chat_prompt_ids(msgs))


def test_prompt_prefix_is_reused(llm):
    cache = llm.new_cache()
    first = llm.run(llm.tokenize("the sun and the fox"), cache, max_tokens=2, **GREEDY)
    list(first)
    longer = llm.tokenize("the sun and the fox run")
    second = llm.run(longer, cache, max_tokens=2, **GREEDY)
    out = [t for t, _ in second]
    assert second.n_cached >= len(llm.tokenize("the sun and the fox")) - 1
    fresh = llm.run(longer, llm.new_cache(), max_tokens=2, **GREEDY)
    assert [t for t, _ in fresh] == out and fresh.n_cached == 0


def test_session_drops_oldest_turns_when_full(llm):
    shifts = []
    s = blockq.ChatSession(llm, system="sys", n_ctx=96, on_shift=shifts.append, **GREEDY)
    for i in range(8):
        assert "".join(s.reply(f"message number {i}", max_tokens=8)) is not None
    assert shifts and all(n >= 1 for n in shifts)
    assert s.messages[0] == {"role": "system", "content": "sys"}  # the system message stays
    assert s.messages[-2]["content"] == "message number 7"
    assert len(s.prompt_ids()) < 96


def test_interrupted_reply_stays_in_history(llm):
    s = blockq.ChatSession(llm, **GREEDY)
    pieces = s.reply("hello there", max_tokens=20)
    got = next(pieces)
    pieces.close()  # what Ctrl-C does
    assert s.messages[-1] == {"role": "assistant", "content": got}
    assert "".join(s.reply("and then", max_tokens=3))  # the conversation goes on


@pytest.mark.parametrize("kw,match", [
    (dict(max_tokens="5"), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(stop=5), "stop"),
    (dict(logprobs=99), "logprobs"),
    (dict(top_k=1.5), "top_k"),
    (dict(presence_penalty=5), "presence_penalty"),
    (dict(response_format={"type": "json_schema", "json_schema": {}}), "json_schema"),
    (dict(response_format="json"), "response_format"),
])
def test_bad_arguments(llm, kw, match):
    with pytest.raises(BadArgument, match=match):
        llm.create_completion("hi", **kw)


def test_prompt_longer_than_context(llm):
    with pytest.raises(BadArgument, match="context holds 128"):
        llm.create_completion("the " * 200)
    with pytest.raises(BadArgument, match="prompt must be"):
        llm.create_completion([])


def test_generate_matches_low_level_generate(llm):
    ids = llm.tokenize("sun")
    low = list(generate(llm.model, ids, n_predict=5, cache=llm.new_cache()))
    assert "".join(llm.generate(ids, max_tokens=5, temperature=0)) == llm.detokenize(low)


def test_stream_chunks_carry_text(llm):
    chunks = list(llm.create_completion("the", max_tokens=10, stream=True, **GREEDY))
    assert all(c["choices"][0]["text"] for c in chunks[:-1])  # only the last one may be empty


JSON = {"type": "json_object"}


@pytest.mark.parametrize("max_tokens", [2, 3, 7, 30, None])
def test_json_object_completion_parses(llm, max_tokens):
    """The tiny random model writes whatever it likes; the mask keeps it one JSON object, closed
    in time for ``max_tokens`` (None: the context)."""
    r = llm.create_completion("the fox", max_tokens=max_tokens, temperature=0,
                              response_format=JSON)
    text = r["choices"][0]["text"]
    assert isinstance(json.loads(text), dict)
    assert r["choices"][0]["finish_reason"] == "stop"
    if max_tokens is not None:
        assert r["usage"]["completion_tokens"] <= max_tokens


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_object_chat_sampled_and_streamed(llm, seed):
    msgs = [{"role": "user", "content": "a JSON object please"}]
    kw = dict(max_tokens=40, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
              response_format=JSON)
    r = llm.create_chat_completion(msgs, **kw)
    text = r["choices"][0]["message"]["content"]
    assert isinstance(json.loads(text), dict)
    chunks = list(llm.create_chat_completion(msgs, stream=True, **kw))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


def test_json_object_greedy_keeps_allowed_argmax(llm):
    """Greedy under the mask: each token is the best one the JSON allows."""
    from blockq.json_constraint import JsonObject
    ids = llm.tokenize("the sun")
    r = llm.run(ids, llm.new_cache(), max_tokens=12, temperature=0, response_format=JSON)
    out = [i.id for _, infos in r for i in infos]
    c, cache = JsonObject(llm.json_vocab()), llm.new_cache()
    logits = llm.model.forward(ids, cache, "last")[0]
    for k, t in enumerate(out):
        allowed = c.mask(12 - k)
        assert t == int(np.argmax(np.where(allowed, logits, -np.inf)))
        c.advance(t)
        logits = llm.model.forward([t], cache, "last")[0]
    assert c.done and r.finish_reason == "stop"
