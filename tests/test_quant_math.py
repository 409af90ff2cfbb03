"""The reciprocal form of the quantize arithmetic (kernels/include/kvpack/quant_math.h) on the CPU.

The fast CUDA kernel quantizes with quantize_with_reciprocal: x * (1 / s), rounded without a
conversion instruction; elements near a rounding tie are flagged and decided by quantize_flagged
(an exact residual test, no division; non-finite or extreme cases divide). This compiles
a small C++ program against quant_math.h with the host compiler and checks, on tens of millions of
cases, that the reciprocal form, with quantize_flagged for the elements it flags, gives
quantize_value's int8 bit for bit, and that it flags rarely on ordinary data. Cases: ordinary values, exact ties
(k + 1/2) * s and 1-3 ulps around them, every scale range (subnormal, huge, negative, zero, inf,
NaN), saturating and non-finite x, random bit patterns. quantize_value itself is checked against the
float64 reference by the CPU and GPU op tests.

Needs a C++ compiler (g++ or c++): the CPU extension's build needs one too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "kernels" / "include"

PROGRAM = r"""
#include <cstdio>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <random>
#include "kvpack/quant_math.h"

using namespace kvpack;

static float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

int main() {
  std::mt19937_64 rng(20261125);
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  long long checked = 0, mismatched = 0, exact_paths = 0, ordinary = 0, ordinary_exact = 0, near_ties = 0;
  auto check = [&](float x, float s, bool is_ordinary) {
    bool flagged = false;
    const float r = reciprocal_scale(s);
    int8_t fast = quantize_with_reciprocal(x, r, flagged);
    ++checked;
    if (is_ordinary) { ++ordinary; ordinary_exact += flagged; }
    if (flagged) {
      ++exact_paths;
      fast = quantize_flagged(x, s, r);
      near_ties += std::fabs(x * r) < INFINITY;  // decided without dividing
    }
    const int8_t ref = quantize_value(x, s);
    if (fast != ref && mismatched++ < 10)
      std::printf("MISMATCH x=%a s=%a r=%a flagged=%d got=%d exact=%d\n", x, s, r, flagged, fast, ref);
  };
  auto random_scale = [&]() -> float {
    const int kind = rng() % 16;
    if (kind == 0) return from_bits(rng() & 0x007FFFFFu);                 // subnormal
    if (kind == 1) return std::ldexp(1.0f + 0.5f * (rng() % 3), 100 + rng() % 28);  // huge
    if (kind == 2) return std::ldexp(1.0f, -(int)(rng() % 20));           // power of two
    float s = static_cast<float>(std::ldexp(1.0 + 0.999 * std::fabs(unit(rng)), -40 + (int)(rng() % 70)));
    return (kind == 3) ? -s : s;                                           // negative: user scales
  };
  for (int i = 0; i < 4000000; ++i) {
    const float s = random_scale();
    // ordinary data: |x| <= 127 s, as scales from the absmax give
    check(static_cast<float>(unit(rng) * 127.0 * std::fabs(static_cast<double>(s))), s, std::fabs(s) > 1e-30f && std::fabs(s) < 1e30f);
    // exact ties and their neighbours
    const double k = static_cast<double>(static_cast<int>(rng() % 257) - 128) + 0.5;
    float x = static_cast<float>(k * s);
    check(x, s, false);
    float up = x, down = x;
    for (int u = 0; u < 3; ++u) {
      up = std::nextafter(up, INFINITY);
      down = std::nextafter(down, -INFINITY);
      check(up, s, false);
      check(down, s, false);
    }
    // saturation and beyond
    check(static_cast<float>(unit(rng) * 1e6 * std::fabs(static_cast<double>(s))), s, false);
    // random bit patterns for both
    check(from_bits(static_cast<uint32_t>(rng())), from_bits(static_cast<uint32_t>(rng())), false);
    check(from_bits(static_cast<uint32_t>(rng())), s, false);
  }
  const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-45f, -1e-45f, 0x1p-126f, 0x1p126f,
                            0x1.fffffep127f, 1.0f, -1.0f, 127.0f, 127.5f, 126.5f, 0.5f, -0.5f};
  for (float x : specials)
    for (float s : specials) check(x, s, false);
  std::printf("checked %lld mismatched %lld exact_paths %lld near_ties %lld ordinary %lld ordinary_exact %lld\n",
              checked, mismatched, exact_paths, near_ties, ordinary, ordinary_exact);
  return mismatched != 0;
}
"""


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

def _compile_and_run(tmp_path, name: str, program: str, flags) -> subprocess.CompletedProcess:
    """Compile ``program`` against quant_math.h with the host compiler and run it; skip without one."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on PATH")
    src = tmp_path / f"{name}.cpp"
    src.write_text(program)
    exe = tmp_path / name
    subprocess.run([cxx, "-std=c++17", *flags, f"-I{INCLUDE}", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out



@pytest.mark.parametrize("flags", [["-O2"], ["-O3", "-ffp-contract=fast"]], ids=["O2", "O3-contract"])
def test_reciprocal_form_equals_the_division(tmp_path, flags):
    out = _compile_and_run(tmp_path, "check", PROGRAM, flags)
    counts = dict(zip(out.stdout.split()[-12::2], map(int, out.stdout.split()[-11::2])))
    assert counts["mismatched"] == 0
    assert counts["checked"] > 40_000_000
    # The exact path must be rare on ordinary data (about 2 * 2^-14 of uniform values fall near a
    # tie), or the kernel would spend its time in it; and it must be taken where it has to be.
    assert counts["ordinary_exact"] < 1e-3 * counts["ordinary"], counts
    assert counts["exact_paths"] > 4_000_000, counts  # the exact ties alone are 4M
    # and most flagged elements are decided by quantize_flagged's tie test, not by a division
    assert counts["near_ties"] > 4_000_000, counts


ABSMAX_PROGRAM = r"""
#include <cstdio>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <random>
#include "kvpack/quant_math.h"

using namespace kvpack;

static float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

int main() {
  std::mt19937_64 rng(20261207);
  long long checked = 0, bad = 0;
  auto report = [&](const char* what, float m, float x, float got) {
    if (bad++ < 10) std::printf("BAD %s m=%a x=%a got=%a\n", what, m, x, got);
  };
  // m: a running absmax (>= 0 or NaN with the sign bit clear); x: any value
  for (int i = 0; i < 4000000; ++i) {
    const float x = from_bits(static_cast<uint32_t>(rng()));
    const float m = from_bits(static_cast<uint32_t>(rng()) & 0x7FFFFFFFu);
    const float got = absmax_combine(m, x);
    ++checked;
    if (std::isnan(m) || std::isnan(x)) {
      if (!std::isnan(got) || std::signbit(got)) report("nan", m, x, got);
    } else if (bits(got) != bits(std::fmax(m, std::fabs(x)))) {
      report("finite", m, x, got);  // bit for bit what fmaxf gave before, infinities included
    }
  }
  const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, -NAN, 1e-45f, -1e-45f,
                            0x1p-126f, 0x1.fffffep127f, -0x1.fffffep127f, 1.0f, -127.0f};
  for (float a : specials)
    for (float x : specials) {
      const float m = std::fabs(a);
      const float got = absmax_combine(m, x);
      ++checked;
      const bool want_nan = std::isnan(m) || std::isnan(x);
      if (want_nan ? !std::isnan(got) : bits(got) != bits(std::fmax(m, std::fabs(x)))) report("special", m, x, got);
    }
  // a reduction: NaN anywhere wins, inf wins over finite, in either order of the elements
  const float row[] = {1.0f, -3.0f, INFINITY, 2.0f, NAN, -5.0f};
  float fwd = 0.0f, bwd = 0.0f;
  for (int i = 0; i < 6; ++i) { fwd = absmax_combine(fwd, row[i]); bwd = absmax_combine(bwd, row[5 - i]); }
  checked += 2;
  if (!std::isnan(fwd) || !std::isnan(bwd)) report("row", fwd, bwd, 0.0f);
  if (!std::isnan(scale_from_absmax(fwd)) || !std::isinf(scale_from_absmax(INFINITY))) report("scale", fwd, 0, 0);
  std::printf("checked %lld bad %lld\n", checked, bad);
  return bad != 0;
}
"""


@pytest.mark.parametrize("flags", [["-O2"], ["-O3", "-ffp-contract=fast"]], ids=["O2", "O3-contract"])
def test_absmax_combine_keeps_nan_and_inf(tmp_path, flags):
    """absmax_combine: NaN wins, inf beats finite, and every other result is fmaxf's bits.

    The scales kernels and cpu_serial reduce with it; NaN-propagation is what lets kvpack.ops find
    non-finite input on the scales alone. On 4M random bit patterns, the specials, and a reduction.
    """
    out = _compile_and_run(tmp_path, "absmax", ABSMAX_PROGRAM, flags)
    assert "bad 0" in out.stdout and int(out.stdout.split()[-3]) > 4_000_000, out.stdout
