// blockq GPU kernels: fused dequantize + matrix-vector product (decode) and dequantize-to-float
// (prompt path, followed by cuBLAS through CuPy).  Block decoders live in blocks.cuh; the type
// list BQ_TYPES(X) -> X(name, weights_per_block, bytes_per_block) is prepended by source.py.
//
// matvec_<type>: one warp per output row.  Each lane decodes 8 consecutive weights per step and
// the warp advances 256 weights per step, so consecutive lanes read consecutive bytes of the row
// (coalesced) and consecutive float4 pairs of x.  Requires cols % 8 == 0 (checked by the host).
#include <cuda_fp16.h>

__device__ __forceinline__ float bq_dot8(const float* v, const float* __restrict__ x) {
    const float4 a = *reinterpret_cast<const float4*>(x);
    const float4 c = *reinterpret_cast<const float4*>(x + 4);
    return v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w
         + v[4] * c.x + v[5] * c.y + v[6] * c.z + v[7] * c.w;
}

__device__ __forceinline__ float bq_warp_sum(float acc) {
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

#define BQ_KERNELS(name, QK, TS)                                                               \
extern "C" __global__ void matvec_##name(const uint8_t* __restrict__ W,                       \
                                         const float* __restrict__ x, float* __restrict__ y,   \
                                         int rows, int cols, long long row_bytes) {            \
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);                       \
    const int lane = threadIdx.x & 31;                                                         \
    if (row >= rows) return;                                                                   \
    const uint8_t* r = W + (size_t)row * (size_t)row_bytes;                                    \
    float acc = 0.f, v[8];                                                                     \
    for (int e = lane * 8; e < cols; e += 256) {                                               \
        dq8_##name(r + (size_t)(e / QK) * TS, e % QK, v);                                      \
        acc += bq_dot8(v, x + e);                                                              \
    }                                                                                          \
    acc = bq_warp_sum(acc);                                                                    \
    if (lane == 0) y[row] = acc;                                                               \
}                                                                                              \
/* dequant_<type>: thread t writes weights 8t..8t+7 of rows [row0, row0+n_rows) as float32 */ \
extern "C" __global__ void dequant_##name(const uint8_t* __restrict__ W, float* __restrict__ out,\
                                          int row0, int n_rows, int cols, long long row_bytes) { \
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;                      \
    const int per_row = cols >> 3;                                                             \
    if (t >= (long long)n_rows * per_row) return;                                              \
    const int rr = (int)(t / per_row), e = (int)(t % per_row) * 8;                             \
    const uint8_t* r = W + (size_t)(row0 + rr) * (size_t)row_bytes;                            \
    float v[8];                                                                                \
    dq8_##name(r + (size_t)(e / QK) * TS, e % QK, v);                                          \
    float* o = out + (size_t)rr * cols + e;                                                    \
    for (int i = 0; i < 8; i++) o[i] = v[i];                                                   \
}

BQ_TYPES(BQ_KERNELS)

// ---- small kernels for the offloaded transformer blocks ----

// RMSNorm of each row of x (n, d) times weight w (d,): one block per row.
extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ y, int d, float eps) {
    extern __shared__ float red[];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* yr = y + (size_t)blockIdx.x * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i] * xr[i];
    s = bq_warp_sum(s);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
        t = bq_warp_sum(t);
        if (threadIdx.x == 0) red[0] = t;
    }
    __syncthreads();
    const float scale = rsqrtf(red[0] / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}

// Rotary embedding in place on x (n_tok, n_head, head_dim) at positions pos (n_tok,).
// neox = 0: rotate interleaved pairs (2i, 2i+1) (llama); neox = 1: pairs (i, i + n_rot/2) (qwen2).
// inv_freq (n_rot/2,) holds the per-pair frequencies (rope scaling already applied).
extern "C" __global__ void rope_f32(float* __restrict__ x, const int* __restrict__ pos,
                                    const float* __restrict__ inv_freq, int n_tok, int n_head,
                                    int head_dim, int n_rot, int neox) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int half = n_rot / 2;
    if (t >= (long long)n_tok * n_head * half) return;
    const int i = (int)(t % half);
    const long long th = t / half;  // token * n_head + head
    const int tok = (int)(th / n_head);
    float* h = x + th * head_dim;
    const float ang = (float)pos[tok] * inv_freq[i];
    float c, s;
    sincosf(ang, &s, &c);
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = h[a], x1 = h[b];
    h[a] = x0 * c - x1 * s;
    h[b] = x0 * s + x1 * c;
}

// SwiGLU: out = silu(gate) * up, elementwise over n values.
extern "C" __global__ void swiglu_f32(const float* __restrict__ g, const float* __restrict__ u,
                                      float* __restrict__ out, long long n) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const float a = g[t];
    out[t] = a / (1.f + expf(-a)) * u[t];
}
