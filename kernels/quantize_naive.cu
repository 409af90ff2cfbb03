// Variant "naive" (the paper's first kernel): one thread per element on a 2-D grid of 16 x 16
// thread blocks, x over columns (d), y over rows (t). Each thread reads its element and its scale
// and writes one output; neighbouring threads touch neighbouring columns, so accesses coalesce
// in runs of 16 elements.
//
// Made correct for every shape: threads past the edge of a partial block do nothing, and since
// gridDim.y is limited to 65535 the y axis loops over rows with a grid stride (one iteration for
// every shape up to T = 1,048,560).
#include "kvpack/cuda_utils.cuh"

namespace kvpack {
namespace cuda {
namespace {

constexpr int kBlock = 16;  // the paper's 16 x 16 block

template <typename Op, bool kPerToken>
__global__ void __launch_bounds__(kBlock* kBlock)
    elementwise_naive_kernel(const typename Op::In* __restrict__ in,
                             const float* __restrict__ scales, typename Op::Out* __restrict__ out,
                             int64_t rows, int64_t cols) {
  const Op op;
  // 64-bit: col and row * cols can exceed 2^31 on large matrices.
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (col >= cols) return;
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * kBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.y; row < rows;
       row += row_stride) {
    const int64_t i = row * cols + col;
    out[i] = op(in[i], scales[kPerToken ? row : col]);
  }
}

template <typename Op, bool kPerToken>
void launch_naive(const ElementwiseArgs& a) {
  const dim3 block(kBlock, kBlock);
  const dim3 grid(static_cast<unsigned int>(ceil_div(a.cols, kBlock)), grid_y(ceil_div(a.rows, kBlock)));
  elementwise_naive_kernel<Op, kPerToken><<<grid, block, 0, a.stream>>>(
      static_cast<const typename Op::In*>(a.in), a.scales, static_cast<typename Op::Out*>(a.out),
      a.rows, a.cols);
  KVPACK_LAUNCH_CHECK();
}

}  // namespace

void quantize_naive(const ElementwiseArgs& a) {
  dispatch_elementwise<QuantizeOp>(a, "quantize_naive", [&](auto op, auto per_token) {
    launch_naive<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

void dequantize_naive(const ElementwiseArgs& a) {
  dispatch_elementwise<DequantizeOp>(a, "dequantize_naive", [&](auto op, auto per_token) {
    launch_naive<typename decltype(op)::type, decltype(per_token)::value>(a);
  });
}

}  // namespace cuda
}  // namespace kvpack
