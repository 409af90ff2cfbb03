// Host launchers of the CUDA kernels, one pair (quantize, dequantize) per variant, plus the GPU
// scales and the fused entry point. kernels/cuda_ops.cpp (g++) checks the tensors and calls these; each
// launcher lives in its variant's .cu file.
//
// The launchers take raw pointers, not at::Tensor, so the kernel files compile without the torch
// tensor headers. The caller guarantees: a CUDA device guard for the tensors' device, contiguous
// row-major [rows, cols] data, rows >= 1 and cols >= 1, scales of length cols (per channel) or rows
// (per token), all pointers on that device. Any pointer alignment is accepted.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include <c10/core/ScalarType.h>

namespace kvpack {
namespace cuda {

struct ElementwiseArgs {
  const void* in;         // quantize: x (dtype); dequantize: q (int8)
  const float* scales;    // fp32: [cols] per channel, [rows] per token
  void* out;              // quantize: q (int8); dequantize: x_hat (dtype)
  int64_t rows;           // T (tokens)
  int64_t cols;           // D (head dimension)
  c10::ScalarType dtype;  // the floating dtype: of x (quantize) or of x_hat (dequantize)
  bool per_token;         // false: a scale per column (channel); true: a scale per row (token)
  cudaStream_t stream;
};

using ElementwiseLauncher = void (*)(const ElementwiseArgs&);

// The paper's four variants (arXiv 2601.04719), made correct for every shape, and ours.
void quantize_naive(const ElementwiseArgs& args);
void dequantize_naive(const ElementwiseArgs& args);
void quantize_tiled(const ElementwiseArgs& args);
void dequantize_tiled(const ElementwiseArgs& args);
void quantize_coarsened(const ElementwiseArgs& args);
void dequantize_coarsened(const ElementwiseArgs& args);
void quantize_vectorized(const ElementwiseArgs& args);
void dequantize_vectorized(const ElementwiseArgs& args);
void quantize_fast(const ElementwiseArgs& args);
void dequantize_fast(const ElementwiseArgs& args);

// quantize_fast.cu: what the fast quantize chose on the current device, from its properties (the
// benchmark records it in its provenance). Arrays are indexed fp32, fp16, bf16.
struct FastTuning {
  int sm_count = 0;
  double peak_gbps = 0.0;              // DRAM peak: 2 x memory clock x bus width
  int64_t bytes_in_flight_per_sm = 0;  // what a streaming kernel must keep in flight per SM
  int quantize_rows_in_flight[3] = {0, 0, 0};
  int quantize_blocks_per_sm[3] = {0, 0, 0};  // resident blocks of 256 threads at 8 rows in flight
};
FastTuning fast_tuning();

// scales.cu: fp32 scales absmax / 127 of x [rows, cols] (dtype), per channel or per token.
void compute_scales(const void* x, float* scales, int64_t rows, int64_t cols,
                    c10::ScalarType dtype, bool per_token, cudaStream_t stream);

// scales.cu: scales into `scales`, then `quantize` (a variant's launcher) with them, on one stream.
// args.scales is ignored; args.in, args.out, rows, cols, dtype, per_token and stream are used.
void quantize_fused(const ElementwiseArgs& args, float* scales, ElementwiseLauncher quantize);

}  // namespace cuda
}  // namespace kvpack
