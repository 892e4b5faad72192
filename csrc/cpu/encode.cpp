// encode (batched and varlen), forward and backward, on the CPU.
//
// Forward: one task per (video, group) reads that group's frames and the key frame once and
// streams them through an online softmax (attn) or a running sum (mean); another per (video, key
// token) writes the key tokens. Nothing of size [T, N, C] is ever allocated.
// Backward: one task per (video, block of patches) walks every frame of those patches, so the
// key frame's gradient (minus the sum over frames) is a private, ordered sum: no atomics, and
// the same bits for any thread count. grad_query is reduced from per-task partials in task order.
#include <cmath>
#include <type_traits>
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

// Key token s of video v: a copy of the key frame's patch, or the mean of its adaptive bin.
template <typename T>
void key_token_fwd(const EncodeParams& p, const Video& v, int64_t s, acc_t<T>* acc) {
  using Acc = acc_t<T>;
  const int64_t C = p.channels;
  T* out = static_cast<T*>(p.sequence) + (v.seq_row + s) * C;
  if (!p.spatial) {
    const T* src = x_row<T>(p, v, v.key, s);
    std::copy(src, src + C, out);
    return;
  }
  const Bin rows = adaptive_bin(s / p.out_w, p.grid_h, p.out_h);
  const Bin cols = adaptive_bin(s % p.out_w, p.grid_w, p.out_w);
  std::fill(acc, acc + C, Acc(0));
  for (int64_t h = rows.start; h < rows.end; ++h) {
    for (int64_t w = cols.start; w < cols.end; ++w) {
      const T* VTOK_RESTRICT src = x_row<T>(p, v, v.key, h * p.grid_w + w);
      VTOK_SIMD
      for (int64_t c = 0; c < C; ++c) acc[c] += load(src[c]);
    }
  }
  const Acc count = static_cast<Acc>((rows.end - rows.start) * (cols.end - cols.start));
  VTOK_SIMD
  for (int64_t c = 0; c < C; ++c) out[c] = store<T>(acc[c] / count);
}

// Per-thread scratch of the residual-token forward: a block of key rows, a block of residual
// rows (both in the accumulation type), scores, the accumulator and the softmax states.
template <typename Acc>
struct GroupScratch {
  std::vector<Acc> key, residual, score, acc;
  std::vector<SoftmaxStateT<Acc>> state;
  GroupScratch(int64_t C, int64_t H)
      : key(kPatchBlock * C), residual(kPatchBlock * C), score(kPatchBlock), acc(C), state(H) {}
};

template <typename T>
void residual_token_fwd(const EncodeParams& p, const Video& v, int64_t g, const acc_t<T>* query,
                        GroupScratch<acc_t<T>>& scratch) {
  using Acc = acc_t<T>;
  const int64_t C = p.channels, N = p.num_patches, H = p.num_heads, hc = C / H;
  const bool attn = p.pool == Pool::kAttn;
  const Acc scale = Acc(1) / std::sqrt(static_cast<Acc>(hc));
  const GroupBounds bounds = group_bounds(g, v.frames, p.frames_per_token);
  Acc* VTOK_RESTRICT acc = scratch.acc.data();
  std::fill(scratch.acc.begin(), scratch.acc.end(), Acc(0));
  for (auto& st : scratch.state) st = softmax_init_t<Acc>();

  for (int64_t n0 = 0; n0 < N; n0 += kPatchBlock) {
    const int64_t nb = std::min(kPatchBlock, N - n0);
    // The key block is converted once and reused by every frame of the group.
    for (int64_t i = 0; i < nb; ++i)
      load_row(scratch.key.data() + i * C, x_row<T>(p, v, v.key, n0 + i), C);
    for (int64_t rank = bounds.first; rank < bounds.last; ++rank) {
      const int64_t t = nonkey_frame(rank, v.key);
      if (!attn) {
        for (int64_t i = 0; i < nb; ++i) {
          const T* VTOK_RESTRICT xt = x_row<T>(p, v, t, n0 + i);
          const Acc* VTOK_RESTRICT k = scratch.key.data() + i * C;
          // Summing a block of patches apart before adding it to the running total keeps the
          // rounding error of long groups (frames_per_token * N terms) small.
          Acc* VTOK_RESTRICT part = scratch.residual.data();
          if (i == 0) std::fill(part, part + C, Acc(0));
          VTOK_SIMD
          for (int64_t c = 0; c < C; ++c) part[c] += load(xt[c]) - k[c];
        }
        const Acc* VTOK_RESTRICT part = scratch.residual.data();
        VTOK_SIMD
        for (int64_t c = 0; c < C; ++c) acc[c] += part[c];
        continue;
      }
      for (int64_t i = 0; i < nb; ++i) {
        const T* VTOK_RESTRICT xt = x_row<T>(p, v, t, n0 + i);
        const Acc* VTOK_RESTRICT k = scratch.key.data() + i * C;
        Acc* VTOK_RESTRICT d = scratch.residual.data() + i * C;
        VTOK_SIMD
        for (int64_t c = 0; c < C; ++c) d[c] = load(xt[c]) - k[c];
      }
      for (int64_t h = 0; h < H; ++h) {
        Acc* score = scratch.score.data();
        Acc block_max = static_cast<Acc>(-INFINITY);
        for (int64_t i = 0; i < nb; ++i) {
          score[i] = scale * dot(query + h * hc, scratch.residual.data() + i * C + h * hc, hc);
          block_max = score[i] > block_max ? score[i] : block_max;
        }
        Acc block_sum = 0;
        for (int64_t i = 0; i < nb; ++i) {
          score[i] = exp_acc(score[i] - block_max);
          block_sum += score[i];
        }
        const MergeScaleT<Acc> ms = softmax_merge_t(scratch.state[h], {block_max, block_sum});
        Acc* VTOK_RESTRICT a = acc + h * hc;
        if (ms.a != Acc(1)) {
          VTOK_SIMD
          for (int64_t c = 0; c < hc; ++c) a[c] *= ms.a;
        }
        for (int64_t i = 0; i < nb; ++i)
          axpy(a, ms.b * score[i], scratch.residual.data() + i * C + h * hc, hc);
      }
    }
  }

  T* out = static_cast<T*>(p.sequence) + (v.seq_row + p.num_key_tokens + g) * C;
  if (!attn) {
    const Acc inv = Acc(1) / static_cast<Acc>((bounds.last - bounds.first) * N);
    VTOK_SIMD
    for (int64_t c = 0; c < C; ++c) out[c] = store<T>(acc[c] * inv);
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    const Acc inv = Acc(1) / scratch.state[h].sum;
    VTOK_SIMD
    for (int64_t c = h * hc; c < (h + 1) * hc; ++c) out[c] = store<T>(acc[c] * inv);
    p.lse[(v.group_row + g) * H + h] = static_cast<float>(softmax_lse_t(scratch.state[h]));
  }
}

template <typename T>
void encode_fwd_impl(const EncodeParams& p, int num_threads) {
  using Acc = acc_t<T>;
  const std::vector<Video> videos = videos_of(p);
  const std::vector<int64_t> starts = group_starts(videos);
  std::vector<Acc> query(p.pool == Pool::kAttn ? p.channels : 0);
  for (size_t c = 0; c < query.size(); ++c) query[c] = static_cast<Acc>(p.query[c]);

  // One parallel region (each region ends in a barrier, which costs a scheduler time slice
  // whenever a thread has been preempted on a busy machine): key tokens, then residual tokens
  // without waiting in between.
#pragma omp parallel num_threads(num_threads)
  {
    GroupScratch<Acc> scratch(p.channels, p.num_heads);
#pragma omp for schedule(static) nowait
    for (int64_t task = 0; task < p.batch * p.num_key_tokens; ++task)
      key_token_fwd<T>(p, videos[task / p.num_key_tokens], task % p.num_key_tokens,
                       scratch.acc.data());
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < starts.back(); ++task) {
      const int64_t b = video_of_task(starts, task);
      residual_token_fwd<T>(p, videos[b], task - starts[b], query.data(), scratch);
    }
  }
}

// Adds to `grad` the key-token gradient of key-frame patch n: its own token's gradient, or with
// spatial pooling the gradient of every adaptive bin holding it, spread uniformly over the bin.
template <typename T, typename Acc>
void key_token_grad(const EncodeParams& p, const T* grad_key_tokens, int64_t n, Acc* grad) {
  const int64_t C = p.channels;
  if (!p.spatial) {
    const T* VTOK_RESTRICT g = grad_key_tokens + n * C;
    VTOK_SIMD
    for (int64_t c = 0; c < C; ++c) grad[c] += load(g[c]);
    return;
  }
  const Bin row_bins = bins_holding(n / p.grid_w, p.grid_h, p.out_h);
  const Bin col_bins = bins_holding(n % p.grid_w, p.grid_w, p.out_w);
  for (int64_t i = row_bins.start; i < row_bins.end; ++i) {
    const Bin rows = adaptive_bin(i, p.grid_h, p.out_h);
    for (int64_t j = col_bins.start; j < col_bins.end; ++j) {
      const Bin cols = adaptive_bin(j, p.grid_w, p.out_w);
      const Acc count = static_cast<Acc>((rows.end - rows.start) * (cols.end - cols.start));
      const T* VTOK_RESTRICT g = grad_key_tokens + (i * p.out_w + j) * C;
      VTOK_SIMD
      for (int64_t c = 0; c < C; ++c) grad[c] += load(g[c]) / count;
    }
  }
}

// Calls visit(d) with the residual row d = x[t, n] - x[key, n] (accumulation type) of every
// patch n and frame t of one group; the key row is converted once per patch.
template <typename T, typename Acc, typename Visit>
void for_each_group_residual(const EncodeParams& p, const Video& v, GroupBounds bounds, Acc* key,
                             Acc* d, Visit&& visit) {
  const int64_t C = p.channels;
  for (int64_t n = 0; n < p.num_patches; ++n) {
    load_row(key, x_row<T>(p, v, v.key, n), C);
    for (int64_t rank = bounds.first; rank < bounds.last; ++rank) {
      const T* VTOK_RESTRICT xt = x_row<T>(p, v, nonkey_frame(rank, v.key), n);
      Acc* VTOK_RESTRICT dv = d;
      const Acc* VTOK_RESTRICT kv = key;
      VTOK_SIMD
      for (int64_t c = 0; c < C; ++c) dv[c] = load(xt[c]) - kv[c];
      visit(static_cast<const Acc*>(d));
    }
  }
}

template <typename T>
void encode_bwd_impl(const EncodeBwdParams& bp, int num_threads) {
  using Acc = acc_t<T>;
  const EncodeParams& p = bp.fwd;
  const int64_t C = p.channels, N = p.num_patches, H = p.num_heads, hc = C / H;
  const int64_t S = p.num_key_tokens;
  const bool attn = p.pool == Pool::kAttn;
  const Acc scale = Acc(1) / std::sqrt(static_cast<Acc>(hc));
  const std::vector<Video> videos = videos_of(p);
  const std::vector<int64_t> starts = group_starts(videos);
  const T* grad_seq = static_cast<const T*>(bp.grad_sequence);
  const T* seq = static_cast<const T*>(p.sequence);
  T* grad_x = static_cast<T*>(bp.grad_x);
  std::vector<Acc> query(attn ? C : 0);
  for (size_t c = 0; c < query.size(); ++c) query[c] = static_cast<Acc>(p.query[c]);

  // Per group and head: lse and <grad r, r>. float32 / float64 sequences hold r exactly as the
  // forward accumulated it; a 16-bit sequence holds r rounded, and <grad r, r> of the rounded r
  // leaves an error in grad_query as large as the rounding (it no longer cancels against
  // sum_i p_i <grad r, d_i>), so for those it is recomputed as sum_i p_i <grad r, d_i>, one more
  // pass over the group's frames. The saved lse is float32; float64 recomputes it in double in
  // the same kind of pass, so that its gradients are exact to double precision (gradcheck).
  constexpr bool kRecomputeGradDotR = sizeof(T) == 2;
  constexpr bool kRecomputeLse = std::is_same<T, double>::value;
  std::vector<Acc> grad_dot_r(attn ? starts.back() * H : 0), lse(attn ? starts.back() * H : 0);
  if (attn) {
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<Acc> key(C), d(C), gr(C);
      std::vector<SoftmaxStateT<Acc>> state(H);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < starts.back(); ++task) {
        const int64_t b = video_of_task(starts, task), g = task - starts[b];
        const Video& v = videos[b];
        const int64_t row = v.seq_row + S + g;
        Acc* VTOK_RESTRICT sums = grad_dot_r.data() + task * H;
        for (int64_t h = 0; h < H; ++h) lse[task * H + h] = static_cast<Acc>(p.lse[task * H + h]);
        const GroupBounds bounds = group_bounds(g, v.frames, p.frames_per_token);
        if (kRecomputeLse) {
          std::fill(state.begin(), state.end(), softmax_init_t<Acc>());
          for_each_group_residual<T>(p, v, bounds, key.data(), d.data(), [&](const Acc* dv) {
            for (int64_t h = 0; h < H; ++h)
              softmax_merge_t(state[h], {scale * dot(query.data() + h * hc, dv + h * hc, hc), Acc(1)});
          });
          for (int64_t h = 0; h < H; ++h) lse[task * H + h] = softmax_lse_t(state[h]);
        }
        load_row(gr.data(), grad_seq + row * C, C);
        if (!kRecomputeGradDotR) {
          load_row(d.data(), seq + row * C, C);
          for (int64_t h = 0; h < H; ++h) sums[h] = dot(gr.data() + h * hc, d.data() + h * hc, hc);
          continue;
        }
        std::fill(sums, sums + H, Acc(0));
        for_each_group_residual<T>(p, v, bounds, key.data(), d.data(), [&](const Acc* dv) {
          for (int64_t h = 0; h < H; ++h) {
            const int64_t o = h * hc;
            const Acc s = scale * dot(query.data() + o, dv + o, hc);
            sums[h] += exp_acc(s - lse[task * H + h]) * dot(gr.data() + o, dv + o, hc);
          }
        });
      }
    }
  }

  const int64_t blocks = (N + kPatchBlock - 1) / kPatchBlock;
  const int64_t tasks = p.batch * blocks;
  std::vector<Acc> grad_query_parts(attn ? tasks * C : 0);
  int64_t max_groups = 0;
  for (const Video& v : videos) max_groups = std::max(max_groups, v.groups);

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> key(kPatchBlock * C), grad_key(kPatchBlock * C), d(C), dd(C);
    std::vector<Acc> grad_groups(max_groups * C);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / blocks, n0 = (task % blocks) * kPatchBlock;
      const int64_t nb = std::min(kPatchBlock, N - n0);
      const Video& v = videos[b];
      const T* grad_key_tokens = grad_seq + v.seq_row * C;
      const T* grad_res_tokens = grad_key_tokens + S * C;
      // The residual tokens' gradients, converted once per task; for mean already divided by
      // the group's element count.
      for (int64_t g = 0; g < v.groups; ++g) {
        Acc* dst = grad_groups.data() + g * C;
        load_row(dst, grad_res_tokens + g * C, C);
        if (!attn) {
          const GroupBounds gb = group_bounds(g, v.frames, p.frames_per_token);
          const Acc inv = Acc(1) / static_cast<Acc>((gb.last - gb.first) * N);
          VTOK_SIMD
          for (int64_t c = 0; c < C; ++c) dst[c] *= inv;
        }
      }
      Acc* grad_q = attn ? grad_query_parts.data() + task * C : nullptr;
      if (attn) std::fill(grad_q, grad_q + C, Acc(0));
      const Acc* gdr = attn ? grad_dot_r.data() + starts[b] * H : nullptr;
      const Acc* lse_b = attn ? lse.data() + starts[b] * H : nullptr;

      // Frames outer, the block's patches inner: each frame's rows of the block are one
      // contiguous stretch of x and grad_x (prefetcher- and TLB-friendly), while every patch
      // still sums its key gradient over frames in the same order.
      for (int64_t i = 0; i < nb; ++i) {
        Acc* gk = grad_key.data() + i * C;
        std::fill(gk, gk + C, Acc(0));
        key_token_grad(p, grad_key_tokens, n0 + i, gk);
        if (attn) load_row(key.data() + i * C, x_row<T>(p, v, v.key, n0 + i), C);
      }
      for (int64_t rank = 0; rank < v.frames - 1; ++rank) {
        const int64_t t = nonkey_frame(rank, v.key);
        const int64_t g = rank / p.frames_per_token;
        const Acc* VTOK_RESTRICT gr = grad_groups.data() + g * C;
        for (int64_t i = 0; i < nb; ++i) {
          Acc* VTOK_RESTRICT gk = grad_key.data() + i * C;
          T* VTOK_RESTRICT gx = grad_x + ((v.frame0 + t) * N + n0 + i) * C;
          if (!attn) {
            VTOK_SIMD
            for (int64_t c = 0; c < C; ++c) {
              gx[c] = store<T>(gr[c]);
              gk[c] -= gr[c];
            }
            continue;
          }
          const T* VTOK_RESTRICT xt = x_row<T>(p, v, t, n0 + i);
          Acc* VTOK_RESTRICT dv = d.data();
          const Acc* VTOK_RESTRICT kv = key.data() + i * C;
          VTOK_SIMD
          for (int64_t c = 0; c < C; ++c) dv[c] = load(xt[c]) - kv[c];
          Acc* VTOK_RESTRICT ddv = dd.data();
          for (int64_t h = 0; h < H; ++h) {
            const int64_t o = h * hc;
            const Acc s = scale * dot(query.data() + o, dv + o, hc);
            const Acc prob = exp_acc(s - lse_b[g * H + h]);
            const Acc coef = prob * (dot(gr + o, dv + o, hc) - gdr[g * H + h]) * scale;
            const Acc* VTOK_RESTRICT q = query.data() + o;
            VTOK_SIMD
            for (int64_t c = 0; c < hc; ++c) {
              ddv[o + c] = prob * gr[o + c] + coef * q[c];
              grad_q[o + c] += coef * dv[o + c];
            }
          }
          VTOK_SIMD
          for (int64_t c = 0; c < C; ++c) {
            gx[c] = store<T>(ddv[c]);
            gk[c] -= ddv[c];
          }
        }
      }
      for (int64_t i = 0; i < nb; ++i)
        store_row(grad_x + ((v.frame0 + v.key) * N + n0 + i) * C, grad_key.data() + i * C, C);
    }
  }

  if (attn) {
    for (int64_t c = 0; c < C; ++c) {
      Acc sum = 0;
      for (int64_t task = 0; task < tasks; ++task) sum += grad_query_parts[task * C + c];
      bp.grad_query[c] = static_cast<float>(sum);
    }
  }
}

int64_t work(const EncodeParams& p) {
  return p.batch * p.num_frames * p.num_patches * p.channels;
}

}  // namespace

void encode_fwd(const EncodeParams& params, int num_threads) {
  dispatch_dtype(params.dtype, [&](auto tag) {
    encode_fwd_impl<decltype(tag)>(params, thread_count(num_threads, work(params)));
  });
}

void encode_bwd(const EncodeBwdParams& params, int num_threads) {
  dispatch_dtype(params.fwd.dtype, [&](auto tag) {
    encode_bwd_impl<decltype(tag)>(params, thread_count(num_threads, work(params.fwd)));
  });
}

}  // namespace VTOK_CPU_ISA
}  // namespace cpu
}  // namespace vtok
