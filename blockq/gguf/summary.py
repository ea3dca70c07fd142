"""JSON-ready descriptions of an open GGUF file: what ``blockq inspect`` prints.

- :func:`describe`: header, metadata (arrays summarized), tensor table, totals per type and
  bits per weight;
- :func:`tensor_stats`: min / max / mean / std of a tensor's dequantized values, in chunks of
  rows so a big embedding never needs a full float copy;
- :func:`block`: one block's decoded fields (via ``blockq.dequantize.block_fields``).
"""
from __future__ import annotations

import difflib
import math
import struct
from typing import Any

import numpy as np

from ..errors import BadArgument
from .constants import ValueType
from .reader import GGUFFile, TensorInfo


def _json_safe(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else repr(v)  # strict JSON has no NaN / inf
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_json_safe(x) for x in v]
    return v


def describe(f: GGUFFile, n_items: int = 8) -> dict:
    """Everything ``inspect`` shows, as plain JSON-ready values; arrays keep ``n_items`` items."""
    meta = []
    for key in f.metadata:
        fld = f.metadata.field(key)
        entry = {"key": key, "type": fld.label, "offset": fld.offset}
        if fld.count is not None:
            entry["count"] = fld.count
            entry["value"] = _json_safe(_first(f, fld, n_items))
        else:
            entry["value"] = _json_safe(f.metadata[key])
        meta.append(entry)
    tensors, totals = [], {}
    for t in f.tensors.values():
        tensors.append({"name": t.name, "type": t.qtype, "shape": list(t.shape),
                        "offset": t.offset, "bytes": t.nbytes, "weights": t.n_elements,
                        "bits_per_weight": t.bits_per_weight})
        tot = totals.setdefault(t.qtype, {"type": t.qtype, "tensors": 0, "weights": 0,
                                          "bytes": 0})
        tot["tensors"] += 1
        tot["weights"] += t.n_elements
        tot["bytes"] += t.nbytes
    for tot in totals.values():
        tot["bits_per_weight"] = 8.0 * tot["bytes"] / tot["weights"]
    n_weights, n_bytes = f.n_weights, f.tensor_bytes
    return {
        "file": f.name, "size": f.size, "version": f.version, "alignment": f.alignment,
        "data_offset": f.data_offset, "metadata_count": len(f.metadata),
        "tensor_count": len(f.tensors), "metadata": meta, "tensors": tensors,
        "totals": sorted(totals.values(), key=lambda d: -d["bytes"]),
        "weights": n_weights, "tensor_bytes": n_bytes,
        "tensor_bits_per_weight": 8.0 * n_bytes / n_weights if n_weights else None,
        "bits_per_weight": 8.0 * f.size / n_weights if n_weights else None,
    }


def _first(f: GGUFFile, fld, n: int):
    """The first ``n`` items of an array without decoding the rest when it is big."""
    if fld.count > 4 * n and fld.elem_type is ValueType.STRING:
        return _first_strings(f, fld, n)
    return list(f.metadata[fld.key][:n])


def _first_strings(f: GGUFFile, fld, n: int) -> list[str]:
    buf, p, out = f._buffer(), fld.value_offset + 12, []
    for _ in range(n):
        k = struct.unpack_from("<Q", buf, p)[0]
        out.append(bytes(buf[p + 8:p + 8 + k]).decode("utf-8", "replace"))
        p += 8 + k
    return out


def find_tensor(f: GGUFFile, name: str) -> TensorInfo:
    t = f.tensors.get(name)
    if t is None:
        close = difflib.get_close_matches(name, list(f.tensors), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BadArgument(f"{f.name} has no tensor named {name!r} ({len(f.tensors)} "
                          f"tensors){hint}")
    return t


def tensor_stats(t: TensorInfo, chunk_weights: int = 1 << 22) -> dict | None:
    """min / max / mean / std of the dequantized values, computed a chunk of rows at a time;
    None for a tensor whose type blockq cannot decode."""
    from ..dequantize import dequantize

    if not t.decodable:
        return None
    cols = t.shape[-1]
    rows = t.n_elements // cols
    row_bytes = t.nbytes // rows
    data = t.data.reshape(rows, row_bytes)
    step = max(1, chunk_weights // cols)
    lo, hi, s, ss = math.inf, -math.inf, 0.0, 0.0
    for r in range(0, rows, step):
        x = dequantize(data[r:r + step], t.qtype, (min(step, rows - r), cols))
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        x64 = x.astype(np.float64)
        s += float(x64.sum())
        ss += float(np.dot(x64.ravel(), x64.ravel()))
    n = t.n_elements
    mean = s / n
    return {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(max(ss / n - mean * mean, 0.0))}


def block(t: TensorInfo, index: int) -> dict:
    """The fields of block ``index`` (counted over the whole tensor) of ``t``."""
    from ..dequantize import block_fields

    if not t.decodable:
        t.data  # raises: the type cannot be decoded
    n_blocks = t.nbytes // t.type.type_size
    if not 0 <= index < n_blocks:
        raise BadArgument(f"tensor {t.name} has {n_blocks} blocks of {t.qtype}; block index "
                          f"{index} is out of range 0..{n_blocks - 1}")
    size = t.type.type_size
    raw = t.data[index * size:(index + 1) * size]
    out = {"tensor": t.name, "block": index, "offset": t.offset + index * size,
           "weights_per_block": t.type.block_size, "bytes_per_block": size}
    out.update(block_fields(t.qtype, raw))
    return _json_safe_dict(out)


def _json_safe_dict(d: dict) -> dict:
    return {k: _json_safe(v) for k, v in d.items()}
