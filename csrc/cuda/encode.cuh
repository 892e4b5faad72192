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

// Resident blocks of 256 threads the forward's vector path is compiled for (the launch bounds'
// minimum, which caps registers at 64K / (256 x blocks)): 4 for mean and group sums (64
// registers), 3 for attention (80), so that the loads in flight, a key row and a frame row of
// 16-byte vectors per thread, cover the HBM latency. The scalar path holds 24 elements per row
// and keeps the compiler's choice.
VTOK_HOST_DEVICE constexpr int fwd_min_blocks(int vec, int mode) {
  return vec == 1 ? 1 : (mode == kAttnPool ? 3 : 4);
}

// Where each of a lane's kK vectors starts in a row (element offset from channel 0). A vector
// that is not the lane's to pool (past the plan's vecs_per_lane, past the segment, past C) is
// loaded from the segment's first vector instead (at()), which is always in bounds and which
// the block reads anyway: no load needs a branch, none adds traffic beyond L1, and what they
// load is zeroed or never stored. Such a vector is kept as ~c0 (negative), not as an offset
// and a flag: flags are predicates, which ptxas saves to the stack around the 64-bit divisions
// of the spatial backward.
template <int kK, int V>
struct LaneVectors {
  int32_t offset[kK];

  __device__ __forceinline__ LaneVectors(const RowPlan& plan, int64_t c0, int lane_in_row, int64_t channels) {
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      const int vi = k * plan.lanes + lane_in_row;
      const bool mine = k < plan.vecs_per_lane && vi < plan.seg_vecs && c0 + vi * V < channels;
      offset[k] = static_cast<int32_t>(mine ? c0 + vi * V : ~c0);
    }
  }
  __device__ __forceinline__ bool ok(int k) const { return offset[k] >= 0; }
  __device__ __forceinline__ int32_t at(int k) const { return offset[k] >= 0 ? offset[k] : ~offset[k]; }
};

// The query segment, scaled, in shared memory; zeros past it, where lanes score vectors that
// are not theirs (zeroed data, whose products must stay 0, not NaN from stale memory).
__device__ __forceinline__ void load_query(float* query_s, const EncodeParams& p, int64_t c0, int seg_elems) {
  const float scale = rsqrtf(static_cast<float>(p.channels / p.num_heads));
  for (int i = threadIdx.x; i < kSegMax; i += kThreads) query_s[i] = i < seg_elems ? p.query[c0 + i] * scale : 0.0f;
  __syncthreads();
}

// r_g for every group: mean or attention pooling of x[t] - x[key], or (kGroupSum, expand's
// backward) the plain sum of x[t] over the group's frames and patches.
template <typename T, int V, int kMode>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks(V, kMode))
    residual_fwd_kernel(const EncodeParams p, const RowPlan plan) {
  constexpr bool kAttn = kMode == kAttnPool;
  constexpr bool kKey = kMode != kGroupSum;
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
  if constexpr (kAttn) load_query(query_s, p, c0, plan.seg_vecs * V);
  const LaneVectors<kK, V> vecs(plan, c0, lane_in_row, p.channels);

  float acc[kK][V] = {};
  SoftmaxState state = softmax_init();
  // One loop over (pass of rows, frame of the group), frames fastest: a single loop body holds
  // every load of a step, key row and frame row, issued before the first use. (As two nested
  // loops, the compiler hoists the key row's loads out of the frame loop, which splits them
  // from the frame's.) The key row is thus loaded again for each frame of a group (a cache
  // hit); with one frame per token, the default, it is loaded once either way.
  int64_t base = 0, rank = bounds.first;
  while (base < p.num_patches) {
    // Rows past N load row N - 1 and count as zeros.
    const bool row_ok = base + slot < p.num_patches;
    const T* patch = x + (row_ok ? base + slot : p.num_patches - 1) * p.x_stride_n;
    const T* key_row = patch + video.key * p.x_stride_t;
    const T* row = patch + nonkey_frame(rank, video.key) * p.x_stride_t;
    Packed<T, V> key[kK], cur[kK];
#pragma unroll
    for (int k = 0; k < kK; ++k)
      if constexpr (kKey) key[k] = load_packed<T, V>(key_row + vecs.at(k));
#pragma unroll
    for (int k = 0; k < kK; ++k) cur[k] = load_packed_stream<T, V>(row + vecs.at(k));
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      const bool ok = row_ok && vecs.ok(k);
      cur[k] = zero_unless(ok, cur[k]);
      if constexpr (kKey) key[k] = zero_unless(ok, key[k]);
    }
    if constexpr (kAttn) {
      // d = x - key is recomputed from the packed rows for the accumulation rather than kept
      // as floats across the row's shuffles.
      float score = 0.0f;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        float xv[V], kv[V];
        unpack(cur[k], xv);
        unpack(key[k], kv);
#pragma unroll
        for (int e = 0; e < V; ++e) score += query_s[(k * lanes + lane_in_row) * V + e] * (xv[e] - kv[e]);
      }
      score = row_sum(score, lanes);  // all lanes of the warp take part, rows or not
      if (row_ok) {
        float weight;
        const float rescale = softmax_push(state, score, weight);
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          float xv[V], kv[V];
          unpack(cur[k], xv);
          unpack(key[k], kv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[k][e] = acc[k][e] * rescale + weight * (xv[e] - kv[e]);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        float xv[V];
        unpack(cur[k], xv);
        if constexpr (kKey) {
          float kv[V];
          unpack(key[k], kv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[k][e] += xv[e] - kv[e];
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) acc[k][e] += xv[e];
        }
      }
    }
    const bool pass_done = rank + 1 == bounds.last;
    rank = pass_done ? bounds.first : rank + 1;
    base += pass_done ? rows_per_pass : 0;
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
      if (vecs.ok(k))
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
      if (vecs.ok(k))
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
  T* out = static_cast<T*>(p.sequence) + (video.seq_row0 + p.num_key_tokens + group) * p.channels;
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    float r[V];
#pragma unroll
    for (int e = 0; e < V; ++e) r[e] = kMode == kGroupSum ? acc[k][e] : acc[k][e] * inv;
    store_vec_if<T, V>(vecs.ok(k), out + vecs.at(k), r);
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
// The launch bounds keep the vector path at 2 (attn) and 3 (mean) resident blocks: left to
// itself, ptxas gives the bf16 variants 161 and 100 registers (1 and 2 blocks), without spills
// either way.
template <typename T, int V, bool kAttn>
__global__ void __launch_bounds__(kThreads, V == 1 ? 1 : (kAttn ? 2 : 3))
    encode_bwd_kernel(const EncodeBwdParams bp, const RowPlan plan) {
  constexpr int kK = max_vecs_per_lane(V);
  // Rows of dq_s padded so that the partial row's reduction (consecutive threads on
  // consecutive channels: V rows of dq_s, 32 / V columns) hits 32 distinct banks.
  constexpr int kDqStride = kThreads + (V > 1 ? 32 / V : 0);
  const EncodeParams& p = bp.fwd;
  const int lanes = plan.lanes;
  const int lane_in_row = threadIdx.x % lanes;
  const int rows_per_block = kThreads / lanes;
  const int64_t seg = blockIdx.x;
  const int64_t tile = blockIdx.y;
  const int64_t b = blockIdx.z;
  // Rows past N load row N - 1 and store nothing.
  const bool row_ok = tile * rows_per_block + threadIdx.x / lanes < p.num_patches;
  const int64_t n = row_ok ? tile * rows_per_block + threadIdx.x / lanes : p.num_patches - 1;

  const VideoSpan video = video_span(p, b);
  const T* x = static_cast<const T*>(p.x) + video.x_offset;
  const T* grad_seq = static_cast<const T*>(bp.grad_sequence);
  T* grad_x = static_cast<T*>(bp.grad_x);
  const int64_t c0 = seg * plan.seg_vecs * V;
  const float* delta = bp.workspace + dq_partial_rows(p.batch, p.num_patches) * p.channels;

  __shared__ float query_s[kAttn ? kSegMax : 1];
  // Each thread's grad_query accumulator lives here, not in registers (which the loop needs):
  // element j of thread t at dq_s[j * kDqStride + t], so a warp's accesses hit 32 distinct banks.
  __shared__ float dq_s[kAttn ? kLaneElems * kDqStride : 1];
  if constexpr (kAttn) {
    for (int j = 0; j < kLaneElems; ++j) dq_s[j * kDqStride + threadIdx.x] = 0.0f;
    load_query(query_s, p, c0, plan.seg_vecs * V);
  }
  const LaneVectors<kK, V> vecs(plan, c0, lane_in_row, p.channels);

  float key_grad[kK][V] = {};
  // The key row, packed, is held across the frames (zeros where the lane has no data, so that
  // d = x - key is 0 there).
  Packed<T, V> key[kK];
  if constexpr (kAttn) {
    const T* key_row = x + video.key * p.x_stride_t + n * p.x_stride_n;
#pragma unroll
    for (int k = 0; k < kK; ++k) key[k] = load_packed<T, V>(key_row + vecs.at(k));
#pragma unroll
    for (int k = 0; k < kK; ++k) key[k] = zero_unless(row_ok && vecs.ok(k), key[k]);
  }

  // Frames are walked in the same order by every row of the block, so the shuffles below see
  // whole warps. One loop over the non-key frames, in increasing t, with the group carried
  // along (no 64-bit division per frame, and no inner loop out of which the compiler would
  // hoist the group's loads away from the frame's).
  int64_t group = 0, group_last = group_bounds(0, video.frames, p.frames_per_token).last;
  // Mean: 1 / (rows of a group), for the groups before the last (all as long as group 0) and
  // for the last, which may be shorter: two divisions here rather than one per frame (a call,
  // whose ABI costs registers in the loop).
  float inv_first = 0.0f, inv_last = 0.0f;
  if constexpr (!kAttn) {
    if (video.groups > 0) {
      const GroupBounds first = group_bounds(0, video.frames, p.frames_per_token);
      const GroupBounds last = group_bounds(video.groups - 1, video.frames, p.frames_per_token);
      inv_first = 1.0f / static_cast<float>((first.last - first.first) * p.num_patches);
      inv_last = 1.0f / static_cast<float>((last.last - last.first) * p.num_patches);
    }
  }
  for (int64_t rank = 0; rank < video.frames - 1; ++rank) {
    const bool next_group = rank == group_last;
    group += next_group ? 1 : 0;
    group_last = next_group ? group_bounds(group, video.frames, p.frames_per_token).last : group_last;
    const int64_t t = nonkey_frame(rank, video.key);
    const T* grad_r_row = grad_seq + (video.seq_row0 + p.num_key_tokens + group) * p.channels;
    T* out = grad_x + ((video.frame0 + t) * p.num_patches + n) * p.channels;
    if constexpr (kAttn) {
      // Every load of the frame before the first use: x, grad r, and the row's two scalars.
      const int64_t lse_index = (video.lse_row0 + group) * p.num_heads + seg;
      const T* row = x + t * p.x_stride_t + n * p.x_stride_n;
      const float lse = p.lse[lse_index];
      const float row_delta = delta[lse_index];
      Packed<T, V> cur[kK], grad_r[kK];
#pragma unroll
      for (int k = 0; k < kK; ++k) cur[k] = load_packed_stream<T, V>(row + vecs.at(k));
#pragma unroll
      for (int k = 0; k < kK; ++k) grad_r[k] = load_packed<T, V>(grad_r_row + vecs.at(k));
      float score = 0.0f, grad_dot = 0.0f;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        // grad r too: an inf at the clamped address must not enter grad_dot as inf * 0.
        cur[k] = zero_unless(row_ok && vecs.ok(k), cur[k]);
        grad_r[k] = zero_unless(row_ok && vecs.ok(k), grad_r[k]);
        float xv[V], kv[V], gv[V];
        unpack(cur[k], xv);
        unpack(key[k], kv);
        unpack(grad_r[k], gv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float d = xv[e] - kv[e];
          score += query_s[(k * lanes + lane_in_row) * V + e] * d;
          grad_dot += gv[e] * d;
        }
      }
      score = row_sum(score, lanes);  // every lane of the warp, rows past N included
      grad_dot = row_sum(grad_dot, lanes);
      if (row_ok) {
        const float prob = exp_f32(score - lse);
        const float coef = prob * (grad_dot - row_delta);
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          float xv[V], kv[V], dd[V];
          unpack(cur[k], xv);
          unpack(key[k], kv);
          unpack(grad_r[k], dd);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            dd[e] = prob * dd[e] + coef * query_s[(k * lanes + lane_in_row) * V + e];
            dq_s[(k * V + e) * kDqStride + threadIdx.x] += coef * (xv[e] - kv[e]);
            key_grad[k][e] -= dd[e];
          }
          store_vec_if<T, V>(vecs.ok(k), out + vecs.at(k), dd);
        }
      }
    } else {
      // Mean: the gradient of every residual is grad r / count; x is not read.
      const float inv_count = group_last == video.frames - 1 ? inv_last : inv_first;
      Packed<T, V> grad_r[kK];
#pragma unroll
      for (int k = 0; k < kK; ++k) grad_r[k] = load_packed<T, V>(grad_r_row + vecs.at(k));
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        float dd[V];
        unpack(grad_r[k], dd);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          dd[e] *= inv_count;
          key_grad[k][e] -= dd[e];
        }
        store_vec_if<T, V>(row_ok && vecs.ok(k), out + vecs.at(k), dd);
      }
    }
  }

  // The key tokens' own gradient: row n of the sequence, or every adaptive bin holding n
  // (bins may overlap), each spread uniformly over its area. Lanes without data add what
  // their clamped loads read to a key_grad that is never stored.
  const T* grad_keys = grad_seq + video.seq_row0 * p.channels;
  if (!p.spatial) {
    Packed<T, V> g[kK];
#pragma unroll
    for (int k = 0; k < kK; ++k) g[k] = load_packed<T, V>(grad_keys + n * p.channels + vecs.at(k));
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      float gv[V];
      unpack(g[k], gv);
#pragma unroll
      for (int e = 0; e < V; ++e) key_grad[k][e] += gv[e];
    }
  } else {
    // Scanning every bin, rather than only bins_holding(n)'s, keeps the V=1 variants spill-free
    // on sm_90a (140 registers; with bins_holding ptxas chose 128 and spilled: compile-check).
    // Not unrolled: a cold path, which unrolled would hold more 16-byte loads than the frame
    // loop (and pass for the hot loop in the sass-report model).
    const int64_t h = n / p.grid_w, w = n % p.grid_w;
#pragma unroll 1
    for (int64_t i = 0; i < p.out_h; ++i) {
      const Bin rows = adaptive_bin(i, p.grid_h, p.out_h);
      if (h < rows.start || h >= rows.end) continue;
#pragma unroll 1
      for (int64_t j = 0; j < p.out_w; ++j) {
        const Bin cols = adaptive_bin(j, p.grid_w, p.out_w);
        if (w < cols.start || w >= cols.end) continue;
        const float inv_area = 1.0f / static_cast<float>((rows.end - rows.start) * (cols.end - cols.start));
        Packed<T, V> g[kK];
#pragma unroll
        for (int k = 0; k < kK; ++k) g[k] = load_packed<T, V>(grad_keys + (i * p.out_w + j) * p.channels + vecs.at(k));
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          float gv[V];
          unpack(g[k], gv);
#pragma unroll
          for (int e = 0; e < V; ++e) key_grad[k][e] += gv[e] * inv_area;
        }
      }
    }
  }
  T* key_out = grad_x + ((video.frame0 + video.key) * p.num_patches + n) * p.channels;
#pragma unroll
  for (int k = 0; k < kK; ++k) store_vec_if<T, V>(row_ok && vecs.ok(k), key_out + vecs.at(k), key_grad[k]);

  if constexpr (kAttn) {
    // This block's partial grad_query row: channel c of the segment is the sum over the
    // block's rows (threads l + r * lanes, l the lane holding c), in a fixed order; the whole
    // block shares the channels, consecutive threads on consecutive channels.
    __syncthreads();
    float* partial = bp.workspace + (b * gridDim.y + tile) * p.channels + c0;
    for (int c = threadIdx.x; c < plan.seg_vecs * V && c0 + c < p.channels; c += kThreads) {
      const int vi = c / V, e = c % V;
      const int l = vi % lanes, k = vi / lanes;
      const float* column = dq_s + (k * V + e) * kDqStride + l;
      float sum = 0.0f;
      for (int r = 0; r < rows_per_block; ++r) sum += column[r * lanes];
      partial[c] = sum;
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
