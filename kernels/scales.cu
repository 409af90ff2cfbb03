// GPU scales: absmax / 127 per channel (over the T rows of each column) or per token (over the D
// columns of each row), and the fused entry point (scales, then a variant's quantize kernel).
//
// Max is exact and order-free, so any reduction order gives the reference's bits; the one
// arithmetic step, absmax / 127, is quant_math.h's scale_from_absmax. An all-zero column or row
// gets scale 0 (quantizes to 0, dequantizes to 0).
//
// Per channel (a column-wise reduction over row-major data): 32 x 8 thread blocks; the 32 threads
// of a warp read 32 neighbouring columns of one row (coalesced), each thread walking its column
// down a strip of rows with a grid stride, 8 rows in flight. The block combines its 8 partial
// maxima per column in shared memory, then one atomicMax per column and block merges the strips.
// atomicMax runs on the float's bits as an unsigned int: for non-negative floats (|x|, +0 start)
// the unsigned order of the bit patterns is the numeric order. A second small kernel turns the
// absmax bits into scales in place.
//
// Per token (a row-wise reduction): one warp per row, lanes striding the row (coalesced), 4 loads
// in flight, warp shuffles to combine; a persistent grid of warps walks the rows.
#include "kvpack/cuda_utils.cuh"

namespace kvpack {
namespace cuda {
namespace {

constexpr int kColsPerBlock = 32;  // blockDim.x: a warp's columns
constexpr int kRowsPerBlock = 8;   // blockDim.y
constexpr int kInFlight = 8;       // per channel: independent loads per thread, then combined
constexpr int kTokenInFlight = 4;  // per token: loads per lane in flight

template <typename T>
__global__ void __launch_bounds__(kColsPerBlock* kRowsPerBlock)
    absmax_channel_kernel(const T* __restrict__ x, unsigned int* __restrict__ absmax_bits,
                          int64_t rows, int64_t cols) {
  __shared__ float partial[kRowsPerBlock][kColsPerBlock + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  // 64-bit: row * cols can exceed 2^31 on large matrices.
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + tx;
  float m = 0.0f;
  if (col < cols) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * kRowsPerBlock;
    int64_t row = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + ty;
    for (; row + (kInFlight - 1) * stride < rows; row += kInFlight * stride) {
      float v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) v[u] = to_float(x[(row + u * stride) * cols + col]);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) m = fmaxf(m, fabsf(v[u]));
    }
    for (; row < rows; row += stride) m = fmaxf(m, fabsf(to_float(x[row * cols + col])));
  }
  partial[ty][tx] = m;
  __syncthreads();
  if (ty == 0 && col < cols) {
#pragma unroll
    for (int k = 1; k < kRowsPerBlock; ++k) m = fmaxf(m, partial[k][tx]);
    atomicMax(absmax_bits + col, __float_as_uint(m));
  }
}

// In place: the absmax bits become fp32 scales.
__global__ void absmax_bits_to_scales_kernel(float* __restrict__ scales, int64_t n) {
  for (int64_t i = global_thread_id(); i < n; i += global_thread_count()) {
    scales[i] = scale_from_absmax(__uint_as_float(reinterpret_cast<unsigned int*>(scales)[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    absmax_token_kernel(const T* __restrict__ x, float* __restrict__ scales, int64_t rows,
                        int64_t cols) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
       row < rows; row += stride) {  // uniform per warp: the shuffles below see all 32 lanes
    const T* xr = x + row * cols;  // 64-bit offset
    float m = 0.0f;
    int64_t d = lane;
    for (; d + (kTokenInFlight - 1) * 32 < cols; d += kTokenInFlight * 32) {
      float v[kTokenInFlight];
#pragma unroll
      for (int u = 0; u < kTokenInFlight; ++u) v[u] = to_float(xr[d + u * 32]);
#pragma unroll
      for (int u = 0; u < kTokenInFlight; ++u) m = fmaxf(m, fabsf(v[u]));
    }
    for (; d < cols; d += 32) m = fmaxf(m, fabsf(to_float(xr[d])));
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (lane == 0) scales[row] = scale_from_absmax(m);
  }
}

template <typename T>
void launch_scales(const T* x, float* scales, int64_t rows, int64_t cols, bool per_token,
                   cudaStream_t stream) {
  if (per_token) {
    constexpr int kThreads = 256;
    constexpr int kWarps = kThreads / 32;
    auto kernel = absmax_token_kernel<T>;
    const unsigned int grid = persistent_grid(kernel, kThreads, ceil_div(rows, kWarps));
    kernel<<<grid, kThreads, 0, stream>>>(x, scales, rows, cols);
    KVPACK_LAUNCH_CHECK();
    return;
  }
  C10_CUDA_CHECK(cudaMemsetAsync(scales, 0, static_cast<size_t>(cols) * sizeof(float), stream));
  auto kernel = absmax_channel_kernel<T>;
  const int64_t col_blocks = ceil_div(cols, kColsPerBlock);
  const int64_t wave = static_cast<int64_t>(sm_count()) *
                       blocks_per_sm(reinterpret_cast<const void*>(kernel), kColsPerBlock * kRowsPerBlock);
  // Row strips: as many as fit the device in one wave (rounded down: every block of this kernel
  // does the same work, so a second, partial wave would cost as much as the first), each strip at
  // least kInFlight rows per thread.
  const int64_t row_blocks = std::min(std::max<int64_t>(1, wave / col_blocks),
                                      ceil_div(rows, kRowsPerBlock * kInFlight));
  const dim3 grid(static_cast<unsigned int>(col_blocks), grid_y(row_blocks));
  const dim3 block(kColsPerBlock, kRowsPerBlock);
  kernel<<<grid, block, 0, stream>>>(x, reinterpret_cast<unsigned int*>(scales), rows, cols);
  KVPACK_LAUNCH_CHECK();
  const unsigned int fin_grid =
      static_cast<unsigned int>(std::min<int64_t>(ceil_div(cols, 256), 4 * sm_count()));
  absmax_bits_to_scales_kernel<<<fin_grid, 256, 0, stream>>>(scales, cols);
  KVPACK_LAUNCH_CHECK();
}

}  // namespace

void compute_scales(const void* x, float* scales, int64_t rows, int64_t cols,
                    c10::ScalarType dtype, bool per_token, cudaStream_t stream) {
  KVPACK_DISPATCH_FLOAT_TYPES(dtype, "compute_scales", [&] {
    launch_scales(static_cast<const scalar_t*>(x), scales, rows, cols, per_token, stream);
  });
}

void quantize_fused(const ElementwiseArgs& args, float* scales, ElementwiseLauncher quantize) {
  compute_scales(args.in, scales, args.rows, args.cols, args.dtype, args.per_token, args.stream);
  ElementwiseArgs with_scales = args;
  with_scales.scales = scales;
  quantize(with_scales);  // same stream: runs after the scales are written
}

}  // namespace cuda
}  // namespace kvpack
