// encode (batched and varlen), forward and backward, on the CPU.
//
// Forward (both poolings): a task per (video, block of patches, run of groups) converts the
// block's key rows once and streams the run's frames through them into one partial per (group,
// block): a sum for mean, an online-softmax state for attn. The partials are then combined per
// group in block order (SplitPlan). x is read once; every sum has a fixed order.
// Backward, attn: one task per (video, block of patches) walks every frame of those patches, so
// the key frame's gradient (minus the sum over frames) is a private, ordered sum: no atomics.
// grad_query is reduced from per-task partials in task order. Backward, mean: the gradient does
// not depend on x, and each thread writes one contiguous range of grad_x's rows.
// The same bits for any thread count, and nothing of size [T, N, C] is ever allocated.
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

// Patches per forward task: its key rows (converted once) stay in L2 while the frames stream
// past them. Fixed, like kPatchBlock, so the order of the sums is too.
constexpr int64_t kTaskPatches = 8 * kPatchBlock;
// Frames the mean forward reads side by side (see encode_fwd_mean).
constexpr int64_t kFrameTile = 4;

// How the forwards split their work: a task per (video, block of kTaskPatches patches, run of
// groups) converts the block's key rows once and streams the run's frames through them, leaving
// one partial result per (group, block); then each group's partials are combined in block
// order, as flash decoding splits a long sequence. x is read once and the key frame once per
// run, where a task per group would read the key frame again for every group. Runs exist only
// to give every thread work: each (group, block) partial is made by one task in one order
// whatever the runs are, so they may follow the thread count without changing a bit.
struct SplitPlan {
  int64_t blocks, runs, run_groups;

  SplitPlan(const EncodeParams& p, const std::vector<Video>& videos, int num_threads) {
    blocks = ceil_div(p.num_patches, kTaskPatches);
    int64_t max_groups = 1;
    for (const Video& v : videos) max_groups = std::max(max_groups, v.groups);
    runs = std::min(max_groups, ceil_div(4 * int64_t(num_threads), p.batch * blocks));
    run_groups = ceil_div(max_groups, runs);
  }
  int64_t tasks(const EncodeParams& p) const { return p.batch * blocks * runs; }
  // Index of (flat group, block) in a [flat group][block] array of partials.
  int64_t slot(int64_t flat_group, int64_t block) const { return flat_group * blocks + block; }
};

struct SplitTask {
  int64_t video, block, n0, nb;
  int64_t first, last;  // ranks of the non-key frames the task streams
  bool copy_key;        // the task writes its block's key tokens (no spatial pooling, first run)
};

inline SplitTask split_task(const EncodeParams& p, const std::vector<Video>& videos,
                            const SplitPlan& plan, int64_t task) {
  SplitTask st;
  st.video = task / (plan.blocks * plan.runs);
  st.block = task / plan.runs % plan.blocks;
  const int64_t run = task % plan.runs;
  st.n0 = st.block * kTaskPatches;
  st.nb = std::min(kTaskPatches, p.num_patches - st.n0);
  st.first = run * plan.run_groups * p.frames_per_token;
  st.last = std::min(videos[st.video].frames - 1,
                     (run + 1) * plan.run_groups * p.frames_per_token);
  st.copy_key = !p.spatial && run == 0;
  return st;
}

// Converts the task's key rows into `key`, and copies them to the key tokens if the task owns them.
template <typename T>
void load_key_block(const EncodeParams& p, const Video& v, const SplitTask& st, acc_t<T>* key) {
  const int64_t C = p.channels;
  for (int64_t i = 0; i < st.nb; ++i) {
    const T* row = x_row<T>(p, v, v.key, st.n0 + i);
    load_row(key + i * C, row, C);
    if (st.copy_key)
      std::copy(row, row + C, static_cast<T*>(p.sequence) + (v.seq_row + st.n0 + i) * C);
  }
}

// Calls visit(task, video) for every task of the plan with work, its key rows converted into
// `key` first. Inside a parallel region; the loop ends in a barrier.
template <typename T, typename Visit>
void for_each_split_task(const EncodeParams& p, const std::vector<Video>& videos,
                         const SplitPlan& plan, acc_t<T>* key, Visit&& visit) {
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < plan.tasks(p); ++task) {
    const SplitTask st = split_task(p, videos, plan, task);
    const Video& v = videos[st.video];
    if (st.first >= st.last && !st.copy_key) continue;
    load_key_block<T>(p, v, st, key);
    visit(st, v);
  }
}

// With spatial pooling the key tokens are bin means, whose bins cross the patch blocks: a loop
// of their own. To be run inside a parallel region (no barrier after it).
template <typename T>
void spatial_key_tokens(const EncodeParams& p, const std::vector<Video>& videos,
                        acc_t<T>* scratch) {
  const int64_t S = p.num_key_tokens;
#pragma omp for schedule(static) nowait
  for (int64_t task = 0; task < p.batch * S; ++task)
    key_token_fwd<T>(p, videos[task / S], task % S, scratch);
}

template <typename T, typename Acc>
inline void add_residuals1(Acc* VTOK_RESTRICT part, const T* VTOK_RESTRICT x,
                           const Acc* VTOK_RESTRICT k, int64_t C) {
  VTOK_SIMD
  for (int64_t c = 0; c < C; ++c) part[c] += load(x[c]) - k[c];
}

// part[f * C + c] += x_f[c] - k[c] for four frames' rows at once.
template <typename T, typename Acc>
inline void add_residuals4(Acc* VTOK_RESTRICT part, const T* const* rows, int64_t offset,
                           const Acc* VTOK_RESTRICT k, int64_t C) {
  const T* VTOK_RESTRICT x0 = rows[0] + offset;
  const T* VTOK_RESTRICT x1 = rows[1] + offset;
  const T* VTOK_RESTRICT x2 = rows[2] + offset;
  const T* VTOK_RESTRICT x3 = rows[3] + offset;
  Acc* VTOK_RESTRICT p0 = part;
  Acc* VTOK_RESTRICT p1 = part + C;
  Acc* VTOK_RESTRICT p2 = part + 2 * C;
  Acc* VTOK_RESTRICT p3 = part + 3 * C;
  VTOK_SIMD
  for (int64_t c = 0; c < C; ++c) {
    const Acc kc = k[c];
    p0[c] += load(x0[c]) - kc;
    p1[c] += load(x1[c]) - kc;
    p2[c] += load(x2[c]) - kc;
    p3[c] += load(x3[c]) - kc;
  }
}

template <typename Acc>
inline void add_row(Acc* VTOK_RESTRICT sum, const Acc* VTOK_RESTRICT row, int64_t C) {
  VTOK_SIMD
  for (int64_t c = 0; c < C; ++c) sum[c] += row[c];
}

// Mean pooling, forward, split as SplitPlan says; a partial is a sum of residual rows.
template <typename T>
void encode_fwd_mean(const EncodeParams& p, const std::vector<Video>& videos,
                     const std::vector<int64_t>& starts, int num_threads) {
  using Acc = acc_t<T>;
  const int64_t C = p.channels, N = p.num_patches, S = p.num_key_tokens;
  const SplitPlan plan(p, videos, num_threads);
  std::vector<Acc> partials(plan.slot(starts.back(), 0) * C);

  // One parallel region: every loop's barrier costs a scheduler time slice whenever a thread
  // has been preempted on a busy machine.
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> key(kTaskPatches * C), part(kFrameTile * C), frame_sum(kFrameTile * C);
    if (p.spatial) spatial_key_tokens<T>(p, videos, part.data());
    for_each_split_task<T>(p, videos, plan, key.data(), [&](const SplitTask& st, const Video& v) {
      // Frames in fours: four streams from memory per core instead of one, and each key row
      // loaded once for all four. A frame's sum over the block (kPatchBlock patches apart, then
      // added up, which keeps the rounding error of long sums small) does not depend on how
      // frames are tiled, and is added to its group's total in frame order, so neither do the
      // bits.
      for (int64_t rank0 = st.first; rank0 < st.last; rank0 += kFrameTile) {
        const int64_t tile = std::min(kFrameTile, st.last - rank0);
        const T* rows[kFrameTile];
        for (int64_t f = 0; f < tile; ++f) {
          rows[f] = x_row<T>(p, v, nonkey_frame(rank0 + f, v.key), st.n0);
          std::fill(frame_sum.begin() + f * C, frame_sum.begin() + (f + 1) * C, Acc(0));
        }
        for (int64_t i0 = 0; i0 < st.nb; i0 += kPatchBlock) {
          std::fill(part.begin(), part.begin() + tile * C, Acc(0));
          for (int64_t i = i0; i < std::min(st.nb, i0 + kPatchBlock); ++i) {
            const Acc* k = key.data() + i * C;
            const int64_t offset = i * p.x_stride_n;
            if (tile == kFrameTile) {
              add_residuals4(part.data(), rows, offset, k, C);
            } else {
              for (int64_t f = 0; f < tile; ++f)
                add_residuals1(part.data() + f * C, rows[f] + offset, k, C);
            }
          }
          for (int64_t f = 0; f < tile; ++f)
            add_row(frame_sum.data() + f * C, part.data() + f * C, C);
        }
        for (int64_t f = 0; f < tile; ++f) {
          const int64_t rank = rank0 + f, g = rank / p.frames_per_token;
          Acc* sum = partials.data() + plan.slot(starts[st.video] + g, st.block) * C;
          if (rank % p.frames_per_token == 0) std::fill(sum, sum + C, Acc(0));
          add_row(sum, frame_sum.data() + f * C, C);
        }
      }
    });
#pragma omp for schedule(static)
    for (int64_t flat = 0; flat < starts.back(); ++flat) {
      const int64_t b = video_of_task(starts, flat), g = flat - starts[b];
      const GroupBounds bounds = group_bounds(g, videos[b].frames, p.frames_per_token);
      Acc* VTOK_RESTRICT acc = part.data();
      std::fill(acc, acc + C, Acc(0));
      for (int64_t block = 0; block < plan.blocks; ++block)
        add_row(acc, partials.data() + plan.slot(flat, block) * C, C);
      const Acc inv = Acc(1) / static_cast<Acc>((bounds.last - bounds.first) * N);
      T* VTOK_RESTRICT out = static_cast<T*>(p.sequence) + (videos[b].seq_row + S + g) * C;
      VTOK_SIMD
      for (int64_t c = 0; c < C; ++c) out[c] = store<T>(acc[c] * inv);
    }
  }
}

// One frame's (or group's) share of an attention token: per head the softmax state of the
// scores seen so far, and the sum of residual rows weighted by exp(score - state.max).
template <typename Acc>
struct SoftmaxPartial {
  SoftmaxStateT<Acc>* state;  // [H]
  Acc* acc;                   // [C]
};

// Streams `rows` residual rows (row i at d + i * C) into a partial, head by head.
template <typename Acc>
void softmax_rows(SoftmaxPartial<Acc> into, const Acc* d, int64_t rows, const Acc* query,
                  Acc scale, int64_t H, int64_t hc, Acc* score) {
  const int64_t C = H * hc;
  for (int64_t h = 0; h < H; ++h) {
    Acc block_max = static_cast<Acc>(-INFINITY);
    for (int64_t i = 0; i < rows; ++i) {
      score[i] = scale * dot(query + h * hc, d + i * C + h * hc, hc);
      block_max = score[i] > block_max ? score[i] : block_max;
    }
    Acc block_sum = 0;
    VTOK_SIMD_SUM(block_sum)
    for (int64_t i = 0; i < rows; ++i) {
      score[i] = exp_cpu(score[i] - block_max);
      block_sum += score[i];
    }
    const MergeScaleT<Acc> ms = softmax_merge_t(into.state[h], {block_max, block_sum});
    Acc* VTOK_RESTRICT a = into.acc + h * hc;
    if (ms.a != Acc(1)) {
      VTOK_SIMD
      for (int64_t c = 0; c < hc; ++c) a[c] *= ms.a;
    }
    for (int64_t i = 0; i < rows; ++i) axpy(a, ms.b * score[i], d + i * C + h * hc, hc);
  }
}

// into <- the softmax partial of the scores of both.
template <typename Acc>
void merge_partial(SoftmaxPartial<Acc> into, SoftmaxPartial<Acc> from, int64_t H, int64_t hc) {
  for (int64_t h = 0; h < H; ++h) {
    const MergeScaleT<Acc> ms = softmax_merge_t(into.state[h], from.state[h]);
    Acc* VTOK_RESTRICT a = into.acc + h * hc;
    const Acc* VTOK_RESTRICT b = from.acc + h * hc;
    VTOK_SIMD
    for (int64_t c = 0; c < hc; ++c) a[c] = a[c] * ms.a + b[c] * ms.b;
  }
}

template <typename Acc>
void clear_partial(SoftmaxPartial<Acc> partial, int64_t H, int64_t C) {
  std::fill(partial.state, partial.state + H, softmax_init_t<Acc>());
  std::fill(partial.acc, partial.acc + C, Acc(0));
}

// Attention pooling, forward, split as SplitPlan says; a partial is a SoftmaxPartial. Each frame
// streams its block of residual rows into a partial of its own (kPatchBlock rows at a time),
// which is merged into its group's partial in frame order.
template <typename T>
void encode_fwd_attn(const EncodeParams& p, const std::vector<Video>& videos,
                     const std::vector<int64_t>& starts, int num_threads) {
  using Acc = acc_t<T>;
  const int64_t C = p.channels, H = p.num_heads, hc = C / H, S = p.num_key_tokens;
  const Acc scale = Acc(1) / std::sqrt(static_cast<Acc>(hc));
  const SplitPlan plan(p, videos, num_threads);
  std::vector<Acc> query(C);
  for (int64_t c = 0; c < C; ++c) query[c] = static_cast<Acc>(p.query[c]);
  const int64_t slots = plan.slot(starts.back(), 0);
  std::vector<Acc> partial_acc(slots * C);
  std::vector<SoftmaxStateT<Acc>> partial_state(slots * H);
  auto partial = [&](int64_t slot) {
    return SoftmaxPartial<Acc>{partial_state.data() + slot * H, partial_acc.data() + slot * C};
  };

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> key(kTaskPatches * C), d(kPatchBlock * C), score(kPatchBlock), acc(C);
    std::vector<SoftmaxStateT<Acc>> state(H);
    const SoftmaxPartial<Acc> frame{state.data(), acc.data()};
    if (p.spatial) spatial_key_tokens<T>(p, videos, acc.data());
    for_each_split_task<T>(p, videos, plan, key.data(), [&](const SplitTask& st, const Video& v) {
      for (int64_t rank = st.first; rank < st.last; ++rank) {
        const int64_t t = nonkey_frame(rank, v.key), g = rank / p.frames_per_token;
        clear_partial(frame, H, C);
        for (int64_t i0 = 0; i0 < st.nb; i0 += kPatchBlock) {
          const int64_t rows = std::min(kPatchBlock, st.nb - i0);
          for (int64_t i = 0; i < rows; ++i) {
            const T* VTOK_RESTRICT xt = x_row<T>(p, v, t, st.n0 + i0 + i);
            const Acc* VTOK_RESTRICT k = key.data() + (i0 + i) * C;
            Acc* VTOK_RESTRICT di = d.data() + i * C;
            VTOK_SIMD
            for (int64_t c = 0; c < C; ++c) di[c] = load(xt[c]) - k[c];
          }
          softmax_rows(frame, d.data(), rows, query.data(), scale, H, hc, score.data());
        }
        const SoftmaxPartial<Acc> group = partial(plan.slot(starts[st.video] + g, st.block));
        if (rank % p.frames_per_token == 0) clear_partial(group, H, C);
        merge_partial(group, frame, H, hc);
      }
    });
#pragma omp for schedule(static)
    for (int64_t flat = 0; flat < starts.back(); ++flat) {
      const int64_t b = video_of_task(starts, flat), g = flat - starts[b];
      clear_partial(frame, H, C);
      for (int64_t block = 0; block < plan.blocks; ++block)
        merge_partial(frame, partial(plan.slot(flat, block)), H, hc);
      T* out = static_cast<T*>(p.sequence) + (videos[b].seq_row + S + g) * C;
      for (int64_t h = 0; h < H; ++h) {
        const Acc inv = Acc(1) / state[h].sum;
        VTOK_SIMD
        for (int64_t c = h * hc; c < (h + 1) * hc; ++c) out[c] = store<T>(acc[c] * inv);
        p.lse[(videos[b].group_row + g) * H + h] = static_cast<float>(softmax_lse_t(state[h]));
      }
    }
  }
}

template <typename T>
void encode_fwd_impl(const EncodeParams& p, int num_threads) {
  const std::vector<Video> videos = videos_of(p);
  const std::vector<int64_t> starts = group_starts(videos);
  if (p.pool == Pool::kAttn)
    encode_fwd_attn<T>(p, videos, starts, num_threads);
  else
    encode_fwd_mean<T>(p, videos, starts, num_threads);
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

// Mean pooling, backward. The gradient does not depend on x: every row of a non-key frame is
// its group's gradient over the group's element count, and row n of the key frame is its
// key-token gradient minus the sum of those over the frames, a sum that is the same for every n.
// With no sum over patches left to order, each thread takes one contiguous range of grad_x's
// rows. That matters more than the arithmetic: a fresh grad_x is faulted in (and zeroed by the
// OS) on first touch, and where threads split it by patch blocks, as attn's backward does, they
// fault on the same huge pages at once and wait on each other.
template <typename T>
void encode_bwd_mean(const EncodeBwdParams& bp, const std::vector<Video>& videos,
                     const std::vector<int64_t>& starts, int num_threads) {
  using Acc = acc_t<T>;
  const EncodeParams& p = bp.fwd;
  const int64_t C = p.channels, N = p.num_patches, S = p.num_key_tokens;
  const T* grad_seq = static_cast<const T*>(bp.grad_sequence);
  T* grad_x = static_cast<T*>(bp.grad_x);

  // Per group the gradient of each of its rows, rounded to T once; per video the sum of those
  // over its non-key frames, in frame order; per packed frame its video.
  std::vector<T> row_grad(starts.back() * C);
  std::vector<Acc> frame_sum(videos.size() * C, Acc(0)), scaled(C);
  std::vector<int64_t> video_of_frame;
  for (size_t b = 0; b < videos.size(); ++b) {
    const Video& v = videos[b];
    video_of_frame.resize(v.frame0 + v.frames, static_cast<int64_t>(b));
    Acc* VTOK_RESTRICT sum = frame_sum.data() + b * C;
    for (int64_t g = 0; g < v.groups; ++g) {
      const GroupBounds bounds = group_bounds(g, v.frames, p.frames_per_token);
      const Acc inv = Acc(1) / static_cast<Acc>((bounds.last - bounds.first) * N);
      Acc* VTOK_RESTRICT sc = scaled.data();
      load_row(sc, grad_seq + (v.seq_row + S + g) * C, C);
      VTOK_SIMD
      for (int64_t c = 0; c < C; ++c) sc[c] *= inv;
      store_row(row_grad.data() + (starts[b] + g) * C, sc, C);
      for (int64_t rank = bounds.first; rank < bounds.last; ++rank) add_row(sum, sc, C);
    }
  }

  const int64_t rows = static_cast<int64_t>(video_of_frame.size()) * N;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t part = 0; part < num_threads; ++part) {
    std::vector<Acc> grad_key(C);
    const int64_t end = rows * (part + 1) / num_threads;
    for (int64_t row = rows * part / num_threads; row < end; ++row) {
      const int64_t frame = row / N, n = row % N, b = video_of_frame[frame];
      const Video& v = videos[b];
      const int64_t t = frame - v.frame0;
      T* VTOK_RESTRICT out = grad_x + row * C;
      if (t != v.key) {
        const int64_t g = group_of_frame(t, v.key, p.frames_per_token);
        const T* src = row_grad.data() + (starts[b] + g) * C;
        std::copy(src, src + C, out);
        continue;
      }
      Acc* VTOK_RESTRICT gk = grad_key.data();
      std::fill(gk, gk + C, Acc(0));
      key_token_grad(p, grad_seq + v.seq_row * C, n, gk);
      const Acc* VTOK_RESTRICT sum = frame_sum.data() + b * C;
      VTOK_SIMD
      for (int64_t c = 0; c < C; ++c) gk[c] -= sum[c];
      store_row(out, gk, C);
    }
  }
}

template <typename T>
void encode_bwd_attn(const EncodeBwdParams& bp, const std::vector<Video>& videos,
                     const std::vector<int64_t>& starts, int num_threads) {
  using Acc = acc_t<T>;
  const EncodeParams& p = bp.fwd;
  const int64_t C = p.channels, N = p.num_patches, H = p.num_heads, hc = C / H;
  const int64_t S = p.num_key_tokens;
  const Acc scale = Acc(1) / std::sqrt(static_cast<Acc>(hc));
  const T* grad_seq = static_cast<const T*>(bp.grad_sequence);
  const T* seq = static_cast<const T*>(p.sequence);
  T* grad_x = static_cast<T*>(bp.grad_x);
  std::vector<Acc> query(C);
  for (size_t c = 0; c < query.size(); ++c) query[c] = static_cast<Acc>(p.query[c]);

  // Per group and head: lse and <grad r, r>. float32 / float64 sequences hold r exactly as the
  // forward accumulated it; a 16-bit sequence holds r rounded, and <grad r, r> of the rounded r
  // leaves an error in grad_query as large as the rounding (it no longer cancels against
  // sum_i p_i <grad r, d_i>), so for those it is recomputed as sum_i p_i <grad r, d_i>, one more
  // pass over the group's frames. The saved lse is float32; float64 recomputes it in double in
  // the same kind of pass, so that its gradients are exact to double precision (gradcheck).
  constexpr bool kRecomputeGradDotR = sizeof(T) == 2;
  constexpr bool kRecomputeLse = std::is_same<T, double>::value;
  std::vector<Acc> grad_dot_r(starts.back() * H), lse(starts.back() * H);
  {
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
            Acc qd, gd;
            dot2(query.data() + o, gr.data() + o, dv + o, hc, qd, gd);
            sums[h] += exp_cpu(scale * qd - lse[task * H + h]) * gd;
          }
        });
      }
    }
  }

  const int64_t blocks = ceil_div(N, kPatchBlock);
  const int64_t tasks = p.batch * blocks;
  std::vector<Acc> grad_query_parts(tasks * C);
  // The residual tokens' gradients in the accumulation type, for every task: converted once
  // here for 16-bit types, read in place otherwise.
  std::vector<Acc> grad_res_converted(std::is_same<T, Acc>::value ? 0 : starts.back() * C);
  for (size_t b = 0; b < videos.size() && !grad_res_converted.empty(); ++b)
    for (int64_t g = 0; g < videos[b].groups; ++g)
      load_row(grad_res_converted.data() + (starts[b] + g) * C,
               grad_seq + (videos[b].seq_row + S + g) * C, C);
  auto grad_res = [&](int64_t b, int64_t g) -> const Acc* {
    if constexpr (std::is_same<T, Acc>::value)
      return grad_seq + (videos[b].seq_row + S + g) * C;
    else
      return grad_res_converted.data() + (starts[b] + g) * C;
  };

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> key(kPatchBlock * C), grad_key(kPatchBlock * C), d(C), dd(C);
    // Static: each thread takes a contiguous run of blocks (whole videos where B >= threads),
    // so threads first-touch different pages of the fresh grad_x; interleaved blocks had both
    // threads faulting on the same huge page at once (about 20% of the backward at CLIP size).
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / blocks, n0 = (task % blocks) * kPatchBlock;
      const int64_t nb = std::min(kPatchBlock, N - n0);
      const Video& v = videos[b];
      const T* grad_key_tokens = grad_seq + v.seq_row * C;
      Acc* grad_q = grad_query_parts.data() + task * C;
      std::fill(grad_q, grad_q + C, Acc(0));
      const Acc* gdr = grad_dot_r.data() + starts[b] * H;
      const Acc* lse_b = lse.data() + starts[b] * H;

      // Frames outer, the block's patches inner: each frame's rows of the block are one
      // contiguous stretch of x and grad_x (prefetcher- and TLB-friendly), while every patch
      // still sums its key gradient over frames in the same order.
      for (int64_t i = 0; i < nb; ++i) {
        Acc* gk = grad_key.data() + i * C;
        std::fill(gk, gk + C, Acc(0));
        key_token_grad(p, grad_key_tokens, n0 + i, gk);
        load_row(key.data() + i * C, x_row<T>(p, v, v.key, n0 + i), C);
      }
      for (int64_t rank = 0; rank < v.frames - 1; ++rank) {
        const int64_t t = nonkey_frame(rank, v.key);
        const int64_t g = rank / p.frames_per_token;
        const Acc* VTOK_RESTRICT gr = grad_res(b, g);
        for (int64_t i = 0; i < nb; ++i) {
          Acc* VTOK_RESTRICT gk = grad_key.data() + i * C;
          T* VTOK_RESTRICT gx = grad_x + ((v.frame0 + t) * N + n0 + i) * C;
          const T* VTOK_RESTRICT xt = x_row<T>(p, v, t, n0 + i);
          Acc* VTOK_RESTRICT dv = d.data();
          const Acc* VTOK_RESTRICT kv = key.data() + i * C;
          VTOK_SIMD
          for (int64_t c = 0; c < C; ++c) dv[c] = load(xt[c]) - kv[c];
          Acc* VTOK_RESTRICT ddv = dd.data();
          for (int64_t h = 0; h < H; ++h) {
            const int64_t o = h * hc;
            Acc qd, gd;
            dot2(query.data() + o, gr + o, dv + o, hc, qd, gd);
            const Acc prob = exp_cpu(scale * qd - lse_b[g * H + h]);
            const Acc coef = prob * (gd - gdr[g * H + h]) * scale;
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

  for (int64_t c = 0; c < C; ++c) {
    Acc sum = 0;
    for (int64_t task = 0; task < tasks; ++task) sum += grad_query_parts[task * C + c];
    bp.grad_query[c] = static_cast<float>(sum);
  }
}

template <typename T>
void encode_bwd_impl(const EncodeBwdParams& bp, int num_threads) {
  const std::vector<Video> videos = videos_of(bp.fwd);
  const std::vector<int64_t> starts = group_starts(videos);
  if (bp.fwd.pool == Pool::kAttn)
    encode_bwd_attn<T>(bp, videos, starts, num_threads);
  else
    encode_bwd_mean<T>(bp, videos, starts, num_threads);
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
