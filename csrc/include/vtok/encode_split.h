#pragma once
// How the cuda encode forward spreads a launch over blocks, written once for its launcher
// (csrc/cuda/encode.cu) and for the binding that lets the CuPy loader's mirror
// (vtok_kernels/backends/cuda_nvrtc.py) be checked against it.
#include "vtok/macros.h"

namespace vtok {

// The forward's residual kernel on 16-byte rows (tile_blocks): a block pools one tile of patch
// rows of one channel segment for groups_per_block consecutive groups of one video, so that each
// thread loads its key row once and keeps it in registers across those groups. The `splits`
// tiles of a frame leave partial results that a second launch merges in tile order (no atomics,
// so the result does not depend on scheduling). On the scalar path a block walks every tile
// for one group and writes the token itself, as expand's group sum does: no partials.
struct EncodeSplit {
  int64_t splits;
  int64_t groups_per_block;
  int64_t chunks;  // ceil(groups / groups_per_block): grid axis y
};

// base = segments x tiles x batch blocks hold each group once. The groups of a video are cut
// into as few chunks (blocks) as reach fill_blocks (two waves of resident blocks), each of the
// most groups that still make that many chunks: fewer groups per block re-read the key rows
// more often, more leave the device idle at small batches.
VTOK_HOST_DEVICE EncodeSplit encode_split(int64_t tiles, int64_t segments, int64_t batch, int64_t groups,
                                          int64_t fill_blocks, bool tile_blocks) {
  EncodeSplit s = {1, 1, groups};
  if (!tile_blocks || groups < 1) return s;
  s.splits = tiles;
  const int64_t base = segments * tiles * batch;
  const int64_t chunks = fill_blocks > base ? (fill_blocks + base - 1) / base : 1;
  // ceil(groups / g) >= chunks for every g < groups / (chunks - 1)
  const int64_t most = chunks > 1 ? (groups + chunks - 2) / (chunks - 1) - 1 : groups;
  s.groups_per_block = most > 1 ? most : 1;
  s.chunks = (groups + s.groups_per_block - 1) / s.groups_per_block;
  return s;
}

// The warp-split forward (warp_pool_kernel, FwdDesign::kWarps): a warp pools `splits`-th of a
// frame's patch rows for a chunk of up to groups_per_warp consecutive groups of one video and
// channel segment, keeping each group's sums in its registers, and leaves one partial row per
// (group, split) for the merge launch. Warp items are numbered chunk fastest, so the warps of a
// block share their key rows (in L1).
struct WarpSplit {
  int64_t splits;
  int64_t groups_per_warp;
  int64_t chunks;  // ceil(groups / groups_per_warp)
  int64_t blocks;  // of warps_per_block warps, one grid axis
};

// Fills fill_warps (two waves of resident warps) at the least cost: first row splits of at least
// 64 rows (each split adds a partial row per group, 4 / 64 of the bytes of x written and read
// again), then fewer groups per warp (the key rows re-read, from L1 or L2, once per chunk), and
// only short of one wave splits of at least 16 rows.
VTOK_HOST_DEVICE WarpSplit warp_split(int64_t rows, int64_t segments, int64_t batch, int64_t groups,
                                      int64_t chunk_groups, int64_t fill_warps, int64_t warps_per_block) {
  WarpSplit s = {1, 1, 0, 0};
  if (groups < 1) return s;
  const int64_t per_item = batch * segments;
  const int64_t target = (fill_warps + per_item - 1) / per_item;  // warps per (video, segment)
  s.groups_per_warp = chunk_groups < groups ? chunk_groups : groups;
  s.chunks = (groups + s.groups_per_warp - 1) / s.groups_per_warp;
  auto splits_up_to = [&](int64_t min_rows) {
    const int64_t most = rows / min_rows > 1 ? rows / min_rows : 1;
    const int64_t wanted = target > s.chunks ? (target + s.chunks - 1) / s.chunks : 1;
    return wanted < most ? wanted : most;
  };
  s.splits = splits_up_to(64);
  if (s.splits * s.chunks < target && s.groups_per_warp > 1) {
    const int64_t chunks = (target + s.splits - 1) / s.splits;
    s.groups_per_warp = chunks >= groups ? 1 : (groups + chunks - 1) / chunks;
    s.chunks = (groups + s.groups_per_warp - 1) / s.groups_per_warp;
    s.splits = splits_up_to(64);  // no more than the smaller chunks need
  }
  if (2 * s.splits * s.chunks < target) {  // short of one wave
    const int64_t more = splits_up_to(16);
    if (more > s.splits) s.splits = more;
  }
  s.blocks = (per_item * s.chunks * s.splits + warps_per_block - 1) / warps_per_block;
  return s;
}

// Floats of the forward's workspace: per (video, group, split) a row of C partial sums, then
// for attn a (max, sum) softmax state per head. groups: the most of any video.
VTOK_HOST_DEVICE int64_t encode_fwd_workspace_elems(int64_t batch, int64_t groups, int64_t splits,
                                                    int64_t channels, int64_t heads, bool attn,
                                                    bool tile_blocks) {
  return tile_blocks ? batch * groups * splits * (channels + (attn ? 2 * heads : 0)) : 0;
}

}  // namespace vtok
