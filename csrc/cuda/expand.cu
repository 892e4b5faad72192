// Launchers of the expand kernels.
#include <type_traits>

#include "encode.cuh"
#include "expand.cuh"
#include "launch_utils.cuh"

namespace vtok {
namespace cuda {

// Blocks for one wave of resident blocks on an H100 (132 SMs x 8). Below it, the forward also
// spreads the groups over grid axis z, so that few or narrow key tokens do not leave the device
// idle while each item writes all T frames of its video. Only for G < 2^31: the kernel then
// sizes the chunks with a 32-bit division.
constexpr int64_t kExpandFillBlocks = 132 * 8;

inline dim3 expand_fwd_grid(int64_t items, int64_t groups) {
  const unsigned x = flat_blocks(items);
  int64_t z = 1;
  if (groups > 1 && groups < (int64_t{1} << 31)) {
    z = (kExpandFillBlocks + x - 1) / x;
    if (z > groups) z = groups;
  }
  return dim3(x, 1, static_cast<unsigned>(z));
}

void expand_fwd(const ExpandParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = VecWidth<T>::value;
    const bool vec_ok = p.channels % kVec == 0 && aligned16(p.key_tokens) && aligned16(p.frames) &&
                        p.key_stride_b % kVec == 0 && p.key_stride_n % kVec == 0 &&
                        (p.num_groups == 0 || (aligned16(p.residual_tokens) && p.res_stride_b % kVec == 0 &&
                                               p.res_stride_g % kVec == 0));
    const int64_t elems = p.batch * p.num_patches * p.channels;  // of the key tokens
    if (vec_ok)
      expand_fwd_kernel<T, kVec><<<expand_fwd_grid(elems / kVec, p.num_groups), kThreads, 0, s>>>(p);
    else
      expand_fwd_kernel<T, 1><<<expand_fwd_grid(elems, p.num_groups), kThreads, 0, s>>>(p);
    check_launch("expand_fwd_kernel");
  });
}

void expand_bwd(const ExpandBwdParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.batch > 65535 || p.num_groups > 65535)
    throw std::invalid_argument("vtok cuda: at most 65535 videos and 65535 residual tokens per call");
  // The residual tokens' gradient is a group sum over the non-key frames: the encode forward's
  // reduction without the key subtraction, reading grad_frames as a contiguous batch.
  EncodeParams sum;
  sum.x = p.grad_frames;
  sum.x_stride_n = p.channels;
  sum.x_stride_t = p.num_patches * p.channels;
  sum.x_stride_b = p.num_frames * sum.x_stride_t;
  sum.batch = p.batch;
  sum.num_frames = p.num_frames;
  sum.num_patches = p.num_patches;
  sum.channels = p.channels;
  sum.dtype = p.dtype;
  sum.key_index = p.key_index;
  sum.frames_per_token = p.frames_per_token;
  sum.num_key_tokens = 0;
  sum.num_groups = p.num_groups;
  sum.sequence = p.grad_residual_tokens;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = VecWidth<T>::value;
    const bool vec_ok = p.channels % kVec == 0 && aligned16(p.grad_frames) && aligned16(p.grad_key_tokens) &&
                        (p.num_groups == 0 || aligned16(p.grad_residual_tokens));
    auto run = [&](auto width) {
      constexpr int V = decltype(width)::value;
      expand_grad_keys_kernel<T, V><<<flat_blocks(p.batch * p.num_patches * p.channels / V), kThreads, 0, s>>>(p);
      check_launch("expand_grad_keys_kernel");
      if (p.num_groups > 0) {
        const RowPlan plan = plan_segments(p.channels, V, false, 1);
        const dim3 grid(plan.num_segments, static_cast<unsigned>(p.num_groups), static_cast<unsigned>(p.batch));
        residual_fwd_kernel<T, V, kGroupSum><<<grid, kThreads, 0, s>>>(sum, plan);
        check_launch("residual_fwd_kernel<group sum>");
      }
    };
    if (vec_ok)
      run(std::integral_constant<int, kVec>{});
    else
      run(std::integral_constant<int, 1>{});
  });
}

}  // namespace cuda
}  // namespace vtok
