// Picks the widest instruction-set variant of the CPU kernels that this CPU runs, and checks
// the arguments every variant relies on.
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "vtok/index_math.h"
#include "vtok/params_check.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vtok {
namespace cpu {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa detect_hardware() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(VTOK_CPU_HAS_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
#endif
#if defined(VTOK_CPU_HAS_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
#endif
  return Isa::kBaseline;
}

// VTOK_CPU_ISA=baseline|avx2 caps the choice (to compare variants, or to rule one out).
Isa detect() {
  const Isa hardware = detect_hardware();
  const char* cap = std::getenv("VTOK_CPU_ISA");
  if (cap == nullptr) return hardware;
  const std::string name(cap);
  if (name == "baseline") return Isa::kBaseline;
  if (name == "avx2" && hardware != Isa::kBaseline) return Isa::kAvx2;
  return hardware;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

// VTOK_CPU_HUGE_PAGES=0 turns the hint below off: where THP defragments on demand
// (defrag=madvise), a fault in a hinted range may wait for memory compaction.
bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* value = std::getenv("VTOK_CPU_HUGE_PAGES");
    return value == nullptr || std::string(value) != "0";
  }();
  return wanted;
}

// A fresh output from the allocator is a new mapping that faults in 4 KiB at a time on first
// write; for outputs the size of x (grad_x, expand's frames) those faults cost more than the
// kernel itself. Asking for transparent huge pages on the output (a hint; ignored where THP is
// off) cuts the faults 512-fold.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (data == nullptr || bytes < int64_t(4 * kHuge) || !huge_pages_wanted()) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace

#if defined(VTOK_CPU_HAS_AVX512)
#define VTOK_CASE_AVX512(call) \
  case Isa::kAvx512: return avx512::call;
#else
#define VTOK_CASE_AVX512(call)
#endif
#if defined(VTOK_CPU_HAS_AVX2)
#define VTOK_CASE_AVX2(call) \
  case Isa::kAvx2: return avx2::call;
#else
#define VTOK_CASE_AVX2(call)
#endif
#define VTOK_DISPATCH(call)        \
  switch (isa()) {                 \
    VTOK_CASE_AVX512(call)         \
    VTOK_CASE_AVX2(call)           \
    default: return baseline::call; \
  }

void check(const EncodeParams& p) {
  const char* error = encode_params_error(p);
  require(error == nullptr, std::string("encode: ") + (error != nullptr ? error : ""));
  if (p.pool == Pool::kAttn) {
    // On the CPU the varlen offsets are host memory: a video with a residual token needs lse.
    const bool has_groups = p.cu_frames != nullptr
                                ? p.cu_tokens[p.batch] > p.batch * p.num_key_tokens
                                : p.num_groups > 0;
    require(p.lse != nullptr || !has_groups, "encode: attn pooling needs lse");
  }
}

void check(const EncodeBwdParams& p) {
  check(p.fwd);
  require(p.grad_sequence != nullptr && p.grad_x != nullptr,
          "encode backward: grad_sequence and grad_x must be set");
  if (p.fwd.pool == Pool::kAttn)
    require(p.grad_query != nullptr, "encode backward: attn pooling needs grad_query");
}

void check(const ExpandParams& p) {
  require(p.key_tokens != nullptr && p.frames != nullptr && p.key_index != nullptr,
          "expand: key_tokens, frames and key_index must be set");
  require(p.frames_per_token >= 1, "expand: frames_per_token must be >= 1");
  require(p.num_groups == num_groups(p.num_frames, p.frames_per_token),
          "expand: num_groups must be ceil((num_frames - 1) / frames_per_token)");
  require(p.num_groups == 0 || p.residual_tokens != nullptr,
          "expand: residual_tokens must be set");
}

void check(const ExpandBwdParams& p) {
  require(p.grad_frames != nullptr && p.grad_key_tokens != nullptr && p.key_index != nullptr,
          "expand backward: grad_frames, grad_key_tokens and key_index must be set");
  require(p.frames_per_token >= 1, "expand backward: frames_per_token must be >= 1");
  require(p.num_groups == num_groups(p.num_frames, p.frames_per_token),
          "expand backward: num_groups must be ceil((num_frames - 1) / frames_per_token)");
  require(p.num_groups == 0 || p.grad_residual_tokens != nullptr,
          "expand backward: grad_residual_tokens must be set");
}

void encode_fwd(const EncodeParams& params, int num_threads) {
  check(params);
  VTOK_DISPATCH(encode_fwd(params, num_threads))
}

void encode_bwd(const EncodeBwdParams& params, int num_threads) {
  check(params);
  const EncodeParams& p = params.fwd;
  const int64_t frames = p.cu_frames != nullptr ? p.cu_frames[p.batch] : p.batch * p.num_frames;
  advise_huge_pages(params.grad_x, frames * p.num_patches * p.channels * element_size(p.dtype));
  VTOK_DISPATCH(encode_bwd(params, num_threads))
}

void expand_fwd(const ExpandParams& params, int num_threads) {
  check(params);
  advise_huge_pages(params.frames, params.batch * params.num_frames * params.num_patches *
                                       params.channels * element_size(params.dtype));
  VTOK_DISPATCH(expand_fwd(params, num_threads))
}

void expand_bwd(const ExpandBwdParams& params, int num_threads) {
  check(params);
  VTOK_DISPATCH(expand_bwd(params, num_threads))
}

const char* selected_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

const char* compiled_isas() {
  return "baseline"
#if defined(VTOK_CPU_HAS_AVX2)
         ",avx2"
#endif
#if defined(VTOK_CPU_HAS_AVX512)
         ",avx512"
#endif
      ;
}

}  // namespace cpu
}  // namespace vtok
