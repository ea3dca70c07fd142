"""Chat templates rendered like transformers' apply_chat_template."""
import pytest

from blockq import read_gguf
from blockq.chat import CHATML_TEMPLATE, TemplateError, render_chat
from blockq.errors import BadArgument, FormatError
from blockq.tokenizer import Tokenizer

SMOL_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n")


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_file):
    md = read_gguf(smollm2_file).metadata
    return Tokenizer.from_metadata({k: md[k] for k in md if k.startswith("tokenizer.")})


@pytest.mark.realfile
def test_smollm2_template_by_hand(smollm2_tok):
    tmpl = smollm2_tok.chat_template
    assert tmpl and "im_start" in tmpl
    user = [{"role": "user", "content": "Hi there"}]
    # no system message: the template adds its default one
    assert render_chat(tmpl, user) == \
        SMOL_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(tmpl, user, add_generation_prompt=False) == \
        SMOL_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n"
    convo = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"},
             {"role": "user", "content": "Привет"}]
    assert render_chat(tmpl, convo) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nПривет<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.realfile
def test_rendered_prompt_tokenizes_with_control_ids(smollm2_tok):
    tok = smollm2_tok
    text = render_chat(tok.chat_template, [{"role": "user", "content": "Hi"}],
                       bos_token=tok.token_text(tok.bos_id), eos_token=tok.token_text(tok.eos_id))
    ids = tok.encode(text, add_special=True, parse_special=True)
    im_start, im_end = tok.token_to_id["<|im_start|>"], tok.token_to_id["<|im_end|>"]
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert ids[0] == im_start and im_end in tok.eog_ids
    assert tok.decode(ids, special=True) == text


def test_chatml_fallback():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    expected = "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    assert render_chat(None, msgs, add_generation_prompt=False) == expected
    assert render_chat("", msgs) == expected + "<|im_start|>assistant\n"
    assert render_chat(CHATML_TEMPLATE, msgs) == render_chat(None, msgs)


def test_hf_environment_features():
    # trim_blocks + lstrip_blocks: block tags leave no newline / indentation behind
    tmpl = ("{{ bos_token }}\n"
            "{% for m in messages %}\n"
            "    {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
            "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
            "[{{ m.role }}] {{ m.content | tojson }}\n"
            "{% endfor %}\n"
            "{{ eos_token }}")
    msgs = [{"role": "a", "content": "é<x>"}, {"role": "skip", "content": "-"},
            {"role": "b", "content": "2"}, {"role": "c", "content": "3"}]
    assert render_chat(tmpl, msgs, bos_token="<s>", eos_token="</s>") == \
        '<s>\n[a] "é<x>"\n</s>'
    assert render_chat("{{ tools[0] }}", msgs, tools=["t"]) == "t"


def test_raise_exception_reaches_the_caller():
    tmpl = ("{% if messages[0]['role'] != 'user' %}"
            "{{ raise_exception('Conversation roles must start with user') }}{% endif %}ok")
    assert render_chat(tmpl, [{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(TemplateError, match="must start with user"):
        render_chat(tmpl, [{"role": "assistant", "content": ""}])


@pytest.mark.parametrize("template,messages,error", [
    ("{% for m in messages %}", [], FormatError),                      # syntax error
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", [], FormatError),  # sandbox
    ("{{ messages[0].content + 'x' }}", [{"role": "user", "content": None}], BadArgument),
    (None, "hello", BadArgument),
    (None, [{"content": "no role"}], BadArgument),
])
def test_errors(template, messages, error):
    with pytest.raises(error):
        render_chat(template, messages)
