"""Text <-> token ids from a GGUF file's tokenizer metadata, with llama.cpp's exact ids.

Two vocabulary kinds, chosen by ``tokenizer.ggml.model``:

- ``gpt2``: byte-level BPE.  Text is split into words by the regexes of ``tokenizer.ggml.pre``
  (table ``PRE_TOKENIZERS``), each word's bytes are mapped to GPT-2's printable characters and
  merged by rank.  The merging runs in the ``tokenizers`` library (a ``BPE`` model behind
  ``Split`` + ``ByteLevel`` pre-tokenizers).
- ``llama``: SentencePiece-style.  Spaces become ``▁`` (plus one leading ``▁`` when
  ``add_space_prefix``), then adjacent pieces are merged, best ``tokenizer.ggml.scores`` first,
  leftmost on ties; a character no token covers falls back to ``<0xXX>`` byte tokens.

Before either runs, special tokens are cut out of the text the way llama.cpp does: longest text
first, user-defined tokens always, control tokens only with ``parse_special=True``.

    tok = Tokenizer.from_metadata(blockq.read_gguf(path).metadata)
    ids = tok.encode("Hello", add_special=True)       # [bos?] + ids
    text = tok.decode(ids)
"""
from __future__ import annotations

import codecs
import enum
import heapq
import re
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from gguf.constants import Keys

from .errors import BadArgument, FormatError, UnsupportedModel
from .validate import Fields, clean_text, show

K = Keys.Tokenizer


class Attr(enum.IntFlag):
    """Per-token attributes (llama.cpp's ``llama_token_attr`` bits)."""
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# tokenizer.ggml.token_type value -> attribute (gguf.TokenType numbering; anything else: UNDEFINED)
TOKEN_TYPE_ATTR = {1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL, 4: Attr.USER_DEFINED,
                   5: Attr.UNUSED, 6: Attr.BYTE}
_SPECIAL = Attr.CONTROL | Attr.UNKNOWN          # hidden in output unless special=True
_SPLIT_OUT = _SPECIAL | Attr.USER_DEFINED       # cut out of the text before tokenizing

SPM_SPACE = "\u2581"  # ▁
C_SPACE = " \t\n\v\f\r"  # what C's isspace() counts (llama.cpp strips with it)

# -- pre-tokenizers (word-splitting regexes per tokenizer.ggml.pre), from llama-vocab.cpp ------
# Each regex splits every piece left by the previous one; matches and the gaps between them
# both become pieces ("isolated").
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_RES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    clean_spaces: bool = True    # decode drops the space before ?!., and inside " 's" etc.
    ignore_merges: bool = False  # a word that is a whole token is taken as is
    add_bos: bool = False        # default for tokenizer.ggml.add_bos_token


def _family(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return {n: pre for n in names.split()}


_LLAMA3 = PreTokenizer((LLAMA3_RE,), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(DEFAULT_RES),
    **_family("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
              _LLAMA3),
    **_family("dbrx smaug-bpe", PreTokenizer((LLAMA3_RE,))),
    **_family("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open grok-2",
              PreTokenizer((QWEN2_RE,), clean_spaces=False)),
    **_family("stablelm2 megrez", PreTokenizer((QWEN2_RE,))),
    **_family("smollm command-r", PreTokenizer((r"\p{N}", GPT2_RE), clean_spaces=False)),
    **_family("starcoder refact codeshell exaone minerva-7b mellum2",
              PreTokenizer((r"\p{N}", GPT2_RE))),
    **_family("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum "
              "modern-bert mpt olmo jais exaone4", PreTokenizer((GPT2_RE,))),
    **_family("trillion granite-docling", PreTokenizer((GPT2_RE,), clean_spaces=False)),
}

# -- end-of-generation detection by token text (llama.cpp does it the same way) ----------------
EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
])
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
             "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
             "<end_of_utterance>")
EOM_TEXTS = ("<|eom_id|>",)
# fill-in-the-middle tokens, found by text when the file names none (they become CONTROL);
# the last three also end generation
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")
# NOTE: gpt-oss marks these CONTROL but llama.cpp renders them as USER_DEFINED; we follow.
FORCE_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


# -- decode cleanup for clean_spaces vocabularies (llama.cpp's three passes) -------------------
_CLEAN_PASSES = ((re.compile(r" (?=[?!.,])"), ""),
                 (re.compile(r" ' "), "'"),
                 (re.compile(r" '(?=s|m|re|ve)"), "'"))


def _get(md: Mapping[str, Any], key: str, default=None):
    return md[key] if key in md else default


def _numbers(f: Fields, key: str, kind) -> np.ndarray | None:
    """A numeric array value (token types, scores), or None when absent."""
    v = f.get(key)
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        v = np.asarray(v)
    if v is not None and not (isinstance(v, np.ndarray) and v.ndim == 1
                              and np.issubdtype(v.dtype, kind)):
        raise FormatError(f"{f.what(key)} = {show(v)} is not an array of "
                          f"{'integers' if kind is np.integer else 'numbers'}")
    return v


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
    """``"a b"`` merges as ``(a, b)`` pairs in rank order."""
    text = "\n".join(merges)
    if text.startswith(" ") or "\n " in text:
        # NOTE: llama.cpp cuts at the first space after position 0, so a part may start with one
        cuts = [(m, m.find(" ", 1)) for m in merges]
        pairs = [(m[:c], m[c + 1:]) for m, c in cuts if c > 0]
    else:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        if any(len(p) != 2 for p in pairs):
            pairs = [p for p in pairs if len(p) == 2]  # no space: llama.cpp ignores it
    if len(set(pairs)) != len(pairs):
        pairs = list(dict.fromkeys(pairs))  # NOTE: a repeated merge keeps its first rank
    return pairs


class Tokenizer:
    """A GGUF vocabulary: ``encode`` / ``decode`` / ``token_to_piece`` with llama.cpp's ids."""

    def __init__(self, *, model: str, pre: str, tokens: Sequence[str], attrs: np.ndarray,
                 scores: Sequence[float] | None, merges: Sequence[str] | None,
                 ids: Mapping[str, int | None], add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, chat_template: str | None = None,
                 model_name: str = ""):
        self.model = model
        self.pre = pre
        self.tokens = tokens if isinstance(tokens, list) else list(tokens)  # not modified
        self.attrs = attrs                          # (n_vocab,) uint8 Attr bits
        self.token_to_id = dict(zip(self.tokens, range(len(self.tokens))))
        self.bos_id = ids.get("bos")
        self.eos_id = ids.get("eos")
        self.eot_id = ids.get("eot")
        self.eom_id = ids.get("eom")
        self.unk_id = ids.get("unk")
        self.pad_id = ids.get("pad")
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self._piece_cache: dict[tuple[int, bool], bytes] = {}
        if model == "llama":
            self._spm_setup(scores)
            self.clean_spaces = False
        else:
            self._bpe_setup(merges)
        self._mark_special(ids)
        self._rstrip = self._strip_attrs(model_name.lower())  # ids that eat the spaces after

    def _strip_attrs(self, name: str) -> frozenset[int]:
        """Special tokens that swallow the whitespace after them (llama.cpp's RSTRIP)."""
        # NOTE: llama.cpp sets per-token attributes by general.name (llama-vocab.cpp): for
        # Phi-3 every special token and </s> strip the spaces after them, but <unk>, <s> and
        # <|endoftext|> do not.  Its other cases (LSTRIP on <mask> of some BERTs) are encoders.
        if "phi-3" not in name and "phi3" not in name:
            return frozenset()
        out = {tid for _, tid in self._specials_all}
        t2i = self.token_to_id
        out |= {t2i[t] for t in ("</s>",) if t in t2i}
        return frozenset(out - {t2i[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in t2i})

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (key -> decoded value), e.g. ``read_gguf(p).metadata``."""
        md = metadata
        f = Fields(md, "metadata")
        model = f.text(K.MODEL, None)
        if model is None:
            raise FormatError(f"metadata has no {K.MODEL}: cannot tell which tokenizer to build")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModel(f"{K.MODEL} = {model!r}: blockq tokenizes 'gpt2' (byte-level "
                                   "BPE) and 'llama' (SentencePiece) vocabularies")
        if _get(md, K.LIST) is None:
            raise FormatError(f"metadata has no {K.LIST}: the vocabulary is missing")
        tokens = f.strings(K.LIST, min_len=1)
        n = len(tokens)
        if "" in tokens:  # NOTE: llama.cpp renames empty tokens the same way
            tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]

        types = _numbers(f, K.TOKEN_TYPE, np.integer)
        attrs = np.full(n, int(Attr.NORMAL), np.uint8)
        if types is not None:
            types = np.asarray(types, dtype=np.int64)
            if types.shape[0] < n:
                raise FormatError(f"{K.TOKEN_TYPE} has {types.shape[0]} entries for {n} tokens")
            lut = np.zeros(8, np.uint8)
            for t, a in TOKEN_TYPE_ATTR.items():
                lut[t] = int(a)
            types = types[:n]
            attrs = np.where((types >= 0) & (types < 8), lut[np.clip(types, 0, 7)], 0)
            attrs = attrs.astype(np.uint8)

        scores = _numbers(f, K.SCORES, np.number)
        if scores is not None and len(scores) < n:
            raise FormatError(f"{K.SCORES} has {len(scores)} entries for {n} tokens")

        pre = f.text(K.PRE, None) or "default"
        if model == "gpt2":
            if pre not in PRE_TOKENIZERS:
                raise UnsupportedModel(f"{K.PRE} = {pre!r}: no pre-tokenizer for it; known: "
                                       f"{', '.join(sorted(PRE_TOKENIZERS))}")
            merges = f.strings(K.MERGES, None)
            if merges is None:
                raise FormatError(f"metadata has no {K.MERGES}: a gpt2 vocabulary needs them")
            add_bos, add_eos, add_prefix = PRE_TOKENIZERS[pre].add_bos, False, False
            defaults = {"bos": 11, "eos": 11}
        else:
            merges = None
            add_bos, add_eos, add_prefix = True, False, True
            defaults = {"bos": 1, "eos": 2, "unk": 0}

        # special ids: the file's value when in range, else llama.cpp's default for the model
        keys = {"bos": K.BOS_ID, "eos": K.EOS_ID, "eot": K.EOT_ID, "eom": K.EOM_ID,
                "unk": K.UNK_ID, "pad": K.PAD_ID, "fim_pre": K.FIM_PRE_ID,
                "fim_suf": K.FIM_SUF_ID, "fim_mid": K.FIM_MID_ID, "fim_pad": K.FIM_PAD_ID,
                "fim_rep": K.FIM_REP_ID, "fim_sep": K.FIM_SEP_ID}
        ids: dict[str, int | None] = {}
        for name, key in keys.items():
            v = defaults.get(name)
            v = v if v is not None and v < n else None
            got = f.integer(key, None, lo=-(1 << 63), hi=1 << 64)
            if got is not None and 0 <= got < n:
                v = int(got)
            ids[name] = v

        add_bos = f.flag(K.ADD_BOS, add_bos)
        add_eos = f.flag(K.ADD_EOS, add_eos)
        if model == "llama":
            add_prefix = f.flag(K.ADD_PREFIX, add_prefix)
        return cls(model=model, pre=pre, tokens=tokens, attrs=attrs,
                   scores=scores, merges=merges, ids=ids, add_bos=add_bos, add_eos=add_eos,
                   add_space_prefix=add_prefix, chat_template=f.text(K.CHAT_TEMPLATE, None),
                   model_name=str(md.get("general.name") or ""))

    def _spm_setup(self, scores) -> None:
        n = len(self.tokens)
        # NOTE: an array, not a list: 8 bytes a score instead of a 32-byte float object and its
        # pointer (6 MiB less resident for a 262k vocabulary like Gemma's); indexing gives the same floats
        if scores is None:
            self.scores = array("d", bytes(8 * n))
        else:
            self.scores = array("d", np.asarray(scores[:n], dtype=np.float64).tobytes())
        # byte -> token for byte fallback: "<0xXX>", else the byte as a one-character token
        self._byte_ids: list[int | None] = []
        for b in range(256):
            tid = self.token_to_id.get(f"<0x{b:02X}>")
            if tid is None:
                tid = self.token_to_id.get(chr(b)) if b < 0x80 else None
            self._byte_ids.append(tid)

    def _bpe_setup(self, merges) -> None:
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers

        spec = PRE_TOKENIZERS[self.pre]
        self.clean_spaces = spec.clean_spaces
        vocab = self.token_to_id
        pairs = _merge_pairs(merges)
        try:
            model = models.BPE(vocab, pairs, ignore_merges=spec.ignore_merges)
        except Exception:
            # NOTE: the tokenizers library needs both parts and the result in the vocabulary;
            # llama.cpp would apply such a merge and then spell the word out byte by byte.
            # No real vocabulary has them: we drop them.
            pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
            model = models.BPE(vocab, pairs, ignore_merges=spec.ignore_merges)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._hf = hf
        self._splitter = pre_tokenizers.Sequence(splits)

    def _mark_special(self, ids: dict[str, int | None]) -> None:
        """End-of-generation set and the special-token list, as llama.cpp derives them."""
        t2i, attrs = self.token_to_id, self.attrs
        eog: set[int] = set()

        def mark(tid: int) -> None:
            attrs[tid] |= int(Attr.CONTROL)  # NOTE: llama.cpp forces these to CONTROL too

        for name, texts in FIM_TEXTS.items():
            tid = ids[name]
            if tid is None:
                tid = next((t2i[t] for t in texts if t in t2i), None)
                if tid is not None:
                    mark(tid)
            if tid is not None and name in FIM_EOG:
                eog.add(tid)
        if self.eot_id is None:
            # NOTE: llama.cpp takes whichever matching token its hash map yields first; we take
            # the first text of EOT_TEXTS present.  Every one of them is in the EOG set anyway.
            self.eot_id = next((t2i[t] for t in EOT_TEXTS if t in t2i), None)
            if self.eot_id is not None:
                mark(self.eot_id)
        if self.eom_id is None:
            self.eom_id = next((t2i[t] for t in EOM_TEXTS if t in t2i), None)
            if self.eom_id is not None:
                mark(self.eom_id)
        for text in EOG_TEXTS:
            tid = t2i.get(text)
            if tid is not None:
                eog.add(tid)
                mark(tid)
        for text in FORCE_USER_DEFINED:
            if text in t2i:
                attrs[t2i[text]] = int(Attr.USER_DEFINED)
        for tid in (self.eos_id, self.eot_id, self.eom_id):
            if tid is not None:
                eog.add(tid)
        # NOTE: llama.cpp's two fix-ups: with <|return|>+<|call|> (gpt-oss) or <|calls|>+<|flush|>
        # (solar-open), <|end|> is no EOG; next to <|tool_response>/<|plamo:eos|>, </s> is normal.
        texts = {self.tokens[t]: t for t in eog}
        if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                                   or ("<|calls|>" in texts and "<|flush|>" in texts)):
            eog.discard(texts["<|end|>"])
            attrs[texts["<|end|>"]] = int(Attr.USER_DEFINED)
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            attrs[texts["</s>"]] = int(Attr.NORMAL)
        self.eog_ids = frozenset(eog)

        # special tokens, longest text first (ties: lower id first)
        special = np.flatnonzero(attrs & int(_SPLIT_OUT))
        lengths = np.array([len(self.tokens[i]) for i in special.tolist()], dtype=np.int64)
        order = special[np.lexsort((special, -lengths))].tolist()
        self._specials_all = [(self.tokens[i], i) for i in order]
        self._specials_user = [(self.tokens[i], i) for i in order
                               if not attrs[i] & int(_SPECIAL)]

    # -- queries -------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_text(self, token_id: int | None) -> str:
        """The vocabulary entry's text (``""`` for None), e.g. for a template's bos_token."""
        if token_id is None:
            return ""
        self._check_id(token_id)
        return self.tokens[token_id]

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self.tokens):
            raise BadArgument(f"token id {token_id} is outside the vocabulary "
                              f"(0..{len(self.tokens) - 1})")

    # -- encode --------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``, as llama.cpp's ``llama_tokenize`` gives them.

        ``add_special``: add BOS/EOS where the vocabulary asks for them (``add_bos``/``add_eos``).
        ``parse_special``: turn control-token texts such as ``<|im_start|>`` into their ids
        (needed for chat prompts); otherwise they are tokenized as plain text.
        """
        if not isinstance(text, str):
            raise BadArgument(f"encode takes a str, got {type(text).__name__}")
        text = clean_text(text)  # lone surrogates -> U+FFFD, as llama.cpp does invalid UTF-8
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise UnsupportedModel("the vocabulary asks for a BOS token but has none")
            out.append(self.bos_id)
        fragments = self._split_special(text, parse_special) if text else []
        if self.model == "llama":
            prev_special = True  # a leading space prefix goes on the first fragment too
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm_encode(frag.replace(" ", SPM_SPACE), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(self._hf.encode(frag, add_special_tokens=False).ids)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise UnsupportedModel("the vocabulary asks for an EOS token but has none")
            out.append(self.eos_id)
        return out

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special-token texts out of ``text``: a list of plain strings and token ids."""
        # NOTE: like llama.cpp, one token at a time, longest first, each splitting every plain
        # fragment left by the longer ones (not a single leftmost-longest scan).
        frags: list[str | int] = [text]
        for stext, sid in (self._specials_all if parse_special else self._specials_user):
            if stext not in text:
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or stext not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(stext)):
                    if k:
                        out.append(sid)
                        if sid in self._rstrip:
                            part = part.lstrip(C_SPACE)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def _spm_encode(self, text: str, out: list[int]) -> None:
        """llama.cpp's SentencePiece merge: best-scoring adjacent pair first, leftmost on ties."""
        n = len(text)
        if n == 0:
            return
        t2i, scores = self.token_to_id, self.scores
        sym = list(text)                      # symbol i's text; "" once merged into its left
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = sym[left] + sym[right]
            tid = t2i.get(merged)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, len(merged)))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            # stale: one side was merged away or grew since this pair was queued
            if not a or not b or len(a) + len(b) != size:
                continue
            sym[left], sym[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        i = 0
        while i != -1:
            s = sym[i]
            tid = t2i.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for byte in s.encode("utf-8"):
                    bid = self._byte_ids[byte]
                    if bid is None:
                        raise UnsupportedModel(f"byte 0x{byte:02X} of {s!r} has no <0x{byte:02X}> "
                                               "token to fall back to")
                    out.append(bid)
            i = nxt[i]

    def pre_split(self, text: str) -> list[str]:
        """The words a gpt2 vocabulary's pre-tokenizer cuts ``text`` into (before byte mapping)."""
        if self.model != "gpt2":
            raise BadArgument(f"pre_split: a {self.model!r} vocabulary has no word splitting")
        return [w for w, _ in self._splitter.pre_tokenize_str(text)]

    # -- decode --------------------------------------------------------------------------------
    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes token ``token_id`` stands for (control tokens: ``b""`` unless ``special``)."""
        key = (token_id, special)
        piece = self._piece_cache.get(key)
        if piece is None:
            self._check_id(token_id)
            piece = self._piece(token_id, special)
            self._piece_cache[key] = piece
        return piece

    def _piece(self, tid: int, special: bool) -> bytes:
        attr, text = int(self.attrs[tid]), self.tokens[tid]
        if attr & _SPECIAL:
            return text.encode("utf-8") if special else b""
        if attr & Attr.USER_DEFINED:
            return text.encode("utf-8")
        if attr & Attr.NORMAL:
            if self.model == "llama":
                return text.replace(SPM_SPACE, " ").encode("utf-8")
            # NOTE: a character outside GPT-2's byte table is kept as UTF-8 (llama.cpp writes
            # an "[UNK_BYTE_...]" marker instead); real byte-level vocabularies have none.
            return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE
                            else c.encode("utf-8") for c in text)
        if attr & Attr.BYTE:
            return bytes([int(text[3:5], 16)])  # "<0xXX>"
        return b""  # unused / undefined tokens print nothing

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of ``ids`` (control tokens shown only with ``special``); bad UTF-8 -> U+FFFD."""
        data = b"".join(self.token_to_piece(int(t), special) for t in ids)
        if self.model == "llama" and self.add_space_prefix and data.startswith(b" "):
            data = data[1:]  # the space encode put in front
        text = data.decode("utf-8", errors="replace")
        if self.clean_spaces:
            for pattern, repl in _CLEAN_PASSES:
                text = pattern.sub(repl, text)
        return text

    def stream(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id}, eog={sorted(self.eog_ids)})")


class StreamDecoder:
    """Token ids in, text out as soon as it forms whole UTF-8 characters.

        dec = tok.stream()
        for t in generated: print(dec.push(t), end="")
        print(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tok = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer.model == "llama" and tokenizer.add_space_prefix

    def push(self, token_id: int) -> str:
        """Text completed by ``token_id`` (may be ``""`` while a character is incomplete)."""
        piece = self.tok.token_to_piece(int(token_id), self.special)
        if self._strip_space and piece:
            self._strip_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
