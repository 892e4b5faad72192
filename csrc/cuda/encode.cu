// Launchers of the encode kernels: choose the vector width and row plan, dispatch on dtype,
// enqueue on the caller's stream.
#include <type_traits>

#include "encode.cuh"
#include "launch_utils.cuh"
#include "vtok/encode_split.h"

namespace vtok {
namespace cuda {

namespace {

// 16-byte accesses need every row the kernels touch to start on a 16-byte boundary: aligned
// base pointers, strides and (attn) head starts that are multiples of the vector width; the
// forward's partial rows are read back 16 bytes at a time too.
int encode_vector_width(const EncodeParams& p, const void* grad_sequence, const void* grad_x) {
  const int vec = 16 / element_size(p.dtype);
  const bool attn = p.pool == Pool::kAttn;
  bool ok = p.channels % vec == 0 && (!attn || (p.channels / p.num_heads) % vec == 0) &&
            aligned16(p.x) && aligned16(p.sequence) && p.x_stride_t % vec == 0 &&
            p.x_stride_n % vec == 0 && (p.cu_frames != nullptr || p.x_stride_b % vec == 0);
  if (p.workspace != nullptr) ok = ok && aligned16(p.workspace);
  if (grad_sequence != nullptr) ok = ok && aligned16(grad_sequence);
  if (grad_x != nullptr) ok = ok && aligned16(grad_x);
  return ok ? vec : 1;
}

// Two waves of resident blocks on an H100 (132 SMs), the forward's grid target: a constant
// rather than the device's count, so that the CuPy loader plans the same grid without asking
// the device (and the results do not depend on it: groups per block change which block pools
// a group, not the order of any sum).
constexpr int64_t kFillSms = 132;

FwdGrid forward_grid(const EncodeParams& p, const PlanInfo& info, FwdDesign design) {
  const int64_t groups = encode_max_groups(p);
  if (design == FwdDesign::kWarps && info.vec > 1) {
    const int compiled_k = p.pool == Pool::kAttn ? info.vecs_per_lane : kFwdVecs;  // launch_warp_pool
    const WarpSplit w = warp_split(p.num_patches, info.num_segments, p.batch, groups,
                                   warp_chunk_groups(info.vec, compiled_k),
                                   2 * kFillSms * kWarpPoolMinBlocks * kWarps, kWarps);
    return {w.splits, w.groups_per_warp, w.chunks, w.blocks};
  }
  const int64_t rows = kThreads / info.lanes;
  const int64_t tiles = (p.num_patches + rows - 1) / rows;
  const int mode = p.pool == Pool::kAttn ? kAttnPool : kMeanPool;
  const EncodeSplit s = encode_split(tiles, info.num_segments, p.batch, groups,
                                     2 * kFillSms * fwd_min_blocks(info.vec, mode), info.vec > 1);
  return {s.splits, s.groups_per_block, s.chunks, s.splits * info.num_segments * s.chunks * p.batch};
}

void check_encode(const EncodeParams& p, const PlanInfo& info) {
  if (p.batch > 65535) throw std::invalid_argument("vtok cuda: at most 65535 videos per call");
  if (p.num_key_tokens * p.channels >= (int64_t{1} << 31))
    throw std::invalid_argument("vtok cuda: key tokens of more than 2^31 elements per video");
  if (encode_max_groups(p) > 65535) throw std::invalid_argument("vtok cuda: at most 65535 residual tokens per video");
  if (p.num_frames >= (int64_t{1} << 31)) throw std::invalid_argument("vtok cuda: fewer than 2^31 frames per video");
  if (info.lanes == 0)
    throw std::invalid_argument("vtok cuda: attention heads of " + std::to_string(p.channels / p.num_heads) +
                                " channels exceed the " + std::to_string(kMaxHeadDim) +
                                " a block pools (use more heads or another backend)");
}

// Attention pooling on 16-byte rows, compiled for the plan's vectors per lane
// (residual_vecs_per_lane).
template <typename T, int V>
void launch_attn_pool(const dim3 grid, cudaStream_t s, const EncodeParams& p, const RowPlan& plan) {
  static_assert(fwd_vecs_per_lane(V, true) == 3, "one instantiation per count of vectors a plan may choose");
  switch (plan.vecs_per_lane) {
    case 1: residual_fwd_kernel<T, V, kAttnPool, 1><<<grid, kThreads, 0, s>>>(p, plan); break;
    case 2: residual_fwd_kernel<T, V, kAttnPool, 2><<<grid, kThreads, 0, s>>>(p, plan); break;
    case 3: residual_fwd_kernel<T, V, kAttnPool, 3><<<grid, kThreads, 0, s>>>(p, plan); break;
    default: throw std::logic_error("vtok cuda: the attention forward's plan holds 1 to 3 vectors per lane");
  }
}

// The warp-split forward on 16-byte rows (FwdDesign::kWarps), compiled for the plan's vectors
// per lane (attention: 1 to fwd_vecs_per_lane(V, true)); mean pooling for kFwdVecs, its plan's
// most.
template <typename T, int V>
void launch_warp_pool(const unsigned blocks, cudaStream_t s, const EncodeParams& p, const RowPlan& plan) {
  if (p.pool != Pool::kAttn) {
    warp_pool_kernel<T, V, false, kFwdVecs><<<blocks, kThreads, 0, s>>>(p, plan);
    return;
  }
  switch (plan.vecs_per_lane) {
    case 1: warp_pool_kernel<T, V, true, 1><<<blocks, kThreads, 0, s>>>(p, plan); break;
    case 2: warp_pool_kernel<T, V, true, 2><<<blocks, kThreads, 0, s>>>(p, plan); break;
    case 3: warp_pool_kernel<T, V, true, 3><<<blocks, kThreads, 0, s>>>(p, plan); break;
    default: throw std::logic_error("vtok cuda: the attention forward's plan holds 1 to 3 vectors per lane");
  }
}

// The backward, compiled on 16-byte rows for the plan's vectors per lane (bwd_vecs_per_lane:
// the most), on the scalar path for the most.
template <typename T, int V, bool kAttn, int kK = 1>
void launch_bwd(const dim3 grid, cudaStream_t s, const EncodeBwdParams& bp, const RowPlan& plan) {
  if constexpr (V == 1) {
    encode_bwd_kernel<T, V, kAttn><<<grid, kThreads, 0, s>>>(bp, plan);
  } else if constexpr (kK <= bwd_vecs_per_lane(V)) {
    if (plan.vecs_per_lane == kK)
      encode_bwd_kernel<T, V, kAttn, kK><<<grid, kThreads, 0, s>>>(bp, plan);
    else
      launch_bwd<T, V, kAttn, kK + 1>(grid, s, bp, plan);
  } else {
    throw std::logic_error("vtok cuda: the backward's plan holds 1 to bwd_vecs_per_lane(V) vectors per lane");
  }
}

RowPlan to_row_plan(const PlanInfo& info) {
  RowPlan plan;
  plan.lanes = info.lanes;
  plan.vecs_per_lane = info.vecs_per_lane;
  plan.seg_vecs = info.seg_vecs;
  plan.num_segments = info.num_segments;
  return plan;
}

}  // namespace

PlanInfo encode_plan(const EncodeParams& p, bool backward, const void* grad_sequence, const void* grad_x) {
  const bool attn = p.pool == Pool::kAttn;
  int vec = backward ? encode_vector_width(p, grad_sequence, grad_x) : encode_vector_width(p, nullptr, nullptr);
  RowPlan plan = backward || vec == 1 ? plan_segments(p.channels, vec, attn, p.num_heads)
                                      : plan_segments_fwd(p.channels, vec, attn, p.num_heads);
  if (plan.lanes == 0 && vec > 1) {  // a head too wide for 16-byte rows: the scalar path
    vec = 1;
    plan = plan_segments(p.channels, vec, attn, p.num_heads);
  }
  return {vec, plan.lanes, plan.vecs_per_lane, plan.seg_vecs, plan.num_segments};
}

int64_t encode_bwd_workspace_elems(int64_t batch, int64_t num_patches, int64_t channels, int64_t lse_elems) {
  return dq_partial_rows(batch, num_patches) * channels + lse_elems;
}

FwdGrid encode_fwd_grid(const EncodeParams& p, FwdDesign design) {
  return forward_grid(p, encode_plan(p, false, nullptr, nullptr), design);
}

void encode_fwd(const EncodeParams& p, void* stream, FwdDesign design) {
  const auto s = static_cast<cudaStream_t>(stream);
  const PlanInfo info = encode_plan(p, false, nullptr, nullptr);
  check_encode(p, info);
  RowPlan plan = to_row_plan(info);
  const bool attn = p.pool == Pool::kAttn;
  const bool warps = design == FwdDesign::kWarps && info.vec > 1;
  const int64_t groups = encode_max_groups(p);
  const FwdGrid split = forward_grid(p, info, design);
  if (groups > 0) {
    const int64_t needed =
        encode_fwd_workspace_elems(p.batch, groups, split.splits, p.channels, p.num_heads, attn, info.vec > 1);
    if (needed > 0 && (p.workspace == nullptr || p.workspace_elems < needed))
      throw std::invalid_argument("vtok cuda: the forward needs a workspace of encode_fwd_workspace_elems floats");
    if (split.splits * plan.num_segments > (int64_t{1} << 31) - 1 || (warps && split.blocks > (int64_t{1} << 31) - 1))
      throw std::invalid_argument("vtok cuda: too many patches per frame");
  }
  plan.splits = static_cast<int32_t>(split.splits);
  plan.groups_per_block = static_cast<int32_t>(split.groups_per_item);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto width) {
      constexpr int V = decltype(width)::value;
      if (p.num_key_tokens > 0) {
        const dim3 grid(flat_blocks_per_video(p.num_key_tokens * p.channels / V, p.batch),
                        static_cast<unsigned>(p.batch));
        key_tokens_kernel<T, V><<<grid, kThreads, 0, s>>>(p);
        check_launch("key_tokens_kernel");
      }
      if (groups > 0) {
        const dim3 grid(static_cast<unsigned>(split.splits * plan.num_segments), static_cast<unsigned>(split.chunks),
                        static_cast<unsigned>(p.batch));
        if constexpr (V > 1) {
          if (warps) {
            launch_warp_pool<T, V>(static_cast<unsigned>(split.blocks), s, p, plan);
            check_launch("warp_pool_kernel");
          } else if (attn) {
            launch_attn_pool<T, V>(grid, s, p, plan);
            check_launch("residual_fwd_kernel");
          } else {
            residual_fwd_kernel<T, V, kMeanPool><<<grid, kThreads, 0, s>>>(p, plan);
            check_launch("residual_fwd_kernel");
          }
        } else {
          if (attn)
            residual_fwd_kernel<T, V, kAttnPool><<<grid, kThreads, 0, s>>>(p, plan);
          else
            residual_fwd_kernel<T, V, kMeanPool><<<grid, kThreads, 0, s>>>(p, plan);
          check_launch("residual_fwd_kernel");
        }
        if constexpr (V > 1) {  // the partial rows of the splits, merged in split order
          const int64_t vectors = p.channels / V;
          const dim3 merge_grid(static_cast<unsigned>((vectors + kThreads - 1) / kThreads), static_cast<unsigned>(groups),
                                static_cast<unsigned>(p.batch));
          residual_fwd_kernel<T, V, kMergeSplits><<<merge_grid, kThreads, 0, s>>>(p, plan);
          check_launch("residual_fwd_kernel<merge>");
        }
      }
    };
    if (info.vec == VecWidth<T>::value)
      run(std::integral_constant<int, VecWidth<T>::value>{});
    else
      run(std::integral_constant<int, 1>{});
  });
}

void encode_bwd(const EncodeBwdParams& bp, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const EncodeParams& p = bp.fwd;
  const PlanInfo info = encode_plan(p, true, bp.grad_sequence, bp.grad_x);
  check_encode(p, info);
  const RowPlan plan = to_row_plan(info);
  const bool attn = p.pool == Pool::kAttn;
  const int64_t groups = encode_max_groups(p);
  const int64_t tiles = (p.num_patches + kThreads / plan.lanes - 1) / (kThreads / plan.lanes);
  if (tiles > 65535) throw std::invalid_argument("vtok cuda: too many patches per frame");
  if (attn) {
    // Varlen: sum_b G_b is known to the caller only (cu_tokens lives on the device).
    const int64_t lse_elems = p.cu_frames != nullptr ? 0 : p.batch * p.num_groups * p.num_heads;
    if (bp.workspace == nullptr || bp.grad_query == nullptr ||
        bp.workspace_elems < encode_bwd_workspace_elems(p.batch, p.num_patches, p.channels, lse_elems))
      throw std::invalid_argument("vtok cuda: the attn backward needs grad_query and a workspace of "
                                  "encode_bwd_workspace_elems floats");
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 grid(plan.num_segments, static_cast<unsigned>(tiles), static_cast<unsigned>(p.batch));
      if (attn) {
        if (groups > 0) {
          attn_delta_kernel<T><<<dim3(static_cast<unsigned>(groups), static_cast<unsigned>(p.batch)), kThreads, 0, s>>>(bp);
          check_launch("attn_delta_kernel");
        }
        launch_bwd<T, V, true>(grid, s, bp, plan);
        check_launch("encode_bwd_kernel");
        grad_query_reduce_kernel<kThreads><<<static_cast<unsigned>((p.channels + kThreads - 1) / kThreads), kThreads, 0, s>>>(
            bp, p.batch * tiles);
        check_launch("grad_query_reduce_kernel");
      } else {
        launch_bwd<T, V, false>(grid, s, bp, plan);
        check_launch("encode_bwd_kernel");
      }
    };
    if (info.vec == VecWidth<T>::value)
      run(std::integral_constant<int, VecWidth<T>::value>{});
    else
      run(std::integral_constant<int, 1>{});
  });
}

}  // namespace cuda
}  // namespace vtok
