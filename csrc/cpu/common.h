#pragma once
// Helpers shared by the CPU kernel sources: per-video geometry, dtype dispatch, and the
// vector loops the compiler turns into SIMD.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/dtype.h"
#include "vtok/index_math.h"
#include "vtok/params.h"

#if defined(__GNUC__)
#define VTOK_RESTRICT __restrict__
#else
#define VTOK_RESTRICT
#endif

// `omp simd` needs only -fopenmp-simd, so these loops vectorise with or without OpenMP threads.
#if defined(__GNUC__) || defined(__clang__)
#define VTOK_PRAGMA(x) _Pragma(#x)
#define VTOK_SIMD _Pragma("omp simd")
#define VTOK_SIMD_SUM(var) VTOK_PRAGMA(omp simd reduction(+ : var))
#else
#define VTOK_SIMD
#define VTOK_SIMD_SUM(var)
#endif

namespace vtok {
namespace cpu {
// Internal linkage: each instruction-set variant keeps its own copy of these helpers instead of
// the linker picking one variant's code for all of them.
namespace {

// Patches per task or block. Fixed (never derived from the thread count) so that the order of
// every floating-point sum, and hence every bit of the result, is the same for any thread count.
constexpr int64_t kPatchBlock = 16;

// One video of a batched or varlen encode: where its frames, tokens and groups live.
struct Video {
  int64_t x_offset;   // elements from x to this video's frame 0
  int64_t frame0;     // this video's frame 0 in grad_x's packed frame dimension
  int64_t frames;     // T_b
  int64_t key;        // key frame, in [0, T_b)
  int64_t groups;     // G_b
  int64_t seq_row;    // first output row (key tokens, then residual tokens)
  int64_t group_row;  // first row of this video's groups in lse
};

inline Video video_of(const EncodeParams& p, int64_t b) {
  Video v;
  if (p.cu_frames != nullptr) {
    v.frame0 = p.cu_frames[b];
    v.frames = p.cu_frames[b + 1] - v.frame0;
    v.x_offset = v.frame0 * p.x_stride_t;
    v.groups = num_groups(v.frames, p.frames_per_token);
    v.seq_row = p.cu_tokens[b];
    v.group_row = varlen_group_offset(p.cu_tokens, b, p.num_key_tokens);
  } else {
    v.frame0 = b * p.num_frames;
    v.frames = p.num_frames;
    v.x_offset = b * p.x_stride_b;
    v.groups = p.num_groups;
    v.seq_row = b * (p.num_key_tokens + p.num_groups);
    v.group_row = b * p.num_groups;
  }
  v.key = p.key_index[b];
  return v;
}

inline std::vector<Video> videos_of(const EncodeParams& p) {
  std::vector<Video> videos(static_cast<size_t>(p.batch));
  for (int64_t b = 0; b < p.batch; ++b) videos[b] = video_of(p, b);
  return videos;
}

// Flat index of the first group of each video, plus the total at the end.
inline std::vector<int64_t> group_starts(const std::vector<Video>& videos) {
  std::vector<int64_t> starts(videos.size() + 1, 0);
  for (size_t b = 0; b < videos.size(); ++b) starts[b + 1] = starts[b] + videos[b].groups;
  return starts;
}

// The video owning flat group `task` (videos without groups are skipped).
inline int64_t video_of_task(const std::vector<int64_t>& starts, int64_t task) {
  return static_cast<int64_t>(std::upper_bound(starts.begin(), starts.end(), task) -
                              starts.begin()) - 1;
}

template <typename T>
inline const T* x_row(const EncodeParams& p, const Video& v, int64_t t, int64_t n) {
  return static_cast<const T*>(p.x) + v.x_offset + t * p.x_stride_t + n * p.x_stride_n;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if defined(__GNUC__) || defined(__clang__)
#define VTOK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define VTOK_ALWAYS_INLINE inline
#endif

// e^x in float without a library call, so that a loop of them vectorises (the softmax weights of
// a block of rows become a few vector instructions instead of a call per row and head). Cephes'
// expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n from the exponent
// bits; within 2 ulp of expf on [-87.3, 88.3]. Below that it returns 0 (expf's denormals, which
// weigh nothing next to a softmax's largest weight of 1), above it e^88.3; NaN stays NaN.
VTOK_ALWAYS_INLINE float exp_approx(float x) {
  const float clamped = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // Round to nearest by adding 1.5 * 2^23: the integer lands in the low mantissa bits.
  constexpr float kRound = 12582912.0f;
  const float shifted = clamped * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  int32_t shifted_bits, round_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  std::memcpy(&round_bits, &kRound, sizeof(float));
  const int32_t exponent_bits = (shifted_bits - round_bits + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(float));
  return x < -87.3f ? 0.0f : poly * scale;
}

// The CPU kernels' exponential: exp_approx in float, the library's exp in double (gradcheck).
VTOK_ALWAYS_INLINE float exp_cpu(float x) { return exp_approx(x); }
VTOK_ALWAYS_INLINE double exp_cpu(double x) { return std::exp(x); }

// Lanes of dot's partial sums: one AVX-512 register of floats. Fixed, so that every instruction
// set adds in the same order.
constexpr int64_t kDotLanes = 16;

// The sum of dot's lanes, added as a tree.
template <typename Acc>
VTOK_ALWAYS_INLINE Acc sum_lanes(Acc* lanes) {
  for (int64_t width = kDotLanes / 2; width > 0; width /= 2) {
    VTOK_SIMD
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// An omp simd reduction leaves the final sum of the lanes to the compiler, which adds them one
// after another through memory; for the short dot products of attention heads (32 to 128
// channels) that chain took longer than the products. Here the lanes are added as a tree.
template <typename Acc>
VTOK_ALWAYS_INLINE Acc dot(const Acc* VTOK_RESTRICT a, const Acc* VTOK_RESTRICT b, int64_t n) {
  Acc lanes[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    VTOK_SIMD
    for (int64_t l = 0; l < kDotLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  for (int64_t l = 0; i + l < n; ++l) lanes[l] += a[i + l] * b[i + l];
  return sum_lanes(lanes);
}

// dot(a, v, n) and dot(b, v, n), bit for bit, in one pass over v.
template <typename Acc>
VTOK_ALWAYS_INLINE void dot2(const Acc* VTOK_RESTRICT a, const Acc* VTOK_RESTRICT b,
                             const Acc* VTOK_RESTRICT v, int64_t n, Acc& av, Acc& bv) {
  Acc lanes_a[kDotLanes] = {}, lanes_b[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    VTOK_SIMD
    for (int64_t l = 0; l < kDotLanes; ++l) {
      lanes_a[l] += a[i + l] * v[i + l];
      lanes_b[l] += b[i + l] * v[i + l];
    }
  }
  for (int64_t l = 0; i + l < n; ++l) {
    lanes_a[l] += a[i + l] * v[i + l];
    lanes_b[l] += b[i + l] * v[i + l];
  }
  av = sum_lanes(lanes_a);
  bv = sum_lanes(lanes_b);
}

template <typename Acc>
inline void axpy(Acc* VTOK_RESTRICT y, Acc alpha, const Acc* VTOK_RESTRICT x, int64_t n) {
  VTOK_SIMD
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T, typename Acc>
inline void load_row(Acc* VTOK_RESTRICT dst, const T* VTOK_RESTRICT src, int64_t n) {
  VTOK_SIMD
  for (int64_t i = 0; i < n; ++i) dst[i] = load(src[i]);
}

template <typename T, typename Acc>
inline void store_row(T* VTOK_RESTRICT dst, const Acc* VTOK_RESTRICT src, int64_t n) {
  VTOK_SIMD
  for (int64_t i = 0; i < n; ++i) dst[i] = store<T>(src[i]);
}

template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(Half{}); break;
    case DType::kBFloat16: f(BFloat16{}); break;
    default: throw std::invalid_argument("dtype: unsupported by the cpu kernels");
  }
}

// Threads worth waking for `elements` of work: a parallel region costs microseconds even on an
// idle machine and can stall for a scheduler time slice on a busy one, so small problems run on
// one thread. The result never changes the bits: the tasks do not depend on the thread count.
inline int thread_count(int num_threads, int64_t elements) {
  constexpr int64_t kElementsPerThread = int64_t(1) << 15;
  const int64_t useful = std::max<int64_t>(1, elements / kElementsPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, useful)));
}

}  // namespace
}  // namespace cpu
}  // namespace vtok
