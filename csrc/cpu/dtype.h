#pragma once
// Storage types of the CPU kernels and their conversions to the accumulation type. Half and
// bfloat16 are plain 16-bit words so the core needs no framework; arithmetic happens in float.
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace vtok {
namespace cpu {
// Internal linkage: each instruction-set variant keeps its own copy of these helpers instead of
// the linker picking one variant's code for all of them.
namespace {

struct BFloat16 {
  uint16_t bits;
};

#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__aarch64__))
// The compiler's _Float16 converts with one instruction where the ISA has it (F16C,
// AVX512-FP16, NEON), which keeps the conversion loops vectorised.
using Half = _Float16;
#define VTOK_NATIVE_HALF 1
#else
struct Half {
  uint16_t bits;
};
#define VTOK_NATIVE_HALF 0
#endif

// float for the 16- and 32-bit formats, double for float64 (gradcheck needs every step in
// double).
template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

template <typename T>
inline T store(acc_t<T> v);

template <>
inline float store<float>(float v) { return v; }
template <>
inline double store<double>(double v) { return v; }

template <>
inline BFloat16 store<BFloat16>(float v) {
  uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}

#if VTOK_NATIVE_HALF
inline float load(Half v) { return static_cast<float>(v); }
template <>
inline Half store<Half>(float v) { return static_cast<Half>(v); }
#else
inline float load(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exponent = (v.bits >> 10) & 0x1fu;
  uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_float(sign);
    // subnormal: value = mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

template <>
inline Half store<Half>(float v) {
  const uint32_t u = float_to_bits(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // subnormal or zero in half: round |v| * 2^24 to nearest even
    const float scaled = bits_to_float(abs) * 16777216.0f;
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rest = scaled - static_cast<float>(m);
    if (rest > 0.5f || (rest == 0.5f && (m & 1u))) ++m;
    return {static_cast<uint16_t>(sign | m)};
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return {static_cast<uint16_t>(sign | h)};
}
#endif

}  // namespace
}  // namespace cpu
}  // namespace vtok
