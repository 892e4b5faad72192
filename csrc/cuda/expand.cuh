#pragma once
// Expand: per-frame features from key tokens and residual tokens, and its backward. The
// residual tokens' gradient is the group sum of grad_frames, computed by residual_fwd_kernel in
// kGroupSum mode (encode.cuh); the key tokens' gradient is the sum over all frames.
#include "common.cuh"

namespace vtok {
namespace cuda {

// frames[b, t, n] = key_tokens[b, n] + (t != k_b ? residual_tokens[b, group(t)] : 0).
// A flat grid-stride loop over output vectors: consecutive threads write consecutive vectors.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) expand_fwd_kernel(const ExpandParams p) {
  const int64_t vecs_per_row = p.channels / V;
  const int64_t total = p.batch * p.num_frames * p.num_patches * vecs_per_row;
  const T* keys = static_cast<const T*>(p.key_tokens);
  const T* residuals = static_cast<const T*>(p.residual_tokens);
  T* frames = static_cast<T*>(p.frames);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = (i % vecs_per_row) * V;
    int64_t rest = i / vecs_per_row;
    const int64_t n = rest % p.num_patches;
    rest /= p.num_patches;
    const int64_t t = rest % p.num_frames;
    const int64_t b = rest / p.num_frames;
    const int64_t key = p.key_index[b];
    float value[V];
    load_vec<T, V>(keys + b * p.key_stride_b + n * p.key_stride_n + c, value);
    if (t != key) {
      const int64_t group = group_of_frame(t, key, p.frames_per_token);
      float r[V];
      load_vec<T, V>(residuals + b * p.res_stride_b + group * p.res_stride_g + c, r);
#pragma unroll
      for (int e = 0; e < V; ++e) value[e] += r[e];
    }
    store_vec<T, V>(frames + i * V, value);
  }
}

// grad_key_tokens[b, n] = sum over every frame t of grad_frames[b, t, n], in increasing t.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) expand_grad_keys_kernel(const ExpandBwdParams p) {
  const int64_t vecs_per_row = p.channels / V;
  const int64_t total = p.batch * p.num_patches * vecs_per_row;
  const T* grad = static_cast<const T*>(p.grad_frames);
  T* out = static_cast<T*>(p.grad_key_tokens);
  const int64_t frame_elems = p.num_patches * p.channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = (i % vecs_per_row) * V;
    const int64_t row = i / vecs_per_row;  // b * N + n
    const int64_t n = row % p.num_patches;
    const int64_t b = row / p.num_patches;
    const T* src = grad + b * p.num_frames * frame_elems + n * p.channels + c;
    float sum[V] = {};
    for (int64_t t = 0; t < p.num_frames; ++t) {
      float v[V];
      load_vec<T, V>(src + t * frame_elems, v);
#pragma unroll
      for (int e = 0; e < V; ++e) sum[e] += v[e];
    }
    store_vec<T, V>(out + i * V, sum);
  }
}

}  // namespace cuda
}  // namespace vtok
