// The one place for kvpack's INT8 arithmetic, shared by the CPU baseline and every CUDA kernel.
//
// Symmetric INT8 (the paper's method, arXiv 2601.04719, Sec. 3):
//   scale      s = absmax / 127                       (fp32, IEEE division)
//   quantize   q = clamp(round_half_even(x / s), -127, 127)   (x / s in fp32, IEEE division)
//   dequantize x_hat = float(q) * s                    (fp32 product, then the output dtype)
// A zero scale (an all-zero channel or token) quantizes to 0 and dequantizes to 0, never NaN. So does
// a channel whose absmax is below 127 * 2^-149 (subnormal data): absmax / 127 underflows to 0.
//
// The float64 reference in kvpack/reference.py computes the same function: a float64 quotient of
// two fp32 values rounded once to fp32 equals the IEEE fp32 quotient (double rounding is innocuous
// for division when 53 >= 2 * 24 + 2), so every variant is tested bit-exactly against it.
// Nothing here may be compiled with --use_fast_math: it would replace the division by an
// approximate reciprocal and break bit-exactness.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KVPACK_HD __host__ __device__ __forceinline__
#else
#define KVPACK_HD inline
#endif

namespace kvpack {

constexpr float kQMax = 127.0f;

KVPACK_HD float scale_from_absmax(float absmax) { return absmax / kQMax; }

// Saturating round-half-to-even conversion of an already divided value to int8.
KVPACK_HD int8_t round_to_int8(float r) {
#if defined(__CUDA_ARCH__)
  // cvt.rni.sat.s8.f32 rounds half to even and saturates to [-128, 127]; clamp -128 to -127
  // for a symmetric range. NaN converts to 0.
  int16_t q;
  asm("cvt.rni.sat.s8.f32 %0, %1;" : "=h"(q) : "f"(r));
  return static_cast<int8_t>(q < -127 ? -127 : q);
#else
  // Clamp first (the bounds are integers, so clamp-then-round equals round-then-clamp) so that
  // the conversion below never overflows; nearbyint rounds half to even in the default mode.
  if (r != r) return 0;  // NaN: 0, as the device conversion gives
  r = r > kQMax ? kQMax : (r < -kQMax ? -kQMax : r);
  return static_cast<int8_t>(std::nearbyint(r));
#endif
}

KVPACK_HD int8_t quantize_value(float x, float scale) {
  return scale == 0.0f ? static_cast<int8_t>(0) : round_to_int8(x / scale);
}

KVPACK_HD float dequantize_value(int8_t q, float scale) { return static_cast<float>(q) * scale; }

}  // namespace kvpack
