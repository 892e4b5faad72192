#pragma once
// The index math every kernel shares, written once for the CPU, nvcc and NVRTC.
#include "vtok/macros.h"

#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace vtok {

// Python-style key index: negative counts from the end. The API rejects anything outside
// [-T, T) before a kernel runs; kernels receive normalised keys.
VTOK_HOST_DEVICE int64_t normalize_key(int64_t key, int64_t num_frames) {
  return key < 0 ? key + num_frames : key;
}

// Non-key frames in increasing t, cut into groups of frames_per_token; the last may be shorter.
VTOK_HOST_DEVICE int64_t num_groups(int64_t num_frames, int64_t frames_per_token) {
  return num_frames <= 1 ? 0 : (num_frames - 1 + frames_per_token - 1) / frames_per_token;
}

// Group g holds the non-key ranks [first, last): rank j is the j-th non-key frame.
struct GroupBounds {
  int64_t first;
  int64_t last;
};

VTOK_HOST_DEVICE GroupBounds group_bounds(int64_t group, int64_t num_frames,
                                          int64_t frames_per_token) {
  const int64_t first = group * frames_per_token;
  int64_t last = first + frames_per_token;
  if (last > num_frames - 1) last = num_frames - 1;
  return {first, last};
}

// Frame index of the j-th non-key frame: the key frame is skipped.
VTOK_HOST_DEVICE int64_t nonkey_frame(int64_t rank, int64_t key) {
  return rank < key ? rank : rank + 1;
}

// Group of a non-key frame t (t != key).
VTOK_HOST_DEVICE int64_t group_of_frame(int64_t frame, int64_t key, int64_t frames_per_token) {
  const int64_t rank = frame < key ? frame : frame - 1;
  return rank / frames_per_token;
}

// torch's adaptive_avg_pool2d bins along one axis: [floor(i*in/out), ceil((i+1)*in/out)).
struct Bin {
  int64_t start;
  int64_t end;
};

VTOK_HOST_DEVICE Bin adaptive_bin(int64_t i, int64_t in_size, int64_t out_size) {
  const int64_t start = (i * in_size) / out_size;
  const int64_t end = ((i + 1) * in_size + out_size - 1) / out_size;
  return {start, end};
}

// The output bins whose adaptive bin holds input position `pos` (bins may overlap): bin i holds
// pos iff floor(i*in/out) <= pos < ceil((i+1)*in/out), i.e. i in
// [floor(pos*out/in), ceil((pos+1)*out/in)) -- the adaptive bin of pos with in and out swapped.
VTOK_HOST_DEVICE Bin bins_holding(int64_t pos, int64_t in_size, int64_t out_size) {
  return adaptive_bin(pos, out_size, in_size);
}

// Varlen: video b owns frames [cu_frames[b], cu_frames[b+1]) and output rows
// [cu_tokens[b], cu_tokens[b+1]); its first group's row in the packed lse.
VTOK_HOST_DEVICE int64_t varlen_group_offset(const int64_t* cu_tokens, int64_t video,
                                             int64_t num_key_tokens) {
  return cu_tokens[video] - video * num_key_tokens;
}

// Streaming softmax over scores s: running max and sum of exp(s - max). Accumulators
// weighted by exp(s - max) are multiplied by the returned rescale factor when max moves.
struct SoftmaxState {
  float max;
  float sum;
};

VTOK_HOST_DEVICE float exp_f32(float v) {
#if defined(__CUDA_ARCH__)
  return __expf(v);
#else
  return expf(v);
#endif
}

VTOK_HOST_DEVICE float log_f32(float v) {
#if defined(__CUDA_ARCH__)
  return __logf(v);
#else
  return logf(v);
#endif
}

VTOK_HOST_DEVICE SoftmaxState softmax_init() { return {-INFINITY, 0.0f}; }

// Adds score s; returns the factor by which accumulators must be rescaled before adding
// exp(s - state.max) * value. A -inf max (empty state) is handled without producing NaN.
VTOK_HOST_DEVICE float softmax_push(SoftmaxState& state, float s, float& weight) {
  const float new_max = s > state.max ? s : state.max;
  const float rescale = state.max == new_max ? 1.0f : exp_f32(state.max - new_max);
  weight = s == new_max ? 1.0f : exp_f32(s - new_max);
  state.sum = state.sum * rescale + weight;
  state.max = new_max;
  return rescale;
}

// Merges state b into a; returns the factors for a's and b's accumulators.
struct MergeScale {
  float a;
  float b;
};

VTOK_HOST_DEVICE MergeScale softmax_merge(SoftmaxState& a, const SoftmaxState& b) {
  const float new_max = a.max > b.max ? a.max : b.max;
  if (new_max == -INFINITY) return {1.0f, 1.0f};  // both empty
  const MergeScale scale = {a.max == new_max ? 1.0f : exp_f32(a.max - new_max),
                            b.max == new_max ? 1.0f : exp_f32(b.max - new_max)};
  a.sum = a.sum * scale.a + b.sum * scale.b;
  a.max = new_max;
  return scale;
}

// log-sum-exp of the scores, saved by the forward so the backward recomputes the softmax.
VTOK_HOST_DEVICE float softmax_lse(const SoftmaxState& state) {
  return state.max + log_f32(state.sum);
}

// The same streaming softmax in a kernel's accumulation type: float, or double for float64
// inputs, whose gradcheck needs every step of the forward in double.
template <typename Acc>
struct SoftmaxStateT {
  Acc max;
  Acc sum;
};

template <typename Acc>
struct MergeScaleT {
  Acc a;
  Acc b;
};

VTOK_HOST_DEVICE float exp_acc(float v) { return exp_f32(v); }
VTOK_HOST_DEVICE double exp_acc(double v) { return exp(v); }
VTOK_HOST_DEVICE float log_acc(float v) { return log_f32(v); }
VTOK_HOST_DEVICE double log_acc(double v) { return log(v); }

template <typename Acc>
VTOK_HOST_DEVICE SoftmaxStateT<Acc> softmax_init_t() {
  return {static_cast<Acc>(-INFINITY), static_cast<Acc>(0)};
}

template <typename Acc>
VTOK_HOST_DEVICE MergeScaleT<Acc> softmax_merge_t(SoftmaxStateT<Acc>& a,
                                                  const SoftmaxStateT<Acc>& b) {
  const Acc new_max = a.max > b.max ? a.max : b.max;
  if (new_max == static_cast<Acc>(-INFINITY)) return {Acc(1), Acc(1)};  // both empty
  const MergeScaleT<Acc> scale = {a.max == new_max ? Acc(1) : exp_acc(a.max - new_max),
                                  b.max == new_max ? Acc(1) : exp_acc(b.max - new_max)};
  a.sum = a.sum * scale.a + b.sum * scale.b;
  a.max = new_max;
  return scale;
}

template <typename Acc>
VTOK_HOST_DEVICE Acc softmax_lse_t(const SoftmaxStateT<Acc>& state) {
  return state.max + log_acc(state.sum);
}

}  // namespace vtok
