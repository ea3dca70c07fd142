"""``blockq chat`` in a pseudo-terminal, driven like a person would (pexpect): Ctrl-C stops a
reply and the conversation goes on with it; a conversation longer than -c keeps going."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect  # the [test] extra installs it
import pytest

from tiny_model import write_tiny

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # a long native context, so a reply that never ends (--ignore-eos) lasts long enough to be
    # interrupted
    return write_tiny(tmp_path_factory.mktemp("pty") / "tiny.gguf", qtype="Q8_0",
                      extra_md={"llama.context_length": 4096})


def spawn(*args) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "blockq", "chat", *map(str, args)], cwd=ROOT,
                          env=env, encoding="utf-8", timeout=180, dimensions=(40, 200))
    child.expect("Ctrl-C stops a reply")
    return child


def prompt_tokens(child) -> tuple[int, int]:
    """(evaluated, cached) prompt tokens of the last reply, from its timing line."""
    child.expect(r"prompt: (\d+) tokens(?: \(\+(\d+) cached\))?")
    return int(child.match.group(1)), int(child.match.group(2) or 0)


def interrupt_reply(child, message: str) -> tuple[int, int]:
    """Send ``message``, press Ctrl-C once the reply is under way; the reply's prompt counts."""
    child.expect("> ")
    child.sendline(message)
    child.expect(re.escape(message))  # the terminal's echo
    child.expect(r"[\s\S]{60}")  # the reply is under way
    child.sendintr()
    child.expect(r"\[reply stopped; the conversation goes on\]")
    return prompt_tokens(child)


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(tiny):
    child = spawn("-m", tiny, "-c", 4096, "--temp", 0, "--ignore-eos")
    try:
        first = interrupt_reply(child, "tell me everything")
        child.expect(r"generation: (\d+) tokens")
        n_reply = int(child.match.group(1))
        n_eval, n_cached = interrupt_reply(child, "and then?")
        # the second prompt starts with the first turn *and* the interrupted reply, all of it
        # still in the cache: only the new turn is evaluated
        assert n_cached >= first[0] + n_reply - 2 and n_eval < 40
        child.expect("> ")
        child.sendintr()  # Ctrl-C at an empty prompt: a hint
        child.expect("Ctrl-C again to exit")
        child.sendintr()  # and again: exit
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_conversation_longer_than_the_context_keeps_going(tiny):
    child = spawn("-m", tiny, "-c", 96, "-n", 12, "--temp", 0, "--ignore-eos")
    try:
        shifts = 0
        for i in range(10):
            child.expect("> ")
            child.sendline(f"message {i} with a few words in it")
            got = child.expect([r"\[context full: the oldest \d+ messages were dropped\]",
                                r"generation: 12 tokens"])
            if got == 0:
                shifts += 1
                child.expect("generation: 12 tokens")
        assert shifts >= 2
        child.expect("> ")
        child.sendline("multi-line \\")
        child.expect(r"\.\.\. ")
        child.sendline("message, second line")
        child.expect("generation: 12 tokens")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert not re.search(r"error|Traceback", child.before or "")
