#pragma once
// Host entry points of the CUDA kernels. Plain C++ (no CUDA headers) so the pybind11 layer is
// compiled by the host compiler. Every launcher only enqueues work on `stream` (a cudaStream_t):
// no host synchronisation, no allocation, so the calls can be captured in a CUDA graph.
// Errors (an unsupported configuration, a launch failure) throw std::invalid_argument or
// std::runtime_error.
#include <cstdint>

#include "vtok/params.h"

namespace vtok {
namespace cuda {

// The largest attention head (channels per head) the kernels pool in one block.
constexpr int64_t kMaxHeadDim = 768;

// How the encode forward on 16-byte rows spreads its work (the scalar path has one design):
// kTiles, a block per tile of patch rows merging its rows every group (residual_fwd_kernel,
// 64 / 80 registers, 3-4 resident blocks); kWarps, a warp per split of the rows and chunk of
// groups, merging its rows once per group at the end (warp_pool_kernel, 128 registers, 2 blocks).
// Both leave partial rows that the same launch merges in split order: same contract, same
// determinism, results equal to rounding.
enum class FwdDesign : int32_t { kTiles = 0, kWarps = 1 };

void encode_fwd(const EncodeParams& p, void* stream, FwdDesign design = FwdDesign::kTiles);
// Needs bp.workspace of encode_bwd_workspace_elems(...) floats for attn (unused for mean).
void encode_bwd(const EncodeBwdParams& bp, void* stream);
void expand_fwd(const ExpandParams& p, void* stream);
void expand_bwd(const ExpandBwdParams& p, void* stream);

// Workspace floats of the attn backward: partial grad_query rows, then one float per lse entry.
int64_t encode_bwd_workspace_elems(int64_t batch, int64_t num_patches, int64_t channels,
                                   int64_t lse_elems);

// The launch plan the launchers use, for tests of the CuPy loader's mirror:
// {vector width, lanes, vecs_per_lane, seg_vecs, num_segments}.
struct PlanInfo {
  int vec, lanes, vecs_per_lane, seg_vecs, num_segments;
};
PlanInfo encode_plan(const EncodeParams& p, bool backward, const void* grad_sequence,
                     const void* grad_x);

// The forward's grid along the rows and groups: {splits, groups per block (kTiles) or warp
// (kWarps), chunks of groups, blocks (kWarps: of kWarps warp items, one grid axis; kTiles:
// splits x segments x chunks x batch)}.
struct FwdGrid {
  int64_t splits, groups_per_item, chunks, blocks;
};
FwdGrid encode_fwd_grid(const EncodeParams& p, FwdDesign design = FwdDesign::kTiles);

}  // namespace cuda
}  // namespace vtok
