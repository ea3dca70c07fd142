"""Constrained sampling for ``response_format: {"type": "json_object"}``: a byte-level JSON state
machine and the token masks it gives, so that what a model writes is always one JSON object.

As llama.cpp's JSON grammar (``grammars/json.gbnf``), written as code: the output is an object
(one space or newline before it allowed); between tokens at most one space, or one newline and
``MAX_WS`` spaces/tabs; strings of valid UTF-8 with JSON's escapes; numbers as RFC 8259 spells
them.  Generation stops when the top-level object closes.  A token is allowed when all of its bytes keep the text a valid prefix *and* the
shortest way to close the object from there still fits the tokens left (``max_tokens`` or the
context), so a cut-off answer still parses.

    vocab = JsonVocab.from_tokenizer(tok)     # once per model: token bytes as a trie
    c = JsonObject(vocab)
    ok = c.mask(budget)                        # (n_vocab,) bool; then sample, then
    c.advance(token_id)                        # ... until c.done

A state is a tuple ``(stack, mode, aux)``: ``stack`` the open containers as a string of ``{``
and ``[`` (plus ``k`` while inside an object key), ``mode`` one of the constants below, ``aux``
the whitespace so far (structural modes: 0 none, 1.. a newline and its indent, ``MAX_WS + 1``
no more), the hex digits or UTF-8 continuation bytes still due, or the rest of a ``true`` /
``false`` / ``null`` literal.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .errors import BadArgument

MAX_WS = 20  # indent after a newline (llama.cpp's grammar caps it too: no endless whitespace)
N_CACHED = 64  # masks kept per vocabulary, by state (an object's states repeat a lot)

(START, VALUE, OBJ_FIRST, OBJ_KEY, COLON, AFTER, ARR_FIRST,  # structural: aux = whitespace run
 STR, ESC, HEX, UTF, LIT,  # inside a string / literal
 NUM_MINUS, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_ESIGN, NUM_EXP,
 DONE) = range(21)
NUMBER_DONE = frozenset((NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP))  # a number may end here
INITIAL = ("", START, 0)

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_CLOSER = {"{": b"}", "[": b"]"}


def _utf8_continuations(b: int) -> int:
    """Continuation bytes a UTF-8 lead byte announces (0: not a lead byte)."""
    if 0xC2 <= b <= 0xDF:
        return 1
    if 0xE0 <= b <= 0xEF:
        return 2
    if 0xF0 <= b <= 0xF4:
        return 3
    return 0


def _number_step(mode: int, b: int) -> int | None:
    """-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?, one byte at a time."""
    digit = b in _DIGITS
    if mode == NUM_MINUS:
        return NUM_ZERO if b == 0x30 else NUM_INT if digit else None
    if mode in (NUM_INT, NUM_FRAC, NUM_EXP) and digit:
        return mode
    if mode in (NUM_ZERO, NUM_INT) and b == 0x2E:  # .
        return NUM_DOT
    if mode in (NUM_ZERO, NUM_INT, NUM_FRAC) and b in (0x45, 0x65):  # E e
        return NUM_E
    if mode == NUM_DOT:
        return NUM_FRAC if digit else None
    if mode == NUM_E:
        return NUM_ESIGN if b in (0x2B, 0x2D) else NUM_EXP if digit else None
    if mode == NUM_ESIGN:
        return NUM_EXP if digit else None
    return None


def _close(stack: str) -> tuple:
    stack = stack[:-1]
    return (stack, AFTER, 0) if stack else ("", DONE, 0)


def _value(stack: str, b: int) -> tuple | None:
    if b == 0x7B:  # {
        return (stack + "{", OBJ_FIRST, 0)
    if b == 0x5B:  # [
        return (stack + "[", ARR_FIRST, 0)
    if b == 0x22:  # "
        return (stack, STR, 0)
    if b in _LITERALS:
        return (stack, LIT, _LITERALS[b])
    if b == 0x2D:  # -
        return (stack, NUM_MINUS, 0)
    if b in _DIGITS:
        return (stack, NUM_ZERO if b == 0x30 else NUM_INT, 0)
    return None


def step(state: tuple, b: int) -> tuple | None:
    """The state after byte ``b``, or None if ``b`` cannot come next in a JSON object."""
    stack, mode, aux = state
    if mode == STR:
        if b == 0x22:  # the closing quote: a key wants its colon next
            return (stack[:-1], COLON, 0) if stack[-1] == "k" else (stack, AFTER, 0)
        if b == 0x5C:
            return (stack, ESC, 0)
        if 0x20 <= b < 0x80:
            return state
        n = _utf8_continuations(b)
        return (stack, UTF, n) if n else None
    if mode == UTF:
        if 0x80 <= b < 0xC0:
            return (stack, UTF, aux - 1) if aux > 1 else (stack, STR, 0)
        return None
    if mode == ESC:
        if b in _ESCAPES:
            return (stack, STR, 0)
        return (stack, HEX, 4) if b == 0x75 else None  # \uXXXX
    if mode == HEX:
        if b in _HEX:
            return (stack, HEX, aux - 1) if aux > 1 else (stack, STR, 0)
        return None
    if mode == LIT:
        if b != aux[0]:
            return None
        return (stack, LIT, aux[1:]) if len(aux) > 1 else (stack, AFTER, 0)
    if NUM_MINUS <= mode <= NUM_EXP:
        nxt = _number_step(mode, b)
        if nxt is not None:
            return (stack, nxt, 0)
        return step((stack, AFTER, 0), b) if mode in NUMBER_DONE else None
    if mode == DONE:
        return None
    if b in _WS:  # the structural modes: "" | " " | "\n" [ \t]{0,MAX_WS}, as llama.cpp's ws
        if aux == 0 and b in (0x20, 0x0A):
            return (stack, mode, 1 if b == 0x0A and mode != START else MAX_WS + 1)
        return (stack, mode, aux + 1) if 1 <= aux <= MAX_WS and b in (0x20, 0x09) else None
    if mode == START:
        return ("{", OBJ_FIRST, 0) if b == 0x7B else None
    if mode == VALUE:
        return _value(stack, b)
    if mode == ARR_FIRST:
        return _close(stack) if b == 0x5D else _value(stack, b)
    if mode == OBJ_FIRST and b == 0x7D:
        return _close(stack)
    if mode in (OBJ_FIRST, OBJ_KEY):
        return (stack + "k", STR, 0) if b == 0x22 else None
    if mode == COLON:
        return (stack, VALUE, 0) if b == 0x3A else None
    # AFTER a value: a comma or the container's closer
    top = stack[-1]
    if b == 0x2C:
        return (stack, OBJ_KEY if top == "{" else VALUE, 0)
    if b == (0x7D if top == "{" else 0x5D):
        return _close(stack)
    return None


def walk(state: tuple | None, data: bytes) -> tuple | None:
    """The state after all of ``data`` (None as soon as a byte is refused)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def completion(state: tuple) -> bytes:
    """The shortest bytes that close the object from ``state`` (b"" when it is done)."""
    stack, mode, aux = state
    if mode == DONE:
        return b""
    if mode == START:
        return b"{}"
    head = b""
    if mode == UTF:
        head, mode = b"\x80" * aux, STR
    elif mode == HEX:
        head, mode = b"0" * aux, STR
    elif mode == ESC:
        head, mode = b"n", STR
    if mode == STR:
        head += b'"'
        if stack[-1] == "k":
            stack, head = stack[:-1], head + b":0"
    elif mode == LIT:
        head = aux
    elif mode in (VALUE, NUM_MINUS, NUM_DOT, NUM_E, NUM_ESIGN):
        head = b"0"
    elif mode == COLON:
        head = b":0"
    elif mode == OBJ_KEY:
        head = b'"":0'
    return head + b"".join(_CLOSER[c] for c in reversed(stack))


def accepts(data: bytes) -> bool:
    """Whether ``data`` is a prefix of one JSON object (complete or not)."""
    return walk(INITIAL, data) is not None


class JsonVocab:
    """A vocabulary's token bytes, once per model: a trie the masks are computed over, and the
    masks already computed (by state)."""

    def __init__(self, pieces: Sequence[bytes]):
        self.pieces = list(pieces)
        self.n_vocab = len(self.pieces)
        self.root: tuple[dict, list] = ({}, [])  # (children by byte, ids ending here)
        for tid, piece in enumerate(self.pieces):
            if not piece:
                continue  # control tokens (end of generation among them) write nothing
            node = self.root
            for b in piece:
                node = node[0].setdefault(b, ({}, []))
            node[1].append(tid)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @classmethod
    def from_tokenizer(cls, tok) -> "JsonVocab":
        return cls([tok.token_to_piece(i) for i in range(tok.n_vocab)])

    def closing_lengths(self, state: tuple) -> np.ndarray:
        """(n_vocab,) int32: for each token, the length of ``completion`` after it; -1 where
        the token's bytes cannot follow ``state``."""
        hit = self._cache.get(state)
        if hit is not None:
            self._cache.move_to_end(state)
            return hit
        out = np.full(self.n_vocab, -1, np.int32)
        todo = [(child, s) for b, child in self.root[0].items()
                if (s := step(state, b)) is not None]
        while todo:
            (children, ids), s = todo.pop()
            if ids:
                out[ids] = len(completion(s))
            for b, child in children.items():
                t = step(s, b)
                if t is not None:
                    todo.append((child, t))
        self._cache[state] = out
        if len(self._cache) > N_CACHED:
            self._cache.popitem(last=False)
        return out


class JsonObject:
    """One generation's place in the JSON object it writes."""

    def __init__(self, vocab: JsonVocab):
        self.vocab = vocab
        self.state = INITIAL

    @property
    def done(self) -> bool:
        return self.state[1] == DONE

    def allows(self, token_id: int, budget: int) -> bool:
        """Whether ``token_id`` may come next with ``budget`` tokens left (it included)."""
        piece = self.vocab.pieces[token_id]
        s = walk(self.state, piece) if piece else None
        return s is not None and len(completion(s)) <= budget - 1

    def mask(self, budget: int) -> np.ndarray:
        """(n_vocab,) bool: the tokens ``allows`` lets through.  When no token can close the
        object in time (``budget`` < 2 at the start, a vocabulary without one-byte tokens),
        every valid token: the answer is then cut off by the length limit."""
        lengths = self.vocab.closing_lengths(self.state)
        ok = (lengths >= 0) & (lengths <= budget - 1)
        if not ok.any():
            ok = lengths >= 0
        if not ok.any():
            raise BadArgument(f"response_format json_object: no token of this vocabulary can "
                              f"continue the JSON after {completion(self.state)!r} is due")
        return ok

    def advance(self, token_id: int) -> None:
        piece = self.vocab.pieces[token_id]
        s = walk(self.state, piece) if piece else None
        if s is None:
            raise BadArgument(f"token {token_id} ({piece!r}) cannot continue the JSON object")
        self.state = s
