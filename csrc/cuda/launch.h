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

void encode_fwd(const EncodeParams& p, void* stream);
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

}  // namespace cuda
}  // namespace vtok
