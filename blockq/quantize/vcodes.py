"""The lattice codebooks as ``w = a * v``: codes of the i-quants that store groups of weights
as one codeword (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M).

Error-compensated rounding (:mod:`blockq.quantize.gptq`) keeps a block's scales from the
plain quantizer and picks its codes itself.  On these types a code covers a *group* of 8
weights (:data:`GROUP`), which are chosen together:

- IQ2_XXS, IQ2_XS, IQ2_S: one codeword of 8 magnitudes (8, 25 or 43) and 8 signs;
- IQ3_XXS, IQ3_S: two codewords of 4 magnitudes and 8 signs;
- IQ1_S, IQ1_M: one codeword of 8 values in -1, 0, 1, plus ``delta`` = +-0.125 (IQ1_S: one
  delta sign per sub-block of 32, kept from the scale search; IQ1_M: one per group, free).

IQ2_XXS, IQ2_XS and IQ3_XXS store 7 sign bits: the 8th is implied by even parity, so a group
always has an even number of negative weights (:data:`SPEC`).

Codes of ``n`` blocks are three arrays, groups in file order (group ``g`` = weights
``8g .. 8g+7`` of the block):

- ``idx`` int32 ``(n, 32, 8 // part)``: the codeword index(es) of each group;
- ``signs`` uint8 ``(n, 32)``: bit ``i`` set when weight ``8g + i`` is negative (0 on IQ1);
- ``neg`` uint8 ``(n, 32)``: 1 when the group's delta is -0.125 (0 on IQ2/IQ3).

:func:`codes_of` reads them, :func:`pack_codes` writes them into blocks (scales untouched; its
exact inverse), :func:`group_values` turns them into ``v``; a weight decodes as
``scales[j // sub] * v[j]`` with :func:`blockq.dequantize.scaled_parts`'s scales.  The bit
layouts are drawn beside the unpackers in :mod:`blockq.dequantize`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .. import codebooks
from ..dequantize import IQ1_DELTA, _records, scaled_parts
from ..errors import BadArgument
from ..types import QK_K, qtype as _qtype

GROUP = 8  # weights chosen together: one sign byte, one IQ2/IQ1 codeword, two IQ3 codewords
N_GROUPS = QK_K // GROUP

# name -> (codeword length, signed magnitudes, 7-bit sign codes of even parity, delta mode)
SPEC = {"IQ2_XXS": (8, True, True, ""), "IQ2_XS": (8, True, True, ""),
        "IQ2_S": (8, True, False, ""), "IQ3_XXS": (4, True, True, ""),
        "IQ3_S": (4, True, False, ""), "IQ1_S": (8, False, False, "block"),
        "IQ1_M": (8, False, False, "group")}


def supported(name: str) -> bool:
    return name in SPEC


def _need(name: str) -> None:
    if name not in SPEC:
        raise BadArgument(f"{name} has no codebook of groups (codebook types: {', '.join(SPEC)})")


def grid(name: str) -> np.ndarray:
    """The type's codewords as float32 ``(n, part)``: magnitudes (IQ2/IQ3) or -1/0/1 (IQ1)."""
    _need(name)
    return codebooks.grid(name).astype(np.float32)


def _low_bits(u, shift, bits, count):
    """Fields of ``bits`` bits at ``shift * k`` of each integer of u: (..., count)."""
    k = np.arange(count, dtype=u.dtype)
    return (u[..., None] >> (k * shift).astype(u.dtype)) & ((1 << bits) - 1)


def codes_of(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(idx, signs, neg)`` of uint8 blocks ``(n, type_size)`` (see the module's docstring)."""
    t = _qtype(qtype)
    _need(t.name)
    r = _records(np.ascontiguousarray(blocks, dtype=np.uint8), t)
    n = len(r)
    name = t.name
    signs = np.zeros((n, N_GROUPS), np.uint8)
    neg = np.zeros((n, N_GROUPS), np.uint8)
    if name == "IQ2_XXS":
        u = r["qs"].view("<u4").reshape(n, 8, 2)  # per sub-block: 4 index bytes, signs | scale
        idx = np.ascontiguousarray(u[..., 0]).view(np.uint8).reshape(n, N_GROUPS, 1)
        signs = codebooks.KSIGNS[_low_bits(u[..., 1], 7, 7, 4)].reshape(n, N_GROUPS)
    elif name == "IQ2_XS":
        q = r["qs"]  # (n, 32) u16: 9-bit index | 7-bit sign code
        idx = (q & 511).reshape(n, N_GROUPS, 1)
        signs = codebooks.KSIGNS[q >> 9]
    elif name == "IQ2_S":
        hi = _low_bits(r["qh"], 2, 2, 4).reshape(n, N_GROUPS)  # index bits 8..9
        idx = (r["qs"].astype(np.int32) | (hi.astype(np.int32) << 8)).reshape(n, N_GROUPS, 1)
        signs = r["signs"].copy()
    elif name == "IQ3_XXS":
        idx = r["qs"].reshape(n, N_GROUPS, 2)
        signs = codebooks.KSIGNS[_low_bits(r["scales_signs"], 7, 7, 4)].reshape(n, N_GROUPS)
    elif name == "IQ3_S":
        hi = _low_bits(r["qh"], 1, 1, 8).reshape(n, 64)  # bit 8 of index 8s + k
        idx = (r["qs"].astype(np.int32) | (hi.astype(np.int32) << 8)).reshape(n, N_GROUPS, 2)
        signs = r["signs"].copy()
    elif name == "IQ1_S":
        qh = r["qh"]  # (n, 8) u16: 4 x 3 index bits, 3-bit scale, delta sign
        hi = _low_bits(qh, 3, 3, 4).reshape(n, N_GROUPS)
        idx = (r["qs"].astype(np.int32) | (hi.astype(np.int32) << 8)).reshape(n, N_GROUPS, 1)
        neg = np.repeat((qh >> 15).astype(np.uint8), 4, axis=1)
    else:  # IQ1_M: one nibble per group, group g in nibble g % 2 of qh[g // 2]
        nib = _low_bits(r["qh"], 4, 4, 2).reshape(n, N_GROUPS)
        idx = (r["qs"].astype(np.int32) | ((nib & 7).astype(np.int32) << 8)).reshape(
            n, N_GROUPS, 1)
        neg = (nib >> 3).astype(np.uint8)
    return idx.astype(np.int32), signs.astype(np.uint8), neg.astype(np.uint8)


def _pack_bits(fields, shift, dtype):
    """Inverse of _low_bits: sum of fields[..., k] << shift*k as dtype."""
    k = np.arange(fields.shape[-1])
    return np.bitwise_or.reduce(fields.astype(dtype) << (k * shift).astype(dtype), axis=-1)


def _even(signs: np.ndarray, name: str) -> np.ndarray:
    odd = np.unpackbits(signs[..., None], axis=-1).sum(-1) & 1
    if odd.any():
        raise BadArgument(f"{name} stores 7 sign bits per 8 weights: every group needs an even "
                          f"number of negative weights ({int(odd.sum())} groups have an odd one)")
    return (signs & 127).astype(np.uint32)


def pack_codes(blocks: np.ndarray, qtype, idx, signs, neg) -> np.ndarray:
    """A copy of ``blocks`` with its codes replaced by ``(idx, signs, neg)``; the scales (and
    IQ1_S's delta sign, which belongs to its sub-block's scale) are kept."""
    t = _qtype(qtype)
    _need(t.name)
    name = t.name
    part = SPEC[name][0]
    n = len(blocks)
    idx = np.asarray(idx).reshape(n, N_GROUPS * (GROUP // part))
    signs = np.asarray(signs, np.uint8).reshape(n, N_GROUPS)
    neg = np.asarray(neg, np.uint8).reshape(n, N_GROUPS)
    size = len(codebooks.grid(name))
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise BadArgument(f"{name}: codeword indices must lie in 0..{size - 1}")
    out = np.array(blocks, dtype=np.uint8, copy=True)
    r = out.view(t.dtype)[:, 0]
    if name == "IQ2_XXS":
        u = r["qs"].view("<u4").reshape(n, 8, 2)
        u[..., 0] = idx.astype(np.uint8).reshape(n, 8, 4).copy().view("<u4")[..., 0]
        s7 = _even(signs, name).reshape(n, 8, 4)
        u[..., 1] = (u[..., 1] & np.uint32(0xF0000000)) | _pack_bits(s7, 7, np.uint32)
        r["qs"] = u.reshape(n, 16).view("<u2").reshape(n, 32)
    elif name == "IQ2_XS":
        r["qs"] = (idx.astype(np.uint16) | (_even(signs, name).astype(np.uint16) << 9))
    elif name == "IQ2_S":
        r["qs"] = (idx & 255).astype(np.uint8)
        r["qh"] = _pack_bits((idx >> 8).reshape(n, 8, 4), 2, np.uint8)
        r["signs"] = signs
    elif name == "IQ3_XXS":
        r["qs"] = idx.astype(np.uint8)
        s7 = _even(signs, name).reshape(n, 8, 4)
        r["scales_signs"] = (r["scales_signs"] & np.uint32(0xF0000000)) | _pack_bits(
            s7, 7, np.uint32)
    elif name == "IQ3_S":
        r["qs"] = (idx & 255).astype(np.uint8)
        r["qh"] = _pack_bits((idx >> 8).reshape(n, 8, 8), 1, np.uint8)
        r["signs"] = signs
    elif name == "IQ1_S":
        r["qs"] = (idx & 255).astype(np.uint8)
        r["qh"] = (r["qh"] & np.uint16(0xF000)) | _pack_bits((idx >> 8).reshape(n, 8, 4), 3,
                                                            np.uint16)
    else:  # IQ1_M
        r["qs"] = (idx & 255).astype(np.uint8)
        nib = ((idx >> 8) | (neg.astype(np.int32) << 3)).reshape(n, 16, 2)
        r["qh"] = _pack_bits(nib, 4, np.uint8)
    return out


def group_values(qtype, idx, signs, neg) -> np.ndarray:
    """``v`` float32 ``(n, 256)``: the signed codeword values (IQ1: plus delta) of each weight."""
    t = _qtype(qtype)
    _need(t.name)
    part, signed, _, _ = SPEC[t.name]
    n = len(idx)
    g = grid(t.name)[np.asarray(idx).reshape(n, -1)].reshape(n, N_GROUPS, GROUP)
    if signed:
        bits = np.unpackbits(np.asarray(signs, np.uint8)[..., None], axis=-1, bitorder="little")
        g = g * np.where(bits == 1, np.float32(-1), np.float32(1))
    else:
        g = g + np.where(np.asarray(neg)[..., None] == 1, -IQ1_DELTA, IQ1_DELTA)
    return g.reshape(n, QK_K).astype(np.float32)


def weight_scales(blocks: np.ndarray, qtype) -> np.ndarray:
    """Each weight's scale ``a`` float32 ``(n, 256)``: its sub-block's scale, ``w = a * v``."""
    sub, scales, _ = scaled_parts(blocks, qtype)
    return np.repeat(scales.astype(np.float32), sub, axis=1)


# --- the search: the best code of one group under a diagonal weighting -----------------------

TOP_K = 16  # candidates of the diagonal search re-ranked under the group's full loss


@njit(nogil=True, cache=True, inline="always")
def _keep(tc, tg, tf, c, g, f):  # pragma: no cover - compiled
    """Insert (cost c, codeword g, extra f) into the ascending top list (tc, tg, tf); the
    caller has checked that c beats its last entry (the check that keeps the search fast)."""
    k = tc.size - 1
    while k > 0 and c < tc[k - 1]:
        tc[k], tg[k], tf[k] = tc[k - 1], tg[k - 1], tf[k - 1]
        k -= 1
    tc[k], tg[k], tf[k] = c, g, f


@njit(nogil=True, cache=True)
def _quad(v, x, M):  # pragma: no cover - compiled
    """(v - x) M (v - x)^T for 8-vectors."""
    s = 0.0
    for i in range(8):
        di = v[i] - x[i]
        r = 0.0
        for j in range(8):
            r += M[i, j] * (v[j] - x[j])
        s += di * r
    return s


@njit(nogil=True, cache=True)
def _fill_signed(v, mags, part, h, g, sign):  # pragma: no cover - compiled
    for i in range(part):
        m = mags[g, i]
        v[h * part + i] = -m if (sign >> (h * part + i)) & 1 else m


@njit(nogil=True, cache=True)
def best_group(x, M, mags, part, signed, parity, deltas, v, code, K=TOP_K):  # pragma: no cover
    """The code of one group of 8 minimising ``(v - x) M (v - x)^T``: the ``K`` best candidates
    under M's diagonal (every codeword searched, with partial-distance pruning; per codeword its
    best signs, with ``parity`` an even number of minus signs, or each delta of ``deltas``)
    re-ranked under the whole M.  With a diagonal M (or K = 1) the result is the exhaustive
    optimum.

    ``mags`` float32 ``(n, part)``: the codewords; ``signed``: the values are ``+-mags``, else
    ``mags + delta``.  Fills ``v`` (8,) with the chosen values and ``code`` int64 (4,) with
    (index, second index or -1, sign byte, delta choice); returns the cost under M."""
    n = mags.shape[0]
    wt = np.empty(8)
    for i in range(8):
        wt[i] = M[i, i]
    K = max(1, min(K, n * max(1, deltas.size)))
    tc = np.full(K, np.inf)
    tg = np.zeros(K, np.int64)
    tf = np.zeros(K, np.int64)
    best = np.inf
    if not signed:
        for k in range(deltas.size):
            dl = deltas[k]
            for g in range(n):
                c = 0.0
                for i in range(8):
                    e = mags[g, i] + dl - x[i]
                    c += wt[i] * e * e
                    if c >= tc[K - 1]:
                        break
                if c < tc[K - 1]:
                    _keep(tc, tg, tf, c, g, k)
        bi = 0
        for j in range(K):
            if tc[j] == np.inf:
                break
            for i in range(8):
                v[i] = mags[tg[j], i] + deltas[tf[j]]
            q = _quad(v, x, M)
            if q < best:
                best, bi = q, j
        for i in range(8):
            v[i] = mags[tg[bi], i] + deltas[tf[bi]]
        code[0], code[1], code[2], code[3] = tg[bi], -1, 0, tf[bi]
        return best
    s0 = 0
    for i in range(8):
        if x[i] < 0:
            s0 |= 1 << i
    odd = False
    if parity:
        cnt = 0
        for i in range(8):
            cnt += (s0 >> i) & 1
        odd = cnt % 2 == 1
    nh = 8 // part
    # two slots (IQ3): Kh x Kh pairs are re-ranked, so each slot keeps sqrt(K)
    Kh = min(n, K if nh == 1 else max(1, int(np.sqrt(K))))
    # per codeword slot h: its Kh best codewords with the signs of x (c*), and with one flip
    # (f*: cost, codeword, flipped weight) when the parity needs one
    cc = np.full((2, Kh), np.inf)
    cg = np.zeros((2, Kh), np.int64)
    cz = np.zeros((2, Kh), np.int64)
    fc = np.full((2, Kh), np.inf)
    fg = np.zeros((2, Kh), np.int64)
    ff = np.zeros((2, Kh), np.int64)
    for h in range(nh):
        o = h * part
        for g in range(n):
            c = 0.0
            for i in range(part):
                e = mags[g, i] - abs(x[o + i])
                c += wt[o + i] * e * e
                if c >= cc[h, Kh - 1] and (not odd or c >= fc[h, Kh - 1]):
                    break
            if c < cc[h, Kh - 1]:
                _keep(cc[h], cg[h], cz[h], c, g, 0)
            if odd and c < fc[h, Kh - 1]:
                fm, fk = np.inf, 0
                for i in range(part):
                    f = 4.0 * wt[o + i] * mags[g, i] * abs(x[o + i])
                    if f < fm:
                        fm, fk = f, i
                if c + fm < fc[h, Kh - 1]:
                    _keep(fc[h], fg[h], ff[h], c + fm, g, o + fk)
    # candidates: one (nh = 1) or two (nh = 2) slots, the flip in at most one of them
    pick0, pick1, sign_b = 0, -1, s0
    for flip_slot in range(-1, nh):
        if (flip_slot >= 0) != odd:
            continue
        for j0 in range(Kh):
            g0 = fg[0, j0] if flip_slot == 0 else cg[0, j0]
            c0 = fc[0, j0] if flip_slot == 0 else cc[0, j0]
            if c0 == np.inf:
                break
            s_a = s0 ^ (1 << ff[0, j0]) if flip_slot == 0 else s0
            for j1 in range(Kh if nh == 2 else 1):
                if nh == 2:
                    g1 = fg[1, j1] if flip_slot == 1 else cg[1, j1]
                    c1 = fc[1, j1] if flip_slot == 1 else cc[1, j1]
                    if c1 == np.inf:
                        break
                    sign = s_a ^ (1 << ff[1, j1]) if flip_slot == 1 else s_a
                    _fill_signed(v, mags, part, 1, g1, sign)
                else:
                    g1, sign = -1, s_a
                _fill_signed(v, mags, part, 0, g0, sign)
                q = _quad(v, x, M)
                if q < best:
                    best, pick0, pick1, sign_b = q, g0, g1, sign
    _fill_signed(v, mags, part, 0, pick0, sign_b)
    if nh == 2:
        _fill_signed(v, mags, part, 1, pick1, sign_b)
    code[0], code[1], code[2], code[3] = pick0, pick1, sign_b, 0
    return best


@njit(nogil=True, cache=True)
def round_groups(W, U, Ui, c0, a, fixed, mags, part, signed, parity, deltas, codes, E,
                 e0, K=TOP_K):  # pragma: no cover
    """Round the 256 columns ``c0 ..`` of W (float32 (rows, cols), rounding order, groups of 8
    contiguous) group by group onto ``a * v`` (``a`` (rows, 256)), propagating each group's error
    into the block's later columns; the scaled errors go to ``E[:, e0 + j]``.

    ``Ui`` ``(32, 8, 8)``: the inverse of each group's diagonal block of U; the group's loss is
    ``|e Ui|^2 = e (Ui Ui^T) e^T``, searched by :func:`best_group`.  ``fixed``
    ``(rows, 32)``: the delta choice per group where ``deltas`` has one entry per choice kept
    (IQ1_S); -1 to search all of ``deltas``.  Fills ``codes`` int64 ``(rows, 32, 4)``."""
    rows = W.shape[0]
    ng = Ui.shape[0]
    x = np.empty(8)
    M = np.empty((8, 8))
    v = np.empty(8)
    e = np.empty(8)
    code = np.empty(4, np.int64)
    one = np.empty(1)
    c1 = c0 + GROUP * ng
    for gi in range(ng):
        g0 = c0 + GROUP * gi
        for i in range(8):
            for j in range(8):
                s = 0.0
                for k in range(8):
                    s += Ui[gi, i, k] * Ui[gi, j, k]
                M[i, j] = s
        for r in range(rows):
            ar = a[r, GROUP * gi]
            if ar != 0.0:
                for i in range(8):
                    x[i] = W[r, g0 + i] / ar
                if fixed[r, gi] >= 0:
                    one[0] = deltas[fixed[r, gi]]
                    best_group(x, M, mags, part, signed, parity, one, v, code, K)
                    code[3] = fixed[r, gi]
                else:
                    best_group(x, M, mags, part, signed, parity, deltas, v, code, K)
                for i in range(8):
                    e[i] = W[r, g0 + i] - ar * v[i]
            else:  # a zero scale: every code decodes to 0
                code[0], code[1], code[2] = 0, (0 if part == 4 else -1), 0
                code[3] = fixed[r, gi] if fixed[r, gi] >= 0 else 0
                for i in range(8):
                    e[i] = W[r, g0 + i]
            for k in range(4):
                codes[r, gi, k] = code[k]
            for k in range(8):
                s = 0.0
                for i in range(k + 1):  # Ui is upper triangular
                    s += e[i] * Ui[gi, i, k]
                E[r, e0 + GROUP * gi + k] = s
            for c in range(g0 + GROUP, c1):
                s = 0.0
                for k in range(8):
                    s += E[r, e0 + GROUP * gi + k] * U[g0 + k, c]
                W[r, c] -= s


def delta_choices(name: str) -> np.ndarray:
    """The deltas a group may take, float64: (+0.125, -0.125) on IQ1 (choice 1 is the stored
    negative bit); a single unused 0 on IQ2/IQ3."""
    _need(name)
    return (np.array([IQ1_DELTA, -IQ1_DELTA], np.float64) if not SPEC[name][1]
            else np.zeros(1, np.float64))
