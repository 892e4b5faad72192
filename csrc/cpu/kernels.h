#pragma once
// CPU launchers of every op. Each kernel source is compiled once per instruction set
// (namespaces below); dispatch.cpp picks the widest one the running CPU supports, so one
// build runs on any x86-64 and still uses AVX-512 where it exists.
#include "vtok/params.h"

namespace vtok {
namespace cpu {

void encode_fwd(const EncodeParams& params, int num_threads);
void encode_bwd(const EncodeBwdParams& params, int num_threads);
void expand_fwd(const ExpandParams& params, int num_threads);
void expand_bwd(const ExpandBwdParams& params, int num_threads);

// The instruction-set variant the launchers above run ("avx512", "avx2" or "baseline"), and
// every variant compiled into this build.
const char* selected_isa();
const char* compiled_isas();

// Arguments a kernel cannot run with; the launchers throw std::invalid_argument for them
// before any thread starts (Python sees a ValueError).
void check(const EncodeParams& params);
void check(const EncodeBwdParams& params);
void check(const ExpandParams& params);
void check(const ExpandBwdParams& params);

#define VTOK_DECLARE_CPU_VARIANT(isa)                                \
  namespace isa {                                                    \
  void encode_fwd(const EncodeParams& params, int num_threads);      \
  void encode_bwd(const EncodeBwdParams& params, int num_threads);   \
  void expand_fwd(const ExpandParams& params, int num_threads);      \
  void expand_bwd(const ExpandBwdParams& params, int num_threads);   \
  }

VTOK_DECLARE_CPU_VARIANT(baseline)
VTOK_DECLARE_CPU_VARIANT(avx2)
VTOK_DECLARE_CPU_VARIANT(avx512)

}  // namespace cpu
}  // namespace vtok
