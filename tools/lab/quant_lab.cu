// Kernel lab: candidate designs for the "fast" quantize / dequantize kernels, timed side by side
// with cudaMemcpy in one standalone program (no torch), to choose what goes into kernels/.
// Development tool; its findings are in tools/lab/NOTES.md. The benchmark of record is the
// workflow's benchmark rule.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -I kernels/include tools/lab/quant_lab.cu -o build/quant_lab
//   build/quant_lab [--quick]
//
// What it compares, on the same buffers and under the same L2 flush:
//   - the ceiling: cudaMemcpy device to device, at 2 GiB and at each op's own byte count;
//   - L2 flush before each repetition: none, "write" (a 200 MB memset, what kvpack.study.bench did:
//     it leaves up to an L2 of dirty lines that the timed op then writes back), "read" (a kernel
//     that reads 4 L2s: L2 left clean);
//   - quantize: the IEEE-division arithmetic (quant_math.h, F2I conversion) against the reciprocal
//     with an exact fallback near ties (no MUFU, no F2I on the common path), rows in flight, grid;
//   - dequantize: the vectorized kernel (char4 -> float4, 16 x 16 blocks) against row-striding
//     kernels with more bytes in flight and an integer-free int8 -> float conversion.
// Every candidate's output is compared bit for bit with the division kernel's, on data that
// includes exact ties, near ties, subnormal scales and zero columns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kvpack/quant_math.h"

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

using kvpack::dequantize_value;
using kvpack::quantize_value;

// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float tof(T v);
template <>
__device__ __forceinline__ float tof(float v) { return v; }
template <>
__device__ __forceinline__ float tof(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float tof(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T fromf(float v);
template <>
__device__ __forceinline__ float fromf(float v) { return v; }
template <>
__device__ __forceinline__ __half fromf(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 fromf(float v) { return __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------
// Reciprocal quantize. y = fl(x * r), r = fl(1 / s), is within |x/s| * 2^-22 of fl(x / s); for
// |y| <= 127 that is < 2^-15, so unless y lies within 2^-14 of a half-integer both round to the same
// integer. Clamping to +-127 before rounding equals rounding then clamping (integer bounds).
// Rounding by the 1.5 * 2^23 trick: t = yc + M holds rint(yc) in its low mantissa bits, and its low
// byte is rint(yc) as int8 (M's low byte is 0). Slow (exact division) when near a tie or y is not
// finite (r = inf for a subnormal s, NaN / inf input).
constexpr float kMagic = 12582912.0f;            // 1.5 * 2^23
constexpr float kTieMargin = 0.5f - 0x1p-14f;    // |yc - rint(yc)| above this: near a tie

__device__ __forceinline__ float recip_scale(float s) { return s == 0.0f ? 0.0f : __frcp_rn(s); }

__device__ __forceinline__ uint32_t round_magic(float x, float r, bool& slow) {
  const float y = __fmul_rn(x, r);
  const float yc = fminf(fmaxf(y, -127.0f), 127.0f);
  const float t = __fadd_rn(yc, kMagic);
  const float k = __fsub_rn(t, kMagic);
  slow |= !(fabsf(y) < INFINITY) || fabsf(__fsub_rn(yc, k)) > kTieMargin;
  return __float_as_uint(t);
}

__device__ __forceinline__ uint32_t pack4(uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
  return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x4000), 0x7610);
}

__device__ __forceinline__ uint32_t pack4_div(const float* x, const float* s) {
  uint32_t w = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) w |= static_cast<uint32_t>(static_cast<uint8_t>(quantize_value(x[j], s[j]))) << (8 * j);
  return w;
}

// int8 -> float without I2F: byte b = q ^ 0x80 under 0x4B40 makes the float 1.5*2^23 + 128 + q.
__device__ __forceinline__ void unpack4_magic(uint32_t w, float* f) {
  w ^= 0x80808080u;
  f[0] = __fsub_rn(__uint_as_float(__byte_perm(w, 0x4B400000u, 0x7650)), 12583040.0f);
  f[1] = __fsub_rn(__uint_as_float(__byte_perm(w, 0x4B400000u, 0x7651)), 12583040.0f);
  f[2] = __fsub_rn(__uint_as_float(__byte_perm(w, 0x4B400000u, 0x7652)), 12583040.0f);
  f[3] = __fsub_rn(__uint_as_float(__byte_perm(w, 0x4B400000u, 0x7653)), 12583040.0f);
}
__device__ __forceinline__ void unpack4_cvt(uint32_t w, float* f) {
#pragma unroll
  for (int j = 0; j < 4; ++j) f[j] = static_cast<float>(static_cast<int8_t>(w >> (8 * j)));
}

// ---------------------------------------------------------------------------------------------
// 16 elements of T as raw 16-byte words.
template <typename T>
struct Chunk16 {
  static constexpr int kWords = 16 * sizeof(T) / 16;
  uint4 w[kWords];
  __device__ __forceinline__ void load(const T* p) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  }
  __device__ __forceinline__ void to_float(float* f) const {
    const T* e = reinterpret_cast<const T*>(w);
#pragma unroll
    for (int j = 0; j < 16; ++j) f[j] = tof(e[j]);
  }
};

// Quantize, contiguous layout: a thread owns 16 consecutive columns of every row it visits;
// kU rows loaded before any is converted. MODE 0: division (quant_math.h); 1: reciprocal.
template <typename T, int MODE, int kU, int kMinBlocks>
__global__ void __launch_bounds__(256, kMinBlocks)
    quant_rows(const T* __restrict__ in, const float* __restrict__ scales, int8_t* __restrict__ out,
               int64_t rows, int64_t cols) {
  const int64_t row_threads = cols / 16;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= row_threads) return;
  const int64_t col = t * 16;
  float cs[16];  // MODE 0: scales; MODE 1: reciprocals
#pragma unroll
  for (int j = 0; j < 16; ++j)
    cs[j] = MODE == 0 ? scales[col + j] : MODE == 3 ? kvpack::reciprocal_scale(scales[col + j]) : recip_scale(scales[col + j]);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  auto emit = [&](const Chunk16<T>& c, int64_t r) {
    float f[16];
    c.to_float(f);
    uint4 o;
    uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
    if (MODE == 0) {
#pragma unroll
      for (int g = 0; g < 4; ++g) ow[g] = pack4_div(f + 4 * g, cs + 4 * g);
    } else if (MODE == 3) {  // the product's: quant_math.h's reciprocal form and quantize_flagged
      bool flagged = false;
#pragma unroll
      for (int g = 0; g < 4; ++g)
        ow[g] = pack4(kvpack::quantize_with_reciprocal_bits(f[4 * g], cs[4 * g], flagged),
                      kvpack::quantize_with_reciprocal_bits(f[4 * g + 1], cs[4 * g + 1], flagged),
                      kvpack::quantize_with_reciprocal_bits(f[4 * g + 2], cs[4 * g + 2], flagged),
                      kvpack::quantize_with_reciprocal_bits(f[4 * g + 3], cs[4 * g + 3], flagged));
      if (flagged) {
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          uint32_t b[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int e = 4 * g + j;
            bool fl = false;
            b[j] = kvpack::quantize_with_reciprocal_bits(f[e], cs[e], fl);
            if (fl) b[j] = static_cast<uint8_t>(kvpack::quantize_flagged(f[e], scales[col + e], cs[e]));
          }
          ow[g] = pack4(b[0], b[1], b[2], b[3]);
        }
      }
    } else if (MODE == 2) {
      uint32_t slow = 0;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        bool sl[4] = {false, false, false, false};
        ow[g] = pack4(round_magic(f[4 * g], cs[4 * g], sl[0]), round_magic(f[4 * g + 1], cs[4 * g + 1], sl[1]),
                      round_magic(f[4 * g + 2], cs[4 * g + 2], sl[2]), round_magic(f[4 * g + 3], cs[4 * g + 3], sl[3]));
#pragma unroll
        for (int j = 0; j < 4; ++j) slow |= static_cast<uint32_t>(sl[j]) << (4 * g + j);
      }
      if (slow) {
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          if (slow & (1u << j)) {
            const uint32_t b = static_cast<uint8_t>(quantize_value(f[j], scales[col + j]));
            ow[j / 4] = (ow[j / 4] & ~(0xFFu << (8 * (j % 4)))) | (b << (8 * (j % 4)));
          }
        }
      }
    } else {
      bool slow = false;
#pragma unroll
      for (int g = 0; g < 4; ++g)
        ow[g] = pack4(round_magic(f[4 * g], cs[4 * g], slow), round_magic(f[4 * g + 1], cs[4 * g + 1], slow),
                      round_magic(f[4 * g + 2], cs[4 * g + 2], slow), round_magic(f[4 * g + 3], cs[4 * g + 3], slow));
      if (slow) {
        float s[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) s[j] = scales[col + j];
#pragma unroll
        for (int g = 0; g < 4; ++g) ow[g] = pack4_div(f + 4 * g, s + 4 * g);
      }
    }
    *reinterpret_cast<uint4*>(out + r * cols + col) = o;
  };
  for (; row + (kU - 1) * stride < rows; row += kU * stride) {
    Chunk16<T> c[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) c[u].load(in + (row + u * stride) * cols + col);
#pragma unroll
    for (int u = 0; u < kU; ++u) emit(c[u], row + u * stride);
  }
  for (; row < rows; row += stride) {
    Chunk16<T> c;
    c.load(in + row * cols + col);
    emit(c, row);
  }
}

// Dequantize, interleaved layout: groups of 4 columns (a char4 in, 4 outputs); thread t of a row
// owns groups t, t + C, ... (kG of them, C = cols / (4 kG)); kU rows in flight. MAGIC: byte-permute
// conversion instead of I2F.
template <typename T, int kG, int kU, bool MAGIC>
__global__ void __launch_bounds__(256)
    dequant_rows(const int8_t* __restrict__ in, const float* __restrict__ scales, T* __restrict__ out,
                 int64_t rows, int64_t cols) {
  const int64_t row_threads = cols / (4 * kG);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= row_threads) return;
  float cs[kG][4];
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int j = 0; j < 4; ++j) cs[g][j] = scales[(t + g * row_threads) * 4 + j];
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  auto emit = [&](uint32_t w, int g, int64_t r) {
    float f[4];
    if (MAGIC) unpack4_magic(w, f); else unpack4_cvt(w, f);
    const int64_t c = (t + g * row_threads) * 4;
    if constexpr (sizeof(T) == 4) {
      float4 o = make_float4(__fmul_rn(f[0], cs[g][0]), __fmul_rn(f[1], cs[g][1]),
                             __fmul_rn(f[2], cs[g][2]), __fmul_rn(f[3], cs[g][3]));
      __stwb(reinterpret_cast<float4*>(out + r * cols + c), o);
    } else {
      T o[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] = fromf<T>(__fmul_rn(f[j], cs[g][j]));
      __stwb(reinterpret_cast<uint2*>(out + r * cols + c), *reinterpret_cast<uint2*>(o));
    }
  };
  for (; row + (kU - 1) * stride < rows; row += kU * stride) {
    uint32_t w[kU][kG];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int g = 0; g < kG; ++g)
        w[u][g] = __ldg(reinterpret_cast<const uint32_t*>(in + (row + u * stride) * cols + (t + g * row_threads) * 4));
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int g = 0; g < kG; ++g) emit(w[u][g], g, row + u * stride);
  }
  for (; row < rows; row += stride)
#pragma unroll
    for (int g = 0; g < kG; ++g)
      emit(__ldg(reinterpret_cast<const uint32_t*>(in + row * cols + (t + g * row_threads) * 4)), g, row);
}

// The product's dequantize default: 16 x 16 blocks, char4 -> 4 outputs, one row per thread-y step.
template <typename T>
__global__ void __launch_bounds__(256) dequant_vectorized(const int8_t* __restrict__ in,
                                                          const float* __restrict__ scales,
                                                          T* __restrict__ out, int64_t rows, int64_t cols) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 16 + threadIdx.x) * 4;
  if (col >= cols) return;
  float cs[4];
  for (int j = 0; j < 4; ++j) cs[j] = scales[col + j];
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * 16 + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.y) * 16) {
    const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(in + row * cols + col));
    float f[4];
    unpack4_cvt(w, f);
    T o[4];
    for (int j = 0; j < 4; ++j) o[j] = fromf<T>(__fmul_rn(f[j], cs[j]));
    if constexpr (sizeof(T) == 4) {
      __stwb(reinterpret_cast<float4*>(out + row * cols + col), *reinterpret_cast<float4*>(o));
    } else {
      __stwb(reinterpret_cast<uint2*>(out + row * cols + col), *reinterpret_cast<uint2*>(o));
    }
  }
}

// The paper's vectorized quantize (16 x 16 blocks, 4 columns per thread, one row per thread-y step,
// a grid over all rows, the division) with a cache hint: HINT 0 = plain read-only loads (the
// paper's), 1 = streaming loads and stores (__ldcs / __stcs: ld.global.cs, st.global.cs), 2 = __ldlu
// loads (last use), 3 = evict-first loads via __ldcs only.
template <typename T, int HINT>
__global__ void __launch_bounds__(256) quant_vectorized_hint(const T* __restrict__ in, const float* __restrict__ scales,
                                                             int8_t* __restrict__ out, int64_t rows, int64_t cols) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 16 + threadIdx.x) * 4;
  if (col >= cols) return;
  float cs[4];
  for (int j = 0; j < 4; ++j) cs[j] = scales[col + j];
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * 16 + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.y) * 16) {
    T v[4];
    const uint4* src = reinterpret_cast<const uint4*>(in + row * cols + col);
    if constexpr (sizeof(T) == 4) {
      uint4 w = HINT == 2 ? __ldlu(src) : (HINT ? __ldcs(src) : __ldg(src));
      *reinterpret_cast<uint4*>(v) = w;
    } else {
      const uint2* s2 = reinterpret_cast<const uint2*>(in + row * cols + col);
      uint2 w = HINT == 2 ? __ldlu(s2) : (HINT ? __ldcs(s2) : __ldg(s2));
      *reinterpret_cast<uint2*>(v) = w;
    }
    float f[4];
    for (int j = 0; j < 4; ++j) f[j] = tof(v[j]);
    const uint32_t q = pack4_div(f, cs);
    if (HINT == 1) __stcs(reinterpret_cast<unsigned int*>(out + row * cols + col), q);
    else *reinterpret_cast<uint32_t*>(out + row * cols + col) = q;
  }
}

// A flat 1-D quantize as torch.compile writes it: each thread 8 consecutive elements of the flat
// [T * D] range (two 16-byte loads for fp32), the column by i % D, the scale gathered per element.
template <typename T>
__global__ void __launch_bounds__(128) quant_flat8(const T* __restrict__ in, const float* __restrict__ scales,
                                                   int8_t* __restrict__ out, int64_t n, int64_t cols) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  T v[8];
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<uint4*>(v)[0] = __ldg(reinterpret_cast<const uint4*>(in + i));
    reinterpret_cast<uint4*>(v)[1] = __ldg(reinterpret_cast<const uint4*>(in + i) + 1);
  } else {
    reinterpret_cast<uint4*>(v)[0] = __ldg(reinterpret_cast<const uint4*>(in + i));
  }
  const uint32_t c0 = static_cast<uint32_t>(i % cols);
  float f[8], cs[8];
  for (int j = 0; j < 8; ++j) {
    f[j] = tof(v[j]);
    cs[j] = __ldg(scales + c0 + j);  // cols % 8 == 0: the 8 stay in one row
  }
  uint2 o = make_uint2(pack4_div(f, cs), pack4_div(f + 4, cs + 4));
  *reinterpret_cast<uint2*>(out + i) = o;
}

__global__ void read_flush(const uint4* __restrict__ buf, int64_t n, unsigned int* sink) {
  uint32_t acc = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(buf + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) atomicAdd(sink, 1u);  // keeps the loads; practically never taken
}

__global__ void fill_random(float* x, int64_t n, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x[i] = static_cast<float>(static_cast<int64_t>(z >> 40) - (1ll << 23)) * 0x1p-23f;  // [-1, 1)
  }
}
__global__ void plant_columns(float* x, int64_t n, int64_t cols) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % cols;
    if (d % 7 == 3) x[i] *= 1e-39f;
    if (d % 11 == 5) x[i] = 0.0f;
  }
}

template <typename T>
__global__ void absmax_cols(const T* x, unsigned int* bits, int64_t rows, int64_t cols) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= cols) return;
  float m = 0.0f;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * 512; r < rows && r < (blockIdx.y + 1) * 512ll; ++r)
    m = fmaxf(m, fabsf(tof(x[r * cols + d])));
  atomicMax(bits + d, __float_as_uint(m));
}

__global__ void bits_to_scales(float* s, int64_t cols) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d < cols) s[d] = kvpack::scale_from_absmax(__uint_as_float(reinterpret_cast<unsigned int*>(s)[d]));
}

template <typename T>
__global__ void to_type(const float* x, T* y, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = fromf<T>(x[i]);
}

// ---------------------------------------------------------------------------------------------
static int g_sms = 132;
static bool g_only_quant = false;
static int g_l2 = 50 << 20;
static void* g_flush = nullptr;
static unsigned int* g_sink = nullptr;
static size_t g_flush_bytes = 0;
static cudaStream_t g_stream;

enum Flush { kNone = 0, kWrite = 1, kRead = 2 };
static const char* kFlushName[] = {"none", "write", "read"};

static void do_flush(int mode) {
  if (mode == kWrite) {
    CK(cudaMemsetAsync(g_flush, 0x5A, g_flush_bytes, g_stream));
  } else if (mode == kRead) {
    read_flush<<<4 * g_sms, 512, 0, g_stream>>>(static_cast<const uint4*>(g_flush), g_flush_bytes / 16, g_sink);
    CK(cudaGetLastError());
  }
}

struct Stat {
  float med, p10, p90;
};

static Stat time_it(const std::function<void()>& fn, int flush, int reps) {
  cudaEvent_t a[64], b[64];
  reps = std::min(reps, 64);
  for (int i = 0; i < 3; ++i) fn();
  CK(cudaStreamSynchronize(g_stream));
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventCreate(&a[i]));
    CK(cudaEventCreate(&b[i]));
  }
  for (int i = 0; i < reps; ++i) {
    do_flush(flush);
    CK(cudaEventRecord(a[i], g_stream));
    fn();
    CK(cudaEventRecord(b[i], g_stream));
  }
  CK(cudaStreamSynchronize(g_stream));
  CK(cudaGetLastError());
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventElapsedTime(&ms[i], a[i], b[i]));
    CK(cudaEventDestroy(a[i]));
    CK(cudaEventDestroy(b[i]));
  }
  std::sort(ms.begin(), ms.end());
  return {ms[reps / 2], ms[reps / 10], ms[(reps * 9) / 10]};
}

template <typename K>
static int blocks_per_sm(K kernel, int threads) {
  int n = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
  return std::max(n, 1);
}

// Grid policies: 0 one pass (each thread kU rows once); 1 the product's (one pass, capped at 4
// iterations once >= 8 waves); 2, 3, 4: one, two, four waves of resident blocks.
template <typename In, typename Out>
static void launch_rows(void (*kernel)(const In*, const float*, Out*, int64_t, int64_t), int64_t rows,
                        int64_t row_threads, int kU, int policy, const In* in, const float* s, Out* out,
                        int64_t cols, int threads = 256) {
  const int64_t col_blocks = (row_threads + threads - 1) / threads;
  const int64_t bx = (row_threads + col_blocks - 1) / col_blocks;
  const int64_t by = std::max<int64_t>(1, threads / bx);
  const int64_t wave = static_cast<int64_t>(g_sms) * blocks_per_sm(kernel, static_cast<int>(bx * by));
  const int64_t one_pass = (rows + by * kU - 1) / (by * kU);
  int64_t rb = one_pass;
  if (policy == 1) rb = std::min(one_pass, std::max((8 * wave + col_blocks - 1) / col_blocks, (one_pass + 3) / 4));
  if (policy == 2) rb = std::min(one_pass, std::max<int64_t>(1, wave / col_blocks));
  if (policy == 3) rb = std::min(one_pass, std::max<int64_t>(1, 2 * wave / col_blocks));
  if (policy == 4) rb = std::min(one_pass, std::max<int64_t>(1, 4 * wave / col_blocks));
  if (policy == 5) rb = std::min(one_pass, std::max<int64_t>(1, std::min<int64_t>(wave / col_blocks, 128)));
  if (policy == 6) rb = std::min(one_pass, std::max<int64_t>(1, std::min<int64_t>(wave / col_blocks, 256)));
  if (policy >= 7 && policy <= 9) {  // about K = 4, 16, 64 iterations per thread, at least one wave
    const int64_t K = policy == 7 ? 4 : policy == 8 ? 16 : 64;
    rb = std::min(one_pass, std::max<int64_t>(std::max<int64_t>(1, wave / col_blocks), (one_pass + K - 1) / K));
  }
  rb = std::min<int64_t>(std::max<int64_t>(rb, 1), 65535);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(rb));
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  kernel<<<grid, block, 0, g_stream>>>(in, s, out, rows, cols);
}

// ---------------------------------------------------------------------------------------------
struct Row {
  std::string shape, dtype, op, impl, flush;
  Stat t;
  double gbps, of_big, of_same;
  bool exact;
};
static std::vector<Row> g_rows;
static double g_big_copy = 0;

static const char* dname(float*) { return "fp32"; }
static const char* dname(__half*) { return "fp16"; }
static const char* dname(__nv_bfloat16*) { return "bf16"; }

// Channel absmax -> scales in one kernel: each thread owns 16 bytes of consecutive columns, walks
// its rows kU at a time, the block combines its rows in shared memory, and one atomicMax per column
// and block merges the blocks. It maxes the *scale* bits: fl(m / 127) is monotonic in m, so the max
// of the blocks' scales is the scale of the max. Needs the output zeroed first (a memset).
template <typename T, int kU, int THREADS>
__global__ void __launch_bounds__(THREADS) absmax_rows(const T* __restrict__ in, const float* /*unused*/,
                                                   unsigned int* __restrict__ bits, int64_t rows, int64_t cols) {
  constexpr int V = 16 / sizeof(T);
  __shared__ float red[THREADS * V];
  const int64_t row_threads = cols / V;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float m[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = 0.0f;
  if (t < row_threads) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
    int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    for (; row + (kU - 1) * stride < rows; row += kU * stride) {
      uint4 w[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) w[u] = __ldg(reinterpret_cast<const uint4*>(in + (row + u * stride) * cols) + t);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const T* e = reinterpret_cast<const T*>(&w[u]);
#pragma unroll
        for (int j = 0; j < V; ++j) m[j] = fmaxf(m[j], fabsf(tof(e[j])));
      }
    }
    for (; row < rows; row += stride) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(in + row * cols) + t);
      const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int j = 0; j < V; ++j) m[j] = fmaxf(m[j], fabsf(tof(e[j])));
    }
  }
  if (blockDim.y > 1) {
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
    for (int j = 0; j < V; ++j) red[j * THREADS + tid] = m[j];
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int y = 1; y < blockDim.y; ++y)
#pragma unroll
        for (int j = 0; j < V; ++j) m[j] = fmaxf(m[j], red[j * THREADS + y * blockDim.x + threadIdx.x]);
    }
  }
  if (threadIdx.y == 0 && t < row_threads) {
#pragma unroll
    for (int j = 0; j < V; ++j) atomicMax(bits + t * V + j, __float_as_uint(kvpack::scale_from_absmax(m[j])));
  }
}

// The product's per-channel scales (scales.cu): 32 x 8 blocks, 4-byte loads, then a finish kernel.
template <typename T>
__global__ void __launch_bounds__(256) absmax_product(const T* __restrict__ x, unsigned int* __restrict__ absmax_bits,
                                                      int64_t rows, int64_t cols) {
  __shared__ float partial[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  float m = 0.0f;
  if (col < cols) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * 8;
    int64_t row = static_cast<int64_t>(blockIdx.y) * 8 + ty;
    for (; row + 7 * stride < rows; row += 8 * stride) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = tof(x[(row + u * stride) * cols + col]);
#pragma unroll
      for (int u = 0; u < 8; ++u) m = fmaxf(m, fabsf(v[u]));
    }
    for (; row < rows; row += stride) m = fmaxf(m, fabsf(tof(x[row * cols + col])));
  }
  partial[ty][tx] = m;
  __syncthreads();
  if (ty == 0 && col < cols) {
    for (int k = 1; k < 8; ++k) m = fmaxf(m, partial[k][tx]);
    atomicMax(absmax_bits + col, __float_as_uint(m));
  }
}

template <typename T>
static void run_shape(int64_t T_, int64_t D, const std::vector<int>& flushes, bool quick) {
  const int64_t n = T_ * D;
  char shape[64];
  std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(T_), static_cast<long long>(D));
  const char* dt = dname(static_cast<T*>(nullptr));
  float* xf;
  T *x, *xh;
  int8_t *q, *qref;
  float *s, *s2;
  CK(cudaMalloc(&xf, n * 4));
  CK(cudaMalloc(&x, n * sizeof(T)));
  CK(cudaMalloc(&q, n));
  CK(cudaMalloc(&qref, n));
  CK(cudaMalloc(&xh, n * sizeof(T)));
  CK(cudaMalloc(&s, D * 4));
  CK(cudaMalloc(&s2, D * 4));
  // Timing data: uniform [-1, 1), as the benchmark's. Scales: absmax / 127 (simple kernel).
  fill_random<<<4 * g_sms, 256, 0, g_stream>>>(xf, n, 0xC0FFEEull + D);
  to_type<T><<<4 * g_sms, 256, 0, g_stream>>>(xf, x, n);
  CK(cudaFree(xf));
  CK(cudaMemsetAsync(s, 0, D * 4, g_stream));
  absmax_cols<T><<<dim3((D + 255) / 256, (T_ + 511) / 512), 256, 0, g_stream>>>(x, reinterpret_cast<unsigned int*>(s), T_, D);
  bits_to_scales<<<(D + 255) / 256, 256, 0, g_stream>>>(s, D);
  CK(cudaStreamSynchronize(g_stream));
  CK(cudaGetLastError());
  // Check data: 512 rows, planted (subnormal columns, zero columns, exact and near ties).
  const int64_t cr = 512, cn = cr * D;
  float* cxf;
  T* cx;
  float* cs;
  int8_t* cq;
  T* cxh;
  CK(cudaMalloc(&cxf, cn * 4));
  CK(cudaMalloc(&cx, cn * sizeof(T)));
  CK(cudaMalloc(&cs, D * 4));
  CK(cudaMalloc(&cq, cn));
  CK(cudaMalloc(&cxh, cn * sizeof(T)));
  fill_random<<<4 * g_sms, 256, 0, g_stream>>>(cxf, cn, 0xBEEFull + D);
  plant_columns<<<4 * g_sms, 256, 0, g_stream>>>(cxf, cn, D);
  to_type<T><<<4 * g_sms, 256, 0, g_stream>>>(cxf, cx, cn);
  CK(cudaMemsetAsync(cs, 0, D * 4, g_stream));
  absmax_cols<T><<<dim3((D + 255) / 256, (cr + 511) / 512), 256, 0, g_stream>>>(cx, reinterpret_cast<unsigned int*>(cs), cr, D);
  bits_to_scales<<<(D + 255) / 256, 256, 0, g_stream>>>(cs, D);
  CK(cudaStreamSynchronize(g_stream));
  CK(cudaGetLastError());
  std::vector<T> hx(cn);
  std::vector<float> hs(D);
  CK(cudaMemcpy(hx.data(), cx, cn * sizeof(T), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hs.data(), cs, D * 4, cudaMemcpyDeviceToHost));
  auto hf = [](T v) -> float {
    if constexpr (sizeof(T) == 4) return v;
    else return static_cast<float>(v);
  };
  {
    std::mt19937 rng(7);
    for (int64_t d = 0; d < D; d += 5) {
      if (hs[d] == 0.0f) continue;
      for (int64_t t = 0; t < 256; ++t) {
        const float k = static_cast<float>(static_cast<int>(rng() % 255) - 127) + 0.5f;
        float v = k * hs[d];
        const int ulps = static_cast<int>(rng() % 5) - 2;
        for (int u = 0; u < std::abs(ulps); ++u) v = std::nextafter(v, ulps > 0 ? INFINITY : -INFINITY);
        if (std::fabs(v) > 127.0f * hs[d]) v = std::copysign(127.0f * hs[d], v);
        if constexpr (sizeof(T) == 4) hx[t * D + d] = v;
        else hx[t * D + d] = T(v);
      }
    }
    CK(cudaMemcpy(cx, hx.data(), cn * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<int8_t> hq_ref(cn), hq(cn);
  int64_t ties = 0;
  for (int64_t i = 0; i < cn; ++i) {
    const float v = hf(hx[i]);
    hq_ref[i] = quantize_value(v, hs[i % D]);
    if (hs[i % D] != 0.0f) {
      const float y = v / hs[i % D];
      ties += std::fabs(std::fabs(y - std::nearbyint(y)) - 0.5f) < 0x1p-14f;
    }
  }
  std::vector<T> hxh_ref(cn), hxh(cn);
  for (int64_t i = 0; i < cn; ++i) {
    const float v = dequantize_value(hq_ref[i], hs[i % D]);
    if constexpr (sizeof(T) == 4) hxh_ref[i] = v;
    else hxh_ref[i] = T(v);
  }
  std::vector<float> hs_ref(D, 0.0f);
  {
    std::vector<T> full(cn);
    CK(cudaMemcpy(full.data(), cx, cn * sizeof(T), cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < cn; ++i) hs_ref[i % D] = std::max(hs_ref[i % D], std::fabs(hf(full[i])));
    for (auto& v : hs_ref) v = kvpack::scale_from_absmax(v);
  }

  const double in_bytes = static_cast<double>(n) * sizeof(T);
  const double qbytes = in_bytes + n;
  const size_t half = static_cast<size_t>(qbytes / 2) & ~static_cast<size_t>(255);
  void *ca, *cb;
  CK(cudaMalloc(&ca, half));
  CK(cudaMalloc(&cb, half));
  CK(cudaMemset(ca, 1, half));
  std::vector<double> same(3, 0);
  const int reps = quick ? 15 : 41;
  for (int f : flushes) {
    Stat st = time_it([&] { CK(cudaMemcpyAsync(cb, ca, half, cudaMemcpyDeviceToDevice, g_stream)); }, f, reps);
    same[f] = 2.0 * half / (st.med * 1e6);
    g_rows.push_back({shape, dt, "copy", "memcpy", kFlushName[f], st, same[f], same[f] / g_big_copy, 1.0, true});
  }
  auto record = [&](const char* op, const std::string& impl, int f, Stat st, bool exact, double bytes) {
    const double gb = bytes / (st.med * 1e6);
    g_rows.push_back({shape, dt, op, impl, kFlushName[f], st, gb, gb / g_big_copy, gb / same[f], exact});
  };
  using QFn = std::function<void(const T*, const float*, int8_t*, int64_t)>;
  struct QCand {
    std::string name;
    QFn fn;
  };
  const int64_t rt = D / 16;
  std::vector<QCand> qc;
#define QC(MODE, U, MB, POL) \
  qc.push_back({std::string(MODE == 3 ? "prod" : MODE == 2 ? "rcp2" : MODE ? "rcp" : "div") + " U" #U " mb" #MB " g" #POL, [&](const T* a, const float* b, int8_t* c, int64_t r) { launch_rows(quant_rows<T, MODE, U, MB>, r, rt, U, POL, a, b, c, D); }})
  QC(0, 2, 2, 1);  // the old product's
  qc.push_back({"vec16 stream ld+st", [&](const T* a, const float* b, int8_t* c, int64_t r) {
                  quant_vectorized_hint<T, 1><<<dim3((D / 4 + 15) / 16, std::min<int64_t>((r + 15) / 16, 65535)), dim3(16, 16), 0, g_stream>>>(a, b, c, r, D);
                }});
  qc.push_back({"vec16 ldlu", [&](const T* a, const float* b, int8_t* c, int64_t r) {
                  quant_vectorized_hint<T, 2><<<dim3((D / 4 + 15) / 16, std::min<int64_t>((r + 15) / 16, 65535)), dim3(16, 16), 0, g_stream>>>(a, b, c, r, D);
                }});
  qc.push_back({"vec16 ldcs", [&](const T* a, const float* b, int8_t* c, int64_t r) {
                  quant_vectorized_hint<T, 3><<<dim3((D / 4 + 15) / 16, std::min<int64_t>((r + 15) / 16, 65535)), dim3(16, 16), 0, g_stream>>>(a, b, c, r, D);
                }});
  qc.push_back({"flat8 (compile-like)", [&](const T* a, const float* b, int8_t* c, int64_t r) {
                  const int64_t nn = r * D;
                  quant_flat8<T><<<static_cast<unsigned>((nn / 8 + 127) / 128), 128, 0, g_stream>>>(a, b, c, nn, D);
                }});
  qc.push_back({"vectorized 16x16 div", [&](const T* a, const float* b, int8_t* c, int64_t r) {
                  quant_vectorized_hint<T, 0><<<dim3((D / 4 + 15) / 16, std::min<int64_t>((r + 15) / 16, 65535)), dim3(16, 16), 0, g_stream>>>(a, b, c, r, D);
                }});
#undef QC
  // reference output on the timing data: the product's kernel
  qc[0].fn(x, s, qref, T_);
  CK(cudaStreamSynchronize(g_stream));
  for (auto& c : qc) {
    CK(cudaMemset(cq, 0x7F, cn));
    c.fn(cx, cs, cq, cr);
    CK(cudaMemset(q, 0x7F, n));
    c.fn(x, s, q, T_);
    CK(cudaStreamSynchronize(g_stream));
    CK(cudaGetLastError());
    CK(cudaMemcpy(hq.data(), cq, cn, cudaMemcpyDeviceToHost));
    bool exact = std::memcmp(hq.data(), hq_ref.data(), cn) == 0;
    {
      std::vector<int8_t> a(n), b(n);
      CK(cudaMemcpy(a.data(), q, n, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(b.data(), qref, n, cudaMemcpyDeviceToHost));
      exact = exact && std::memcmp(a.data(), b.data(), n) == 0;
    }
    for (int f : flushes) record("quantize", c.name, f, time_it([&] { c.fn(x, s, q, T_); }, f, reps), exact, qbytes);
  }
  if (g_only_quant) {
    std::printf("%s %s: %lld near-tie elements in the check data\n", shape, dt, static_cast<long long>(ties));
    for (void* p : {static_cast<void*>(ca), cb, static_cast<void*>(x), static_cast<void*>(q), static_cast<void*>(qref),
                    static_cast<void*>(xh), static_cast<void*>(s), static_cast<void*>(s2), static_cast<void*>(cxf),
                    static_cast<void*>(cx), static_cast<void*>(cs), static_cast<void*>(cq), static_cast<void*>(cxh)})
      CK(cudaFree(p));
    return;
  }
  // scales (memset + kernel[s]) and fused (scales + quantize)
  using SFn = std::function<void(const T*, float*, int64_t)>;
  struct SCand {
    std::string name;
    SFn fn;
  };
  std::vector<SCand> sc;
  sc.push_back({"product 3-launch", [&](const T* a, float* o, int64_t r) {
                  CK(cudaMemsetAsync(o, 0, D * 4, g_stream));
                  const int64_t cb_ = (D + 31) / 32;
                  const int64_t wave = static_cast<int64_t>(g_sms) * blocks_per_sm(absmax_product<T>, 256);
                  const int64_t rb = std::min(std::max<int64_t>(1, wave / cb_), (r + 63) / 64);
                  absmax_product<T><<<dim3(cb_, std::min<int64_t>(rb, 65535)), dim3(32, 8), 0, g_stream>>>(a, reinterpret_cast<unsigned int*>(o), r, D);
                  bits_to_scales<<<(D + 255) / 256, 256, 0, g_stream>>>(o, D);
                }});
#define SC(U, POL, TH)                                                                              \
  sc.push_back({"rows16B U" #U " g" #POL " b" #TH, [&](const T* a, float* o, int64_t r) {           \
                  CK(cudaMemsetAsync(o, 0, D * 4, g_stream));                                       \
                  launch_rows(absmax_rows<T, U, TH>, r, D / (16 / static_cast<int>(sizeof(T))), U, POL, a, nullptr, \
                              reinterpret_cast<unsigned int*>(o), D, TH);                             \
                }})
  SC(4, 2, 256);
  SC(8, 5, 256);
  SC(8, 6, 256);
  SC(8, 5, 1024);
  SC(16, 5, 1024);
  SC(8, 6, 1024);
#undef SC
  for (auto& c : sc) {
    std::vector<float> got(D);
    c.fn(cx, cs, cr);
    CK(cudaStreamSynchronize(g_stream));
    CK(cudaGetLastError());
    CK(cudaMemcpy(got.data(), cs, D * 4, cudaMemcpyDeviceToHost));
    bool exact = std::memcmp(got.data(), hs_ref.data(), D * 4) == 0;
    c.fn(x, s2, T_);
    CK(cudaStreamSynchronize(g_stream));
    std::vector<float> a(D), b(D);
    CK(cudaMemcpy(a.data(), s2, D * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), s, D * 4, cudaMemcpyDeviceToHost));
    exact = exact && std::memcmp(a.data(), b.data(), D * 4) == 0;
    for (int f : flushes) record("scales", c.name, f, time_it([&] { c.fn(x, s2, T_); }, f, reps), exact, in_bytes);
    for (int f : flushes)
      record("fused", c.name + " +" + qc[3].name, f, time_it([&] { c.fn(x, s2, T_); qc[3].fn(x, s2, q, T_); }, f, reps), exact,
             in_bytes + qbytes);
  }
  // restore check scales (the scales candidates overwrote cs with the same values; verify below)
  CK(cudaMemcpy(cs, hs.data(), D * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(cq, hq_ref.data(), cn, cudaMemcpyHostToDevice));
  // dequantize
  using DFn = std::function<void(const int8_t*, const float*, T*, int64_t)>;
  struct DCand {
    std::string name;
    DFn fn;
  };
  std::vector<DCand> dc;
  dc.push_back({"vectorized 16x16", [&](const int8_t* a, const float* b, T* c, int64_t r) {
                  dequant_vectorized<T><<<dim3((D / 4 + 15) / 16, std::min<int64_t>((r + 15) / 16, 65535)), dim3(16, 16), 0, g_stream>>>(a, b, c, r, D);
                }});
#define DC(G, U, MAGIC, POL)                                                                    \
  dc.push_back({std::string(MAGIC ? "magic" : "i2f") + " G" #G " U" #U " g" #POL,                \
                [&](const int8_t* a, const float* b, T* c, int64_t r) {                        \
                  launch_rows(dequant_rows<T, G, U, MAGIC>, r, D / (4 * G), U, POL, a, b, c, D); \
                }})
  DC(1, 1, false, 0);
  DC(1, 2, false, 0);
  DC(1, 4, false, 0);
  DC(1, 2, true, 0);
#undef DC
  for (auto& c : dc) {
    CK(cudaMemset(cxh, 0x7F, cn * sizeof(T)));
    c.fn(cq, cs, cxh, cr);
    CK(cudaStreamSynchronize(g_stream));
    CK(cudaGetLastError());
    CK(cudaMemcpy(hxh.data(), cxh, cn * sizeof(T), cudaMemcpyDeviceToHost));
    const bool exact = std::memcmp(hxh.data(), hxh_ref.data(), cn * sizeof(T)) == 0;
    for (int f : flushes) record("dequantize", c.name, f, time_it([&] { c.fn(qref, s, xh, T_); }, f, reps), exact, qbytes);
  }
  std::printf("%s %s: %lld near-tie elements in the check data\n", shape, dt, static_cast<long long>(ties));
  for (void* p : {static_cast<void*>(ca), cb, static_cast<void*>(x), static_cast<void*>(q), static_cast<void*>(qref),
                  static_cast<void*>(xh), static_cast<void*>(s), static_cast<void*>(s2), static_cast<void*>(cxf),
                  static_cast<void*>(cx), static_cast<void*>(cs), static_cast<void*>(cq), static_cast<void*>(cxh)})
    CK(cudaFree(p));
}

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") quick = true;
    if (std::string(argv[i]) == "--quantize-only") g_only_quant = true;
  }
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, 0));
  g_sms = p.multiProcessorCount;
  g_l2 = p.l2CacheSize;
  std::printf("device %s, %d SMs, L2 %d MB\n", p.name, g_sms, g_l2 >> 20);
  CK(cudaStreamCreate(&g_stream));
  g_flush_bytes = static_cast<size_t>(4) * g_l2;
  CK(cudaMalloc(&g_flush, g_flush_bytes));
  CK(cudaMemset(g_flush, 3, g_flush_bytes));
  CK(cudaMalloc(&g_sink, 4));
  {
    const size_t big = size_t(1) << 31;
    void *a, *b;
    CK(cudaMalloc(&a, big));
    CK(cudaMalloc(&b, big));
    CK(cudaMemset(a, 1, big));
    Stat st = time_it([&] { CK(cudaMemcpyAsync(b, a, big, cudaMemcpyDeviceToDevice, g_stream)); }, kNone, 21);
    g_big_copy = 2.0 * big / (st.med * 1e6);
    std::printf("copy ceiling (2 GiB memcpy, no flush): %.0f GB/s (p10 %.3f p90 %.3f ms)\n", g_big_copy, st.p10, st.p90);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  const std::vector<int> fl = {kRead};
  run_shape<float>(131072, 8192, fl, quick);
  run_shape<float>(131072, 1024, fl, quick);
  run_shape<float>(131072, 256, fl, quick);
  run_shape<float>(262144, 128, fl, quick);
  std::printf("\n%-12s %-5s %-10s %-20s %-5s %8s %8s %8s %7s %7s %7s %s\n", "shape", "dtype", "op", "impl",
              "flush", "med_ms", "p10", "p90", "GB/s", "%big", "%same", "exact");
  for (const Row& r : g_rows)
    std::printf("%-12s %-5s %-10s %-20s %-5s %8.4f %8.4f %8.4f %7.0f %6.1f%% %6.1f%% %s\n", r.shape.c_str(),
                r.dtype.c_str(), r.op.c_str(), r.impl.c_str(), r.flush.c_str(), r.t.med, r.t.p10, r.t.p90,
                r.gbps, 100 * r.of_big, 100 * r.of_same, r.exact ? "yes" : "NO");
  return 0;
}
