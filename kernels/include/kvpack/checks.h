// Argument checks shared by the CPU and CUDA implementations of every op. The Python wrappers in
// kvpack/ops.py check first with friendlier messages; these guard direct torch.ops.kvpack calls.
#pragma once

#include <string>

#include <torch/types.h>

// Host compiler only: the nvcc-compiled .cu files never include this (kernels/cuda_ops.cpp does).
#if defined(__CUDACC__)
#error "kvpack/checks.h is host code for g++-compiled .cpp files; do not include it in a .cu file"
#endif

namespace kvpack {
// Internal linkage: each .cpp file that includes this gets its own copy of every helper (and of
// the c10::str instantiations they use), so no two translation units can ever share (and the
// linker pick one of) differently compiled definitions of the same inline function.
namespace {

enum class Granularity { kChannel, kToken };

inline Granularity parse_granularity(const std::string& g) {
  if (g == "channel") return Granularity::kChannel;
  if (g == "token") return Granularity::kToken;
  TORCH_CHECK_VALUE(false, "kvpack: granularity must be 'channel' or 'token', got '", g, "'");
}

// Number of scales for a [T, D] matrix: D per channel (one per column), T per token (one per row).
inline int64_t num_scales(const at::Tensor& x, Granularity g) {
  return g == Granularity::kChannel ? x.size(1) : x.size(0);
}

inline void check_matrix(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2, "kvpack: ", name, " must be a 2-D [T, D] tensor, got ", x.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(x.numel() > 0, "kvpack: ", name, " is empty (shape ", x.sizes(), ")");
}

inline void check_float_input(const at::Tensor& x) {
  check_matrix(x, "x");
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "kvpack: x must be float32, float16 or bfloat16, got ", t);
}

inline void check_scales(const at::Tensor& x, const at::Tensor& scales, Granularity g) {
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "kvpack: scales must be float32, got ",
                   scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == num_scales(x, g),
                    "kvpack: scales must have shape [", num_scales(x, g), "] for ",
                    g == Granularity::kChannel ? "per-channel" : "per-token",
                    " quantization of a ", x.sizes(), " tensor, got ", scales.sizes());
  TORCH_CHECK_VALUE(scales.device() == x.device(), "kvpack: scales are on ", scales.device(),
                    " but the tensor is on ", x.device());
}

inline void check_int8_input(const at::Tensor& q) {
  check_matrix(q, "q");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kChar, "kvpack: q must be int8, got ", q.scalar_type());
}

inline void check_out_dtype(at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "kvpack: dequantize dtype must be float32, float16 or bfloat16, got ", t);
}

}  // namespace
}  // namespace kvpack
