// The one place for kvpack's INT8 arithmetic, shared by the CPU baseline and every CUDA kernel.
//
// Symmetric INT8 (the paper's method, arXiv 2601.04719, Sec. 3):
//   scale      s = absmax / 127                       (fp32, IEEE division)
//   quantize   q = clamp(round_half_even(x / s), -127, 127)   (x / s in fp32, IEEE division)
//   dequantize x_hat = float(q) * s                    (fp32 product, then the output dtype)
// A zero scale (an all-zero channel or token) quantizes to 0 and dequantizes to 0, never NaN. So does
// a channel whose absmax is below 127 * 2^-149 (subnormal data): absmax / 127 underflows to 0.
//
// Subnormal scales (absmax below 127 * 2^-126, about 1.5e-36) are kept as IEEE gradual underflow
// gives them, never flushed: s is absmax / 127 rounded to the subnormal grid (spacing 2^-149), so it
// is off by up to 2^-150 absolutely, not by half an ulp relatively. Then 127 * s can fall short of
// absmax by up to 127 * 2^-150, and the channel's largest elements saturate at +-127 with up to that
// much more error than s / 2 (absmax 5.73e-43 = 409 * 2^-149: s = 3 * 2^-149, 409 / 3 = 136.3 -> 127,
// error 28 * 2^-149). Or s rounds up, and the absmax maps to less than 127 (absmax 64 * 2^-149:
// 64 / 127 = 0.504 rounds to s = 2^-149, q = 64). What holds for every element of such a channel is
// the normal bound plus that shortfall: |x - x_hat| <= s / 2 + 127 * 2^-150 + the fp32 roundings of
// the quotient and the product (a few ulps of |x|, and 2^-150 where the product is subnormal);
// tests/test_reference.py asserts it. |q| of the absmax is 127 for every normal scale; for a
// subnormal one it can be less. Data this small is no KV cache; the rule is stated so that the
// kernels, the reference and the tests agree on it.
//
// Non-finite input: the absmax reduction propagates NaN and inf (absmax_combine below), so a channel
// (token) holding a NaN gets a NaN scale and one holding an inf (and no NaN) an inf scale. That is how
// kvpack.ops finds non-finite input without a pass of its own: it checks the D (or T) scales. What
// quantize then writes for such a channel is unspecified (here: NaN or inf scale -> q = 0). With a
// finite, positive scale given by the caller, x = NaN quantizes to 0 and x = +-inf to +-127.
//
// The float64 reference in kvpack/reference.py computes the same function: a float64 quotient of
// two fp32 values rounded once to fp32 equals the IEEE fp32 quotient (double rounding is innocuous
// for division when 53 >= 2 * 24 + 2), so every variant is tested bit-exactly against it.
// Nothing here may be compiled with --use_fast_math: it would replace the division by an
// approximate reciprocal and break bit-exactness.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KVPACK_HD __host__ __device__ __forceinline__
#else
#define KVPACK_HD inline
#endif

namespace kvpack {

constexpr float kQMax = 127.0f;

KVPACK_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

KVPACK_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// The one step of every abs-max reduction: max(m, |x|) for a running absmax m (start at 0.0f), with
// NaN winning over everything and inf over every finite value. fmaxf (and std::max) would drop a
// NaN (fmaxf(NaN, y) = y) and give a NaN channel a finite scale. Why the bits: with the sign bit
// cleared, IEEE bit patterns read as unsigned integers order like the values (+0 < subnormals <
// normals < +inf), and every NaN pattern (exponent all ones, mantissa nonzero) lies above +inf's
// 0x7F800000. So an unsigned max of the bits of |x| is the numeric max for finite and infinite
// values, bit for bit what fmaxf gives (|x| is never -0), and NaN as soon as one element is NaN.
// Also the merge of two partial absmaxes (|m| = m), in any order: the max is exact and order-free.
KVPACK_HD float absmax_combine(float m, float x) {
  const uint32_t a = float_bits(m);
  const uint32_t b = float_bits(x) & 0x7FFFFFFFu;  // |x|
  return float_from_bits(a > b ? a : b);
}

// absmax / 127: NaN stays NaN and inf stays inf, so a non-finite absmax gives a non-finite scale.
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

// Whether quantize_value(x, scale) loses x to saturation: a fixed scale (the KV cache's per-channel
// scales, calibrated on the prefill) meets a value past it. The quotient rounds to +-128 or beyond
// (|x / s| >= 127.5; 127.5 rounds half to even to 128) and is clamped to +-127, or the scale is 0 and
// x is not. Written with the same IEEE division as quantize_value.
KVPACK_HD bool saturates(float x, float scale) {
  return scale == 0.0f ? x != 0.0f : !(std::fabs(x / scale) < kQMax + 0.5f);
}

// ------------------------------------------------------------------------------------------------
// The reciprocal form of quantize_value, for kernels that load a scale once and apply it to many
// elements ("fast"): one multiplication instead of a division per element (on the GPU, IEEE
// division costs a MUFU.RCP, four FMAs, a range check and the F2I conversion, which made the
// 16-bit quantize compute-bound). Bit-identical to quantize_value:
//
//   r = reciprocal_scale(s)                                  once per scale
//   q = quantize_with_reciprocal(x, r, flagged)              every element
//   if flagged: q = quantize_flagged(x, s, r)                about 1 element in 8000 (uniform fp32)
//
// Why the common path is exact. y = fl(x * r) with r = fl(1 / s) differs from the IEEE quotient
// fl(x / s) by at most |x / s| * (2^-23 + 2^-24 + 2^-48) < 2^-15.4 wherever |x / s| <= 127.5, so the
// two round to the same integer unless y lies within 2^-14 of a half-integer; then, and when y is
// not finite, the element is flagged. Clamping to +-127 before rounding equals rounding then
// clamping (integer bounds), and past +-127 both saturate. A zero scale gets r = 0, so q = 0 as
// quantize_value gives (x finite). Scales outside [2^-100, 2^100] (and inf, NaN) get a NaN r, so
// all their elements are flagged and go to the division.
// Rounding without a conversion instruction: t = yc + 1.5 * 2^23 holds rint(yc) (round half to
// even) in its low mantissa bits for |yc| < 2^22, and since 1.5 * 2^23 has a zero low byte, the
// low byte of t's bits is rint(yc) as an int8.
//
// Why the flagged path is exact without dividing (quantize_flagged). Let z = x / s (exact) and
// h = k + 1/2 the half-integer y is near (|z - h| < 2^-13). fl(z) == h exactly when |z - h| is at
// most half of ulp(h); otherwise fl(z) is on z's side of h. So q = the even one of k, k + 1 in the
// first case, else k + 1 if z > h, else k. (Two details that cannot change q: a quotient of two
// fp32 values is never exactly a midpoint between floats, so the band's ends are never hit; and
// just below |h| = 0.5 the float spacing halves, but there the even neighbour, 0, is also the
// neighbour toward zero, so the wider band gives the same q.) The test needs x - h * s exactly: h = H / 2
// with H an odd integer below 256, so x - h * s is a multiple of 2^(e_s - 25) smaller than
// 2^(e_s - 12): 13 significant bits, which fmaf(-h, s, x) returns exactly (no rounding) for
// 2^-100 <= |s| <= 2^100. The bands' widths, a power of two times |s|, are exact too.
// tests/test_quant_math.py checks all of this against quantize_value on the CPU; the GPU tests check
// the kernels against the float64 reference.

constexpr float kRoundingMagic = 12582912.0f;      // 1.5 * 2^23
constexpr float kNearTie = 0.5f - 0x1p-14f;        // |y - rint(y)| above this: too near a tie
constexpr float kMinReciprocalScale = 0x1p-100f;   // |s| outside [min, max]: the division path
constexpr float kMaxReciprocalScale = 0x1p100f;

#if defined(__CUDA_ARCH__)
#define KVPACK_MUL_RN(a, b) __fmul_rn(a, b)
#define KVPACK_ADD_RN(a, b) __fadd_rn(a, b)
#define KVPACK_SUB_RN(a, b) __fsub_rn(a, b)
#define KVPACK_FMA_RN(a, b, c) __fmaf_rn(a, b, c)
#else
#define KVPACK_MUL_RN(a, b) ((a) * (b))
#define KVPACK_ADD_RN(a, b) ((a) + (b))
#define KVPACK_SUB_RN(a, b) ((a) - (b))
#define KVPACK_FMA_RN(a, b, c) std::fma(a, b, c)
#endif

KVPACK_HD float reciprocal_scale(float scale) {
  if (scale == 0.0f) return 0.0f;
  const float a = std::fabs(scale);
  if (!(a >= kMinReciprocalScale && a <= kMaxReciprocalScale)) return NAN;  // inf, NaN, extreme
  return 1.0f / scale;  // IEEE division (round to nearest)
}

// Returns a 32-bit word whose low byte is the quantized value (the caller packs bytes from it);
// sets `flagged` (never clears it) when that byte may differ from quantize_value(x, s).
KVPACK_HD uint32_t quantize_with_reciprocal_bits(float x, float recip, bool& flagged) {
  const float y = KVPACK_MUL_RN(x, recip);
  const float yc = std::fmin(std::fmax(y, -kQMax), kQMax);  // NaN becomes -127: flagged below
  const float t = KVPACK_ADD_RN(yc, kRoundingMagic);
  const float k = KVPACK_SUB_RN(t, kRoundingMagic);  // rint(yc), exact
  flagged |= !(std::fabs(y) < INFINITY) || std::fabs(KVPACK_SUB_RN(yc, k)) > kNearTie;
  return float_bits(t);
}

KVPACK_HD int8_t quantize_with_reciprocal(float x, float recip, bool& flagged) {
  return static_cast<int8_t>(quantize_with_reciprocal_bits(x, recip, flagged) & 0xFFu);
}

// quantize_value(x, scale) for an element quantize_with_reciprocal flagged, recip =
// reciprocal_scale(scale): near a tie it decides without dividing (see above); non-finite values
// and scales outside [2^-100, 2^100] take quantize_value itself.
KVPACK_HD int8_t quantize_flagged(float x, float scale, float recip) {
  const float y = KVPACK_MUL_RN(x, recip);
  if (!(std::fabs(y) < INFINITY)) return quantize_value(x, scale);  // also NaN recip, NaN x
  const float k = std::floor(std::fmin(std::fmax(y, -kQMax), kQMax));
  const float h = KVPACK_ADD_RN(k, 0.5f);                   // y is within 2^-14 of h
  const float rho = KVPACK_FMA_RN(-h, scale, x);             // x - h * s, exactly
  const float dist = scale < 0.0f ? -rho : rho;              // (z - h) * |s|
  const float ulp = float_from_bits((float_bits(std::fabs(h)) & 0x7F800000u) - (23u << 23));  // |h| >= 0.5
  const bool rounds_to_h = std::fabs(dist) <= KVPACK_MUL_RN(KVPACK_MUL_RN(0.5f, ulp), std::fabs(scale));
  const int ki = static_cast<int>(k);
  const int q = rounds_to_h ? ki + (ki & 1) : (dist > 0.0f ? ki + 1 : ki);  // even of k, k + 1
  return static_cast<int8_t>(q);
}

// ------------------------------------------------------------------------------------------------
// Symmetric INT4 (issue 17; docs/int4.md says why symmetric), the same rules at 4 bits:
//   scale      s = absmax / 7 over a group of channels of a token (or a key channel)
//   quantize   q = clamp(round_half_even(x / s), -7, 7), stored as the nibble q + 8 (1..15)
//   dequantize x_hat = float(q) * s
// A zero scale stores 8 (q = 0). kvpack/torch_impl.py's int4_* functions and kvpack/reference.py's
// float64 twin compute the same, bit for bit. Two nibbles a byte: element 2i low, 2i + 1 high.
constexpr float kInt4QMax = 7.0f;

KVPACK_HD float int4_scale_from_absmax(float absmax) { return absmax / kInt4QMax; }

KVPACK_HD uint32_t quantize_int4_nibble(float x, float scale) {
  if (scale == 0.0f) return 8u;
  const int8_t q = round_to_int8(x / scale);  // round half to even; NaN -> 0
  return static_cast<uint32_t>((q > 7 ? 7 : (q < -7 ? -7 : q)) + 8);
}

// The stored nibble back to q (the decode kernels reach the same q through the LOP3 trick); x_hat =
// float(q) * s, as dequantize_value.
KVPACK_HD int int4_from_nibble(uint32_t nibble) { return static_cast<int>(nibble) - 8; }

// Whether quantize_int4_nibble(x, scale) saturates (a calibrated key channel meets a larger value):
// |x / s| >= 7.5 rounds past +-7, or the scale is 0 and x is not.
KVPACK_HD bool saturates_int4(float x, float scale) {
  return scale == 0.0f ? x != 0.0f : !(std::fabs(x / scale) < kInt4QMax + 0.5f);
}

}  // namespace kvpack
