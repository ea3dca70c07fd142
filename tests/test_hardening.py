"""Hostile and careless input: every case is one clear blockq error, never a traceback,
a crash, an exhausted machine, or a lost or half-written file.

Each test here is one of the cases found by probing blockq as an attacker would (issue 15).
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from blockq.convert import convert
from blockq.errors import BlockqError, FileError, FormatError, UnsupportedModel
from blockq.model import Model, ModelArgs
from blockq.tokenizer import Tokenizer
from test_convert import QUIET, THIS_CHECKOUT, make_hf, writing_into
from test_model import BASE_MD
from tiny_model import tokenizer_metadata, write_tiny


# --- model metadata -----------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("llama.embedding_length", 0, ["embedding_length = 0", "[1, "]),
    ("llama.attention.head_count", 0, ["head_count = 0"]),
    ("llama.attention.head_count_kv", 0, ["head_count_kv = 0"]),
    ("llama.attention.head_count_kv", [], ["empty array"]),
    ("llama.context_length", -5, ["context_length = -5"]),
    ("llama.context_length", 1 << 40, ["context_length = 1,099,511,627,776"]),
    ("general.architecture", ["llama"], ["general.architecture", "must be a string"]),
    ("llama.block_count", "30", ["block_count = '30'", "a string"]),
    ("llama.block_count", 100_000, ["block_count = 100,000", "512"]),
    ("llama.embedding_length", math.nan, ["embedding_length = nan", "integer"]),
    ("llama.embedding_length", 577, ["not a multiple of head_count 9"]),
    ("llama.feed_forward_length", True, ["feed_forward_length = True", "a boolean"]),
    ("llama.attention.layer_norm_rms_epsilon", math.nan, ["layer_norm_rms_epsilon = nan"]),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5, ["layer_norm_rms_epsilon = -1e-05"]),
    ("llama.attention.layer_norm_rms_epsilon", "1e-5", ["a string"]),
    ("llama.rope.freq_base", 0.0, ["freq_base = 0.0", "(1.0, inf)"]),
    ("llama.rope.freq_base", -10000.0, ["freq_base = -10000.0"]),
    ("llama.rope.freq_base", math.inf, ["freq_base = inf"]),
    ("llama.rope.scaling.factor", 1e-30, ["scaling factor 1e-30 is too small"]),
    ("llama.rope.scaling.factor", -2.0, ["scaling.factor = -2.0"]),
    ("llama.rope.scaling.type", 1, ["scaling.type = 1", "must be a string"]),
    ("llama.attention.key_length", 0, ["key_length = 0"]),
    ("llama.rope.dimension_count", -2, ["dimension_count = -2"]),
    ("llama.vocab_size", 0, ["vocabulary size = 0"]),
])
def test_bad_metadata_value_is_one_format_error(key, value, words):
    with pytest.raises(FormatError) as e:
        ModelArgs.from_metadata({**BASE_MD, key: value}, where="m.gguf")
    msg = str(e.value)
    assert msg.startswith("m.gguf: ") and "\n" not in msg
    for w in words:
        assert w in msg


def test_missing_key_and_empty_vocabulary():
    md = {k: v for k, v in BASE_MD.items() if k != "llama.vocab_size"}
    with pytest.raises(FormatError, match="tokenizer.ggml.tokens is missing"):
        ModelArgs.from_metadata(md)
    with pytest.raises(FormatError, match="vocabulary size = 0"):
        ModelArgs.from_metadata({**md, "tokenizer.ggml.tokens": []})


def test_model_load_names_the_file_for_an_array_architecture(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", extra_md={"general.architecture": ["llama", "x"]})
    with pytest.raises(FormatError, match=r"m\.gguf: general\.architecture .* must be a string"):
        Model.load(path)


@pytest.mark.parametrize("key, value, words", [
    ("tokenizer.ggml.tokens", [], ["tokenizer.ggml.tokens has 0 entries"]),
    ("tokenizer.ggml.merges", np.arange(4, dtype=np.uint32), ["uint32", "array of strings"]),
    ("tokenizer.ggml.tokens", np.arange(4, dtype=np.int32), ["array of strings"]),
    ("tokenizer.ggml.token_type", ["a", "b"], ["not an array of integers"]),
    ("tokenizer.ggml.bos_token_id", "1", ["bos_token_id = '1'"]),
    ("tokenizer.ggml.model", ["gpt2"], ["tokenizer.ggml.model", "must be a string"]),
])
def test_bad_tokenizer_metadata_is_one_format_error(key, value, words):
    with pytest.raises(FormatError) as e:
        Tokenizer.from_metadata({**tokenizer_metadata(), key: value})
    for w in words:
        assert w in str(e.value)


# --- Hugging Face configs and safetensors headers ----------------------------------------------
def _hf_with(tmp_path, cfg_edit=None, config_text=None):
    make_hf(tmp_path / "hf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)
    path = tmp_path / "hf" / "config.json"
    if config_text is None:
        cfg = json.loads(path.read_text())
        cfg_edit(cfg)
        config_text = json.dumps(cfg)
    path.write_text(config_text)
    (tmp_path / "o").mkdir()
    return tmp_path / "hf", tmp_path / "o" / "out.gguf"


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("edit, error, words", [
    (_set("num_attention_heads", 0), FormatError, ["num_attention_heads = 0"]),
    (_set("num_hidden_layers", "1"), FormatError, ["num_hidden_layers = '1'", "a string"]),
    (_set("num_hidden_layers", [1]), FormatError, ["num_hidden_layers = [1]", "an array"]),
    (_set("num_hidden_layers", 10_000_000), FormatError, ["10,000,000", "512"]),
    (_set("hidden_size", 65), FormatError, ["not a multiple of num_attention_heads 2"]),
    (_set("num_key_value_heads", 0), FormatError, ["num_key_value_heads = 0"]),
    (_set("rms_norm_eps", -1.0), FormatError, ["rms_norm_eps = -1.0"]),
    (_set("rope_theta", 0), FormatError, ["rope_theta = 0.0"]),
    (_set("vocab_size", 1.5), FormatError, ["vocab_size = 1.5"]),
    (_set("architectures", [{}]), UnsupportedModel, ["architecture {}"]),
    (_set("architectures", "LlamaForCausalLM"), None, []),
    (_set("rope_scaling", "linear"), FormatError, ["rope_scaling = 'linear'", "object"]),
    (_set("rope_scaling", {"rope_type": "linear", "factor": 0}), FormatError, ["factor = 0.0"]),
    (_set("tie_word_embeddings", "yes"), FormatError, ["tie_word_embeddings = 'yes'"]),
])
def test_bad_hf_config_is_one_error_before_any_work(tmp_path, edit, error, words):
    src, out = _hf_with(tmp_path, edit)
    if error is None:  # a bare string names the class as well as a one-element list does
        convert(src, out, "Q8_0", **QUIET)
        assert out.exists()
        return
    with pytest.raises(error) as e:
        convert(src, out, "Q8_0", **QUIET)
    assert "config.json" in str(e.value)
    for w in words:
        assert w in str(e.value)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("text, words", [
    ("[]", ["top level is an array"]),
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, ["nested too deeply"]),
    ("\xff", ["not valid JSON"]),
])
def test_unusable_config_json(tmp_path, text, words):
    src, out = _hf_with(tmp_path, config_text=text)
    with pytest.raises(FormatError) as e:
        convert(src, out, "Q8_0", **QUIET)
    for w in words:
        assert w in str(e.value)


def _rewrite_header(path, header):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    body = raw[8 + n:]
    h = (header if isinstance(header, bytes) else json.dumps(header).encode())
    path.write_bytes(len(h).to_bytes(8, "little") + h + body)


def _first_entry(edit):
    def f(h):
        name = next(k for k in h if k != "__metadata__")
        edit(h[name])
        return h
    return f


@pytest.mark.parametrize("make_header, words", [
    (lambda h: [], ["header is []", "JSON object"]),
    (lambda h: b"[" * 50_000 + b"]" * 50_000, ["nested too deeply"]),
    (_first_entry(lambda e: e.__setitem__("shape", [-1, 64])), ["shape = -1"]),
    (_first_entry(lambda e: e.__setitem__("shape", ["64", 64])), ["shape = '64'"]),
    (_first_entry(lambda e: e.__setitem__("data_offsets", ["0", 4])), ["data_offsets = '0'"]),
    (_first_entry(lambda e: e.__setitem__("dtype", ["F32"])), ["is ['F32']"]),
    (lambda h: {**h, "x": 5}, ["lacks dtype/shape/data_offsets"]),
])
def test_bad_safetensors_header(tmp_path, make_header, words):
    src, out = _hf_with(tmp_path, lambda c: None)
    st = src / "model.safetensors"
    n = int.from_bytes(st.read_bytes()[:8], "little")
    header = json.loads(st.read_bytes()[8:8 + n])
    _rewrite_header(st, make_header(header))
    with pytest.raises(BlockqError) as e:
        convert(src, out, "Q8_0", **QUIET)
    for w in words:
        assert w in str(e.value)
    assert list(out.parent.iterdir()) == []


# --- outputs: never an input, never a special file, never half-written ---------------------------
def _tiny_gguf(tmp_path):
    return write_tiny(tmp_path / "m.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)


def _cli(args):
    """Run the blockq command in-process: (exit code, stderr lines)."""
    import contextlib
    import io

    from blockq.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, err.getvalue().strip().splitlines()


@pytest.mark.parametrize("how", ["same", "symlink-out", "symlink-in", "hardlink"])
def test_convert_refuses_to_overwrite_its_input(tmp_path, how):
    src = _tiny_gguf(tmp_path)
    before = src.read_bytes()
    out = src
    if how == "symlink-out":
        out = tmp_path / "link.gguf"
        out.symlink_to(src)
    elif how == "symlink-in":
        (tmp_path / "in.gguf").symlink_to(src)
        src = tmp_path / "in.gguf"
        out = tmp_path / "m.gguf"
    elif how == "hardlink":
        out = tmp_path / "hard.gguf"
        os.link(src, out)
    code, err = _cli(["convert", src, out, "--type", "Q8_0", "--quiet"])
    assert code == 1 and len(err) == 1 and "is the input" in err[0]
    assert (tmp_path / "m.gguf").read_bytes() == before


def test_imatrix_refuses_to_overwrite_the_model_before_computing(tmp_path, monkeypatch):
    import blockq.imatrix

    model = _tiny_gguf(tmp_path)
    before = model.read_bytes()
    (tmp_path / "t.txt").write_text("hello world " * 50)
    monkeypatch.setattr(blockq.imatrix, "compute_imatrix",
                        lambda *a, **k: pytest.fail("computed before checking the output"))
    for out, words in [(model, "is the input"), (tmp_path / "no" / "i.gguf", "does not exist"),
                       (tmp_path / "t.txt", "is the input")]:
        code, err = _cli(["imatrix", model, "-f", tmp_path / "t.txt", "-o", out, "-c", "16"])
        assert code == 1 and len(err) == 1 and words in err[0], err
    assert model.read_bytes() == before


def test_special_files_are_never_replaced(tmp_path):
    from blockq.errors import BadArgument
    from blockq.outfile import check_output

    with pytest.raises(BadArgument, match="/dev/null is a character device"):
        check_output("/dev/null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, err = _cli(["convert", _tiny_gguf(tmp_path), fifo, "--type", "Q8_0", "--quiet"])
    assert code == 1 and "is a FIFO (named pipe), not a regular file" in err[0]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))
    with pytest.raises(BadArgument, match="is a socket"):
        check_output(tmp_path / "s")
    sock.close()


def _convert_process(tmp_path, extra_code=""):
    """A CLI convert of a slow HF folder into tmp_path/o (which holds an old out.gguf)."""
    make_hf(tmp_path / "hf", n_layer=4, n_ff=2048)
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / "out.gguf").write_bytes(b"old")
    code = ("import sys, time, blockq.convert as c\n"
            "c.SLAB_BYTES = 4096\n"
            "orig = c._producer\n"
            "def slow(*a, **k):\n"
            "    f = orig(*a, **k)\n"
            "    return lambda: (time.sleep(0.1), f())[1]\n"
            "c._producer = slow\n" + extra_code +
            "from blockq.cli import main\n"
            "main(sys.argv[1:])\n")
    return subprocess.Popen([sys.executable, "-c", code, "convert", str(tmp_path / "hf"),
                             str(tmp_path / "o" / "out.gguf"), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env=THIS_CHECKOUT)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGQUIT])
def test_a_signal_during_convert_leaves_only_the_old_file(tmp_path, sig):
    p = _convert_process(tmp_path)
    assert writing_into(p.pid, tmp_path / "o")
    time.sleep(0.3)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == (-9 if sig == signal.SIGKILL else 130), err.decode()
    assert [x.name for x in (tmp_path / "o").iterdir()] == ["out.gguf"]
    assert (tmp_path / "o" / "out.gguf").read_bytes() == b"old"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_a_signal_while_numba_compiles_is_raised_once_the_compile_is_over(sig):
    # a KeyboardInterrupt thrown into Numba's compiler, or into the LLVM callbacks where ctypes
    # swallows it, left half-built LLVM objects: the convert of a clean clone (nothing cached
    # yet) died of "no compiled object yet" (exit code 1), or of SIGSEGV, instead of 130
    import numba
    from numba.core import event

    from blockq.outfile import signals_as_interrupt

    class Signal(event.Listener):
        def on_start(self, ev):
            os.kill(os.getpid(), sig)

        def on_end(self, ev):
            pass

    @numba.njit(cache=False)
    def f(x):
        return x + 1

    listener = Signal()
    event.register("numba:compile", listener)
    try:
        with signals_as_interrupt(), pytest.raises(KeyboardInterrupt):
            f(1)
    finally:
        event.unregister("numba:compile", listener)
    assert len(f.signatures) == 1  # the compile was not cut short
    assert f(1) == 2


def test_a_source_changing_under_convert_stops_it(tmp_path):
    make_hf(tmp_path / "hf")
    (tmp_path / "o").mkdir()
    st = tmp_path / "hf" / "model.safetensors"

    def overwrite(ev):
        if ev.i_tensor == 3:
            with open(st, "r+b") as f:  # another process rewriting the file in place
                f.seek(-64, os.SEEK_END)
                f.write(b"\0" * 64)
            os.utime(st, ns=(time.time_ns(), time.time_ns() + 10**9))

    with pytest.raises(FileError, match="changed while blockq read it"):
        convert(tmp_path / "hf", tmp_path / "o" / "out.gguf", "Q8_0", progress=overwrite,
                **QUIET)
    assert list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize("where, err", [("create", errno.EROFS), ("create", errno.EACCES),
                                        ("create", errno.EPERM), ("write", errno.ENOSPC)])
def test_file_system_errors_are_one_line_naming_path_and_cause(tmp_path, monkeypatch, where,
                                                               err):
    import blockq.outfile as of

    src = _tiny_gguf(tmp_path)
    (tmp_path / "o").mkdir()
    real_open, real_fdopen = os.open, os.fdopen

    def failing_open(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path / "o")) and flags & os.O_WRONLY:
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *a, **k)

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

    if where == "create":
        monkeypatch.setattr(of.os, "open", failing_open)
        monkeypatch.setattr(of.tempfile, "mkstemp", lambda **k: failing_open(
            k["dir"], os.O_WRONLY))
    else:
        monkeypatch.setattr(of.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    code, lines = _cli(["convert", src, tmp_path / "o" / "out.gguf", "--type", "Q8_0",
                        "--quiet"])
    assert code == 1 and len(lines) == 1, lines
    assert str(tmp_path / "o") in lines[0] and f"({errno.errorcode[err]})" in lines[0]
    assert list((tmp_path / "o").iterdir()) == []


# --- weights: no NaN/inf scale is ever written, and one read back names its tensor ---------------
@pytest.mark.parametrize("qt, big", [("Q4_0", 1e6), ("Q4_1", 3e6), ("Q4_K", 1e30),
                                     ("Q5_K", 3.4e38), ("Q2_K", 1e30), ("F16", 1e5)])
def test_quantize_refuses_weights_that_overflow_the_scale(qt, big):
    from blockq.errors import BadArgument
    from blockq.quantize import quantize

    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    x[1, 300] = big
    with pytest.raises(BadArgument) as e, np.errstate(over="ignore"):
        quantize(x, qt)
    block = 300 // (256 if qt.endswith("_K") else 32 if qt != "F16" else 1)
    assert f"row 1, block {block}," in str(e.value) and "NaN/inf" in str(e.value)


def test_convert_names_the_tensor_and_block_of_an_overflowing_weight(tmp_path):
    def huge(w):
        w["model.layers.0.mlp.up_proj.weight"][5, 40] = 1e6

    make_hf(tmp_path / "hf", mutate=huge)
    (tmp_path / "o").mkdir()
    with pytest.raises(BlockqError, match=r"blk\.0\.ffn_up\.weight .*row 5, block 1,"):
        convert(tmp_path / "hf", tmp_path / "o" / "out.gguf", "Q4_0", **QUIET)
    assert list((tmp_path / "o").iterdir()) == []


def _with_inf_scale(tmp_path):
    """A Q4_0 tiny model whose blk.0.ffn_down.weight block 3 has an inf scale."""
    import blockq

    path = write_tiny(tmp_path / "m.gguf", qtype="Q4_0", n_layer=1, n_embd=64, n_head=2,
                      n_head_kv=1, n_ff=128)
    with blockq.read_gguf(path) as f:
        t = f.tensors["blk.0.ffn_down.weight"]
        at = t.offset + 3 * 18  # block 3 of row 0: its f16 scale
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(np.float16(np.inf).tobytes())
    return path


def test_a_file_with_inf_scales_names_the_tensor(tmp_path):
    path = _with_inf_scale(tmp_path)
    with Model.load(path) as m:
        with pytest.raises(FormatError, match=r"m\.gguf: tensor blk\.0\.ffn_down\.weight \(Q4_0\)"
                           r" has 1 block\(s\) that decode to NaN/inf \(first: block 3\)"):
            m.forward([1, 2, 3], m.new_cache(16))
    for cmd in (["generate", path, "-p", "hi", "-n", "4", "--temp", "0"],
                ["perplexity", path, "-f", path.parent / "t.txt", "-c", "16"]):
        (path.parent / "t.txt").write_text("the cat sat on the mat " * 20)
        code, err = _cli(cmd)
        assert code == 1 and err[-1].startswith("error: ") and "blk.0.ffn_down" in err[-1], err


# --- chat templates: bounded in size, time and recursion; failures are one line -------------------
@pytest.mark.parametrize("template, words", [
    ("{{ 'a b ' * 50000000 }}", ["repeating 4 items 50,000,000 times"]),
    ("{{ messages|tojson(indent=400000000) }}", ["a size of 400,000,000"]),
    ("{{ [1, 2] * 100000000 }}", ["repeating 2 items"]),
    ("{{ 'a'|center(1000000000) }}", ["a size of 1,000,000,000"]),
    ("{{ 'q'.ljust(1000000000) }}", ["a size of 1,000,000,000"]),
    ("{{ '%999999999d' % 3 }}", ["a format width of 999,999,999"]),
    ("{{ '{:>999999999}'.format(1) }}", ["a format width of 999,999,999"]),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", ["characters of output"]),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
     ["longer than 0.5 s"]),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", ["recursion too deep"]),
    ("{{ 1/0 }}", ["ZeroDivisionError"]),
    ("{{ 10.0 ** 1000 }}", ["OverflowError"]),
    ("{{ 9 ** 99999 }}", ["integer power 9 ** 99999"]),
])
def test_template_is_bounded_and_fails_in_one_line(monkeypatch, template, words):
    import blockq.chat as chat

    monkeypatch.setattr(chat, "MAX_SECONDS", 0.5)
    monkeypatch.setattr(chat, "MAX_CHARS", 1 << 20)
    t0 = time.monotonic()
    with pytest.raises(chat.TemplateError) as e:
        chat.render_chat(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith("chat template") and "\n" not in msg
    for w in words:
        assert w in msg


def test_template_nested_too_deeply_to_compile():
    from blockq.chat import render_chat

    with pytest.raises(FormatError, match="chat template"):
        render_chat("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", [{"role": "user"}])


# --- text input and arguments ---------------------------------------------------------------------
def test_invalid_utf8_and_surrogates_become_replacement_characters():
    from blockq.validate import clean_text

    tok = Tokenizer.from_metadata(tokenizer_metadata())
    raw = b"caf\xff \xed\xa0\x80 ok".decode("utf-8", "surrogateescape")  # as argv/stdin give it
    assert clean_text(raw) == "caf\ufffd \ufffd\ufffd\ufffd ok"
    assert tok.encode(raw) == tok.encode("caf\ufffd \ufffd\ufffd\ufffd ok")
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_invalid_utf8_in_prompt_system_file_and_stdin(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the cat \xff\xfe sat " * 40)
    short = tmp_path / "short.txt"
    short.write_bytes(b"the cat \xff\xfe sat")
    env = THIS_CHECKOUT
    bad_arg = os.fsdecode(b"hi \xff there")
    for args, stdin in [(["generate", path, "-p", bad_arg, "-n", "2", "--temp", "0"], b""),
                        (["generate", path, "-p", "x", "-sys", bad_arg, "-n", "2"], b""),
                        (["generate", path, "-f", short, "-n", "2", "--temp", "0"], b""),
                        (["perplexity", path, "-f", bad, "-c", "16", "--chunks", "1"], b""),
                        (["chat", path, "-n", "2", "--temp", "0"], b"hello \xff\xfe\n")]:
        p = subprocess.run([sys.executable, "-m", "blockq", *map(str, args)], input=stdin,
                           capture_output=True, env=env, timeout=300)
        assert p.returncode == 0, (args, p.stderr.decode(errors="replace")[-600:])
        assert b"Traceback" not in p.stderr


@pytest.mark.parametrize("args, words", [
    (["perplexity", "{m}", "-f", "{t}", "-c", "16", "--chunks", "0"], ["chunks 0"]),
    (["kld", "{m}", "{m}", "-f", "{t}", "-c", "16", "--chunks", "0"], ["chunks 0"]),
    (["perplexity", "{m}", "-f", "{t}", "-c", "16", "--chunks", "-3"], ["chunks -3"]),
    (["generate", "{m}", "-p", "hi", "-n", "-2"], ["-2 is not in the range x>=-1"]),
    (["generate", "{m}", "-p", "hi", "--top-k", "-1"], ["-1 is not in the range x>=0"]),
    (["bench", "{m}", "-p", "100000", "-n", "1", "-r", "1"], ["context is 256 tokens"]),
])
def test_bad_numbers_are_clear_errors(tmp_path, args, words):
    m = _tiny_gguf(tmp_path)
    t = tmp_path / "t.txt"
    t.write_text("the cat sat on the mat " * 40)
    code, err = _cli([a.format(m=m, t=t) for a in args])
    assert code in (1, 2) and err, err
    for w in words:
        assert w in err[-1], err


def test_kld_refuses_models_with_different_token_strings(tmp_path):
    md = tokenizer_metadata()
    other = dict(md, **{"tokenizer.ggml.tokens": [*md["tokenizer.ggml.tokens"][:-1], "<|zz|>"]})
    a = write_tiny(tmp_path / "a.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)
    b = write_tiny(tmp_path / "b.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=128,
                   extra_md=other)
    t = tmp_path / "t.txt"
    t.write_text("the cat sat on the mat " * 40)
    code, err = _cli(["kld", a, b, "-f", t, "-c", "16"])
    assert code == 1 and "vocabularies differ at token" in err[-1], err


# --- a mapped model file truncated under a running generate -------------------------------------
def test_model_truncated_while_generating_is_one_line_and_exit_1(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", qtype="Q4_0", n_layer=2)
    size = path.stat().st_size
    code = ("import os, sys\n"
            "from blockq.model import Model\n"
            "orig, calls = Model.forward, []\n"
            "def forward(self, *a, **k):\n"  # another program truncates the file mid-run
            "    calls.append(1)\n"
            "    if len(calls) == 3:\n"
            "        os.truncate(sys.argv[2], 8192)\n"
            "    return orig(self, *a, **k)\n"
            "Model.forward = forward\n"
            "from blockq.cli import main\n"
            "main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", code, "generate", str(path), "-p", "hello",
                        "-n", "20", "--temp", "0"], capture_output=True, env=THIS_CHECKOUT,
                       timeout=300)
    err = p.stderr.decode().strip().splitlines()
    assert p.returncode == 1, p.stderr.decode()[-800:]
    assert err[-1] == (f"error: {path}: the file shrank from {size:,} to 8,192 bytes while "
                       "blockq had it mapped; stop other programs writing it, then run again")


def test_numba_cache_entries_of_racing_processes_never_swap_code(tmp_path, monkeypatch):
    """Two processes adding entries to one function's disk cache at once both read an index
    without the other's entry.  Numba named both data files "1", so one key could end up with
    the other's code; blockq names a data file by its key's hash (blockq.kernels.jitcache)."""
    from numba.core.caching import IndexDataCacheFile
    import blockq.kernels.jitcache  # noqa: F401  (the patch)
    a, b = (IndexDataCacheFile(str(tmp_path), "fn-7.py311", ("stamp", 1)) for _ in range(2))
    monkeypatch.setattr(b, "_load_index", lambda: {})  # b read the index before a wrote it
    key_a, key_b = (("sig a", "avx512vnni"), ("h", "h")), (("sig a", "avx2"), ("h", "h"))
    a.save(key_a, "code for a")
    b.save(key_b, "code for b")
    monkeypatch.undo()
    fresh = IndexDataCacheFile(str(tmp_path), "fn-7.py311", ("stamp", 1))
    assert fresh.load(key_a) in (None, "code for a")  # lost (compiled again), never b's code
    assert fresh.load(key_b) == "code for b"
    assert len(list(tmp_path.glob("fn-7.py311.*.nbc"))) == 2
    a.save(key_a, "code for a")  # a second save of a key rewrites its own file
    assert fresh.load(key_a) == "code for a" and fresh.load(key_b) == "code for b"


_FACTORY = '''
from blockq.kernels.jitcache import keyed_jit
def make(c):
    @keyed_jit(("test",))
    def add(a):
        return a + c
    return add
add1, add2 = make(1), make(2)
'''


def test_cached_closures_of_one_factory_keep_their_own_code(tmp_path):
    """Two closures a factory makes (one qualified name, one signature), each compiled by a
    process of its own into a shared disk cache, then both loaded by a third: each must run its
    own code.  Numba's symbol names would be equal there (the name plus a per-process counter)
    and resolve to one address; keyed_jit gives each a name of its own (jitcache._distinct)."""
    import subprocess
    import sys
    (tmp_path / "factory_mod.py").write_text(_FACTORY)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]))

    def run(code):
        r = subprocess.run([sys.executable, "-c", "import factory_mod as m\n" + code], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-1500:]
        return r.stdout.split()
    assert run("print(m.add1(10))") == ["11"]  # compiles add1 alone
    assert run("print(m.add2(10))") == ["12"]  # compiles add2 alone, in another process
    # the native symbol of each, looked up by name as blockq's drivers take kernel addresses
    # (cpu_int8.compiled): one address for both was the Q8_1-for-Q8_0 quantizer bug
    got = run("""
r = [m.add1(10), m.add2(10), m.add1.stats.cache_hits.total(), m.add2.stats.cache_hits.total()]
a, b = (list(f.overloads.values())[0] for f in (m.add1, m.add2))
r.append(a.library.get_pointer_to_function(a.fndesc.mangled_name)
         != b.library.get_pointer_to_function(b.fndesc.mangled_name))
print(*r)""")
    assert got == ["11", "12", "1", "1", "True"]
