// The vectorized kernel (the paper's fourth variant) as a template, with plain loads as the paper's
// ("fast" used it with streaming loads for short fp32 rows until it had row kernels sized from the
// device; kernels/quantize_fast.cu): each thread moves 4
// consecutive elements of a row with one vector access each way: quantize reads a float4 (fp32; 8
// bytes of fp16/bf16) and writes a char4; dequantize reads a char4 and writes a float4. Blocks are
// the paper's 16 x 16: x over groups of 4 columns, y over rows.
//
// The paper's kernel needs D % 4 == 0 and aligned rows. This one is correct for any input: when D is
// not a multiple of 4, or x / q / the output is not aligned to its vector width (a sliced tensor,
// a storage offset), it runs the flat path (flat_kernel.cuh): 4-wide vectors over the flat range,
// with an unaligned head and a tail done one element at a time.
#pragma once

#include "kvpack/cuda_utils.cuh"
#include "kvpack/flat_kernel.cuh"

namespace kvpack {
namespace cuda {
// Internal linkage, as flat_kernel.cuh: each including file gets its own instantiations.
namespace {

constexpr int kBlock = 16;
constexpr int kVec = 4;  // float4 / char4

template <typename Op, bool kPerToken>
__global__ void __launch_bounds__(kBlock* kBlock)
    elementwise_vectorized_kernel(const typename Op::In* __restrict__ in,
                                  const float* __restrict__ scales,
                                  typename Op::Out* __restrict__ out, int64_t rows, int64_t cols) {
  using In = typename Op::In;
  using Out = typename Op::Out;
  const Op op;
  // 64-bit: col and row * cols can exceed 2^31 on large matrices.
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) * kVec;
  if (col >= cols) return;  // cols % kVec == 0 here, so col < cols means all 4 are inside
  float col_scale[kVec];
  if (!kPerToken) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) col_scale[k] = scales[col + k];
  }
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * kBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.y; row < rows;
       row += row_stride) {
    const int64_t i = row * cols + col;
    const VecN<In, kVec> x = load_vec<In, kVec>(in + i);
    const float row_scale = kPerToken ? scales[row] : 0.0f;
    VecN<Out, kVec> y;
#pragma unroll
    for (int k = 0; k < kVec; ++k) y.val[k] = op(x.val[k], kPerToken ? row_scale : col_scale[k]);
    store_vec<Out, kVec>(out + i, y);
  }
}

template <typename Op, bool kPerToken>
void launch_vectorized(const ElementwiseArgs& a) {
  using In = typename Op::In;
  using Out = typename Op::Out;
  // Row-structured vector path: every row starts on a vector boundary of both in and out.
  const bool aligned = a.cols % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(a.in) % alignof(VecN<In, kVec>) == 0 &&
                       reinterpret_cast<uintptr_t>(a.out) % alignof(VecN<Out, kVec>) == 0;
  if (!aligned) {
    launch_flat<Op, kPerToken, kVec>(a);
    return;
  }
  const dim3 block(kBlock, kBlock);
  const dim3 grid(static_cast<unsigned int>(ceil_div(a.cols / kVec, kBlock)),
                  grid_y(ceil_div(a.rows, kBlock)));
  elementwise_vectorized_kernel<Op, kPerToken><<<grid, block, 0, a.stream>>>(
      static_cast<const In*>(a.in), a.scales, static_cast<Out*>(a.out), a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace kvpack
