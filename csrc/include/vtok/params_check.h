#pragma once
// The host-side consistency checks of EncodeParams that every backend's binding makes before a
// kernel runs. Pointers are compared with null, never dereferenced (they may be device memory);
// checks that need a backend's own knowledge (dtypes, head width limits, lse for varlen) stay
// with that backend.
#include "vtok/index_math.h"
#include "vtok/params.h"

namespace vtok {

// nullptr when consistent, else what is wrong.
inline const char* encode_params_error(const EncodeParams& p) {
  if (p.x == nullptr || p.sequence == nullptr || p.key_index == nullptr)
    return "x, sequence and key_index must be set (got a null pointer)";
  if (p.batch < 1 || p.num_frames < 1 || p.num_patches < 1 || p.channels < 1)
    return "batch, num_frames, num_patches and channels must be >= 1";
  if (p.frames_per_token < 1) return "frames_per_token must be >= 1";
  if (p.num_heads < 1 || p.channels % p.num_heads != 0)
    return "num_heads must be >= 1 and divide channels";
  if ((p.cu_frames == nullptr) != (p.cu_tokens == nullptr))
    return "cu_frames and cu_tokens must both be set (varlen) or both be null (batched)";
  if (p.cu_frames == nullptr && p.num_groups != num_groups(p.num_frames, p.frames_per_token))
    return "num_groups must be ceil((num_frames - 1) / frames_per_token)";
  if (p.pool == Pool::kAttn) {
    if (p.query == nullptr) return "attn pooling needs query";
  } else if (p.pool == Pool::kMean) {
    if (p.num_heads != 1) return "mean pooling takes num_heads == 1";
  } else {
    return "pool must be mean or attn";
  }
  if (p.spatial) {
    if (p.grid_h < 1 || p.grid_w < 1 || p.grid_h * p.grid_w != p.num_patches)
      return "grid_h * grid_w must equal num_patches";
    if (p.out_h < 1 || p.out_w < 1 || p.out_h > p.grid_h || p.out_w > p.grid_w)
      return "spatial (out_h, out_w) must fit in the grid";
    if (p.num_key_tokens != p.out_h * p.out_w) return "num_key_tokens must be out_h * out_w";
  } else if (p.num_key_tokens != p.num_patches) {
    return "num_key_tokens must equal num_patches without spatial";
  }
  return nullptr;
}

}  // namespace vtok
