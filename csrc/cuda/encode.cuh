#pragma once
// Encode kernels (batched and varlen share them: cu_frames == nullptr means batched).
//
// Forward: on 16-byte rows a block holds one tile of patch rows of one channel segment
// (`lanes` threads share a row, kThreads / lanes rows per tile) for several consecutive groups
// of one video: each thread loads its key row once, keeps it in registers and streams the
// frames of its groups past it. At the end of each group the rows of the block are merged in a
// fixed order (warp shuffles, then shared memory); the tiles of a frame leave one partial row
// per group in a workspace, which a second launch merges in tile order (kMergeSplits). On the
// scalar path, and for expand's group sum, a block walks every tile of one group instead and
// writes the token itself. No atomics: the result does not depend on scheduling. Key tokens
// are a separate, small kernel. A second forward on 16-byte rows (warp_pool_kernel, launch.h
// FwdDesign::kWarps) gives each warp a split of the rows for a chunk of groups instead and
// merges its rows once per group, not once per frame; its partial rows take the same merge.
//
// Backward: one block per (channel segment, tile of patch rows, video) walks all frames of the
// video for its rows, accumulating the key frame's gradient on chip (registers) across them;
// every element of grad_x is written exactly once and grad_query goes through per-block partial
// rows reduced in a fixed order: no atomics, so the backward is deterministic.
#include "common.cuh"

namespace vtok {
namespace cuda {

enum ResidualMode : int { kMeanPool = 0, kAttnPool = 1, kGroupSum = 2, kMergeSplits = 3 };

// Vectors per lane a residual_fwd_kernel is compiled for (its kK). Attention on 16-byte rows has
// one instantiation per count its plan may choose, 1 to fwd_vecs_per_lane(V, true), and is
// launched with the plan's own (a head of 64 bf16 channels on 4 lanes: 2, not 3 of which one
// would load, unpack, score and merge zeros); this is the widest. Mean pooling there holds
// kFwdVecs (its plan takes fewer only for segments of one vector); the scalar path and the group
// sum max_vecs_per_lane(V); the merge of partial rows holds none.
VTOK_HOST_DEVICE constexpr int residual_vecs_per_lane(int vec, int mode) {
  return mode == kMergeSplits ? 0
         : vec > 1 && mode != kGroupSum ? fwd_vecs_per_lane(vec, mode == kAttnPool)
                                        : max_vecs_per_lane(vec);
}

// Resident blocks of 256 threads the forward's vector path is compiled for (the launch bounds'
// minimum, which caps registers at 64K / (256 x blocks)): 4 for mean pooling, group sums and
// the merge of partial rows (64 registers), 3 for attention (80), so that the loads in flight, a
// key row and two frame rows of 16-byte vectors per thread, cover the HBM latency. The encode
// launcher sizes its grid with them. The scalar path holds 24 elements per row and keeps the
// compiler's choice.
VTOK_HOST_DEVICE constexpr int fwd_min_blocks(int vec, int mode) {
  return vec == 1 ? 1 : (mode == kAttnPool ? 3 : 4);
}

VTOK_HOST_DEVICE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// Frame ranks within a video: 32-bit in the encode forward's frame loop, where registers are
// scarce (its launcher refuses videos of 2^31 frames or more), else 64-bit.
template <bool kNarrow>
struct RankInt {
  using type = int64_t;
};
template <>
struct RankInt<true> {
  using type = int32_t;
};

// Residual tokens of the longest video: the workspace's groups per video.
VTOK_HOST_DEVICE int64_t encode_max_groups(const EncodeParams& p) {
  return p.cu_frames != nullptr ? num_groups(p.num_frames, p.frames_per_token) : p.num_groups;
}

// The forward's workspace (vtok/encode_split.h): the partial sums of (video b, group g, split s)
// are row (b x groups + g) x splits + s of C floats; for attn the softmax states of those rows
// follow, (max, sum) per head.
__device__ __forceinline__ int64_t split_row(const EncodeParams& p, const RowPlan& plan, int64_t b, int64_t group,
                                             int64_t split) {
  return (b * encode_max_groups(p) + group) * plan.splits + split;
}

__device__ __forceinline__ float* split_states(const EncodeParams& p, const RowPlan& plan) {
  return p.workspace + p.batch * encode_max_groups(p) * plan.splits * p.channels;
}

// d = x - key, from one 16-byte vector of a frame row and of the key row (unpacked to float).
template <typename T, int V>
__device__ __forceinline__ void packed_residual(const Packed<T, V>& x, const Packed<T, V>& key, float (&d)[V]) {
  float kv[V];
  unpack(x, d);
  unpack(key, kv);
#pragma unroll
  for (int e = 0; e < V; ++e) d[e] -= kv[e];
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
  // at() of every vector, and ok() as bit k of the result: what a forward keeps across its
  // frame loop (kK offsets and one mask, rather than kK signed offsets to decode each frame).
  __device__ __forceinline__ unsigned split(int32_t (&at_out)[kK]) const {
    unsigned ok_bits = 0;
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      at_out[k] = at(k);
      ok_bits |= (ok(k) ? 1u : 0u) << k;
    }
    return ok_bits;
  }
};

// Where the encode forward's per-group merge writes (pool_tiles): the block's first group's
// partial row and softmax state (kOneTile) and the strides to the next group's, the channels
// merged (the segment, cut at C) and log2 of the plan's lanes.
struct MergeOut {
  int64_t rows = 0;    // element offsets into p.workspace (a pointer read from shared memory
  int64_t states = 0;  // would make its stores generic, not global)
  int64_t rows_stride = 0;
  int64_t states_stride = 0;
  int elems = 0;
  int lane_bits = 0;
};

// The query segment, scaled, in shared memory; zeros past it, where lanes score vectors that
// are not theirs (zeroed data, whose products must stay 0, not NaN from stale memory).
__device__ __forceinline__ void load_query(float* query_s, const EncodeParams& p, int64_t c0, int seg_elems) {
  const float scale = rsqrtf(static_cast<float>(p.channels / p.num_heads));
  for (int i = threadIdx.x; i < kSegMax; i += kThreads) query_s[i] = i < seg_elems ? p.query[c0 + i] * scale : 0.0f;
  __syncthreads();
}

// The same, laid out by lane: the kK vectors of lane l at (l x kK + k) x V, so that a thread
// reads its query at one base address plus constants (in the forward's frame loop, one address
// register rather than one per vector).
template <int kK, int V>
__device__ __forceinline__ void load_query_by_lane(float* query_s, const EncodeParams& p, int64_t c0, int seg_elems,
                                                   int lanes) {
  const float scale = rsqrtf(static_cast<float>(p.channels / p.num_heads));
  for (int i = threadIdx.x; i < kSegMax; i += kThreads) {
    const int l = i / (kK * V), k = i / V % kK, e = i % V;
    const int j = (k * lanes + l) * V + e;
    query_s[i] = l < lanes && j < seg_elems ? p.query[c0 + j] * scale : 0.0f;
  }
  __syncthreads();
}

// 1 / the rows a group averages (mean), or 1 / the softmax denominator (attn). An infinite
// maximum score (inf in x) makes softmax NaN in the reference (inf - inf); the streaming
// softmax would instead average the infinite rows. Propagate NaN as it does.
__device__ __forceinline__ float residual_scale(const EncodeParams& p, const GroupBounds& bounds, bool attn,
                                                const SoftmaxState& state) {
  if (!attn) return 1.0f / static_cast<float>((bounds.last - bounds.first) * p.num_patches);
  if (!(state.max > -INFINITY && state.max < INFINITY)) return __int_as_float(0x7fffffff);
  return 1.0f / state.sum;
}

// The forward's sums and maxima over a warp's lanes with a plan's `lanes` unknown at compile
// time. Within a row (sum_in_row, every frame: the score), offsets lanes / 2 down to 1 as in
// row_sum, counted unsigned (a signed halving costs two instructions per round; a jump into a
// straight run of shuffles, as below, made the frame loop of 24 channels per lane spill).
// Across the rows (across_rows, every group: the softmax state), offsets lanes up to 16: one
// jump into a straight run of shuffles rather than a loop, whose counter, test and branch cost
// more than the shuffle they guard.
__device__ __forceinline__ float sum_in_row(float v, int lanes) {
  for (unsigned offset = static_cast<unsigned>(lanes) >> 1; offset != 0; offset >>= 1)
    v += __shfl_xor_sync(kFullMask, v, static_cast<int>(offset));
  return v;
}

template <bool kMax>
__device__ __forceinline__ float across_rows(float v, int lanes) {
  auto op = [](float a, float b) { return kMax ? fmaxf(a, b) : a + b; };
  switch (lanes) {
    case 1: v = op(v, __shfl_xor_sync(kFullMask, v, 1)); [[fallthrough]];
    case 2: v = op(v, __shfl_xor_sync(kFullMask, v, 2)); [[fallthrough]];
    case 4: v = op(v, __shfl_xor_sync(kFullMask, v, 4)); [[fallthrough]];
    case 8: v = op(v, __shfl_xor_sync(kFullMask, v, 8)); [[fallthrough]];
    case 16: v = op(v, __shfl_xor_sync(kFullMask, v, 16)); [[fallthrough]];
    default: break;
  }
  return v;
}

// The sums over the rows of a warp of the N values each lane holds, left scattered over the lanes
// (a reduce-scatter): lanes at distances lanes, 2 lanes, ..., 16 hold the same channels of
// different rows. In the round at distance 16 >> kRound a lane keeps half of its values (the upper
// half where its bit of that distance is set), adds its partner's copy of that half and passes the
// other half on, so that 16 values over 8 rows take 8 + 4 + 2 shuffles rather than 3 x 16. A count
// that no longer halves is summed whole (both partners then hold the same sums, bit for bit:
// a + b == b + a). kScaled: the values are first multiplied by `scale` (the row's softmax
// rescale), folded into the first round. The lane's sums, its flat values first .. first + N - 1,
// go to `lane_s` + first (the lane's values in the warp's row in shared memory, by lane: see
// lane_major), where every channel of the segment then has exactly one writer, or several
// writing the same bits. One base address and constant offsets: per-value addresses, hoisted out
// of the frame loop for every round count a plan may have, spilled.
template <int kRound, bool kScaled, int N>
__device__ __forceinline__ void sum_rows_scattered(const float (&values)[N], float scale, int lanes, int first,
                                                   float* lane_s) {
  constexpr int kDistance = 16 >> kRound;
  if (kDistance < lanes) {  // every row summed (kRound 5: always)
    float* out = lane_s + first;
#pragma unroll
    for (int t = 0; t < N; ++t) out[t] = kScaled ? values[t] * scale : values[t];
    return;
  }
  if constexpr (kRound < 5) {
    const bool upper = (threadIdx.x & kDistance) != 0;
    if constexpr (N % 2 == 0) {
      constexpr int kHalf = N / 2;
      float kept[kHalf];
#pragma unroll
      for (int t = 0; t < kHalf; ++t) {
        const float keep = upper ? values[t + kHalf] : values[t];
        const float pass = upper ? values[t] : values[t + kHalf];
        const float other = __shfl_xor_sync(kFullMask, kScaled ? pass * scale : pass, kDistance);
        kept[t] = kScaled ? fmaf(keep, scale, other) : keep + other;
      }
      sum_rows_scattered<kRound + 1, false>(kept, 1.0f, lanes, first + (upper ? kHalf : 0), lane_s);
    } else {
      float sums[N];
#pragma unroll
      for (int t = 0; t < N; ++t) {
        // Not contracted into an FMA with the sum below: both partners must add the same products.
        const float mine = kScaled ? __fmul_rn(values[t], scale) : values[t];
        sums[t] = mine + __shfl_xor_sync(kFullMask, mine, kDistance);
      }
      sum_rows_scattered<kRound + 1, false>(sums, 1.0f, lanes, first, lane_s);
    }
  }
}

// Where channel i of a segment lies in a warp's row in shared memory: the kElems values of lane
// l (its vectors k = 0 .. kK - 1, element e at k x V + e) at l x kElems, so that a lane stores
// its sums at one base address (sum_rows_scattered). lane_bits: log2 of the plan's lanes.
template <int kK, int V>
__device__ __forceinline__ int lane_major(int i, int lane_bits) {
  // Unsigned, with lanes = 2^lane_bits and V a power of two: shifts and masks, not divisions.
  const unsigned vi = static_cast<unsigned>(i) / V;
  const unsigned l = vi & ((1u << lane_bits) - 1u), k = vi >> lane_bits;
  return static_cast<int>((l * kK + k) * V + static_cast<unsigned>(i) % V);
}

// r_g for every group: mean or attention pooling of x[t] - x[key], or (kGroupSum, expand's
// backward) the plain sum of x[t] over the group's frames and patches. grid: (segment + split x
// segments, chunk of groups_per_block groups, video). kK: the vectors a lane holds
// (residual_vecs_per_lane).
template <typename T, int V, int kMode, int kK>
__device__ __forceinline__ void pool_tiles(const EncodeParams& p, const RowPlan& plan) {
  constexpr bool kAttn = kMode == kAttnPool;
  constexpr bool kKey = kMode != kGroupSum;
  // A block owns one tile and a chunk of groups (the encode forward's vector path: the plan's
  // splits are the frame's tiles), or every tile of one group (the scalar path, and expand's
  // group sum, whose launcher keeps the plan's default of one split and one group per block).
  constexpr bool kOneTile = V > 1 && kMode != kGroupSum;
  // A thread pools one patch row per frame. With one frame per token the merge of a group's
  // rows runs every frame and takes about two thirds of the frame loop's instructions (sm_90a,
  // bf16 attention, head 64: 308 per frame and warp, of which about 85 load and pool the row).
  // Two rows per thread would halve that per byte, but need about 85 registers for mean pooling
  // and 115 for attention (ptxas, unbounded), past the 64 and 80 of the resident blocks these
  // kernels are built for (at those bounds they spill). Cutting the merge takes warps that own
  // a run of rows each and keep several groups' sums across it, as the Triton forwards do.
  // Mean pooling in one tile takes the frames' rows two at a time, with kFwdVecs vectors per
  // lane; attention (whose row needs more registers: the query, the softmax state) one at a
  // time, with exactly the plan's vectors per lane.
  constexpr bool kPair = kOneTile && kMode == kMeanPool;
  constexpr int kElems = kK * V;
  static_assert(kK >= 1 && kElems <= kLaneElems, "a lane holds at most kLaneElems channels of a row");
  // A row's vectors, packed; declared here rather than in the lambdas below (g++ 12, which
  // builds the tests' host emulator, fails on the template inside them).
  using Row = Packed<T, V>[kK];
  const int lanes = plan.lanes;
  const int lane_in_row = threadIdx.x % lanes;
  const int slot = threadIdx.x / lanes;
  const int rows_per_tile = kThreads / lanes;
  const int64_t seg = blockIdx.x % plan.num_segments;
  const int64_t split = blockIdx.x / plan.num_segments;
  const int64_t b = blockIdx.z;

  const VideoSpan video = video_span(p, b);
  const int64_t group_begin = static_cast<int64_t>(blockIdx.y) * plan.groups_per_block;
  if (group_begin >= video.groups) return;  // block-uniform: varlen videos with fewer groups
  const int64_t group_end = min_i64(group_begin + plan.groups_per_block, video.groups);
  // The block's frames are the non-key ranks of its groups, consecutive.
  using Rank = typename RankInt<kOneTile>::type;
  const Rank frames = static_cast<Rank>(video.frames);
  const Rank key_frame = static_cast<Rank>(video.key);
  const Rank fpt = static_cast<Rank>(min_i64(p.frames_per_token, video.frames));
  const Rank rank_begin = static_cast<Rank>(group_begin * p.frames_per_token);
  const Rank rank_end = static_cast<Rank>(min_i64(group_end * p.frames_per_token, video.frames - 1));
  const T* x = static_cast<const T*>(p.x) + video.x_offset;
  const int64_t c0 = seg * plan.seg_vecs * V;
  const int seg_elems = plan.seg_vecs * V;

  __shared__ float query_s[kAttn ? kSegMax : 1];
  // Each warp's row of the segment at the end of a group (row_stride: the span of a row's
  // vectors over its lanes, past seg_elems where lanes x kK vectors overshoot the segment). Two
  // buffers, alternating by group, where they fit, so that the next group's rows need not wait
  // for the merge of this one's: one barrier per group instead of two.
  __shared__ float rows_s[kWarps * kSegMax];
  __shared__ SoftmaxState states_s[2][kWarps];
  if constexpr (kAttn) load_query_by_lane<kK, V>(query_s, p, c0, seg_elems, lanes);
  // The lane's vectors, once per block: where each is loaded from (clamped, LaneVectors::at)
  // and, bit k, whether vector k is the lane's to pool.
  int32_t lane_at[kK];
  const unsigned lane_ok = LaneVectors<kK, V>(plan, c0, lane_in_row, p.channels).split(lane_at);
  const float* query_lane = query_s + lane_in_row * kElems;
  const int row_stride = lanes * kElems;
  const bool two_buffers = 2 * row_stride <= kSegMax;
  // What the merge of a group needs, for the block's first group, and how far the next group's
  // outputs lie: computed once per block and kept in shared memory, read after the merge's
  // barrier (not per group, nor in registers across the frame loop). kOneTile: this tile's
  // partial rows (split_row) and softmax states in the workspace.
  __shared__ MergeOut merge_out;
  if (threadIdx.x == 0) {
    MergeOut out;
    out.elems = static_cast<int>(min_i64(seg_elems, p.channels - c0));
    out.lane_bits = 0;
    while ((1 << out.lane_bits) < lanes) ++out.lane_bits;
    if constexpr (kOneTile) {
      const int64_t row = split_row(p, plan, b, group_begin, split);
      out.rows = row * p.channels + c0;
      out.rows_stride = static_cast<int64_t>(plan.splits) * p.channels;
      if constexpr (kAttn) {
        out.states = (split_states(p, plan) - p.workspace) + (row * p.num_heads + seg) * 2;
        out.states_stride = static_cast<int64_t>(plan.splits) * p.num_heads * 2;
      }
    }
    merge_out = out;
  }

  // The channels of the lane's vectors, flat: value k x V + e is element e of vector k.
  float acc[kElems] = {};
  SoftmaxState state = softmax_init();
  // kFresh: the next frame is the first of a group, whose weight is 1 at its own maximum: it
  // sets acc and state rather than rescaling zeros (with one frame per token, every frame), and
  // (attention) takes its score from d already in acc. Not for attention rows of 24 channels
  // per lane (3 vectors of a 16-bit type), whose second code path for that frame no longer fits
  // the 80 registers beside acc and the key row (4 bytes spilled on sm_90a, 8 on sm_80).
  constexpr bool kFresh = kOneTile && !(kAttn && kElems > 16);
  bool fresh = true;

  // The group's rows merged: those of a warp (sum_rows_scattered), then the warps, always in the
  // same order; then this tile's partial row (kOneTile: merged by a second launch, even for a
  // frame of one tile), or the token. Every thread of the block calls it.
  auto finish_group = [&](int64_t group) {
    const int warp = threadIdx.x / 32;
    const int buffer = two_buffers ? static_cast<int>(group & 1) : 0;
    float* rows = rows_s + buffer * kWarps * row_stride;
    float scale = 1.0f;
    if constexpr (kAttn) {
      // The rows' softmax states first, to the warp's maximum: each row's values are then
      // rescaled once (in the first round of the scatter) and added plainly. fmaxf, unlike a
      // comparison, gives both partners the same maximum when one is NaN (the row's own rescale
      // then carries the NaN).
      const float max = across_rows<true>(state.max, lanes);
      scale = state.max == max ? 1.0f : exp_f32(state.max - max);
      const float sum = across_rows<false>(state.sum * scale, lanes);
      if (threadIdx.x % 32 == 0) states_s[buffer][warp] = {max, sum};
    }
    sum_rows_scattered<0, kAttn>(acc, scale, lanes, 0, rows + warp * row_stride + lane_in_row * kElems);
    __syncthreads();
    const MergeOut out = merge_out;
    // The warps' softmax states, to the block's maximum: a factor per warp, computed once by
    // each thread that merges channels.
    SoftmaxState merged = {0.0f, 0.0f};
    float factor[kWarps];
    if (kAttn && static_cast<int>(threadIdx.x) < out.elems) {
      merged.max = states_s[buffer][0].max;
#pragma unroll
      for (int w = 1; w < kWarps; ++w) merged.max = fmaxf(merged.max, states_s[buffer][w].max);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float warp_max = states_s[buffer][w].max;
        factor[w] = warp_max == merged.max ? 1.0f : exp_f32(warp_max - merged.max);
        merged.sum = w == 0 ? states_s[buffer][w].sum * factor[w] : fmaf(states_s[buffer][w].sum, factor[w], merged.sum);
      }
    }
    // One element of the segment per thread: the whole block shares the merge of the warps.
#pragma unroll 1  // once per thread for segments up to kThreads channels: not worth copies
    for (int i = threadIdx.x; i < out.elems; i += kThreads) {
      const float* channel = rows + lane_major<kK, V>(i, out.lane_bits);
      float sum = kAttn ? channel[0] * factor[0] : channel[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        const float part = channel[w * row_stride];
        sum = kAttn ? fmaf(part, factor[w], sum) : sum + part;
      }
      if constexpr (kOneTile) {
        const int64_t nth = group - group_begin;
        p.workspace[out.rows + nth * out.rows_stride + i] = sum;
        if (kAttn && i == 0) {
          float* saved = p.workspace + out.states + nth * out.states_stride;
          saved[0] = merged.max;
          saved[1] = merged.sum;
        }
      } else {
        const VideoSpan video = video_span(p, blockIdx.z);
        const GroupBounds bounds = group_bounds(group, video.frames, p.frames_per_token);
        const float r = kMode == kGroupSum ? sum : sum * residual_scale(p, bounds, kAttn, merged);
        T* out = static_cast<T*>(p.sequence) + (video.seq_row0 + p.num_key_tokens + group) * p.channels;
        out[c0 + i] = from_float<T>(r);
        if (kAttn && i == 0) p.lse[(video.lse_row0 + group) * p.num_heads + seg] = softmax_lse(merged);
        if (kAttn && p.residual32 != nullptr) p.residual32[(video.lse_row0 + group) * p.channels + c0 + i] = r;
      }
    }
    if (!two_buffers) __syncthreads();  // rows_s is the next group's
    // kFresh: the next frame sets acc and state; zeroed all the same, so that the compiler
    // sees them dead from the scatter on instead of holding them across the merge.
#pragma unroll
    for (int j = 0; j < kElems; ++j) acc[j] = 0.0f;
    state = softmax_init();
    fresh = true;
  };

  // The block's frames at one tile of rows. Block-uniform: every thread walks the same tiles
  // and frames.
  auto walk_tile = [&](int64_t tile, bool last_tile) {
    // Rows past N load row N - 1 and count as zeros.
    const int64_t row = tile * rows_per_tile + slot;
    const bool row_ok = row < p.num_patches;
    const T* patch = x + (row_ok ? row : p.num_patches - 1) * p.x_stride_n;
    // Frames' rows by a carried pointer: the next row is the last one plus the frame stride,
    // twice that past the key frame (no 64-bit multiply per frame). rank_of_row: the non-key
    // rank of `row`.
    const int64_t stride = p.x_stride_t;
    auto advance = [&](const T* row_ptr, Rank rank_of_row) {
      return row_ptr + stride + (rank_of_row + 1 == key_frame ? stride : 0);
    };
    // Zeros where the lane has no data; applied where a row is used, not where it is loaded,
    // which would wait for the load there.
    auto mine = [&](const Packed<T, V>& v, int k) { return zero_unless(row_ok && (lane_ok >> k & 1u), v); };
    const float row_floor = row_ok ? 0.0f : -INFINITY;

    Row key;
    Rank group_last = rank_begin + fpt < frames - 1 ? rank_begin + fpt : frames - 1;
    int32_t group = static_cast<int32_t>(group_begin);  // < 65535 (the launchers' limit)
    // Pools the frame of `rank` and, at the end of a group, finishes it; false after the block's
    // last frame.
    auto step = [&](const Row& raw, Rank& rank) {
      Row cur;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        cur[k] = mine(raw[k], k);
        keep_packed(key[k]);
      }
      // d = x - key, zero where the lane has no data (both rows are zeroed there).
      auto residual = [&](int k, float (&d)[V]) { packed_residual(cur[k], key[k], d); };
      if constexpr (kAttn) {
        // A row past N scores -inf (its score is 0: + -inf): weight 0 beside any finite score,
        // including in the merges, and its d is 0 in any case, so that it needs no branch.
        float score = 0.0f;
        if (kFresh && fresh) {
          // A group's first frame: d goes straight into acc (its weight is 1 at its own
          // maximum), which is free here, and the score is taken from it: nothing recomputed.
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            float d[V];
            residual(k, d);
#pragma unroll
            for (int e = 0; e < V; ++e) {
              acc[k * V + e] = d[e];
              score += query_lane[k * V + e] * d[e];
            }
          }
          score = sum_in_row(score, lanes);  // all lanes of the warp take part, rows or not
          state = {score + row_floor, 1.0f};
        } else {
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            float d[V];
            residual(k, d);
#pragma unroll
            for (int e = 0; e < V; ++e) score += query_lane[k * V + e] * d[e];
          }
          score = sum_in_row(score, lanes);
          score += row_floor;
          // d is recomputed from the packed rows for the accumulation rather than kept as
          // floats across the row's shuffles (beside acc, which holds the group's sums).
#pragma unroll
          for (int k = 0; k < kK; ++k) keep_packed(cur[k]);
          float weight;
          const float rescale = softmax_push(state, score, weight);
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            float d[V];
            residual(k, d);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[k * V + e] = acc[k * V + e] * rescale + weight * d[e];
          }
        }
      } else if constexpr (kKey) {
        if (kFresh && fresh) {
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            float d[V];
            residual(k, d);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[k * V + e] = d[e];
          }
        } else {
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            float d[V];
            residual(k, d);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[k * V + e] += d[e];
          }
        }
      } else {
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          float xv[V];
          unpack(cur[k], xv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[k * V + e] += xv[e];
        }
      }
      fresh = false;
      const bool group_done = rank + 1 == group_last;
      if (group_done && last_tile) finish_group(group);
      if (group_done) {
        ++group;
        group_last = group_last + fpt < frames - 1 ? group_last + fpt : frames - 1;
      }
      return ++rank != rank_end;
    };

    // The key row and the first frames' rows, every load issued before the first use; the key
    // row then stays in registers, packed, for every frame of the block's groups. kPair: the
    // frames two at a time, both loaded before either is used (a frame past the block's loads
    // the last one again, an L1 hit, and is not pooled).
    Row a, b;  // b: kPair only
    Rank rank = rank_begin;
    // The row of frame `rank` (the next one to load), carried across the loads.
    const T* next = patch + nonkey_frame(rank, key_frame) * stride;
    // Loads the rows of frame `rank` (and kPair: of rank + 1, or again rank's past the block's
    // frames) and moves `next` past them.
    auto load_rows = [&]() {
      const T* row_a = next;
      const T* row_b = kPair && rank + 1 < rank_end ? advance(row_a, rank) : row_a;
      next = kPair ? advance(row_b, rank + 1) : advance(row_a, rank);
#pragma unroll
      for (int k = 0; k < kK; ++k) a[k] = load_packed_stream<T, V>(row_a + lane_at[k]);
#pragma unroll
      for (int k = 0; k < kK; ++k)
        if constexpr (kPair) b[k] = load_packed_stream<T, V>(row_b + lane_at[k]);
    };
    {
      const T* key_row = patch + key_frame * stride;
#pragma unroll
      for (int k = 0; k < kK; ++k)
        if constexpr (kKey) key[k] = load_packed<T, V>(key_row + lane_at[k]);
      load_rows();
#pragma unroll
      for (int k = 0; k < kK; ++k)
        if constexpr (kKey) key[k] = mine(key[k], k);
    }
    for (;;) {
      if (!step(a, rank)) break;
      if constexpr (kPair) {
        if (!step(b, rank)) break;
      }
      load_rows();
    }
  };

  if constexpr (kOneTile) {
    walk_tile(split, true);
  } else {
    const int64_t tiles = (p.num_patches + rows_per_tile - 1) / rows_per_tile;
    for (int64_t tile = 0; tile < tiles; ++tile) walk_tile(tile, tile + 1 == tiles);
  }
}

// V consecutive floats of the workspace (16-byte loads where V is a multiple of 4: the launcher
// takes the vector path only with a 16-byte aligned workspace).
template <int V>
__device__ __forceinline__ void load_floats(const float* ptr, float (&out)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      float part[4];
      load_vec<float, 4>(ptr + 4 * q, part);
#pragma unroll
      for (int e = 0; e < 4; ++e) out[4 * q + e] = part[e];
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = ptr[e];
  }
}

// The residual tokens from the partial rows of a frame's tiles, merged in tile order (and lse).
// grid: (blocks of kThreads vectors of V channels, group, video).
template <typename T, int V, bool kAttn>
__device__ __forceinline__ void merge_splits(const EncodeParams& p, const RowPlan& plan) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  const int64_t group = blockIdx.y;
  const int64_t b = blockIdx.z;
  const VideoSpan video = video_span(p, b);
  if (group >= video.groups || c >= p.channels) return;
  const int64_t head_dim = p.channels / p.num_heads;
  const int64_t head = kAttn ? c / head_dim : 0;
  const int64_t row0 = split_row(p, plan, b, group, 0);
  const float* part = p.workspace + row0 * p.channels + c;
  const float* saved = split_states(p, plan) + (row0 * p.num_heads + head) * 2;

  float acc[V] = {};
  SoftmaxState state = softmax_init();
  // Unrolled without a branch inside, so that the loads of several tiles are in flight at once.
#pragma unroll 4
  for (int64_t s = 0; s < plan.splits; ++s) {
    float v[V];
    load_floats<V>(part + s * p.channels, v);
    if constexpr (kAttn) {
      const SoftmaxState other = {saved[s * p.num_heads * 2], saved[s * p.num_heads * 2 + 1]};
      const MergeScale scale = softmax_merge(state, other);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = acc[e] * scale.a + v[e] * scale.b;
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += v[e];
    }
  }
  const float inv = residual_scale(p, group_bounds(group, video.frames, p.frames_per_token), kAttn, state);
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] *= inv;
  T* out = static_cast<T*>(p.sequence) + (video.seq_row0 + p.num_key_tokens + group) * p.channels;
  store_vec<T, V>(out + c, acc);
  if (kAttn && c % head_dim == 0) p.lse[(video.lse_row0 + group) * p.num_heads + head] = softmax_lse(state);
  if (kAttn && p.residual32 != nullptr) {
    float* r32 = p.residual32 + (video.lse_row0 + group) * p.channels + c;
#pragma unroll
    for (int e = 0; e < V; ++e) r32[e] = acc[e];
  }
}

// A lane's share of <q, row>, added to `dot`: its kK vectors of the row, unpacked, against its
// query channels.
template <typename T, int V, int kK>
__device__ __forceinline__ float lane_dot(const float* query_lane, const Packed<T, V> (&row)[kK], float dot = 0.0f) {
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    float v[V];
    unpack(row[k], v);
#pragma unroll
    for (int e = 0; e < V; ++e) dot += query_lane[k * V + e] * v[e];
  }
  return dot;
}

// warp_pool's running maximum moves when a score passes it by this much (natural-log units):
// the weights it sums stay below e^8 ~ 3000 of a float's range, and the maximum settles after
// a row or two, so that most frames skip the rescale.
constexpr float kRescaleMargin = 8.0f;
// The lowest finite float, warp_pool's maximum before any score.
constexpr float kLowestScore = -3.40282347e38f;

// Groups a warp of the warp-split forward holds at once (warp_pool): its registers keep a
// group's sums of kElems = V x K channels per lane, kChunk of them (four of 16 elements spill
// at the 128 registers of two resident blocks).
VTOK_HOST_DEVICE constexpr int warp_chunk_groups(int vec, int k) {
  return vec * k <= 8 ? 4 : vec * k <= 16 ? 2 : 1;
}

// The encode forward on 16-byte rows, warp-split: each warp owns (video, segment, split of the
// patch rows, chunk of up to kChunk groups) and walks the split's rows, `lanes` threads per
// row and 32 / lanes rows at a time; for each rows' pass it loads the key rows once and streams
// the chunk's frames past them, accumulating each group's sums per thread (mean: the sum of
// x - key; attention: an online softmax per thread, max, weight sum and weighted sum). Nothing
// crosses lanes in the frame loop but a row's score (attention: log2(lanes) shuffles). At the
// end the warp merges its rows once per group and writes the split's partial row (and softmax
// state) to the workspace, which merge_splits merges in split order, as for pool_tiles.
// Shared memory holds the query, each lane its own channels; no barrier, no atomics.
template <typename T, int V, bool kAttn, int kK>
__device__ __forceinline__ void warp_pool(const EncodeParams& p, const RowPlan& plan) {
  constexpr int kElems = kK * V;
  constexpr int kChunk = warp_chunk_groups(V, kK);
  using Row = Packed<T, V>[kK];
  const int lanes = plan.lanes;
  const int lane = threadIdx.x % 32;
  const int lane_in_row = lane & (lanes - 1);
  const int row_group = lane / lanes;
  const int row_groups = 32 / lanes;

  // The warp's work item; the chunks of one split are consecutive warps (a block's warps share
  // their key rows in L1).
  const int64_t chunks = (encode_max_groups(p) + plan.groups_per_block - 1) / plan.groups_per_block;
  int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t chunk = item % chunks;
  item /= chunks;
  const int64_t split = item % plan.splits;
  item /= plan.splits;
  const int64_t seg = item % plan.num_segments;
  const int64_t b = item / plan.num_segments;
  if (b >= p.batch) return;  // warp-uniform: nothing below synchronises a block
  const VideoSpan video = video_span(p, b);
  const int64_t group_begin = chunk * plan.groups_per_block;
  if (group_begin >= video.groups) return;
  const int groups = static_cast<int>(min_i64(plan.groups_per_block, video.groups - group_begin));
  const int32_t key_frame = static_cast<int32_t>(video.key);
  const int32_t fpt = static_cast<int32_t>(min_i64(p.frames_per_token, video.frames));
  const int32_t rank_begin = static_cast<int32_t>(group_begin * p.frames_per_token);
  const int32_t rank_end = static_cast<int32_t>(min_i64((group_begin + groups) * p.frames_per_token, video.frames - 1));
  const int64_t row_begin = split * p.num_patches / plan.splits;
  const int64_t row_end = (split + 1) * p.num_patches / plan.splits;
  const int64_t c0 = seg * plan.seg_vecs * V;
  const T* x = static_cast<const T*>(p.x) + video.x_offset;
  const int64_t stride = p.x_stride_t;

  int32_t lane_at[kK];
  const unsigned lane_ok = LaneVectors<kK, V>(plan, c0, lane_in_row, p.channels).split(lane_at);
  // The lane's query channels, scaled, in the warp's slice of shared memory (by lane: one base
  // address and constant offsets), zeros where the lane has no vector: read every frame rather
  // than held in kElems registers.
  __shared__ float query_s[kAttn ? kWarps * 32 * kElems : 1];
  float* const query_lane = query_s + (threadIdx.x / 32 * 32 + lane) * kElems;
  if constexpr (kAttn) {
    const float scale = rsqrtf(static_cast<float>(p.channels / p.num_heads));
#pragma unroll
    for (int k = 0; k < kK; ++k)
#pragma unroll
      for (int e = 0; e < V; ++e)
        query_lane[k * V + e] = (lane_ok >> k & 1u) ? p.query[lane_at[k] + e] * scale : 0.0f;
  }

  float acc[kChunk][kElems];
  SoftmaxState state[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
#pragma unroll
    for (int i = 0; i < kElems; ++i) acc[j][i] = 0.0f;
    // The lowest finite maximum rather than -inf: a row past the split (score -inf) then
    // weighs exp(-inf) = 0 on the path that keeps the maximum, never exp(-inf + inf).
    state[j] = {kLowestScore, 0.0f};
  }

  for (int64_t row_base = row_begin; row_base < row_end; row_base += row_groups) {
    // Rows past the split load its last row and count as zeros.
    const int64_t row = row_base + row_group;
    const bool row_ok = row < row_end;
    const T* patch = x + (row_ok ? row : row_end - 1) * p.x_stride_n;
    auto mine = [&](const Packed<T, V>& v, int k) { return zero_unless(row_ok && (lane_ok >> k & 1u), v); };
    Row key, next;
    const T* at = patch + nonkey_frame(rank_begin, key_frame) * stride;
#pragma unroll
    for (int k = 0; k < kK; ++k) key[k] = load_packed<T, V>(patch + key_frame * stride + lane_at[k]);
#pragma unroll
    for (int k = 0; k < kK; ++k) next[k] = load_packed_stream<T, V>(at + lane_at[k]);
#pragma unroll
    for (int k = 0; k < kK; ++k) key[k] = mine(key[k], k);
    // The lane's share of <q, key row>, once per rows' pass: a frame's score is then <q, x> less
    // it, and needs neither the key unpacked nor d per frame (16 fewer instructions per vector).
    const float query_key = kAttn ? lane_dot<T, V, kK>(query_lane, key) : 0.0f;
    int32_t rank = rank_begin;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (j >= groups) break;
      const int32_t stop = rank + fpt < rank_end ? rank + fpt : rank_end;
#pragma unroll 1
      for (; rank < stop; ++rank) {
        // The frame's rows, and the next frame's loaded before they are used: all kK loads
        // behind one warp-uniform branch, which skips them after the chunk's last frame (with
        // one group per warp they would be a third of its loads).
        Row cur;
#pragma unroll
        for (int k = 0; k < kK; ++k) cur[k] = mine(next[k], k);
        if (rank + 1 < rank_end) {
          at = at + stride + (rank + 1 == key_frame ? stride : 0);
#pragma unroll
          for (int k = 0; k < kK; ++k) next[k] = load_packed_stream<T, V>(at + lane_at[k]);
        }
        // d = x - key, vector k; recomputed from the packed rows where needed rather than held
        // as floats across the row's shuffles.
        auto residual = [&](int k, float (&d)[V]) { packed_residual(cur[k], key[k], d); };
        if constexpr (kAttn) {
          const float score = sum_in_row(lane_dot<T, V, kK>(query_lane, cur, -query_key), lanes) +
                              (row_ok ? 0.0f : -INFINITY);
#pragma unroll
          for (int k = 0; k < kK; ++k) keep_packed(cur[k]);
          // The maximum moves only when a score of the warp reaches it plus kRescaleMargin (FA4's
          // lazy rescaling): weights up to e^kRescaleMargin, and on the other frames no exp of
          // the old maximum nor a multiply of every sum. The vote keeps the branch warp-uniform.
          // ">=": an infinite score after an infinite maximum takes softmax_push (weight 1),
          // where exp(inf - inf) would make the sum and the lse NaN.
          if (__any_sync(kFullMask, score >= state[j].max + kRescaleMargin)) {
            float weight;
            const float rescale = softmax_push(state[j], score, weight);
#pragma unroll
            for (int k = 0; k < kK; ++k) {
              float d[V];
              residual(k, d);
#pragma unroll
              for (int e = 0; e < V; ++e) acc[j][k * V + e] = fmaf(weight, d[e], acc[j][k * V + e] * rescale);
            }
          } else {
            const float weight = exp_f32(score - state[j].max);
            state[j].sum += weight;
#pragma unroll
            for (int k = 0; k < kK; ++k) {
              float d[V];
              residual(k, d);
#pragma unroll
              for (int e = 0; e < V; ++e) acc[j][k * V + e] = fmaf(weight, d[e], acc[j][k * V + e]);
            }
          }
        } else {
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            float d[V];
            residual(k, d);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[j][k * V + e] += d[e];
          }
        }
      }
    }
  }

  // The split's partial row of each group: the warp's rows merged (softmax states to the warp's
  // maximum first), written by the lanes of its first rows.
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j >= groups) break;
    float scale = 1.0f;
    const int64_t out_row = split_row(p, plan, b, group_begin + j, split);
    if constexpr (kAttn) {
      const float max = across_rows<true>(state[j].max, lanes);
      scale = state[j].max == max ? 1.0f : exp_f32(state[j].max - max);
      const float sum = across_rows<false>(state[j].sum * scale, lanes);
      if (lane == 0) {
        float* saved = split_states(p, plan) + (out_row * p.num_heads + seg) * 2;
        saved[0] = max;
        saved[1] = sum;
      }
    }
    float* out = p.workspace + out_row * p.channels;
#pragma unroll
    for (int k = 0; k < kK; ++k) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float v = kAttn ? acc[j][k * V + e] * scale : acc[j][k * V + e];
        v = across_rows<false>(v, lanes);
        if (row_group == 0 && (lane_ok >> k & 1u)) out[lane_at[k] + e] = v;
      }
    }
  }
}

// Resident blocks warp_pool_kernel is built for (128 registers: a chunk's sums per thread).
constexpr int kWarpPoolMinBlocks = 2;

template <typename T, int V, bool kAttn, int kK>
__global__ void __launch_bounds__(kThreads, kWarpPoolMinBlocks) warp_pool_kernel(const EncodeParams p, const RowPlan plan) {
  warp_pool<T, V, kAttn, kK>(p, plan);
}

template <typename T, int V, int kMode, int kK = residual_vecs_per_lane(V, kMode)>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks(V, kMode))
    residual_fwd_kernel(const EncodeParams p, const RowPlan plan) {
  if constexpr (kMode == kMergeSplits) {
    if (p.pool == Pool::kAttn)
      merge_splits<T, V, true>(p, plan);
    else
      merge_splits<T, V, false>(p, plan);
  } else {
    pool_tiles<T, V, kMode, kK>(p, plan);
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
// grad_query partial rows of the workspace in the layout of lse; r from the forward's float32
// copy where it kept one. grid: (group, video); one warp per head.
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
  const float* r32 = p.residual32 != nullptr ? p.residual32 + (video.lse_row0 + group) * p.channels : nullptr;
  float* delta = bp.workspace + dq_partial_rows(p.batch, p.num_patches) * p.channels;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t head = warp; head < p.num_heads; head += kWarps) {
    float dot = 0.0f;
    for (int64_t c = head * head_dim + lane; c < (head + 1) * head_dim; c += 32)
      dot += (r32 != nullptr ? r32[c] : to_float(r[c])) * to_float(grad_r[c]);
    dot = row_sum(dot, 32);
    if (lane == 0) delta[(video.lse_row0 + group) * p.num_heads + head] = dot;
  }
}

// Vectors per lane an encode_bwd_kernel is compiled for (its kK): on 16-byte rows, one
// instantiation per count its plan may choose, 1 to max_vecs_per_lane(V), launched with the
// plan's own (a head of 64 bf16 channels on 8 lanes: 1, not 3 of which two would load, unpack,
// score and store nothing); this is the widest, and the scalar path's.
VTOK_HOST_DEVICE constexpr int bwd_vecs_per_lane(int vec) { return max_vecs_per_lane(vec); }

// Resident blocks of 256 threads the backward is compiled for (the launch bounds' minimum,
// which caps registers at 64K / (256 x blocks)): left to itself, ptxas gives the bf16 variants
// at their widest 161 (attn) and 100 (mean) registers, 1 and 2 blocks, without spills either
// way; 2 and 3 keep more loads in flight. Attention rows of up to 8 channels per lane (a head of
// 64 bf16 channels on 8 lanes) fit 3 blocks (80 registers) without spills, at 4 more
// instructions per frame than at 2 blocks: half as many frames' loads again in flight.
VTOK_HOST_DEVICE constexpr int bwd_min_blocks(int vec, bool attn, int vecs_per_lane) {
  return vec == 1 ? 1 : !attn || vecs_per_lane * vec <= 8 ? 3 : 2;
}

// grad_x for every frame of the video at this block's patch rows, and this block's partial
// grad_query row. grid: (segment, tile of kThreads / lanes patch rows, video). kK: the vectors
// a lane holds (bwd_vecs_per_lane; on 16-byte rows the plan's vecs_per_lane).
template <typename T, int V, bool kAttn, int kK = bwd_vecs_per_lane(V)>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks(V, kAttn, kK))
    encode_bwd_kernel(const EncodeBwdParams bp, const RowPlan plan) {
  constexpr int kElems = kK * V;
  static_assert(kK >= 1 && kElems <= kLaneElems, "a lane holds at most kLaneElems channels of a row");
  // A lane's grad_query accumulator: in registers where it is small, else in shared memory
  // (the rows of 24 channels per lane need their registers for the frame loop).
  constexpr bool kDqRegs = kAttn && kElems <= 16;
  // d = x - key and grad r kept as floats across the row's shuffles where they fit beside it,
  // else converted again from the packed rows (wider rows spill on sm_80 otherwise).
  constexpr bool kKeepFloats = kElems <= 8;
  // On 16-byte rows the plan holds exactly kK vectors per lane, ceil(seg_vecs / lanes): every
  // vector but the last lies in the segment (a head, which lies in C), so only the last may be
  // idle, and only it is zeroed per frame. Mean segments of the scalar path and the last mean
  // segment may end anywhere.
  constexpr bool kOnlyLastIdle = kAttn && V > 1;
  // Rows of dq_s padded so that the partial row's reduction (consecutive threads on
  // consecutive channels: V rows of dq_s, 32 / V columns) hits 32 distinct banks.
  constexpr int kDqStride = kThreads + (V > 1 ? 32 / V : 0);
  using Rank = int32_t;  // frames of a video: the launcher refuses 2^31 or more
  const EncodeParams& p = bp.fwd;
  const int lanes = plan.lanes;
  const int lane_in_row = threadIdx.x % lanes;
  const int rows_per_block = kThreads / lanes;
  const int64_t seg = blockIdx.x;
  const int64_t tile = blockIdx.y;
  const int64_t b = blockIdx.z;
  // Rows past N load row N - 1 and store nothing; their grad_query sums are dropped at the end.
  const bool row_ok = tile * rows_per_block + threadIdx.x / lanes < p.num_patches;
  const int64_t n = row_ok ? tile * rows_per_block + threadIdx.x / lanes : p.num_patches - 1;

  const VideoSpan video = video_span(p, b);
  const T* x = static_cast<const T*>(p.x) + video.x_offset;
  const T* grad_seq = static_cast<const T*>(bp.grad_sequence);
  T* grad_x = static_cast<T*>(bp.grad_x);
  const int64_t c0 = seg * plan.seg_vecs * V;

  __shared__ float query_s[kAttn ? kSegMax : 1];
  // Element j of thread t's grad_query accumulator at dq_s[j * kDqStride + t], so that a warp's
  // accesses hit 32 distinct banks: the accumulator itself (not kDqRegs), or its copy for the
  // block's reduction.
  __shared__ float dq_s[kAttn ? kElems * kDqStride : 1];
  if constexpr (kAttn) {
    if constexpr (!kDqRegs) {
      for (int j = 0; j < kElems; ++j) dq_s[j * kDqStride + threadIdx.x] = 0.0f;
    }
    // By lane: a thread reads its kElems query values at one base address.
    load_query_by_lane<kK, V>(query_s, p, c0, plan.seg_vecs * V, lanes);
  }
  const float* query_lane = query_s + lane_in_row * kElems;
  const LaneVectors<kK, V> vecs(plan, c0, lane_in_row, p.channels);
  // On 16-byte rows the rows' pointers below point at the lane's first vector and the others lie
  // rel(k) further (one pointer per row at one vector per lane); on the scalar path at channel 0.
  // Computed where used, not kept in arrays: flags are predicates, which ptxas saves to the
  // stack around the 64-bit divisions of the spatial backward.
  constexpr bool kLaneBase = V > 1;
  const int32_t lane_base = kLaneBase ? vecs.at(0) : 0;
  auto rel = [&](int k) { return kLaneBase ? vecs.at(k) - vecs.at(0) : vecs.at(k); };
  // The lane's to pool: zeroed otherwise (kOnlyLastIdle: the last alone may not be).
  auto mine = [&](int k) { return kOnlyLastIdle && k + 1 < kK ? true : vecs.ok(k); };

  float key_grad[kK][V] = {};
  // The key row, packed, is held across the frames (zeros where the lane has no data, so that
  // d = x - key is 0 there).
  Packed<T, V> key[kK];
  if constexpr (kAttn) {
    const T* key_row = x + video.key * p.x_stride_t + n * p.x_stride_n + lane_base;
#pragma unroll
    for (int k = 0; k < kK; ++k) key[k] = load_packed<T, V>(key_row + rel(k));
#pragma unroll
    for (int k = 0; k < kK; ++k) key[k] = zero_unless(mine(k), key[k]);
  }
  float dq[kDqRegs ? kElems : 1] = {};

  // Frames are walked in the same order by every row of the block, so the shuffles below see
  // whole warps: one loop over the non-key ranks, in increasing t, with the group carried along.
  // The rows of x and grad_x by pointers carried from frame to frame (the frame stride, twice
  // past the key frame), grad r's row and the group's scalars by pointers moved once per group:
  // no 64-bit multiply per frame.
  const Rank frames = static_cast<Rank>(video.frames);
  const Rank key_frame = static_cast<Rank>(video.key);
  const Rank ranks = frames - 1;
  const Rank fpt = static_cast<Rank>(min_i64(p.frames_per_token, video.frames));
  Rank group_end = fpt < ranks ? fpt : ranks;  // exclusive, in ranks
  const int64_t first_frame = key_frame == 0 ? 1 : 0;
  // The strides held in registers where the loop leaves them room (rows of up to 8 channels
  // per lane); wider rows are better off reloading them.
  auto held = [](auto v) { return kKeepFloats ? keep_int(v) : v; };
  const int64_t x_step = held(p.x_stride_t);
  const int64_t out_step = held(p.num_patches * p.channels);
  const int64_t group_step = held(p.channels);
  const int64_t heads = held(p.num_heads);
  const T* x_row = x + first_frame * x_step + n * p.x_stride_n + lane_base;
  T* out_row = grad_x + ((video.frame0 + first_frame) * p.num_patches + n) * p.channels + lane_base;
  const T* grad_r_row = grad_seq + (video.seq_row0 + p.num_key_tokens) * p.channels + lane_base;
  // The group's lse and <grad r, r> (attn).
  const float* lse_at = p.lse + video.lse_row0 * p.num_heads + seg;
  const float* delta_at = bp.workspace + dq_partial_rows(p.batch, p.num_patches) * p.channels +
                          video.lse_row0 * p.num_heads + seg;
  // Mean: 1 / (rows of a group), for the groups before the last (all as long as group 0) and
  // for the last, which may be shorter: two divisions here rather than one per frame (a call,
  // whose ABI costs registers in the loop).
  float inv_count = 0.0f, inv_last = 0.0f;
  if constexpr (!kAttn) {
    if (video.groups > 0) {
      const GroupBounds first = group_bounds(0, video.frames, p.frames_per_token);
      const GroupBounds last = group_bounds(video.groups - 1, video.frames, p.frames_per_token);
      inv_count = 1.0f / static_cast<float>((first.last - first.first) * p.num_patches);
      inv_last = 1.0f / static_cast<float>((last.last - last.first) * p.num_patches);
    }
  }
  // Whether vector k goes to grad_x: for rows of up to 8 channels per lane bit k of an integer
  // held across the frames (store16_if tests it), not predicates recomputed in each.
  int32_t store_bits = 0;
  if constexpr (kKeepFloats) {
#pragma unroll
    for (int k = 0; k < kK; ++k) store_bits |= (row_ok && mine(k) ? 1 : 0) << k;
    store_bits = keep_int(store_bits);
  }
  auto store_ok = [&](int k) { return kKeepFloats ? (store_bits >> k & 1) != 0 : row_ok && mine(k); };

  for (Rank rank = 0; rank < ranks; ++rank) {
    if (rank == group_end) {  // block-uniform: the next group's row and scalars
      grad_r_row += group_step;
      lse_at += heads;
      delta_at += heads;
      group_end = group_end + fpt < ranks ? group_end + fpt : ranks;
      if constexpr (!kAttn) {
        if (group_end == ranks) inv_count = inv_last;
      }
    }
    if constexpr (kAttn) {
      // Every load of the frame before the first use: x, grad r, and the row's two scalars.
      const float lse = *lse_at;
      const float row_delta = *delta_at;
      Packed<T, V> cur[kK], grad_r[kK];
#pragma unroll
      for (int k = 0; k < kK; ++k) cur[k] = load_packed_stream<T, V>(x_row + rel(k));
#pragma unroll
      for (int k = 0; k < kK; ++k) grad_r[k] = load_packed<T, V>(grad_r_row + rel(k));
      float d[kKeepFloats ? kElems : 1], g[kKeepFloats ? kElems : 1];
      // d = x - key and grad r of vector k, as floats.
      auto residual = [&](int k, float (&dv)[V], float (&gv)[V]) {
        float xv[V], kv[V];
        unpack(cur[k], xv);
        unpack(key[k], kv);
        unpack(grad_r[k], gv);
#pragma unroll
        for (int e = 0; e < V; ++e) dv[e] = xv[e] - kv[e];
      };
      float score = 0.0f, grad_dot = 0.0f;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        // grad r too: an inf at the clamped address must not enter grad_dot as inf * 0.
        cur[k] = zero_unless(mine(k), cur[k]);
        grad_r[k] = zero_unless(mine(k), grad_r[k]);
        float dv[V], gv[V];
        residual(k, dv, gv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if constexpr (kKeepFloats) {
            d[k * V + e] = dv[e];
            g[k * V + e] = gv[e];
          }
          score += query_lane[k * V + e] * dv[e];
          grad_dot += gv[e] * dv[e];
        }
      }
      // Both sums in one run of rounds; every lane of the warp takes part, rows past N included.
      for (unsigned offset = static_cast<unsigned>(lanes) >> 1; offset != 0; offset >>= 1) {
        score += __shfl_xor_sync(kFullMask, score, static_cast<int>(offset));
        grad_dot += __shfl_xor_sync(kFullMask, grad_dot, static_cast<int>(offset));
      }
      const float prob = exp_f32(score - lse);
      const float coef = prob * (grad_dot - row_delta);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        float dv[V], gv[V], dd[V];
        if constexpr (kKeepFloats) {
#pragma unroll
          for (int e = 0; e < V; ++e) dv[e] = d[k * V + e], gv[e] = g[k * V + e];
        } else {
          residual(k, dv, gv);
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int j = k * V + e;
          dd[e] = prob * gv[e] + coef * query_lane[j];
          if constexpr (kDqRegs) {
            dq[j] += coef * dv[e];
          } else {
            dq_s[j * kDqStride + threadIdx.x] += coef * dv[e];
          }
          key_grad[k][e] -= dd[e];
        }
        store_vec_if<T, V>(store_ok(k), out_row + rel(k), dd);
      }
    } else {
      // Mean: the gradient of every residual is grad r / count; x is not read.
      Packed<T, V> grad_r[kK];
#pragma unroll
      for (int k = 0; k < kK; ++k) grad_r[k] = load_packed<T, V>(grad_r_row + rel(k));
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        float dd[V];
        unpack(grad_r[k], dd);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          dd[e] *= inv_count;
          key_grad[k][e] -= dd[e];
        }
        store_vec_if<T, V>(store_ok(k), out_row + rel(k), dd);
      }
    }
    x_row += x_step;
    out_row += out_step;
    if (rank + 1 == key_frame) {  // the next rank's frame lies past the key frame
      x_row += x_step;
      out_row += out_step;
    }
  }

  // The key tokens' own gradient: row n of the sequence, or every adaptive bin holding n
  // (bins may overlap), each spread uniformly over its area. Lanes without data add what
  // their clamped loads read to a key_grad that is never stored.
  const T* grad_keys = grad_seq + video.seq_row0 * p.channels + lane_base;
  if (!p.spatial) {
    Packed<T, V> g[kK];
#pragma unroll
    for (int k = 0; k < kK; ++k) g[k] = load_packed<T, V>(grad_keys + n * p.channels + rel(k));
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
        for (int k = 0; k < kK; ++k) g[k] = load_packed<T, V>(grad_keys + (i * p.out_w + j) * p.channels + rel(k));
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
  T* key_out = grad_x + ((video.frame0 + video.key) * p.num_patches + n) * p.channels + lane_base;
#pragma unroll
  for (int k = 0; k < kK; ++k) store_vec_if<T, V>(store_ok(k), key_out + rel(k), key_grad[k]);

  if constexpr (kAttn) {
    // Rows past N leave nothing in the block's sums.
    if constexpr (kDqRegs) {
#pragma unroll
      for (int j = 0; j < kElems; ++j) dq_s[j * kDqStride + threadIdx.x] = row_ok ? dq[j] : 0.0f;
    } else {
      if (!row_ok) {
        for (int j = 0; j < kElems; ++j) dq_s[j * kDqStride + threadIdx.x] = 0.0f;
      }
    }
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
