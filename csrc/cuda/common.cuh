#pragma once
// Device helpers shared by every CUDA kernel: storage types, conversions, vector access, the
// per-video view of the params, and the row plan that maps a channel segment onto lanes.
// Compiled by nvcc (the extension) and by NVRTC (CuPy) from this same text: no CUDA headers.
#include "vtok/index_math.h"
#include "vtok/params.h"

namespace vtok {
namespace cuda {

constexpr int kThreads = 256;  // every kernel; launch bounds and shared arrays depend on it
constexpr int kWarps = kThreads / 32;
// Channels one lane holds per row (K vectors of V): bounds registers (forward: acc, key, d;
// backward: d, key_grad) and the widest head a block pools, 32 * 24 = 768 channels. float32
// rows (V = 4) stop at K = 4: K = 6 needs more than 128 registers and spills; wider float32
// heads take the scalar path (launch plan below).
constexpr int kLaneElems = 24;
VTOK_HOST_DEVICE constexpr int max_vecs_per_lane(int vec) { return vec == 4 ? 4 : kLaneElems / vec; }
constexpr int kSegMax = 32 * kLaneElems;
// Vectors per lane of the encode forward on 16-byte rows, whose threads hold a key row across
// the frames (encode.cuh): mean pooling loads two frames' rows at a time, of two vectors each;
// attention one row, of up to three (float32: four spilled on sm_80, at the 80 registers of
// three resident blocks). Wider heads take the forward's scalar path.
constexpr int kFwdVecs = 2;
VTOK_HOST_DEVICE constexpr int fwd_vecs_per_lane(int vec, bool attn) {
  return attn ? (vec == 4 ? 3 : max_vecs_per_lane(vec)) : kFwdVecs;
}
constexpr unsigned kFullMask = 0xffffffffu;

// 16-bit storage types, converted with PTX so NVRTC needs no cuda_fp16.h / cuda_bf16.h.
struct half_t {
  unsigned short bits;
};
struct bf16_t {
  unsigned short bits;
};

// Elements per 16-byte access.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

// How one channel segment (a head for attn, a slice of C for mean) is spread over threads:
// `lanes` consecutive threads share a patch row, each holding `vecs_per_lane` vectors of V
// elements; kThreads / lanes rows are in flight per block. Chosen on the host (plan_rows) and
// mirrored by plan_rows / plan_segments of vtok_kernels/backends/cuda_nvrtc.py for the CuPy loader.
struct RowPlan {
  int32_t lanes = 0;          // power of two in [1, 32]; 0 means unsupported
  int32_t vecs_per_lane = 0;  // K <= max_vecs_per_lane(V)
  int32_t seg_vecs = 0;       // vectors of V elements per segment
  int32_t num_segments = 0;
  // The encode forward's residual kernel only (vtok/encode_split.h): blocks along the patch
  // tiles of a frame, and consecutive groups per block. 1 and 1: a block walks every tile of
  // one group (expand's group sum, the scalar path).
  int32_t splits = 1;
  int32_t groups_per_block = 1;
};

#if !defined(__CUDACC_RTC__)
// Lanes per row minimising idle lanes for a segment of seg_vecs vectors, ties to more lanes, or
// with fewest_lanes to fewer lanes (the forward: a block holds one tile of kThreads / lanes
// rows, and a frame's partial results per group shrink as the tiles grow).
inline RowPlan plan_rows(int64_t seg_vecs, int64_t num_segments, int vec, bool fewest_lanes = false,
                         int max_k = 0) {
  RowPlan plan;
  if (max_k == 0) max_k = max_vecs_per_lane(vec);
  int64_t best_waste = -1;
  for (int step = 0; step < 6; ++step) {
    const int lanes = fewest_lanes ? 1 << step : 32 >> step;
    const int64_t k = (seg_vecs + lanes - 1) / lanes;
    if (k > max_k) continue;
    const int64_t waste = lanes * k - seg_vecs;
    if (best_waste < 0 || waste < best_waste) {
      best_waste = waste;
      plan.lanes = lanes;
      plan.vecs_per_lane = static_cast<int32_t>(k);
    }
  }
  plan.seg_vecs = static_cast<int32_t>(seg_vecs);
  plan.num_segments = static_cast<int32_t>(num_segments);
  return plan;
}

// Mean / sum pooling: C is cut into segments of at most 64 vectors (fewer lanes idle than
// with 32 * K) (enough blocks to fill the
// device at B*G ~ 100); attn: one segment per head (the score needs the whole head).
inline RowPlan plan_segments(int64_t channels, int vec, bool attn, int64_t num_heads) {
  const int64_t total_vecs = channels / vec;
  if (attn) return plan_rows(total_vecs / num_heads, num_heads, vec);
  const int64_t segments = (total_vecs + 63) / 64;
  return plan_rows((total_vecs + segments - 1) / segments, segments, vec);
}

// The encode forward on 16-byte rows (fwd_vecs_per_lane vectors per lane): a block's tile is
// kThreads / lanes rows, so rows of few lanes (fewest_lanes) make the fewest partial results per
// group; mean pooling cuts C into segments of one 128-byte line per row (8 vectors: 4 lanes),
// which keep whole L2 sectors per block and, with more segments than plan_segments makes,
// blocks enough for two waves at the benchmark's batches without splitting the groups.
inline RowPlan plan_segments_fwd(int64_t channels, int vec, bool attn, int64_t num_heads) {
  const int64_t total_vecs = channels / vec;
  if (attn) return plan_rows(total_vecs / num_heads, num_heads, vec, true, fwd_vecs_per_lane(vec, true));
  const int64_t segments = (total_vecs + 7) / 8;
  return plan_rows((total_vecs + segments - 1) / segments, segments, vec, true, fwd_vecs_per_lane(vec, false));
}
#endif

__device__ __forceinline__ float to_float(float v) { return v; }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
#if defined(VTOK_CUDA_EMULATION)
// tests/cuda_emulator runs these kernels on the host (threads for lanes): same rounding
// (round to nearest even) without PTX.
__device__ __forceinline__ float to_float(half_t v) {
  _Float16 h;
  __builtin_memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
__device__ __forceinline__ float to_float(bf16_t v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}
template <>
__device__ __forceinline__ half_t from_float<half_t>(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  half_t out;
  __builtin_memcpy(&out.bits, &h, 2);
  return out;
}
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
  const unsigned int bits = __float_as_uint(v);
  bf16_t out;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    out.bits = static_cast<unsigned short>((bits >> 16) | 0x40u);  // quiet NaN
  } else {
    out.bits = static_cast<unsigned short>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  return out;
}
#else
__device__ __forceinline__ float to_float(half_t v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}
__device__ __forceinline__ float to_float(bf16_t v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}
template <>
__device__ __forceinline__ half_t from_float<half_t>(float v) {
  half_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
  return h;
}
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
  bf16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
  return h;
}
#endif

// A 32-bit word holds 4 / sizeof(T) elements; going through words (not a union with uint4)
// keeps 128-bit accesses in registers.
__device__ __forceinline__ void unpack_word(unsigned w, float* out, float) { out[0] = __uint_as_float(w); }
__device__ __forceinline__ void unpack_word(unsigned w, float* out, half_t) {
  out[0] = to_float(half_t{static_cast<unsigned short>(w & 0xffffu)});
  out[1] = to_float(half_t{static_cast<unsigned short>(w >> 16)});
}
__device__ __forceinline__ void unpack_word(unsigned w, float* out, bf16_t) {
  out[0] = to_float(bf16_t{static_cast<unsigned short>(w & 0xffffu)});
  out[1] = to_float(bf16_t{static_cast<unsigned short>(w >> 16)});
}
__device__ __forceinline__ unsigned pack_word(const float* in, float) { return __float_as_uint(in[0]); }
__device__ __forceinline__ unsigned pack_word(const float* in, half_t) {
  return static_cast<unsigned>(from_float<half_t>(in[0]).bits) |
         (static_cast<unsigned>(from_float<half_t>(in[1]).bits) << 16);
}
__device__ __forceinline__ unsigned pack_word(const float* in, bf16_t) {
  return static_cast<unsigned>(from_float<bf16_t>(in[0]).bits) |
         (static_cast<unsigned>(from_float<bf16_t>(in[1]).bits) << 16);
}

template <typename T, int V>
__device__ __forceinline__ void unpack16(const uint4 raw, float (&out)[V]) {
  constexpr int kPerWord = 4 / sizeof(T);
  unpack_word(raw.x, out + 0 * kPerWord, T{});
  unpack_word(raw.y, out + 1 * kPerWord, T{});
  unpack_word(raw.z, out + 2 * kPerWord, T{});
  unpack_word(raw.w, out + 3 * kPerWord, T{});
}

// Loads V elements as floats; V * sizeof(T) is 16 (one 128-bit access) or V is 1.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    unpack16<T, V>(*reinterpret_cast<const uint4*>(ptr), out);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = to_float(ptr[e]);
  }
}

// V elements as loaded, converted to float only where used: a row of a 16-bit type stays in
// half the registers floats would take, which is what lets the forward keep every load of a
// pass in flight at once within its register budget. V * sizeof(T) is 16, or V is 1.
template <typename T, int V>
struct Packed {
  static_assert(V * sizeof(T) == 16, "a packed vector is one 16-byte access or one element");
  uint4 bits;
};
template <typename T>
struct Packed<T, 1> {
  T value;
};

template <typename T, int V>
__device__ __forceinline__ Packed<T, V> load_packed(const T* ptr) {
  if constexpr (V == 1) {
    return {*ptr};
  } else {
    return {*reinterpret_cast<const uint4*>(ptr)};
  }
}

// For data read exactly once (non-key frames): evict-first keeps the key frame and the small
// per-group vectors resident in L2 instead.
template <typename T, int V>
__device__ __forceinline__ Packed<T, V> load_packed_stream(const T* ptr) {
  if constexpr (V == 1) {
    return {*ptr};
  } else {
    return {__ldcs(reinterpret_cast<const uint4*>(ptr))};
  }
}

// The kernels load on clamped (always valid) addresses so that no load sits behind a branch;
// what a lane must not see is replaced by zeros after the load, with selects.
template <typename T, int V>
__device__ __forceinline__ Packed<T, V> zero_unless(bool keep, Packed<T, V> v) {
  if constexpr (V == 1) {
    if (!keep) v.value = T{};
  } else {
    v.bits.x = keep ? v.bits.x : 0u;
    v.bits.y = keep ? v.bits.y : 0u;
    v.bits.z = keep ? v.bits.z : 0u;
    v.bits.w = keep ? v.bits.w : 0u;
  }
  return v;
}

// Makes the compiler treat v as redefined here: a loop-invariant packed row (the forward's key
// row) is then converted where it is used, not once before the loop into floats that hold
// twice its registers across the loop.
template <typename T, int V>
__device__ __forceinline__ void keep_packed(Packed<T, V>& v) {
#if !defined(VTOK_CUDA_EMULATION)
  if constexpr (V > 1) asm volatile("" : "+r"(v.bits.x), "+r"(v.bits.y), "+r"(v.bits.z), "+r"(v.bits.w));
#endif
}

// The same for a loop-invariant integer (a stride, a flag): kept in a register across a loop
// rather than recomputed from the params in every iteration (a load of the constant bank and,
// for a product, its multiplies), which ptxas prefers where registers are short.
__device__ __forceinline__ int64_t keep_int(int64_t v) {
#if !defined(VTOK_CUDA_EMULATION)
  asm volatile("" : "+l"(v));
#endif
  return v;
}
__device__ __forceinline__ int32_t keep_int(int32_t v) {
#if !defined(VTOK_CUDA_EMULATION)
  asm volatile("" : "+r"(v));
#endif
  return v;
}

template <typename T, int V>
__device__ __forceinline__ void unpack(const Packed<T, V>& v, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_float(v.value);
  } else {
    unpack16<T, V>(v.bits, out);
  }
}

// One 16-byte store to global memory (ptr 16-byte aligned), written in PTX: from a uint4
// assignment nvcc 13 emitted four 32-bit STG.E for every vector store of these kernels on
// sm_90a. `ok` predicates the whole vector, so a lane past the end of a row needs neither a
// branch nor a valid address.
__device__ __forceinline__ void store16_if(bool ok, void* ptr, const uint4 v) {
#if defined(VTOK_CUDA_EMULATION)
  if (ok) *static_cast<uint4*>(ptr) = v;
#else
  asm volatile(
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %0, 0;\n\t@p st.global.v4.b32 [%1], {%2, %3, %4, %5};\n\t}"
      :
      : "r"(static_cast<int>(ok)), "l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
      : "memory");
#endif
}

__device__ __forceinline__ void store16(void* ptr, const uint4 v) {
#if defined(VTOK_CUDA_EMULATION)
  *static_cast<uint4*>(ptr) = v;
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
               :
               : "l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#endif
}

template <typename T, int V>
__device__ __forceinline__ uint4 pack16(const float (&in)[V]) {
  constexpr int kPerWord = 4 / sizeof(T);
  return uint4{pack_word(in + 0 * kPerWord, T{}), pack_word(in + 1 * kPerWord, T{}),
               pack_word(in + 2 * kPerWord, T{}), pack_word(in + 3 * kPerWord, T{})};
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    store16(ptr, pack16<T, V>(in));
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) ptr[e] = from_float<T>(in[e]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec_if(bool ok, T* ptr, const float (&in)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    store16_if(ok, ptr, pack16<T, V>(in));
  } else if (ok) {
#pragma unroll
    for (int e = 0; e < V; ++e) ptr[e] = from_float<T>(in[e]);
  }
}

// Sum over the `lanes` consecutive threads of a row (lanes is a power of two dividing 32; every
// lane of the warp must call it).
__device__ __forceinline__ float row_sum(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// One video as the kernels see it, batched or varlen.
struct VideoSpan {
  int64_t frame0;    // first frame in the packed / flattened [*, N, C] frame index space
  int64_t frames;    // T_b
  int64_t key;       // k_b in [0, T_b)
  int64_t groups;    // G_b
  int64_t seq_row0;  // first output row of the video (key tokens, then residual tokens)
  int64_t lse_row0;  // first lse row of the video (one row per group)
  int64_t x_offset;  // element offset of the video's frame 0 in x
};

__device__ __forceinline__ VideoSpan video_span(const EncodeParams& p, int64_t b) {
  VideoSpan v;
  v.key = p.key_index[b];
  if (p.cu_frames == nullptr) {
    v.frames = p.num_frames;
    v.frame0 = b * p.num_frames;
    v.groups = p.num_groups;
    v.seq_row0 = b * (p.num_key_tokens + p.num_groups);
    v.lse_row0 = b * p.num_groups;
    v.x_offset = b * p.x_stride_b;
  } else {
    v.frame0 = p.cu_frames[b];
    v.frames = p.cu_frames[b + 1] - v.frame0;
    v.groups = num_groups(v.frames, p.frames_per_token);
    v.seq_row0 = p.cu_tokens[b];
    v.lse_row0 = varlen_group_offset(p.cu_tokens, b, p.num_key_tokens);
    v.x_offset = v.frame0 * p.x_stride_t;
  }
  return v;
}

// Rows [0, dq_partial_rows(p)) of the backward workspace hold per-block partial grad_query
// rows of C floats; the per-(group, head) <grad r, r> terms follow. The bound does not depend
// on the row plan (kThreads / lanes >= 8 rows per block), so Python can size the workspace.
VTOK_HOST_DEVICE int64_t dq_partial_rows(int64_t batch, int64_t num_patches) {
  return batch * ((num_patches + kWarps - 1) / kWarps);
}

}  // namespace cuda
}  // namespace vtok
