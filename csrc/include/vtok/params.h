#pragma once
// One params struct per op. Framework-free: raw pointers, element strides, sizes.
// Batched and varlen share the structs: cu_frames == nullptr means batched.
#include "vtok/macros.h"

namespace vtok {

enum class Pool : int32_t { kMean = 0, kAttn = 1 };
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct EncodeParams {
  // x: batched [B, T, N, C] with strides (x_stride_b, x_stride_t, x_stride_n, 1);
  //    varlen  [F, N, C]    with strides (-, x_stride_t, x_stride_n, 1).
  const void* x = nullptr;
  int64_t x_stride_b = 0, x_stride_t = 0, x_stride_n = 0;
  int64_t batch = 0;       // B
  int64_t num_frames = 0;  // T (batched); max frames per video (varlen)
  int64_t num_patches = 0; // N
  int64_t channels = 0;    // C
  DType dtype = DType::kFloat32;

  const int64_t* key_index = nullptr;  // [B], already in [0, T_b)
  const int64_t* cu_frames = nullptr;  // [B+1] varlen only
  const int64_t* cu_tokens = nullptr;  // [B+1] varlen only

  Pool pool = Pool::kMean;
  const float* query = nullptr;  // [C] float32, attn only
  int64_t num_heads = 1;
  int64_t frames_per_token = 1;

  // Key tokens: S = N (copy of the key frame) or, when spatial, S = out_h * out_w bins of the
  // grid_h x grid_w key frame, with the bins of torch's adaptive_avg_pool2d.
  bool spatial = false;
  int64_t grid_h = 0, grid_w = 0, out_h = 0, out_w = 0;
  int64_t num_key_tokens = 0;  // S
  int64_t num_groups = 0;      // G (batched); unused for varlen (per video)

  // Outputs: sequence [B, S+G, C] contiguous (varlen [L, C]); lse float32 [B, G, heads]
  // (varlen [sum_b G_b, heads]), attn only.
  void* sequence = nullptr;
  float* lse = nullptr;
  // attn (cuda, 16-bit types): the residual tokens again in float32, [rows of lse, C], as they
  // were before rounding to the sequence's type. The backward's softmax row term <grad r, r>
  // reads them: grad_query is a difference of near-equal terms (exactly zero for one patch), and
  // r rounded to 8 bits of mantissa would decide it. Null: the backward reads the sequence.
  float* residual32 = nullptr;

  // Forward scratch (cuda): per-block partial results of the residual tokens, merged in a fixed
  // order when a frame's patches are split over blocks. workspace_elems floats; see the
  // backend's encode_fwd_workspace_elems. Unused by the backward (EncodeBwdParams.workspace).
  float* workspace = nullptr;
  int64_t workspace_elems = 0;
};

struct EncodeBwdParams {
  EncodeParams fwd;                    // the forward's arguments; sequence and lse as saved
  const void* grad_sequence = nullptr; // contiguous like sequence
  void* grad_x = nullptr;              // contiguous [B, T, N, C] (varlen [F, N, C])
  float* grad_query = nullptr;         // [C] float32, attn only
  float* workspace = nullptr;          // backend-defined scratch (e.g. partial grad_query)
  int64_t workspace_elems = 0;
};

struct ExpandParams {
  // key_tokens [B, N, C] and residual_tokens [B, G, C] with strides (.., .., 1); frames
  // contiguous [B, T, N, C].
  const void* key_tokens = nullptr;
  int64_t key_stride_b = 0, key_stride_n = 0;
  const void* residual_tokens = nullptr;
  int64_t res_stride_b = 0, res_stride_g = 0;
  int64_t batch = 0, num_frames = 0, num_patches = 0, channels = 0, num_groups = 0;
  int64_t frames_per_token = 1;
  const int64_t* key_index = nullptr;  // [B], already in [0, T)
  DType dtype = DType::kFloat32;
  void* frames = nullptr;
};

struct ExpandBwdParams {
  // grad_frames contiguous [B, T, N, C]; outputs contiguous [B, N, C] and [B, G, C].
  const void* grad_frames = nullptr;
  int64_t batch = 0, num_frames = 0, num_patches = 0, channels = 0, num_groups = 0;
  int64_t frames_per_token = 1;
  const int64_t* key_index = nullptr;
  DType dtype = DType::kFloat32;
  void* grad_key_tokens = nullptr;
  void* grad_residual_tokens = nullptr;
};

}  // namespace vtok
