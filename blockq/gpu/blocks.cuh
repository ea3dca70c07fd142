// blockq GPU block decoders: one function per block type that dequantizes 8 consecutive weights
// of one block.  Written __host__ __device__ so the same code is compiled by nvcc for the kernels
// and by a host C++ compiler for tests (tests/test_gpu_source.py checks every decoder bit-exactly
// against gguf-py's dequantize on the CPU).
//
// Convention: dq8_<type>(blk, off, v) writes v[0..7] = weights off..off+7 of the block starting
// at byte pointer blk; off is a multiple of 8 and < the type's block size.  F32/F16/BF16 are
// treated as "blocks" of 8 weights so every kernel walks rows in the same way.  The list of
// types with their block sizes (macro BQ_TYPES) is generated from blockq/types.py by
// blockq/gpu/source.py, so the table stays the single source of truth.
#include <stdint.h>
#include <string.h>

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#endif

#define BQ_HD __host__ __device__ __forceinline__

BQ_HD uint16_t bq_u16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }
BQ_HD uint32_t bq_u32(const uint8_t* p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
BQ_HD float bq_bits_to_f32(uint32_t bits) { float f; memcpy(&f, &bits, 4); return f; }
BQ_HD float bq_f32(const uint8_t* p) { return bq_bits_to_f32(bq_u32(p)); }

// IEEE half -> float, exact (subnormals, inf and NaN included).
BQ_HD float bq_f16(const uint8_t* p) {
    uint32_t h = bq_u16(p);
    uint32_t s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0) {
        if (m == 0) {
            bits = s;
        } else {  // subnormal: renormalize the mantissa
            e = 113;
            while (!(m & 0x400)) { m <<= 1; e--; }
            bits = s | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) {
        bits = s | 0x7f800000u | (m << 13);
    } else {
        bits = s | ((e + 112) << 23) | (m << 13);
    }
    return bq_bits_to_f32(bits);
}
BQ_HD float bq_bf16(const uint8_t* p) { return bq_bits_to_f32((uint32_t)bq_u16(p) << 16); }

// ---- float types (8 weights per pseudo-block) ----
BQ_HD void dq8_f32(const uint8_t* b, int off, float* v) { for (int i = 0; i < 8; i++) v[i] = bq_f32(b + 4 * (off + i)); }
BQ_HD void dq8_f16(const uint8_t* b, int off, float* v) { for (int i = 0; i < 8; i++) v[i] = bq_f16(b + 2 * (off + i)); }
BQ_HD void dq8_bf16(const uint8_t* b, int off, float* v) { for (int i = 0; i < 8; i++) v[i] = bq_bf16(b + 2 * (off + i)); }

// ---- legacy 32-weight blocks ----
// Q4_0 (18 B): 0..1 d f16 | 2..17 qs: byte j = w[j] (low nibble) | w[j+16] (high nibble); w = d*(q-8)
BQ_HD void dq8_q4_0(const uint8_t* b, int off, float* v) {
    float d = bq_f16(b);
    int shift = off < 16 ? 0 : 4, j0 = off & 15;
    for (int i = 0; i < 8; i++) v[i] = d * (float)(((b[2 + j0 + i] >> shift) & 0xF) - 8);
}
// Q4_1 (20 B): 0..1 d | 2..3 m | 4..19 qs (as Q4_0); w = d*q + m
BQ_HD void dq8_q4_1(const uint8_t* b, int off, float* v) {
    float d = bq_f16(b), m = bq_f16(b + 2);
    int shift = off < 16 ? 0 : 4, j0 = off & 15;
    for (int i = 0; i < 8; i++) v[i] = d * (float)((b[4 + j0 + i] >> shift) & 0xF) + m;
}
// Q5_0 (22 B): 0..1 d | 2..5 qh (u32, bit e = 5th bit of w[e]) | 6..21 qs (as Q4_0); w = d*(q-16)
BQ_HD void dq8_q5_0(const uint8_t* b, int off, float* v) {
    float d = bq_f16(b);
    uint32_t qh = bq_u32(b + 2);
    int shift = off < 16 ? 0 : 4, j0 = off & 15;
    for (int i = 0; i < 8; i++) {
        int q = ((b[6 + j0 + i] >> shift) & 0xF) | (((qh >> (off + i)) & 1) << 4);
        v[i] = d * (float)(q - 16);
    }
}
// Q5_1 (24 B): 0..1 d | 2..3 m | 4..7 qh | 8..23 qs; w = d*q + m
BQ_HD void dq8_q5_1(const uint8_t* b, int off, float* v) {
    float d = bq_f16(b), m = bq_f16(b + 2);
    uint32_t qh = bq_u32(b + 4);
    int shift = off < 16 ? 0 : 4, j0 = off & 15;
    for (int i = 0; i < 8; i++) {
        int q = ((b[8 + j0 + i] >> shift) & 0xF) | (((qh >> (off + i)) & 1) << 4);
        v[i] = d * (float)q + m;
    }
}
// Q8_0 (34 B): 0..1 d | 2..33 qs int8; w = d*q
BQ_HD void dq8_q8_0(const uint8_t* b, int off, float* v) {
    float d = bq_f16(b);
    for (int i = 0; i < 8; i++) v[i] = d * (float)(int8_t)b[2 + off + i];
}

// ---- k-quants: 256-weight super-blocks ----
// Weight index e = 128*h + 32*j + l (h: half, j: 0..3, l: 0..31) for Q2_K/Q3_K/Q6_K.
// Q2_K (84 B): 0..15 scales (low nibble: scale, high: min, one byte per 16 weights)
//   | 16..79 qs: 2-bit q of w[e] at qs[32h + l] bits 2j..2j+1 | 80..81 d | 82..83 dmin
//   w = d*(sc & 15)*q - dmin*(sc >> 4), sc = scales[8h + 2j + l/16]
BQ_HD void dq8_q2_k(const uint8_t* b, int off, float* v) {
    int h = off >> 7, j = (off >> 5) & 3, l = off & 31;
    float d = bq_f16(b + 80), dmin = bq_f16(b + 82);
    int sc = b[8 * h + 2 * j + (l >> 4)];
    float dl = d * (float)(sc & 0xF), ml = dmin * (float)(sc >> 4);
    for (int i = 0; i < 8; i++) v[i] = dl * (float)((b[16 + 32 * h + l + i] >> (2 * j)) & 3) - ml;
}
// Q3_K 6-bit signed sub-block scales, 16 of them packed in 12 bytes:
//   low 4 bits of scale i: byte i (i < 8, low nibble) or byte i-8 (high nibble)
//   high 2 bits of scale i: byte 8 + i%4, bits 2*(i/4)..+1; value = packed - 32
BQ_HD int bq_q3k_scale(const uint8_t* s, int i) {
    int lo = i < 8 ? (s[i] & 0xF) : (s[i - 8] >> 4);
    int hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}
// Q3_K (110 B): 0..31 hmask (bit 4h+j of hmask[l]: high bit of w[e]) | 32..95 qs (as Q2_K)
//   | 96..107 scales | 108..109 d;  w = d*scale*(q2 | hbit<<2 - 4)
BQ_HD void dq8_q3_k(const uint8_t* b, int off, float* v) {
    int h = off >> 7, j = (off >> 5) & 3, l = off & 31;
    float dl = bq_f16(b + 108) * (float)bq_q3k_scale(b + 96, 8 * h + 2 * j + (l >> 4));
    for (int i = 0; i < 8; i++) {
        int q = (b[32 + 32 * h + l + i] >> (2 * j)) & 3;
        int hb = (b[l + i] >> (4 * h + j)) & 1;
        v[i] = dl * (float)(q - (hb ? 0 : 4));
    }
}
// Q4_K/Q5_K 6-bit scale and min of sub-block j (0..7) packed in 12 bytes s:
//   j < 4: scale = s[j] & 63, min = s[j+4] & 63
//   j >= 4: scale = (s[j+4] & 15) | (s[j-4] >> 6) << 4, min = (s[j+4] >> 4) | (s[j] >> 6) << 4
BQ_HD void bq_scale_min_k4(const uint8_t* s, int j, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63; *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}
// Q4_K (144 B): 0..1 d | 2..3 dmin | 4..15 scales | 16..143 qs.  Weight e = 64g + 32s + l:
//   q = nibble s of qs[32g + l]; sub-block 2g+s; w = d*sc*q - dmin*m
BQ_HD void dq8_q4_k(const uint8_t* b, int off, float* v) {
    int g = off >> 6, s = (off >> 5) & 1, l = off & 31, sc, m;
    bq_scale_min_k4(b + 4, 2 * g + s, &sc, &m);
    float d = bq_f16(b) * (float)sc, dm = bq_f16(b + 2) * (float)m;
    for (int i = 0; i < 8; i++) v[i] = d * (float)((b[16 + 32 * g + l + i] >> (4 * s)) & 0xF) - dm;
}
// Q5_K (176 B): as Q4_K with 16..47 qh (bit 2g+s of qh[l]: 5th bit) and 48..175 qs
BQ_HD void dq8_q5_k(const uint8_t* b, int off, float* v) {
    int g = off >> 6, s = (off >> 5) & 1, l = off & 31, sc, m, sub = 2 * g + s;
    bq_scale_min_k4(b + 4, sub, &sc, &m);
    float d = bq_f16(b) * (float)sc, dm = bq_f16(b + 2) * (float)m;
    for (int i = 0; i < 8; i++) {
        int q = ((b[48 + 32 * g + l + i] >> (4 * s)) & 0xF) | (((b[16 + l + i] >> sub) & 1) << 4);
        v[i] = d * (float)q - dm;
    }
}
// Q6_K (210 B): 0..127 ql | 128..191 qh | 192..207 scales int8 | 208..209 d.  Weight e = 128h + 32k + l:
//   low 4 bits: nibble k/2 of ql[64h + 32(k&1) + l]; high 2 bits: qh[32h + l] bits 2k..2k+1
//   w = d * scales[8h + 2k + l/16] * (q - 32)
BQ_HD void dq8_q6_k(const uint8_t* b, int off, float* v) {
    int h = off >> 7, k = (off >> 5) & 3, l = off & 31;
    float dl = bq_f16(b + 208) * (float)(int8_t)b[192 + 8 * h + 2 * k + (l >> 4)];
    for (int i = 0; i < 8; i++) {
        int lo = (b[64 * h + 32 * (k & 1) + l + i] >> (4 * (k >> 1))) & 0xF;
        int hi = (b[128 + 32 * h + l + i] >> (2 * k)) & 3;
        v[i] = dl * (float)((lo | (hi << 4)) - 32);
    }
}
// Q8_K (292 B): 0..3 d f32 | 4..259 qs int8 | 260..291 bsums (unused here); w = d*q
BQ_HD void dq8_q8_k(const uint8_t* b, int off, float* v) {
    float d = bq_f32(b);
    for (int i = 0; i < 8; i++) v[i] = d * (float)(int8_t)b[4 + off + i];
}

// ---- non-linear, ternary and i-quant types ----
// Their value tables (bq_kv_iq4nl, bq_kv_mxfp4, bq_ksigns, bq_grid_<type>) are generated from
// blockq/codebooks.py by blockq/gpu/source.py (tables_source); on the GPU they are __device__
// arrays, so these decoders are __device__ only there (BQ_DT).  Layouts: formats/<TYPE>.md.
#ifdef __CUDACC__
#define BQ_DT __device__ __forceinline__
#else
#define BQ_DT inline
#endif
BQ_DT float bq_sign(float v, int bits, int j) { return (bits >> j) & 1 ? -v : v; }
BQ_DT float bq_half_scale(float d, int s, float f) { return (d * (0.5f + (float)s)) * f; }

// IQ4_NL (18 B): 0..1 d | 2..17 qs, nibbles as Q4_0; w = d * kvalues[q]
BQ_DT void dq8_iq4_nl(const uint8_t* b, int off, float* v) {
    float d = bq_f16(b);
    int shift = off < 16 ? 0 : 4, j0 = off & 15;
    for (int i = 0; i < 8; i++) v[i] = d * (float)bq_kv_iq4nl[(b[2 + j0 + i] >> shift) & 0xF];
}
// IQ4_XS (136 B): 0..1 d | 2..3 scales_h | 4..7 scales_l | 8..135 qs, 16 bytes per 32 weights
BQ_DT void dq8_iq4_xs(const uint8_t* b, int off, float* v) {
    int s = off >> 5, k = off & 31, shift = k < 16 ? 0 : 4, j0 = k & 15;
    int ls = ((b[4 + s / 2] >> (4 * (s % 2))) & 0xF) | (((bq_u16(b + 2) >> (2 * s)) & 3) << 4);
    float dl = bq_f16(b) * (float)(ls - 32);
    for (int i = 0; i < 8; i++) v[i] = dl * (float)bq_kv_iq4nl[(b[8 + 16 * s + j0 + i] >> shift) & 0xF];
}
// MXFP4 (17 B): 0 e (E8M0: d = 2^(e-128)) | 1..16 E2M1 codes, nibbles as Q4_0; w = e2m1x2[q] * d
BQ_DT void dq8_mxfp4(const uint8_t* b, int off, float* v) {
    uint32_t e = b[0];
    float d = bq_bits_to_f32(e < 2 ? 0x00200000u << e : (e - 1) << 23);
    int shift = off < 16 ? 0 : 4, j0 = off & 15;
    for (int i = 0; i < 8; i++) v[i] = (float)bq_kv_mxfp4[(b[1 + j0 + i] >> shift) & 0xF] * d;
}
// TQ1_0 (54 B): 0..47 qs (5 trits per byte) | 48..51 qh (4 per byte) | 52..53 d
//   trit k of byte c = (((c * 3^k) & 255) * 3) >> 8;  w = (t - 1) * d
BQ_DT void dq8_tq1_0(const uint8_t* b, int off, float* v) {
    float d = bq_f16(b + 52);
    for (int i = 0; i < 8; i++) {
        int e = off + i, n, c;
        if (e < 160) { n = e >> 5; c = b[e & 31]; }
        else if (e < 240) { n = (e - 160) >> 4; c = b[32 + ((e - 160) & 15)]; }
        else { n = (e - 240) >> 2; c = b[48 + ((e - 240) & 3)]; }
        int p = 1;
        for (int k = 0; k < n; k++) p *= 3;
        v[i] = (float)(((((c * p) & 255) * 3) >> 8) - 1) * d;
    }
}
// TQ2_0 (66 B): 0..63 qs, weight 128h + 32l + m at bits 2l..2l+1 of qs[32h + m] | 64..65 d
BQ_DT void dq8_tq2_0(const uint8_t* b, int off, float* v) {
    float d = bq_f16(b + 64);
    int h = off >> 7, l = (off >> 5) & 3, m = off & 31;
    for (int i = 0; i < 8; i++) v[i] = (float)(((b[32 * h + m + i] >> (2 * l)) & 3) - 1) * d;
}
// IQ2_XXS (66 B): 0..1 d | per 32 weights s, 8 bytes at 2 + 8s: 4 grid indices, then a u32 of
//   4 x 7-bit sign codes and a 4-bit scale (bits 28..31); off / 8 = group l of sub-block s
BQ_DT void dq8_iq2_xxs(const uint8_t* b, int off, float* v) {
    int s = off >> 5, l = (off >> 3) & 3;
    uint32_t aux = bq_u32(b + 2 + 8 * s + 4);
    float db = bq_half_scale(bq_f16(b), (int)(aux >> 28), 0.25f);
    int g = b[2 + 8 * s + l], sg = bq_ksigns[(aux >> (7 * l)) & 127];
    for (int j = 0; j < 8; j++) v[j] = bq_sign(db * (float)bq_grid_iq2_xxs[g][j], sg, j);
}
// IQ2_XS (74 B): 0..1 d | 2..65 32 u16 (9-bit grid index, 7-bit sign code) | 66..73 scales
BQ_DT void dq8_iq2_xs(const uint8_t* b, int off, float* v) {
    int k = off >> 3, s = k >> 2, l = k & 3;
    int q = bq_u16(b + 2 + 2 * k), sg = bq_ksigns[q >> 9];
    float db = bq_half_scale(bq_f16(b), (b[66 + s] >> (4 * (l >> 1))) & 0xF, 0.25f);
    for (int j = 0; j < 8; j++) v[j] = bq_sign(db * (float)bq_grid_iq2_xs[q & 511][j], sg, j);
}
// IQ2_S (82 B): 0..1 d | 2..33 qs | 34..65 signs | 66..73 qh (2 bits per group) | 74..81 scales
BQ_DT void dq8_iq2_s(const uint8_t* b, int off, float* v) {
    int k = off >> 3, s = k >> 2, l = k & 3;
    int g = b[2 + k] | (((b[66 + s] >> (2 * l)) & 3) << 8), sg = b[34 + k];
    float db = bq_half_scale(bq_f16(b), (b[74 + s] >> (4 * (l >> 1))) & 0xF, 0.25f);
    for (int j = 0; j < 8; j++) v[j] = bq_sign(db * (float)bq_grid_iq2_s[g][j], sg, j);
}
// IQ3_XXS (98 B): 0..1 d | 2..65 grid indices (4 weights each) | 66..97 u32 per 32 weights:
//   4 x 7-bit sign codes (8 weights each), 4-bit scale at bits 28..31
BQ_DT void dq8_iq3_xxs(const uint8_t* b, int off, float* v) {
    int s = off >> 5, l = (off >> 3) & 3;
    uint32_t aux = bq_u32(b + 66 + 4 * s);
    float db = bq_half_scale(bq_f16(b), (int)(aux >> 28), 0.5f);
    int sg = bq_ksigns[(aux >> (7 * l)) & 127], g1 = b[2 + 8 * s + 2 * l], g2 = b[3 + 8 * s + 2 * l];
    for (int j = 0; j < 4; j++) {
        v[j] = bq_sign(db * (float)bq_grid_iq3_xxs[g1][j], sg, j);
        v[4 + j] = bq_sign(db * (float)bq_grid_iq3_xxs[g2][j], sg, 4 + j);
    }
}
// IQ3_S (110 B): 0..1 d | 2..65 qs | 66..73 qh (bit m of byte s: index bit 8 of group 8s+m)
//   | 74..105 signs | 106..109 scales (a nibble per 32 weights); w = d*(1+2s)*grid*sign
BQ_DT void dq8_iq3_s(const uint8_t* b, int off, float* v) {
    int s = off >> 5, q8 = (off >> 3) & 3, sg = b[74 + 4 * s + q8];
    float db = bq_f16(b) * (float)(1 + 2 * ((b[106 + s / 2] >> (4 * (s % 2))) & 0xF));
    for (int h = 0; h < 2; h++) {
        int m = 2 * q8 + h, g = b[2 + 8 * s + m] | (((b[66 + s] >> m) & 1) << 8);
        for (int j = 0; j < 4; j++) v[4 * h + j] = bq_sign(db * (float)bq_grid_iq3_s[g][j], sg, 4 * h + j);
    }
}
// IQ1_S (50 B): 0..1 d | 2..33 qs | 34..49 u16 per 32 weights: index bits 8..10 per group,
//   3-bit scale at 12..14, sign of delta at 15;  w = d*(2s+1)*(grid + delta)
BQ_DT void dq8_iq1_s(const uint8_t* b, int off, float* v) {
    int s = off >> 5, l = (off >> 3) & 3, qh = bq_u16(b + 34 + 2 * s);
    float dl = bq_f16(b) * (float)(2 * ((qh >> 12) & 7) + 1), delta = qh & 0x8000 ? -0.125f : 0.125f;
    int g = b[2 + 4 * s + l] | (((qh >> (3 * l)) & 7) << 8);
    for (int j = 0; j < 8; j++) v[j] = dl * ((float)bq_grid_iq1_s[g][j] + delta);
}
// IQ1_M (56 B): 0..31 qs | 32..47 qh (a nibble per group) | 48..55 4 u16: 3-bit scales per 16
//   weights, top nibbles = the f16 d
BQ_DT void dq8_iq1_m(const uint8_t* b, int off, float* v) {
    int k = off >> 3, s = k >> 2, l = k & 3;
    uint16_t dh = (uint16_t)((bq_u16(b + 48) >> 12) | ((bq_u16(b + 50) >> 8) & 0xF0)
                             | ((bq_u16(b + 52) >> 4) & 0xF00) | (bq_u16(b + 54) & 0xF000));
    uint8_t dbytes[2] = {(uint8_t)(dh & 0xFF), (uint8_t)(dh >> 8)};
    int ls = (bq_u16(b + 48 + 2 * (s / 2)) >> (6 * (s % 2) + 3 * (l / 2))) & 7;
    float dl = bq_f16(dbytes) * (float)(2 * ls + 1);
    int nib = (b[32 + 2 * s + l / 2] >> (4 * (l % 2))) & 0xF, g = b[4 * s + l] | ((nib & 7) << 8);
    float delta = nib & 8 ? -0.125f : 0.125f;
    for (int j = 0; j < 8; j++) v[j] = dl * ((float)bq_grid_iq1_s[g][j] + delta);
}
