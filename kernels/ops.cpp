// Schemas of every kvpack op, declared once. Each backend registers its implementation in its own
// file: cpu_baseline.cpp (CPU, variant "cpu_serial") and the .cu files (CUDA, the GPU variants).
//
//   compute_scales(x[T, D], granularity)            -> fp32 scales: [D] per channel, [T] per token
//   quantize(x, scales, variant, granularity)       -> int8 [T, D]
//   dequantize(q, scales, variant, granularity, dtype) -> dtype [T, D]
//   quantize_fused(x, variant, granularity)         -> (int8 [T, D], fp32 scales)
#include <torch/library.h>

TORCH_LIBRARY(kvpack, m) {
  m.def("compute_scales(Tensor x, str granularity) -> Tensor");
  m.def("quantize(Tensor x, Tensor scales, str variant, str granularity) -> Tensor");
  m.def("dequantize(Tensor q, Tensor scales, str variant, str granularity, ScalarType dtype) -> Tensor");
  m.def("quantize_fused(Tensor x, str variant, str granularity) -> (Tensor, Tensor)");
}
