// The general path of the vector variants ("vectorized", "fast"): the [rows, cols] matrix seen as
// one flat range of rows * cols elements, walked by a persistent grid with
// vectorize_with_alignment (aligned vector body, unaligned head, tail). It takes any D (D % 4 != 0,
// D % 16 != 0) and any pointer alignment, where the row-structured vector kernels need D to be a
// multiple of the vector width and every row to start aligned.
//
// Each vector's first element locates its row and column with one division; the others step
// from there, wrapping to the next row (a vector may straddle two rows).
#pragma once

#include "kvpack/cuda_utils.cuh"

namespace kvpack {
namespace cuda {
// Internal linkage: each kernel file that includes this gets its own instantiations, so two files
// instantiating the same kernel never share (and register twice) one host stub.
namespace {

// row = i / cols, col = i % cols; with a 32-bit division (inline, ~20 instructions) when both fit
// in 32 bits, the 64-bit one (a called subroutine) only beyond.
__device__ __forceinline__ void row_col(int64_t i, int64_t cols, int64_t& row, int64_t& col) {
  if (((static_cast<uint64_t>(i) | static_cast<uint64_t>(cols)) >> 32) == 0) {
    const uint32_t r = static_cast<uint32_t>(i) / static_cast<uint32_t>(cols);
    row = r;
    col = static_cast<uint32_t>(i) - r * static_cast<uint32_t>(cols);
  } else {
    row = i / cols;
    col = i - row * cols;
  }
}

// __launch_bounds__(256, 2): without a minimum-blocks hint ptxas held these kernels to 32
// registers and spilled a few bytes (sm_90, nvcc 13.0); with it they take 37-45, no spills.
template <typename Op, bool kPerToken, int VEC>
__global__ void __launch_bounds__(256, 2)
    elementwise_flat_kernel(const typename Op::In* __restrict__ in,
                            const float* __restrict__ scales, typename Op::Out* __restrict__ out,
                            int64_t rows, int64_t cols) {
  using In = typename Op::In;
  using Out = typename Op::Out;
  const Op op;
  // 64-bit: rows * cols can exceed 2^31.
  const int64_t n = rows * cols;
  auto scalar_op = [&](Out& o, In x, int64_t i) {
    int64_t row, col;
    row_col(i, cols, row, col);
    o = op(x, scales[kPerToken ? row : col]);
  };
  auto vec_op = [&](VecN<Out, VEC>& o, const VecN<In, VEC>& x, int64_t i0) {
    int64_t row, col;
    row_col(i0, cols, row, col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      o.val[k] = op(x.val[k], scales[kPerToken ? row : col]);
      if (++col == cols) {
        col = 0;
        ++row;
      }
    }
  };
  vectorize_with_alignment<VEC>(in, out, n, global_thread_id(), global_thread_count(), vec_op,
                                scalar_op);
}

// Launches the flat kernel on a persistent grid: at most one full wave of resident blocks.
template <typename Op, bool kPerToken, int VEC>
void launch_flat(const ElementwiseArgs& a) {
  constexpr int kThreads = 256;
  auto kernel = elementwise_flat_kernel<Op, kPerToken, VEC>;
  const int64_t vectors = ceil_div(a.rows * a.cols, VEC);
  const unsigned int grid = persistent_grid(kernel, kThreads, ceil_div(vectors, kThreads));
  kernel<<<grid, kThreads, 0, a.stream>>>(static_cast<const typename Op::In*>(a.in), a.scales,
                                          static_cast<typename Op::Out*>(a.out), a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace kvpack
