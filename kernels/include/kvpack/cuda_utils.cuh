// Device and launch helpers shared by every kvpack CUDA kernel (kernels/*.cu).
//
//   - dtype traits: the CUDA type of each input dtype, exact widening to float, round-to-nearest
//     narrowing from float;
//   - the per-element operations QuantizeOp / DequantizeOp, written once over quant_math.h, that
//     every variant applies (the rounding rule lives in one place);
//   - VecN and vectorize_with_alignment: 16-byte (or narrower) vector loads and stores with an
//     unaligned head and a tail, for flat element ranges of any length and alignment;
//   - 64-bit index helpers, launch helpers (grids sized to the device) and the host-side dtype
//     dispatch macro.
//
// Deliberately light: it includes no torch/ATen tensor headers, so that each kernel file compiles
// in seconds; only kernels/cuda_ops.cpp (g++) sees at::Tensor.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "kvpack/launchers.h"
#include "kvpack/quant_math.h"

namespace kvpack {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// dtype traits. Widening fp16/bf16 -> float is exact; narrowing rounds to nearest even, as
// torch's .to(dtype) does, which the reference tests rely on.

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  // bf16 is the high half of an fp32: widening is a 16-bit shift, written out so that it is one
  // integer instruction whatever the toolkit lowers cvt.f32.bf16 to.
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) {
    return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(v)) << 16);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Convert<T>::to_float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Convert<T>::from_float(v);
}

// ------------------------------------------------------------------------------------------------
// The two element-wise operations every variant applies; only the memory access pattern differs
// between variants. In is what is read, Out what is written.

template <typename T>
struct QuantizeOp {
  using In = T;
  using Out = int8_t;
  __device__ __forceinline__ Out operator()(In x, float scale) const {
    return quantize_value(to_float(x), scale);
  }
};

template <typename T>
struct DequantizeOp {
  using In = int8_t;
  using Out = T;
  __device__ __forceinline__ Out operator()(In q, float scale) const {
    return from_float<T>(dequantize_value(q, scale));  // fp32 product, then one rounding
  }
};

// ------------------------------------------------------------------------------------------------
// Vectors. VecN<T, N> holds N consecutive elements and is aligned to its size, at most 16 bytes;
// load_vec / store_vec move one as 16-byte (LDG.E.128 / STG.E.128) or narrower vector accesses, a
// 64-byte VecN (16 floats) as four 16-byte accesses.

template <typename T, int N>
struct alignas((sizeof(T) * N) < 16 ? (sizeof(T) * N) : 16) VecN {
  static_assert((sizeof(T) * N & (sizeof(T) * N - 1)) == 0, "VecN must be a power-of-two bytes");
  T val[N];
};

// The unsigned integer (vector) type of a power-of-two size up to 16 bytes.
template <int kBytes>
struct RawWord;
template <>
struct RawWord<1> {
  using type = uint8_t;
};
template <>
struct RawWord<2> {
  using type = uint16_t;
};
template <>
struct RawWord<4> {
  using type = uint32_t;
};
template <>
struct RawWord<8> {
  using type = uint2;
};
template <>
struct RawWord<16> {
  using type = uint4;
};

// Vector loads and stores go through integer words of the vector's alignment (uint4 at most) and
// the __ldg / __ldcs / __stwb intrinsics, which are single PTX instructions (ld.global.nc.v4.u32,
// ld.global.cs.v4.u32, st.global.wb.v4.u32): a plain struct store of a 16-byte VecN<float, 4> was
// split by NVVM into four 4-byte stores (nvcc 13.0), these cannot be. Loads use the read-only path
// (every kernel input is const __restrict__), or with kStreaming the streaming cache hint
// (ld.global.cs: evict first) for data read exactly once. Measured on the H100
// (tools/lab/NOTES.md): the vectorized fp32 quantize at 131072 x 256 went from 93% to 101% of the
// copy bandwidth with it; 8192-wide rows did not move, and the fp32 row kernel lost 20%.
template <typename T, int N, bool kStreaming>
__device__ __forceinline__ VecN<T, N> load_vec_hinted(const T* p) {
  using V = VecN<T, N>;
  using W = typename RawWord<alignof(V)>::type;
  constexpr int kWords = sizeof(V) / sizeof(W);
  V v;
  const W* src = reinterpret_cast<const W*>(p);
  W* dst = reinterpret_cast<W*>(&v);
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    if constexpr (kStreaming) {
      dst[i] = __ldcs(src + i);
    } else {
      dst[i] = __ldg(src + i);
    }
  }
  return v;
}

template <typename T, int N>
__device__ __forceinline__ VecN<T, N> load_vec(const T* p) {
  return load_vec_hinted<T, N, false>(p);
}

template <typename T, int N>
__device__ __forceinline__ VecN<T, N> load_vec_streaming(const T* p) {
  return load_vec_hinted<T, N, true>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const VecN<T, N>& v) {
  using V = VecN<T, N>;
  using W = typename RawWord<alignof(V)>::type;
  constexpr int kWords = sizeof(V) / sizeof(W);
  const W* src = reinterpret_cast<const W*>(&v);
  W* dst = reinterpret_cast<W*>(p);
#pragma unroll
  for (int i = 0; i < kWords; ++i) __stwb(dst + i, src[i]);
}

template <int kBytes>
__host__ __device__ __forceinline__ bool is_aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & (kBytes - 1)) == 0;
}

// ------------------------------------------------------------------------------------------------
// 64-bit indices. A KV matrix can hold more than 2^31 elements (T = 262144, D = 8192 is 2^31),
// so every element offset is int64_t, and products like row * D are formed in 64 bits *before*
// the multiplication (blockIdx.x * blockDim.x in 32 bits would wrap).

__device__ __forceinline__ int64_t global_thread_id() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t global_thread_count() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// vectorize_with_alignment: apply an element-wise operation to a flat range [0, n) of in -> out,
// grid-stride (thread `tid` of `stride`), with VEC-element vector accesses where the addresses
// allow it:
//   head: the elements before `in` reaches the vector alignment, one at a time;
//   body: whole vectors, vec_op(out_vec, in_vec, first_index);
//   tail: the last n % VEC elements, one at a time.
// When `out` is not aligned the same way as `in` (different offsets into the vector width),
// everything runs one element at a time: correct, slower, and rare (only for sliced inputs).
// scalar_op(out_ref, in_value, index) and vec_op get the flat element index so the caller can find
// the element's scale.
template <int VEC, typename In, typename Out, typename VecOp, typename ScalarOp>
__device__ __forceinline__ void vectorize_with_alignment(const In* __restrict__ in,
                                                         Out* __restrict__ out, int64_t n,
                                                         int64_t tid, int64_t stride,
                                                         VecOp&& vec_op, ScalarOp&& scalar_op) {
  using InVec = VecN<In, VEC>;
  using OutVec = VecN<Out, VEC>;
  constexpr uintptr_t kInAlign = alignof(InVec);
  constexpr uintptr_t kOutAlign = alignof(OutVec);

  const uintptr_t in_addr = reinterpret_cast<uintptr_t>(in);
  int64_t prefix = static_cast<int64_t>(((kInAlign - (in_addr & (kInAlign - 1))) & (kInAlign - 1)) /
                                        sizeof(In));
  const bool in_ok = (in_addr & (sizeof(In) - 1)) == 0;
  const bool out_ok =
      ((reinterpret_cast<uintptr_t>(out) + static_cast<uintptr_t>(prefix) * sizeof(Out)) &
       (kOutAlign - 1)) == 0;
  if (!in_ok || !out_ok) {
    for (int64_t i = tid; i < n; i += stride) scalar_op(out[i], in[i], i);
    return;
  }
  if (prefix > n) prefix = n;
  for (int64_t i = tid; i < prefix; i += stride) scalar_op(out[i], in[i], i);

  const int64_t num_vec = (n - prefix) / VEC;
  for (int64_t v = tid; v < num_vec; v += stride) {
    const int64_t i0 = prefix + v * VEC;
    const InVec src = load_vec<In, VEC>(in + i0);
    OutVec dst;
    vec_op(dst, src, i0);
    store_vec<Out, VEC>(out + i0, dst);
  }

  for (int64_t i = prefix + num_vec * VEC + tid; i < n; i += stride) scalar_op(out[i], in[i], i);
}

// ------------------------------------------------------------------------------------------------
// Host-side launch helpers.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// gridDim.y and gridDim.z are limited to 65535; kernels with rows on the y axis loop over rows
// with a grid stride, so their grid can be capped here without losing rows.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

inline unsigned int grid_y(int64_t blocks_needed) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks_needed, 1), kMaxGridY));
}

inline int current_device() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// Multiprocessor count of the current device, read once per device with cudaGetDeviceProperties.
inline int sm_count() {
  static std::mutex mu;
  static std::vector<int> cache;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= static_cast<int>(cache.size())) cache.resize(dev + 1, 0);
  if (cache[dev] == 0) {
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    cache[dev] = prop.multiProcessorCount;
  }
  return cache[dev];
}

// The device's DRAM, read once per device: peak bandwidth from the memory clock and bus width
// (2 transfers per clock), and its share per multiprocessor.
struct DeviceMemory {
  double peak_gbps = 0.0;
  double gbps_per_sm = 0.0;
};

inline const DeviceMemory& device_memory() {
  static std::mutex mu;
  static std::map<int, DeviceMemory> cache;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  int khz = 0, bits = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, dev));
  DeviceMemory m;
  m.peak_gbps = 2.0 * khz * 1e3 * (bits / 8.0) / 1e9;
  m.gbps_per_sm = m.peak_gbps / std::max(1, sm_count());
  return cache.emplace(dev, m).first->second;
}

// The loaded DRAM latency a streaming kernel must cover, in ns: a dependent chain of loads under
// full load took ~1.7 us per step on the H200 (tools/lab/depth_lab.cu, a scales kernel with one
// 256-thread block on 64 SMs: 107 us for 64 steps), rounded up.
constexpr double kLoadedLatencyNs = 2000.0;

// Bytes a streaming kernel must keep in flight per SM to run at the device's peak bandwidth (Little's
// law: bandwidth per SM x latency). H200: 36.5 GB/s per SM -> 73 KB; H100 SXM: 25.4 -> 51 KB. A
// device whose attributes read 0 (none known) gets 64 KB.
inline int64_t bytes_in_flight_per_sm() {
  const double gbps = device_memory().gbps_per_sm;
  return gbps > 0.0 ? static_cast<int64_t>(gbps * kLoadedLatencyNs) : int64_t{64} << 10;
}

// Resident blocks per multiprocessor for `kernel` at `threads` threads per block (registers and
// shared memory included), from the occupancy calculator, cached per kernel, device and size.
inline int blocks_per_sm(const void* kernel, int threads, size_t dynamic_smem = 0) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  const auto key = std::make_tuple(kernel, current_device(), threads, dynamic_smem);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, dynamic_smem));
  n = std::max(n, 1);
  cache.emplace(key, n);
  return n;
}

// A persistent (grid-stride) 1-D grid: enough blocks to fill every multiprocessor once, never more
// than the work needs.
template <typename Kernel>
inline unsigned int persistent_grid(Kernel kernel, int threads, int64_t blocks_needed) {
  const int64_t full = static_cast<int64_t>(sm_count()) *
                       blocks_per_sm(reinterpret_cast<const void*>(kernel), threads);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min({blocks_needed, full, kMaxGridX})));
}

// Calls f(std::integral_constant<bool, b>) so a run-time flag selects a kernel instantiation.
template <typename F>
inline void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::integral_constant<bool, true>{});
  } else {
    f(std::integral_constant<bool, false>{});
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Runs f(TypeTag<OpT<scalar_t>>, integral_constant<bool, per_token>) for the dtype and the
// granularity of `args`: each variant's launcher is one call of this with its templated launch.
template <template <typename> class OpT, typename F>
inline void dispatch_elementwise(const ElementwiseArgs& args, const char* name, F&& f);

}  // namespace cuda
}  // namespace kvpack

// Host-side dispatch over the three floating dtypes: runs the lambda with `scalar_t` bound to the
// CUDA type of STYPE (float, __half, __nv_bfloat16): one templated kernel body serves all three.
#define KVPACK_DISPATCH_FLOAT_TYPES(STYPE, NAME, ...)                                           \
  [&] {                                                                                         \
    switch (STYPE) {                                                                            \
      case c10::ScalarType::Float: {                                                            \
        using scalar_t = float;                                                                 \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case c10::ScalarType::Half: {                                                             \
        using scalar_t = __half;                                                                \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      case c10::ScalarType::BFloat16: {                                                         \
        using scalar_t = __nv_bfloat16;                                                         \
        return __VA_ARGS__();                                                                   \
      }                                                                                         \
      default:                                                                                  \
        TORCH_CHECK_TYPE(false, "kvpack: ", NAME, " supports float32, float16 and bfloat16, got ", \
                         STYPE);                                                                \
    }                                                                                           \
  }()

// Checks the launch just made (bad configuration, missing kernel image) right away.
#define KVPACK_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace kvpack {
namespace cuda {

template <template <typename> class OpT, typename F>
inline void dispatch_elementwise(const ElementwiseArgs& args, const char* name, F&& f) {
  KVPACK_DISPATCH_FLOAT_TYPES(args.dtype, name, [&] {
    dispatch_bool(args.per_token, [&](auto per_token) { f(TypeTag<OpT<scalar_t>>{}, per_token); });
  });
}

}  // namespace cuda
}  // namespace kvpack
