#pragma once
// Expand: per-frame features from key tokens and residual tokens, and its backward. The
// residual tokens' gradient is the group sum of grad_frames, computed by residual_fwd_kernel in
// kGroupSum mode (encode.cuh); the key tokens' gradient is the sum over all frames.
//
// Both kernels below work on items (b, n, c): vector c of key token n of video b, each item
// going through every frame of its video. Items run over grid axis x in a grid-stride loop, as
// consecutive threads on consecutive vectors. A thread splits its first item and the grid's
// stride into (b, n, c) once, in 32 bits, and then carries its position from item to item by
// mixed-radix addition, and the forward its frame and group from frame to frame: no vector pays
// for a 64-bit division, which nvcc emits as an out-of-line call of about 20 instructions on its
// fast path. Offsets stay 64-bit: a video, a frame, or a key token row times its stride can pass
// 2^31 elements.
#include "common.cuh"

namespace vtok {
namespace cuda {

// Item position: video b, key token n, vector column c of a token's `cols` vectors.
struct ItemPos {
  int64_t b;
  int64_t n;
  int64_t c;
};

__device__ __forceinline__ unsigned clamp_u32(int64_t v) {
  return v < 0xffffffffll ? static_cast<unsigned>(v) : 0xffffffffu;
}

// `index` < 2^32 - 1: the launchers give axis x at most 4096 blocks (flat_blocks), so a
// thread's first index and the grid's stride both fit. A dimension of 2^32 - 1 or more is
// larger than any index, which then lies at its start, as dividing by the clamped size gives.
__device__ __forceinline__ ItemPos split_item(unsigned index, int64_t cols, int64_t patches) {
  const unsigned width = clamp_u32(cols);
  const unsigned row = index / width;
  const unsigned height = clamp_u32(patches);
  return {static_cast<int64_t>(row / height), static_cast<int64_t>(row % height),
          static_cast<int64_t>(index % width)};
}

// pos += step in the mixed radix (b, n < patches, c < cols): digits of both are below their
// radix, so one carry per digit suffices.
__device__ __forceinline__ void advance_item(ItemPos& pos, const ItemPos& step, int64_t cols, int64_t patches) {
  pos.c += step.c;
  pos.n += step.n;
  pos.b += step.b;
  if (pos.c >= cols) {
    pos.c -= cols;
    ++pos.n;
  }
  if (pos.n >= patches) {
    pos.n -= patches;
    ++pos.b;
  }
}

// V floats as stored: one 16-byte vector or one element, converted once and stored many times.
template <typename T, int V>
__device__ __forceinline__ Packed<T, V> pack_vec(const float (&in)[V]) {
  if constexpr (V == 1) {
    return {from_float<T>(in[0])};
  } else {
    return {pack16<T, V>(in)};
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_packed(T* ptr, const Packed<T, V>& v) {
  if constexpr (V == 1) {
    *ptr = v.value;
  } else {
    store16(ptr, v.bits);
  }
}

// frames[b, t, n] = key_tokens[b, n] + (t != k_b ? residual_tokens[b, group(t)] : 0).
// An item loads its key vector once and writes it to every frame: the key frame as is, then the
// other frames in increasing t, each group's key + r_g computed once for all of its frames. A
// warp's store instruction writes 32 consecutive vectors of a frame. Grid axis z cuts the groups
// into contiguous chunks (the launcher uses it only for G < 2^31, which keeps the chunk size a
// 32-bit division, once per thread). Every element is written exactly once.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) expand_fwd_kernel(const ExpandParams p) {
  const int64_t cols = p.channels / V;
  const int64_t frame_elems = p.num_patches * p.channels;
  const int64_t video_elems = p.num_frames * frame_elems;
  const int64_t fpt = p.frames_per_token;
  const int64_t last_rank = p.num_frames - 1;  // non-key frames have ranks [0, T - 1)
  int64_t g0 = 0, g1 = p.num_groups;
  if (gridDim.z > 1) {
    const unsigned per_chunk = (static_cast<unsigned>(p.num_groups) + gridDim.z - 1) / gridDim.z;
    const int64_t begin = static_cast<int64_t>(per_chunk) * blockIdx.z;
    g0 = begin < p.num_groups ? begin : p.num_groups;
    g1 = begin + per_chunk < p.num_groups ? begin + per_chunk : p.num_groups;
  }
  // Only the last group may be short: g * fpt < T - 1 for every group g < G.
  const int64_t rank0 = g0 < p.num_groups ? g0 * fpt : last_rank;
  const int64_t ranks = (g1 < p.num_groups ? g1 * fpt : last_rank) - rank0;
  const T* keys = static_cast<const T*>(p.key_tokens);
  const T* residuals = static_cast<const T*>(p.residual_tokens) + g0 * p.res_stride_g;
  T* frames = static_cast<T*>(p.frames);
  const ItemPos step = split_item(gridDim.x * kThreads, cols, p.num_patches);
  for (ItemPos pos = split_item(blockIdx.x * kThreads + threadIdx.x, cols, p.num_patches); pos.b < p.batch;
       advance_item(pos, step, cols, p.num_patches)) {
    const int64_t key = p.key_index[pos.b];
    const int64_t c = pos.c * V;
    float k[V];
    load_vec<T, V>(keys + pos.b * p.key_stride_b + pos.n * p.key_stride_n + c, k);
    T* const row = frames + pos.b * video_elems + pos.n * p.channels + c;  // in frame 0
    if (blockIdx.z == 0) store_packed<T, V>(row + key * frame_elems, pack_vec<T, V>(k));
    const T* r_ptr = residuals + pos.b * p.res_stride_b + c;
    // Frames in rank order from rank0's, the key frame stepped over where the walk reaches it.
    const int64_t step_onto_key = key - rank0;
    T* dst = row + (step_onto_key >= 0 ? rank0 : rank0 + 1) * frame_elems;
    Packed<T, V> value;
    int64_t left_in_group = 0;
#pragma unroll 1
    for (int64_t i = 0; i < ranks; ++i) {
      if (left_in_group == 0) {
        float r[V];
        load_vec<T, V>(r_ptr, r);
        r_ptr += p.res_stride_g;
#pragma unroll
        for (int e = 0; e < V; ++e) r[e] = k[e] + r[e];
        value = pack_vec<T, V>(r);
        left_in_group = fpt;
      }
      --left_in_group;
      if (i == step_onto_key) dst += frame_elems;
      store_packed<T, V>(dst, value);
      dst += frame_elems;
    }
  }
}

// grad_key_tokens[b, n] = sum over every frame t of grad_frames[b, t, n], in increasing t.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) expand_grad_keys_kernel(const ExpandBwdParams p) {
  const int64_t cols = p.channels / V;
  const int64_t frame_elems = p.num_patches * p.channels;
  const int64_t video_elems = p.num_frames * frame_elems;
  const T* grad = static_cast<const T*>(p.grad_frames);
  T* out = static_cast<T*>(p.grad_key_tokens);
  const ItemPos step = split_item(gridDim.x * kThreads, cols, p.num_patches);
  for (ItemPos pos = split_item(blockIdx.x * kThreads + threadIdx.x, cols, p.num_patches); pos.b < p.batch;
       advance_item(pos, step, cols, p.num_patches)) {
    const int64_t row = pos.n * p.channels + pos.c * V;
    const T* src = grad + pos.b * video_elems + row;
    float sum[V] = {};
    for (int64_t t = 0; t < p.num_frames; ++t, src += frame_elems) {
      float v[V];
      load_vec<T, V>(src, v);
#pragma unroll
      for (int e = 0; e < V; ++e) sum[e] += v[e];
    }
    store_vec<T, V>(out + pos.b * frame_elems + row, sum);
  }
}

}  // namespace cuda
}  // namespace vtok
