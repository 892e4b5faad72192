// expand (the generation-side adjoint of encode), forward and backward, on the CPU.
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"

#ifndef VTOK_CPU_ISA
#define VTOK_CPU_ISA baseline
#endif

namespace vtok {
namespace cpu {
namespace VTOK_CPU_ISA {
namespace {

template <typename T>
void expand_fwd_impl(const ExpandParams& p, int num_threads) {
  const int64_t T_ = p.num_frames, N = p.num_patches, C = p.channels;
  const T* key_tokens = static_cast<const T*>(p.key_tokens);
  const T* residual_tokens = static_cast<const T*>(p.residual_tokens);
  T* frames = static_cast<T*>(p.frames);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t task = 0; task < p.batch * T_; ++task) {
    const int64_t b = task / T_, t = task % T_;
    const int64_t key = p.key_index[b];
    T* out = frames + task * N * C;
    const T* VTOK_RESTRICT r =
        t == key ? nullptr
                 : residual_tokens + b * p.res_stride_b +
                       group_of_frame(t, key, p.frames_per_token) * p.res_stride_g;
    for (int64_t n = 0; n < N; ++n) {
      const T* VTOK_RESTRICT k = key_tokens + b * p.key_stride_b + n * p.key_stride_n;
      T* VTOK_RESTRICT o = out + n * C;
      if (r == nullptr) {
        std::copy(k, k + C, o);
        continue;
      }
      VTOK_SIMD
      for (int64_t c = 0; c < C; ++c) o[c] = store<T>(load(k[c]) + load(r[c]));
    }
  }
}

// Two kinds of task, both writing disjoint outputs with ordered sums: (video, patch block) sums
// every frame into the key tokens' gradient, (video, group) sums the group's frames and patches.
template <typename T>
void expand_bwd_impl(const ExpandBwdParams& p, int num_threads) {
  using Acc = acc_t<T>;
  const int64_t T_ = p.num_frames, N = p.num_patches, C = p.channels, G = p.num_groups;
  const T* grad_frames = static_cast<const T*>(p.grad_frames);
  T* grad_key = static_cast<T*>(p.grad_key_tokens);
  T* grad_res = static_cast<T*>(p.grad_residual_tokens);
  const int64_t blocks = ceil_div(N, kPatchBlock);
  const int64_t key_tasks = p.batch * blocks;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> acc(C), part(C);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < key_tasks + p.batch * G; ++task) {
      Acc* VTOK_RESTRICT a = acc.data();
      if (task < key_tasks) {
        const int64_t b = task / blocks, n0 = (task % blocks) * kPatchBlock;
        for (int64_t n = n0; n < std::min(N, n0 + kPatchBlock); ++n) {
          std::fill(acc.begin(), acc.end(), Acc(0));
          for (int64_t t = 0; t < T_; ++t) {
            const T* VTOK_RESTRICT g = grad_frames + ((b * T_ + t) * N + n) * C;
            VTOK_SIMD
            for (int64_t c = 0; c < C; ++c) a[c] += load(g[c]);
          }
          store_row(grad_key + (b * N + n) * C, a, C);
        }
        continue;
      }
      const int64_t b = (task - key_tasks) / G, g = (task - key_tasks) % G;
      const int64_t key = p.key_index[b];
      const GroupBounds bounds = group_bounds(g, T_, p.frames_per_token);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t rank = bounds.first; rank < bounds.last; ++rank) {
        const int64_t t = nonkey_frame(rank, key);
        Acc* VTOK_RESTRICT pt = part.data();
        std::fill(part.begin(), part.end(), Acc(0));
        for (int64_t n = 0; n < N; ++n) {
          const T* VTOK_RESTRICT g_row = grad_frames + ((b * T_ + t) * N + n) * C;
          VTOK_SIMD
          for (int64_t c = 0; c < C; ++c) pt[c] += load(g_row[c]);
        }
        VTOK_SIMD
        for (int64_t c = 0; c < C; ++c) a[c] += pt[c];
      }
      store_row(grad_res + (b * G + g) * C, a, C);
    }
  }
}

}  // namespace

void expand_fwd(const ExpandParams& params, int num_threads) {
  dispatch_dtype(params.dtype, [&](auto tag) {
    const int64_t work = params.batch * params.num_frames * params.num_patches * params.channels;
    expand_fwd_impl<decltype(tag)>(params, thread_count(num_threads, work));
  });
}

void expand_bwd(const ExpandBwdParams& params, int num_threads) {
  dispatch_dtype(params.dtype, [&](auto tag) {
    const int64_t work = params.batch * params.num_frames * params.num_patches * params.channels;
    expand_bwd_impl<decltype(tag)>(params, thread_count(num_threads, work));
  });
}

}  // namespace VTOK_CPU_ISA
}  // namespace cpu
}  // namespace vtok
