"""GGUF constants: the container's numbers, its value types, and the metadata keys blockq knows.

Keys live in namespaces (``Keys.General``, ``Keys.LLM``, ``Keys.Attention``, ``Keys.Rope``,
``Keys.Tokenizer``); per-architecture keys are templates to fill with ``.format(arch=...)``::

    Keys.LLM.CONTEXT_LENGTH.format(arch="llama")  # -> "llama.context_length"

Each key is declared once, together with the GGUF value type llama.cpp expects for it
(``KEY_TYPES``); the writer uses that table to type plain Python values, because llama.cpp's
loader refuses a scalar of the wrong type (a ``context_length`` stored as INT32 does not load).
The facts come from llama.cpp's ``ggml/include/gguf.h``, ``ggml/src/gguf.cpp``,
``include/llama.h`` and gguf-py's ``constants.py`` / ``gguf_writer.py``; ``formats/gguf.md`` is
the normative description of the container.
"""
from __future__ import annotations

import re
from enum import IntEnum

import numpy as np

GGUF_MAGIC = b"GGUF"
READ_VERSIONS = (2, 3)  # v1 (32-bit counts) is gone from llama.cpp too; v2 and v3 share a layout
WRITE_VERSION = 3
DEFAULT_ALIGNMENT = 32  # used when general.alignment is absent
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: bump on block-format changes (ggml.h)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name must be shorter than this many bytes to load
INT64_MAX = (1 << 63) - 1  # ggml counts elements and bytes in int64

# Fixed-size parts of the file, in bytes.
#   header:      magic u8[4] | version u32 | tensor_count u64 | kv_count u64
#   kv record:   key (u64 length + bytes) | value type u32 | value
#   tensor info: name (u64 length + bytes) | n_dims u32 | dims u64[n_dims] | type u32 | offset u64
HEADER_BYTES = 4 + 4 + 8 + 8
MIN_KV_BYTES = 8 + 1 + 4 + 1  # a one-byte key holding a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, one dimension


class ValueType(IntEnum):
    """``enum gguf_type``: the type tag stored before every metadata value."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types -> little-endian numpy dtype (a GGUF bool is one byte, 0 or 1).
SCALAR_DTYPES: dict[ValueType, np.dtype] = {
    ValueType.UINT8: np.dtype("u1"),
    ValueType.INT8: np.dtype("i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype("u1"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}
INTEGER_TYPES = frozenset(t for t, d in SCALAR_DTYPES.items() if d.kind in "iu"
                          and t is not ValueType.BOOL)
FLOAT_TYPES = frozenset((ValueType.FLOAT32, ValueType.FLOAT64))


def type_label(vtype: ValueType, elem: ValueType | None = None) -> str:
    """``"UINT32"``, ``"ARRAY[STRING]"``: how inspect and error messages name a value's type."""
    return f"ARRAY[{elem.name}]" if vtype is ValueType.ARRAY and elem is not None else vtype.name


# GGML type ids that exist (or existed) in llama.cpp but not in blockq's block table
# (blockq.types), named only so that inspect and errors can say what the file holds.
OTHER_GGML_TYPES = {
    4: "Q4_2", 5: "Q4_3", 9: "Q8_1", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8",
    36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0",
}


class FileType(IntEnum):
    """``enum llama_ftype`` (include/llama.h): the preset stored in ``general.file_type``."""
    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_Q2_K_S = 21
    MOSTLY_BF16 = 32


# The preset llama.cpp's loader guesses from a file's most common tensor type when
# general.file_type is absent (src/llama-model-loader.cpp); the writer uses it the same way.
FILE_TYPE_OF_QTYPE: dict[str, FileType] = {
    "F32": FileType.ALL_F32, "F16": FileType.MOSTLY_F16, "BF16": FileType.MOSTLY_BF16,
    "Q4_0": FileType.MOSTLY_Q4_0, "Q4_1": FileType.MOSTLY_Q4_1, "Q5_0": FileType.MOSTLY_Q5_0,
    "Q5_1": FileType.MOSTLY_Q5_1, "Q8_0": FileType.MOSTLY_Q8_0, "Q2_K": FileType.MOSTLY_Q2_K,
    "Q3_K": FileType.MOSTLY_Q3_K_M, "Q4_K": FileType.MOSTLY_Q4_K_M,
    "Q5_K": FileType.MOSTLY_Q5_K_M, "Q6_K": FileType.MOSTLY_Q6_K,
}


# --- metadata keys ---------------------------------------------------------------------------
# KEY_TYPES: key (or template) -> (value type, array element type or None).  A scalar entry of a
# numeric type also types a per-layer list given for that key (an ARRAY of that type).
KEY_TYPES: dict[str, tuple[ValueType, ValueType | None]] = {}

_U32, _I32, _F32, _BOOL, _STR, _ARR = (ValueType.UINT32, ValueType.INT32, ValueType.FLOAT32,
                                       ValueType.BOOL, ValueType.STRING, ValueType.ARRAY)


def _key(template: str, vtype: ValueType, elem: ValueType | None = None) -> str:
    KEY_TYPES[template] = (vtype, elem)
    return template


class Keys:
    class General:
        TYPE = _key("general.type", _STR)
        ARCHITECTURE = _key("general.architecture", _STR)
        QUANTIZATION_VERSION = _key("general.quantization_version", _U32)
        ALIGNMENT = _key("general.alignment", _U32)
        FILE_TYPE = _key("general.file_type", _U32)
        NAME = _key("general.name", _STR)
        AUTHOR = _key("general.author", _STR)
        VERSION = _key("general.version", _STR)
        ORGANIZATION = _key("general.organization", _STR)
        FINETUNE = _key("general.finetune", _STR)
        BASENAME = _key("general.basename", _STR)
        DESCRIPTION = _key("general.description", _STR)
        QUANTIZED_BY = _key("general.quantized_by", _STR)
        SIZE_LABEL = _key("general.size_label", _STR)
        LICENSE = _key("general.license", _STR)
        LICENSE_NAME = _key("general.license.name", _STR)
        LICENSE_LINK = _key("general.license.link", _STR)
        URL = _key("general.url", _STR)
        DOI = _key("general.doi", _STR)
        UUID = _key("general.uuid", _STR)
        REPO_URL = _key("general.repo_url", _STR)
        SOURCE_URL = _key("general.source.url", _STR)
        SOURCE_REPO_URL = _key("general.source.repo_url", _STR)
        BASE_MODEL_COUNT = _key("general.base_model.count", _U32)
        BASE_MODEL_NAME = _key("general.base_model.{id}.name", _STR)
        BASE_MODEL_ORGANIZATION = _key("general.base_model.{id}.organization", _STR)
        BASE_MODEL_REPO_URL = _key("general.base_model.{id}.repo_url", _STR)
        DATASET_COUNT = _key("general.dataset.count", _U32)
        DATASET_NAME = _key("general.dataset.{id}.name", _STR)
        DATASET_REPO_URL = _key("general.dataset.{id}.repo_url", _STR)
        TAGS = _key("general.tags", _ARR, _STR)
        LANGUAGES = _key("general.languages", _ARR, _STR)
        SAMPLING_SEQUENCE = _key("general.sampling.sequence", _STR)
        SAMPLING_TOP_K = _key("general.sampling.top_k", _I32)
        SAMPLING_TOP_P = _key("general.sampling.top_p", _F32)
        SAMPLING_MIN_P = _key("general.sampling.min_p", _F32)
        SAMPLING_TEMP = _key("general.sampling.temp", _F32)
        SAMPLING_PENALTY_LAST_N = _key("general.sampling.penalty_last_n", _I32)
        SAMPLING_PENALTY_REPEAT = _key("general.sampling.penalty_repeat", _F32)

    class LLM:
        VOCAB_SIZE = _key("{arch}.vocab_size", _U32)
        CONTEXT_LENGTH = _key("{arch}.context_length", _U32)
        EMBEDDING_LENGTH = _key("{arch}.embedding_length", _U32)
        BLOCK_COUNT = _key("{arch}.block_count", _U32)
        LEADING_DENSE_BLOCK_COUNT = _key("{arch}.leading_dense_block_count", _U32)
        FEED_FORWARD_LENGTH = _key("{arch}.feed_forward_length", _U32)
        EXPERT_FEED_FORWARD_LENGTH = _key("{arch}.expert_feed_forward_length", _U32)
        EXPERT_SHARED_FEED_FORWARD_LENGTH = _key("{arch}.expert_shared_feed_forward_length",
                                                 _U32)
        USE_PARALLEL_RESIDUAL = _key("{arch}.use_parallel_residual", _BOOL)
        TENSOR_DATA_LAYOUT = _key("{arch}.tensor_data_layout", _STR)
        EXPERT_COUNT = _key("{arch}.expert_count", _U32)
        EXPERT_USED_COUNT = _key("{arch}.expert_used_count", _U32)
        EXPERT_SHARED_COUNT = _key("{arch}.expert_shared_count", _U32)
        EXPERT_WEIGHTS_SCALE = _key("{arch}.expert_weights_scale", _F32)
        EXPERT_WEIGHTS_NORM = _key("{arch}.expert_weights_norm", _BOOL)
        EXPERT_GATING_FUNC = _key("{arch}.expert_gating_func", _U32)
        POOLING_TYPE = _key("{arch}.pooling_type", _U32)
        LOGIT_SCALE = _key("{arch}.logit_scale", _F32)
        DECODER_START_TOKEN_ID = _key("{arch}.decoder_start_token_id", _U32)
        ATTN_LOGIT_SOFTCAPPING = _key("{arch}.attn_logit_softcapping", _F32)
        FINAL_LOGIT_SOFTCAPPING = _key("{arch}.final_logit_softcapping", _F32)
        ROUTER_LOGIT_SOFTCAPPING = _key("{arch}.router_logit_softcapping", _F32)
        SWIN_NORM = _key("{arch}.swin_norm", _BOOL)
        RESCALE_EVERY_N_LAYERS = _key("{arch}.rescale_every_n_layers", _U32)
        RESIDUAL_SCALE = _key("{arch}.residual_scale", _F32)
        EMBEDDING_SCALE = _key("{arch}.embedding_scale", _F32)
        INTERLEAVE_MOE_LAYER_STEP = _key("{arch}.interleave_moe_layer_step", _U32)
        FULL_ATTENTION_INTERVAL = _key("{arch}.full_attention_interval", _U32)
        NEXTN_PREDICT_LAYERS = _key("{arch}.nextn_predict_layers", _U32)

    class Attention:
        HEAD_COUNT = _key("{arch}.attention.head_count", _U32)
        HEAD_COUNT_KV = _key("{arch}.attention.head_count_kv", _U32)
        MAX_ALIBI_BIAS = _key("{arch}.attention.max_alibi_bias", _F32)
        CLAMP_KQV = _key("{arch}.attention.clamp_kqv", _F32)
        KEY_LENGTH = _key("{arch}.attention.key_length", _U32)
        VALUE_LENGTH = _key("{arch}.attention.value_length", _U32)
        LAYERNORM_EPS = _key("{arch}.attention.layer_norm_epsilon", _F32)
        LAYERNORM_RMS_EPS = _key("{arch}.attention.layer_norm_rms_epsilon", _F32)
        GROUPNORM_EPS = _key("{arch}.attention.group_norm_epsilon", _F32)
        GROUPNORM_GROUPS = _key("{arch}.attention.group_norm_groups", _U32)
        CAUSAL = _key("{arch}.attention.causal", _BOOL)
        Q_LORA_RANK = _key("{arch}.attention.q_lora_rank", _U32)
        KV_LORA_RANK = _key("{arch}.attention.kv_lora_rank", _U32)
        SLIDING_WINDOW = _key("{arch}.attention.sliding_window", _U32)
        SLIDING_WINDOW_PATTERN = _key("{arch}.attention.sliding_window_pattern", _U32)
        SCALE = _key("{arch}.attention.scale", _F32)
        KEY_LENGTH_MLA = _key("{arch}.attention.key_length_mla", _U32)
        VALUE_LENGTH_MLA = _key("{arch}.attention.value_length_mla", _U32)
        SHARED_KV_LAYERS = _key("{arch}.attention.shared_kv_layers", _U32)

    class Rope:
        DIMENSION_COUNT = _key("{arch}.rope.dimension_count", _U32)
        DIMENSION_SECTIONS = _key("{arch}.rope.dimension_sections", _ARR, _I32)
        FREQ_BASE = _key("{arch}.rope.freq_base", _F32)
        FREQ_BASE_SWA = _key("{arch}.rope.freq_base_swa", _F32)
        SCALING_TYPE = _key("{arch}.rope.scaling.type", _STR)
        SCALING_FACTOR = _key("{arch}.rope.scaling.factor", _F32)
        SCALING_ATTN_FACTOR = _key("{arch}.rope.scaling.attn_factor", _F32)
        SCALING_ORIG_CTX_LEN = _key("{arch}.rope.scaling.original_context_length", _U32)
        SCALING_FINETUNED = _key("{arch}.rope.scaling.finetuned", _BOOL)
        SCALING_YARN_LOG_MUL = _key("{arch}.rope.scaling.yarn_log_multiplier", _F32)
        SCALING_YARN_EXT_FACTOR = _key("{arch}.rope.scaling.yarn_ext_factor", _F32)
        SCALING_YARN_ATTN_FACTOR = _key("{arch}.rope.scaling.yarn_attn_factor", _F32)
        SCALING_YARN_BETA_FAST = _key("{arch}.rope.scaling.yarn_beta_fast", _F32)
        SCALING_YARN_BETA_SLOW = _key("{arch}.rope.scaling.yarn_beta_slow", _F32)

    class SSM:
        CONV_KERNEL = _key("{arch}.ssm.conv_kernel", _U32)
        INNER_SIZE = _key("{arch}.ssm.inner_size", _U32)
        STATE_SIZE = _key("{arch}.ssm.state_size", _U32)
        TIME_STEP_RANK = _key("{arch}.ssm.time_step_rank", _U32)
        GROUP_COUNT = _key("{arch}.ssm.group_count", _U32)

    class Tokenizer:
        MODEL = _key("tokenizer.ggml.model", _STR)
        PRE = _key("tokenizer.ggml.pre", _STR)
        TOKENS = _key("tokenizer.ggml.tokens", _ARR, _STR)
        TOKEN_TYPE = _key("tokenizer.ggml.token_type", _ARR, _I32)
        TOKEN_TYPE_COUNT = _key("tokenizer.ggml.token_type_count", _U32)
        SCORES = _key("tokenizer.ggml.scores", _ARR, _F32)
        MERGES = _key("tokenizer.ggml.merges", _ARR, _STR)
        BOS_ID = _key("tokenizer.ggml.bos_token_id", _U32)
        EOS_ID = _key("tokenizer.ggml.eos_token_id", _U32)
        EOT_ID = _key("tokenizer.ggml.eot_token_id", _U32)
        EOM_ID = _key("tokenizer.ggml.eom_token_id", _U32)
        UNK_ID = _key("tokenizer.ggml.unknown_token_id", _U32)
        SEP_ID = _key("tokenizer.ggml.seperator_token_id", _U32)  # NOTE: llama.cpp's spelling
        PAD_ID = _key("tokenizer.ggml.padding_token_id", _U32)
        MASK_ID = _key("tokenizer.ggml.mask_token_id", _U32)
        CLS_ID = _key("tokenizer.ggml.cls_token_id", _U32)
        FIM_PRE_ID = _key("tokenizer.ggml.fim_pre_token_id", _U32)
        FIM_SUF_ID = _key("tokenizer.ggml.fim_suf_token_id", _U32)
        FIM_MID_ID = _key("tokenizer.ggml.fim_mid_token_id", _U32)
        FIM_PAD_ID = _key("tokenizer.ggml.fim_pad_token_id", _U32)
        FIM_REP_ID = _key("tokenizer.ggml.fim_rep_token_id", _U32)
        FIM_SEP_ID = _key("tokenizer.ggml.fim_sep_token_id", _U32)
        ADD_BOS = _key("tokenizer.ggml.add_bos_token", _BOOL)
        ADD_EOS = _key("tokenizer.ggml.add_eos_token", _BOOL)
        ADD_SEP = _key("tokenizer.ggml.add_sep_token", _BOOL)
        ADD_PREFIX = _key("tokenizer.ggml.add_space_prefix", _BOOL)
        REMOVE_EXTRA_WS = _key("tokenizer.ggml.remove_extra_whitespaces", _BOOL)
        PRECOMPILED_CHARSMAP = _key("tokenizer.ggml.precompiled_charsmap", _ARR, ValueType.UINT8)
        SUPPRESS_TOKENS = _key("tokenizer.ggml.suppress_tokens", _ARR, _I32)
        NORMALIZER_LOWERCASE = _key("tokenizer.ggml.normalizer.lowercase", _BOOL)
        HF_JSON = _key("tokenizer.huggingface.json", _STR)
        CHAT_TEMPLATE = _key("tokenizer.chat_template", _STR)
        CHAT_TEMPLATE_N = _key("tokenizer.chat_template.{name}", _STR)
        CHAT_TEMPLATES = _key("tokenizer.chat_templates", _ARR, _STR)


_NUMBERED = re.compile(r"^(general\.(?:base_model|dataset))\.\d+\.")


def known_key_type(key: str, arch: str | None) -> tuple[ValueType, ValueType | None] | None:
    """The value type llama.cpp expects for ``key`` (``arch`` fills ``{arch}``), or None."""
    hit = KEY_TYPES.get(key)
    if hit is not None:
        return hit
    if arch and key.startswith(arch + "."):
        hit = KEY_TYPES.get("{arch}" + key[len(arch):])
        if hit is not None:
            return hit
    template = _NUMBERED.sub(r"\1.{id}.", key)
    if template != key:
        return KEY_TYPES.get(template)
    if key.startswith("tokenizer.chat_template."):
        return KEY_TYPES[Keys.Tokenizer.CHAT_TEMPLATE_N]
    return None
