#pragma once
// Encode kernels (batched and varlen share them: cu_frames == nullptr means batched).
//
// Forward: one block per (channel segment, group, video) reduces the group's fpt * N residual
// rows; `lanes` threads share a row, kThreads / lanes rows are in flight, and the partial
// results of the rows are merged once at the end (warp shuffles, then shared memory in a fixed
// order), so the result does not depend on scheduling. Key tokens are a second, small kernel.
//
// Backward: one block per (channel segment, tile of patch rows, video) walks all frames of the
// video for its rows, accumulating the key frame's gradient on chip (registers) across them;
// every element of grad_x is written exactly once and grad_query goes through per-block partial
// rows reduced in a fixed order: no atomics, so the backward is deterministic.
#include "common.cuh"

namespace vtok {
namespace cuda {

enum ResidualMode : int { kMeanPool = 0, kAttnPool = 1, kGroupSum = 2 };

// r_g for every group: mean or attention pooling of x[t] - x[key], or (kGroupSum, expand's
// backward) the plain sum of x[t] over the group's frames and patches.
template <typename T, int V, int kMode>
__global__ void __launch_bounds__(kThreads)
    residual_fwd_kernel(const EncodeParams p, const RowPlan plan) {
  constexpr bool kAttn = kMode == kAttnPool;
  constexpr int kK = max_vecs_per_lane(V);
  const int lanes = plan.lanes;
  const int lane_in_row = threadIdx.x % lanes;
  const int slot = threadIdx.x / lanes;
  const int rows_per_pass = kThreads / lanes;
  const int64_t seg = blockIdx.x;
  const int64_t group = blockIdx.y;
  const int64_t b = blockIdx.z;

  const VideoSpan video = video_span(p, b);
  if (group >= video.groups) return;  // block-uniform: varlen videos with fewer groups
  const GroupBounds bounds = group_bounds(group, video.frames, p.frames_per_token);
  const T* x = static_cast<const T*>(p.x) + video.x_offset;
  const int64_t c0 = seg * plan.seg_vecs * V;

  __shared__ float query_s[kAttn ? kSegMax : 1];
  __shared__ float acc_s[kWarps][kSegMax];
  __shared__ SoftmaxState state_s[kWarps];
  if constexpr (kAttn) {
    const float scale = rsqrtf(static_cast<float>(p.channels / p.num_heads));
    for (int i = threadIdx.x; i < plan.seg_vecs * V; i += kThreads) query_s[i] = p.query[c0 + i] * scale;
    __syncthreads();
  }

  bool vec_ok[kK];
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    const int vi = k * lanes + lane_in_row;
    vec_ok[k] = k < plan.vecs_per_lane && vi < plan.seg_vecs && c0 + vi * V < p.channels;
  }

  float acc[kK][V] = {};
  SoftmaxState state = softmax_init();
  for (int64_t base = 0; base < p.num_patches; base += rows_per_pass) {
    const int64_t n = base + slot;
    const bool row_ok = n < p.num_patches;
    // The key row is loaded once per patch row and reused by the group's frames.
    float key[kK][V] = {};
    if constexpr (kMode != kGroupSum) {
#pragma unroll
      for (int k = 0; k < kK; ++k)
        if (row_ok && vec_ok[k])
          load_vec<T, V>(x + video.key * p.x_stride_t + n * p.x_stride_n + c0 + (k * lanes + lane_in_row) * V,
                         key[k]);
    }
    for (int64_t rank = bounds.first; rank < bounds.last; ++rank) {
      const int64_t t = nonkey_frame(rank, video.key);
      float d[kK][V] = {};
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        if (row_ok && vec_ok[k]) {
          load_vec_stream<T, V>(x + t * p.x_stride_t + n * p.x_stride_n + c0 + (k * lanes + lane_in_row) * V, d[k]);
#pragma unroll
          for (int e = 0; e < V; ++e) d[k][e] -= key[k][e];
        }
      }
      if constexpr (kAttn) {
        float score = 0.0f;
#pragma unroll
        for (int k = 0; k < kK; ++k)
          if (vec_ok[k])
#pragma unroll
            for (int e = 0; e < V; ++e) score += query_s[(k * lanes + lane_in_row) * V + e] * d[k][e];
        score = row_sum(score, lanes);  // all lanes of the warp take part, rows or not
        if (row_ok) {
          float weight;
          const float rescale = softmax_push(state, score, weight);
#pragma unroll
          for (int k = 0; k < kK; ++k)
#pragma unroll
            for (int e = 0; e < V; ++e) acc[k][e] = acc[k][e] * rescale + weight * d[k][e];
        }
      } else {
#pragma unroll
        for (int k = 0; k < kK; ++k)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[k][e] += d[k][e];
      }
    }
  }

  // Merge the rows of a warp (lanes at distance >= `lanes` hold the same channels), then the
  // warps, always in the same order.
  for (int offset = lanes; offset < 32; offset *= 2) {
    if constexpr (kAttn) {
      const SoftmaxState other = {__shfl_xor_sync(kFullMask, state.max, offset),
                                  __shfl_xor_sync(kFullMask, state.sum, offset)};
      const MergeScale scale = softmax_merge(state, other);
#pragma unroll
      for (int k = 0; k < kK; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e)
          acc[k][e] = acc[k][e] * scale.a + __shfl_xor_sync(kFullMask, acc[k][e], offset) * scale.b;
    } else {
#pragma unroll
      for (int k = 0; k < kK; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) acc[k][e] += __shfl_xor_sync(kFullMask, acc[k][e], offset);
    }
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane < lanes) {
#pragma unroll
    for (int k = 0; k < kK; ++k)
      if (vec_ok[k])
#pragma unroll
        for (int e = 0; e < V; ++e) acc_s[warp][(k * lanes + lane) * V + e] = acc[k][e];
    if (lane == 0) state_s[warp] = state;
  }
  __syncthreads();
  if (warp != 0 || lane >= lanes) return;
  for (int w = 1; w < kWarps; ++w) {
    MergeScale scale = {1.0f, 1.0f};
    if constexpr (kAttn) scale = softmax_merge(state, state_s[w]);
#pragma unroll
    for (int k = 0; k < kK; ++k)
      if (vec_ok[k])
#pragma unroll
        for (int e = 0; e < V; ++e)
          acc[k][e] = acc[k][e] * scale.a + acc_s[w][(k * lanes + lane) * V + e] * scale.b;
  }

  float denom = 1.0f;
  if constexpr (kMode == kMeanPool) denom = static_cast<float>((bounds.last - bounds.first) * p.num_patches);
  if constexpr (kAttn) denom = state.sum;
  float inv = 1.0f / denom;
  if constexpr (kAttn) {
    // An infinite maximum score (inf in x) makes softmax NaN in the reference (inf - inf); the
    // streaming softmax would instead average the infinite rows. Propagate NaN as it does.
    if (!(state.max > -INFINITY && state.max < INFINITY)) inv = __int_as_float(0x7fffffff);
  }
  T* out = static_cast<T*>(p.sequence) + (video.seq_row0 + p.num_key_tokens + group) * p.channels + c0;
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    if (!vec_ok[k]) continue;
    float r[V];
#pragma unroll
    for (int e = 0; e < V; ++e) r[e] = kMode == kGroupSum ? acc[k][e] : acc[k][e] * inv;
    store_vec<T, V>(out + (k * lanes + lane) * V, r);
  }
  if constexpr (kAttn) {
    if (lane == 0) p.lse[(video.lse_row0 + group) * p.num_heads + seg] = softmax_lse(state);
  }
}

// Key tokens: the key frame's N rows, or its H x W grid reduced with adaptive_avg_pool2d bins.
// grid: (x: chunks of S * C / V vectors, y: video).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) key_tokens_kernel(const EncodeParams p) {
  const int64_t b = blockIdx.y;
  const VideoSpan video = video_span(p, b);
  const T* key_frame = static_cast<const T*>(p.x) + video.x_offset + video.key * p.x_stride_t;
  T* out = static_cast<T*>(p.sequence) + video.seq_row0 * p.channels;
  // 32-bit index math (the launcher checks S * C / V < 2^31): a 64-bit division is a call
  // whose ABI costs spills.
  const unsigned vecs_per_row = static_cast<unsigned>(p.channels / V);
  const unsigned total = static_cast<unsigned>(p.num_key_tokens) * vecs_per_row;
  for (unsigned i = blockIdx.x * kThreads + threadIdx.x; i < total; i += gridDim.x * kThreads) {
    const int64_t token = i / vecs_per_row;
    const int64_t c = static_cast<int64_t>(i % vecs_per_row) * V;
    float value[V];
    if (!p.spatial) {
      load_vec<T, V>(key_frame + token * p.x_stride_n + c, value);
    } else {
      const Bin rows = adaptive_bin(token / p.out_w, p.grid_h, p.out_h);
      const Bin cols = adaptive_bin(token % p.out_w, p.grid_w, p.out_w);
#pragma unroll
      for (int e = 0; e < V; ++e) value[e] = 0.0f;
      for (int64_t h = rows.start; h < rows.end; ++h) {
        for (int64_t w = cols.start; w < cols.end; ++w) {
          float v[V];
          load_vec<T, V>(key_frame + (h * p.grid_w + w) * p.x_stride_n + c, v);
#pragma unroll
          for (int e = 0; e < V; ++e) value[e] += v[e];
        }
      }
      const float area = static_cast<float>((rows.end - rows.start) * (cols.end - cols.start));
#pragma unroll
      for (int e = 0; e < V; ++e) value[e] /= area;
    }
    store_vec<T, V>(out + token * p.channels + c, value);
  }
}

// <grad r_g,j, r_g,j> per group and head (the softmax backward's row term), written after the
// grad_query partial rows of the workspace in the layout of lse. grid: (group, video); one warp
// per head.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_delta_kernel(const EncodeBwdParams bp) {
  const EncodeParams& p = bp.fwd;
  const int64_t group = blockIdx.x;
  const int64_t b = blockIdx.y;
  const VideoSpan video = video_span(p, b);
  if (group >= video.groups) return;
  const int64_t head_dim = p.channels / p.num_heads;
  const int64_t row = (video.seq_row0 + p.num_key_tokens + group) * p.channels;
  const T* r = static_cast<const T*>(p.sequence) + row;
  const T* grad_r = static_cast<const T*>(bp.grad_sequence) + row;
  float* delta = bp.workspace + dq_partial_rows(p.batch, p.num_patches) * p.channels;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t head = warp; head < p.num_heads; head += kWarps) {
    float dot = 0.0f;
    for (int64_t c = head * head_dim + lane; c < (head + 1) * head_dim; c += 32)
      dot += to_float(r[c]) * to_float(grad_r[c]);
    dot = row_sum(dot, 32);
    if (lane == 0) delta[(video.lse_row0 + group) * p.num_heads + head] = dot;
  }
}

// grad_x for every frame of the video at this block's patch rows, and this block's partial
// grad_query row. grid: (segment, tile of kThreads / lanes patch rows, video).
template <typename T, int V, bool kAttn>
__global__ void __launch_bounds__(kThreads)
    encode_bwd_kernel(const EncodeBwdParams bp, const RowPlan plan) {
  constexpr int kK = max_vecs_per_lane(V);
  const EncodeParams& p = bp.fwd;
  const int lanes = plan.lanes;
  const int lane_in_row = threadIdx.x % lanes;
  const int rows_per_block = kThreads / lanes;
  const int64_t seg = blockIdx.x;
  const int64_t tile = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t n = tile * rows_per_block + threadIdx.x / lanes;
  const bool row_ok = n < p.num_patches;

  const VideoSpan video = video_span(p, b);
  const T* x = static_cast<const T*>(p.x) + video.x_offset;
  const T* grad_seq = static_cast<const T*>(bp.grad_sequence);
  T* grad_x = static_cast<T*>(bp.grad_x);
  const int64_t c0 = seg * plan.seg_vecs * V;
  const float* delta = bp.workspace + dq_partial_rows(p.batch, p.num_patches) * p.channels;

  __shared__ float query_s[kAttn ? kSegMax : 1];
  // Each thread's grad_query accumulator lives here, not in registers (which the loop needs):
  // element j of thread t at dq_s[j][t], so a warp's accesses hit 32 distinct banks.
  __shared__ float dq_s[kAttn ? kLaneElems : 1][kAttn ? kThreads : 1];
  if constexpr (kAttn) {
    const float scale = rsqrtf(static_cast<float>(p.channels / p.num_heads));
    for (int i = threadIdx.x; i < plan.seg_vecs * V; i += kThreads) query_s[i] = p.query[c0 + i] * scale;
    __syncthreads();
  }

  bool vec_ok[kK];
  // Channel of the k-th vector of this lane: recomputed where used (registers are the limit).
  const auto chan = [&](int k) { return c0 + static_cast<int64_t>((k * lanes + lane_in_row) * V); };
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    const int vi = k * lanes + lane_in_row;
    vec_ok[k] = k < plan.vecs_per_lane && vi < plan.seg_vecs && chan(k) < p.channels;
  }

  float key_grad[kK][V] = {};
  if constexpr (kAttn) {
    for (int j = 0; j < kLaneElems; ++j) dq_s[j][threadIdx.x] = 0.0f;
  }
  const T* key_row = x + video.key * p.x_stride_t + n * p.x_stride_n;

  // Frames are walked in the same order by every row of the block, so the shuffles below see
  // whole warps. To stay within 128 registers, the key row and grad r are re-read per frame
  // (L1 hits: this thread's key row and the block's shared grad r rows), not held.
  for (int64_t t = 0; t < video.frames; ++t) {
    if (t == video.key) continue;
    const int64_t group = group_of_frame(t, video.key, p.frames_per_token);
    const T* grad_r_row = grad_seq + (video.seq_row0 + p.num_key_tokens + group) * p.channels;
    T* out = grad_x + ((video.frame0 + t) * p.num_patches + n) * p.channels;
    if constexpr (kAttn) {
      float d[kK][V] = {};
      float score = 0.0f, grad_dot = 0.0f;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        if (!vec_ok[k] || !row_ok) continue;
        float key[V], grad_r[V];
        load_vec_stream<T, V>(x + t * p.x_stride_t + n * p.x_stride_n + chan(k), d[k]);
        load_vec<T, V>(key_row + chan(k), key);
        load_vec<T, V>(grad_r_row + chan(k), grad_r);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          d[k][e] -= key[e];
          score += query_s[(k * lanes + lane_in_row) * V + e] * d[k][e];
          grad_dot += grad_r[e] * d[k][e];
        }
      }
      score = row_sum(score, lanes);  // every lane of the warp, rows past N included
      grad_dot = row_sum(grad_dot, lanes);
      if (row_ok) {
        const int64_t lse_index = (video.lse_row0 + group) * p.num_heads + seg;
        const float prob = exp_f32(score - p.lse[lse_index]);
        const float coef = prob * (grad_dot - delta[lse_index]);
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          if (!vec_ok[k]) continue;
          float grad_r[V], dd[V];
          load_vec<T, V>(grad_r_row + chan(k), grad_r);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            dd[e] = prob * grad_r[e] + coef * query_s[(k * lanes + lane_in_row) * V + e];
            dq_s[k * V + e][threadIdx.x] += coef * d[k][e];
            key_grad[k][e] -= dd[e];
          }
          store_vec<T, V>(out + chan(k), dd);
        }
      }
    } else if (row_ok) {
      // Mean: the gradient of every residual is grad r / count; x is not read.
      const GroupBounds bounds = group_bounds(group, video.frames, p.frames_per_token);
      const float inv_count = 1.0f / static_cast<float>((bounds.last - bounds.first) * p.num_patches);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        if (!vec_ok[k]) continue;
        float dd[V];
        load_vec<T, V>(grad_r_row + chan(k), dd);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          dd[e] *= inv_count;
          key_grad[k][e] -= dd[e];
        }
        store_vec<T, V>(out + chan(k), dd);
      }
    }
  }

  if (row_ok) {
    // The key tokens' own gradient: row n of the sequence, or every adaptive bin holding n
    // (bins may overlap), each spread uniformly over its area.
    const T* grad_keys = grad_seq + video.seq_row0 * p.channels;
    if (!p.spatial) {
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        if (!vec_ok[k]) continue;
        float g[V];
        load_vec<T, V>(grad_keys + n * p.channels + chan(k), g);
#pragma unroll
        for (int e = 0; e < V; ++e) key_grad[k][e] += g[e];
      }
    } else {
      // Scanning every bin, rather than only bins_holding(n)'s, keeps the V=1 variants spill-free
      // on sm_90a (140 registers; with bins_holding ptxas chose 128 and spilled: compile-check).
      const int64_t h = n / p.grid_w, w = n % p.grid_w;
      for (int64_t i = 0; i < p.out_h; ++i) {
        const Bin rows = adaptive_bin(i, p.grid_h, p.out_h);
        if (h < rows.start || h >= rows.end) continue;
        for (int64_t j = 0; j < p.out_w; ++j) {
          const Bin cols = adaptive_bin(j, p.grid_w, p.out_w);
          if (w < cols.start || w >= cols.end) continue;
          const float inv_area = 1.0f / static_cast<float>((rows.end - rows.start) * (cols.end - cols.start));
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            if (!vec_ok[k]) continue;
            float g[V];
            load_vec<T, V>(grad_keys + (i * p.out_w + j) * p.channels + chan(k), g);
#pragma unroll
            for (int e = 0; e < V; ++e) key_grad[k][e] += g[e] * inv_area;
          }
        }
      }
    }
    T* out = grad_x + ((video.frame0 + video.key) * p.num_patches + n) * p.channels;
#pragma unroll
    for (int k = 0; k < kK; ++k)
      if (vec_ok[k]) store_vec<T, V>(out + chan(k), key_grad[k]);
  }

  if constexpr (kAttn) {
    // This block's partial grad_query row: the sum over its rows (threads lane_in_row + r *
    // lanes), in a fixed order.
    __syncthreads();
    if (threadIdx.x < lanes) {
      float* partial = bp.workspace + (b * gridDim.y + tile) * p.channels;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        if (!vec_ok[k]) continue;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          float sum = 0.0f;
          for (int r = 0; r < rows_per_block; ++r) sum += dq_s[k * V + e][r * lanes + threadIdx.x];
          partial[chan(k) + e] = sum;
        }
      }
    }
  }
}

// grad_query[c] = scale * sum of the partial rows, in a fixed order. (A template, like every
// kernel here, so that each translation unit including this header may instantiate it.)
template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    grad_query_reduce_kernel(const EncodeBwdParams bp, const int64_t num_partials) {
  const EncodeParams& p = bp.fwd;
  const int64_t c = blockIdx.x * static_cast<int64_t>(kBlock) + threadIdx.x;
  if (c >= p.channels) return;
  float sum = 0.0f;
  for (int64_t i = 0; i < num_partials; ++i) sum += bp.workspace[i * p.channels + c];
  bp.grad_query[c] = sum * rsqrtf(static_cast<float>(p.channels / p.num_heads));
}

}  // namespace cuda
}  // namespace vtok
