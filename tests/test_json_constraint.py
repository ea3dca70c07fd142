"""The JSON state machine behind ``response_format: json_object``, on its own: prefixes it
accepts and refuses, the shortest completions it proposes, and the token masks over a vocabulary
(checked against walking every token's bytes one by one)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from blockq.json_constraint import (DONE, INITIAL, JsonObject, JsonVocab, accepts, completion,
                                    walk)

VALID_PREFIXES = [
    b"", b"{", b" {", b"\n{", b"{}", b'{"', b'{"a', b'{"a"', b'{"a":', b'{"a": ', b'{"a":1',
    b'{"a":-0.5e+3', b'{"a":12E4}', b'{"a":tr', b'{"a":true', b'{"a":null,"b":false}',
    b'{"a":[', b'{"a":[]', b'{"a":[1,2,{"b":[]}]}', b'{"a":"\\u00e9\\n\\"', b'{"a":"\\u12',
    "{\"é\":\"日本\"}".encode(), b'{"a":"\xe6\x97', b'{\n  "a": {\n\t\t"b": [ 1, 2 ]\n  }\n}',
    b'{"a":0.', b'{"a":1e', b'{"a":1e-', b'{"a":-',
]
INVALID = [
    b"[", b"1", b'"a"', b"  {", b"\t{", b"{{", b"{a", b"{'a'", b'{"a"}', b'{"a" 1', b'{"a":}',
    b'{"a":1,}', b'{"a":[1,]}', b'{"a":01', b'{"a":1.e3', b'{"a":+1', b'{"a":.5', b'{"a":tx',
    b'{"a":True', b'{"a":"\n', b'{"a":"\\x', b'{"a":"\\u12g', b'{"a":"\x80', b'{"a":"\xff',
    b'{"a":"\xc3x', b'{}x', b"{} ", b'{"a":1}}', b'{"a":[1}', b'{"a":{]}', b'{"a": 1  }',
    b"{\n" + b" " * 21 + b"}", b"{\n\n}",
]


@pytest.mark.parametrize("data", VALID_PREFIXES)
def test_valid_prefixes_are_accepted_and_complete_to_json(data):
    assert accepts(data)
    end = walk(INITIAL, data)
    tail = completion(end)
    closed = walk(end, tail)
    assert closed is not None and closed[1] == DONE
    whole = (data + tail).decode("utf-8", errors="replace")
    assert isinstance(json.loads(whole), dict)


@pytest.mark.parametrize("data", INVALID)
def test_invalid_prefixes_are_refused(data):
    assert not accepts(data)


def test_completion_lengths():
    assert completion(INITIAL) == b"{}"
    assert completion(walk(INITIAL, b'{"a":[{"b')) == b'":0}]}'
    assert completion(walk(INITIAL, b'{"a":{"b":1,')) == b'"":0}}'
    assert completion(walk(INITIAL, b'{"a":fa')) == b"lse}"
    assert completion(walk(INITIAL, b'{"a":"\\u1')) == b'000"}'
    assert completion(walk(INITIAL, b'{"a":1}')) == b""


# a small vocabulary: every ASCII byte, some multi-byte pieces, a control token (b"")
PIECES = [bytes([b]) for b in range(128)] + [
    b'{"', b'":', b'"}', b"}}", b"},", b"true", b"null}", b"12", b"1.", b" {", b"\n  ",
    b'\\u', "é".encode(), "日".encode()[:2], "日".encode()[2:], b"", b'{}', b'"a"', b"]}",
]


@pytest.fixture(scope="module")
def vocab():
    return JsonVocab(PIECES)


@pytest.mark.parametrize("prefix", [b"", b"{", b'{"a', b'{"a":', b'{"a":[1', b'{"a":"\\',
                                    b'{"a":tr', b'{"a":"\xe6', b'{"a":{"b":null}'])
def test_masks_match_walking_each_token(vocab, prefix):
    state = walk(INITIAL, prefix)
    lengths = vocab.closing_lengths(state)
    for tid, piece in enumerate(PIECES):
        end = walk(state, piece) if piece else None
        want = -1 if end is None else len(completion(end))
        assert lengths[tid] == want, (prefix, piece)
    assert vocab.closing_lengths(state) is lengths  # cached


def test_budget_closes_the_object_in_time(vocab):
    rng = np.random.default_rng(0)
    for budget in (2, 3, 5, 9, 20):
        for _ in range(20):
            c, out = JsonObject(vocab), b""
            for left in range(budget, 0, -1):
                if c.done:
                    break
                tid = int(rng.choice(np.flatnonzero(c.mask(left))))
                assert c.allows(tid, left)
                c.advance(tid)
                out += PIECES[tid]
            assert c.done, (budget, out)
            assert isinstance(json.loads(out.decode("utf-8", errors="replace")), dict)


def test_control_tokens_and_bad_tokens_are_never_allowed(vocab):
    c = JsonObject(vocab)
    eos = PIECES.index(b"")
    assert not c.allows(eos, 100) and not c.mask(100)[eos]
    assert not c.allows(ord("["), 100)
    with pytest.raises(Exception, match="cannot continue"):
        c.advance(ord("["))
