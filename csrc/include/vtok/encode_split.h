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

// Floats of the forward's workspace: per (video, group, split) a row of C partial sums, then
// for attn a (max, sum) softmax state per head. groups: the most of any video.
VTOK_HOST_DEVICE int64_t encode_fwd_workspace_elems(int64_t batch, int64_t groups, int64_t splits,
                                                    int64_t channels, int64_t heads, bool attn,
                                                    bool tile_blocks) {
  return tile_blocks ? batch * groups * splits * (channels + (attn ? 2 * heads : 0)) : 0;
}

}  // namespace vtok
