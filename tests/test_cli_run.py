"""``blockq generate / chat / perplexity / bench / demo`` on a tiny model (and SmolLM2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from blockq.cli import cli
from blockq.errors import UnsupportedModel
from blockq.generate import generate
from blockq.model import Model
from blockq.tokenizer import Tokenizer
from tiny_model import write_tiny

TEXT = ("The quick brown fox jumps over the lazy dog; then the dog sleeps in the sun "
        "and the fox runs into the woods, where the trees are tall and the air is cool. ") * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("cli") / "tiny.gguf", qtype="Q8_0", tied=False)


def run(*args, input=None):
    res = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def test_generate_prints_only_the_generated_text(tiny):
    res = run("generate", tiny, "-p", "the fox", "-n", 4, "--temp", 0, "-c", 64)
    assert res.exit_code == 0
    model = Model.load(tiny)
    tok = Tokenizer.from_metadata(model.metadata)
    ids = list(generate(model, tok.encode("the fox", parse_special=True), n_predict=4))
    assert res.stdout == tok.decode(ids) + "\n"
    assert "tok/s" in res.stderr and "tok/s" not in res.stdout


def test_generate_seed_repeats(tiny):
    a = run("generate", tiny, "-p", "a", "-n", 6, "--temp", 1.0, "--seed", 7).stdout
    b = run("generate", tiny, "-p", "a", "-n", 6, "--temp", 1.0, "--seed", 7).stdout
    assert a == b


def test_chat_keeps_the_conversation(tiny):
    res = run("chat", tiny, "-n", 3, "--temp", 0, input="hello\nthe sun\n/exit\nignored\n")
    assert res.exit_code == 0
    import blockq
    s = blockq.ChatSession(blockq.load(tiny), temperature=0)
    want = ["".join(s.reply(m, max_tokens=3)) for m in ("hello", "the sun")]
    assert res.stdout == want[0] + "\n" + want[1] + "\n"  # one reply per message
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 2
    history = s.llm.detokenize(s.prompt_ids(), special=True)  # both turns are in the next prompt
    assert history.count("<|im_start|>user") == 2 and "hello" in history


def test_perplexity_json(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    res = run("perplexity", tiny, "-f", text, "-c", 64, "--json")
    out = json.loads(res.stdout)
    assert set(out) == {"ppl", "stderr", "chunks", "tokens"}
    assert out["chunks"] >= 2 and out["tokens"] == out["chunks"] * 31
    assert 1.0 < out["ppl"] < 1e6 and out["stderr"] > 0
    plain = run("perplexity", tiny, "-f", text, "-c", 64, "--chunks", 1)
    assert plain.stdout.startswith("PPL = ") and " +/- " in plain.stdout


def test_bench_json(tiny):
    out = json.loads(run("bench", tiny, "-p", 16, "-n", 2, "-r", 1, "--json", "-t", 1).stdout)
    assert out["pp_tps"] > 0 and out["tg_tps"] > 0 and out["threads"] == 1


def test_bad_thread_count(tiny):
    res = CliRunner().invoke(cli, ["bench", str(tiny), "-t", "100000"])
    assert "-t 100000" in str(res.exception)


@pytest.mark.realfile
def test_generate_on_smollm2(smollm2_file):
    res = run("generate", smollm2_file, "-p", "The capital of France is", "-n", 4, "--temp", 0)
    assert res.exit_code == 0 and "Paris" in res.stdout


@pytest.mark.realfile
def test_generate_on_gemma3(gemma3_file):
    res = run("generate", gemma3_file, "-p", "The capital of France is", "-n", 8, "--temp", 0)
    assert res.exit_code == 0 and "France" in res.stdout


def test_generate_refuses_an_unknown_architecture(tmp_path):
    path = write_tiny(tmp_path / "rwkv.gguf", arch="rwkv6")
    res = CliRunner().invoke(cli, ["generate", str(path), "-p", "hi", "-n", 1])
    assert isinstance(res.exception, UnsupportedModel)
    assert "architecture 'rwkv6' (a recurrent model) is not supported yet (supported: " \
        in str(res.exception)


@pytest.mark.realfile
def test_demo(smollm2_file):
    res = run("demo", smollm2_file, "-n", 12)
    assert res.exit_code == 0
    assert "Q4_K: RMSE" in res.stdout and "Q6_K: RMSE" in res.stdout
    assert "Paris" in res.stdout.split("assistant:")[1]


def test_generate_llama_numerics_on_tiny_q8_0(tmp_path):
    """--numerics llama runs end to end (the exactness itself is in test_q8_activations.py)."""
    from click.testing import CliRunner

    from blockq.cli import cli
    from tiny_model import write_tiny

    path = write_tiny(tmp_path / "q8.gguf", qtype="Q8_0")
    r = CliRunner().invoke(cli, ["generate", str(path), "-p", "ab", "-n", "3", "--temp", "0",
                                 "--numerics", "llama"])
    assert r.exit_code == 0, r.output


def test_llama_cpp_habits_on_generate(tiny):
    import blockq
    llm = blockq.load(tiny)
    want = "".join(llm.generate("the fox", max_tokens=12, temperature=0, ignore_eos=True))
    res = run("generate", "-m", tiny, "-p", "the fox", "-n", 12, "--temp", 0, "--ignore-eos")
    assert res.stdout == want + "\n"
    assert "model: tiny.gguf" in res.stderr and "generation: 12 tokens" in res.stderr  # exact
    stop = want[4:7]
    res = run("generate", "-m", tiny, "-p", "the fox", "-n", 12, "--temp", 0, "--ignore-eos",
              "-r", stop)
    assert res.stdout == want[:want.index(stop)] + "\n"
    msgs = [{"role": "system", "content": "be short"}, {"role": "user", "content": "the fox"}]
    res = run("generate", tiny, "-sys", "be short", "-p", "the fox", "-n", 5, "--temp", 0,
              "--ignore-eos")
    assert res.stdout == "".join(llm.chat(msgs, max_tokens=5, temperature=0,
                                          ignore_eos=True)) + "\n"
    assert "Usage:" in run("generate", "-h").stdout
    res = CliRunner().invoke(cli, ["generate", str(tiny), "-m", str(tiny) + "x"])
    assert res.exit_code != 0


def test_generate_without_a_prompt_is_bounded(tiny):
    res = run("generate", tiny, "--temp", 0, "--ignore-eos")
    assert "no prompt" in res.stderr and "generation: 256 tokens" in res.stderr


MODEL_COMMANDS = ["demo", "inspect", "generate", "chat", "perplexity", "bench", "serve",
                  "convert", "imatrix", "calibrate", "kld"]


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_model_command_takes_dash_m(name):
    assert "-m, --model" in run(name, "-h").stdout


def test_dash_m_where_the_model_was_positional(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert run("inspect", "-m", tiny, "--json").stdout == run("inspect", tiny, "--json").stdout
    res = run("inspect")
    assert res.exit_code == 2 and "Missing argument 'FILE' (or -m FILE)" in res.output
    want = run("kld", tiny, tiny, "-f", text, "-c", 64, "--json").stdout
    for args in (["--base", tiny, "-m", tiny], [tiny, "-m", tiny], ["--base", tiny, tiny]):
        assert run("kld", *args, "-f", text, "-c", 64, "--json").stdout == want
    res = run("kld", "-m", tiny, "-f", text)
    assert res.exit_code == 2 and "give two models, BASE and QUANT" in res.output
    out = tmp_path / "q.gguf"
    assert run("convert", "-m", tiny, out, "Q8_0", "--quiet").exit_code == 0 and out.is_file()
    assert run("convert", "-m", tiny, tmp_path / "r.gguf", "--type", "Q8_0", "--quiet"
               ).exit_code == 0
    for args in (["-m", tiny], ["-m", tiny, tiny, out, "Q8_0"], [tiny]):
        assert run("convert", *args).exit_code == 2
    res = run("convert", "-m", tiny, tmp_path / "s.gguf", "Q9_X")
    assert res.exit_code == 2 and "Q9_X" in res.output
    ppl = run("perplexity", "-m", tiny, "-f", text, "-c", 64, "--json").stdout
    assert ppl == run("perplexity", tiny, "-f", text, "-c", 64, "--json").stdout


def test_the_command_line_keeps_numba_from_loading_scipys_blas(tiny, tmp_path):
    """A ``blockq`` process never imports scipy.linalg.cython_blas (Numba would, at its first
    kernel call, where SciPy is installed: 16 MiB resident); a caller of main(argv) keeps it."""
    import subprocess
    import sys

    code = ("import sys, atexit\n"
            "atexit.register(lambda: print('BLAS', sys.modules.get("
            "'scipy.linalg.cython_blas') is not None, 'arraymath' , "
            "'numba.np.arraymath' in sys.modules, file=sys.stderr))\n"
            f"sys.argv = ['blockq', 'generate', {str(tiny)!r}, '-p', 'a', '-n', '2']\n"
            "from blockq.cli import main\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "BLAS False arraymath True" in r.stderr  # kernels ran; SciPy's BLAS never loaded
    from blockq.cli import main

    main(["--version"])
    assert sys.modules.get("scipy.linalg.cython_blas", "absent") is not None


@pytest.mark.realfile
def test_sentencepiece_scores_are_doubles_in_an_array(gemma3_file):
    """Gemma-3's 262k scores: 8 bytes each, not a float object and a pointer (6 MiB less)."""
    from array import array

    from blockq.gguf.reader import read_gguf

    with read_gguf(gemma3_file) as r:
        tok = Tokenizer.from_metadata(r.metadata)
        assert tok.model == "llama" and len(tok.scores) == tok.n_vocab == 262144
        assert isinstance(tok.scores, array) and tok.scores.typecode == "d"
        assert list(tok.scores) == [float(x) for x in r.metadata["tokenizer.ggml.scores"]]
