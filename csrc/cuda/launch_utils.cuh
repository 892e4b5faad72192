#pragma once
// Host-side helpers of the launchers (nvcc only): dtype dispatch, vector width, error checks.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.cuh"
#include "launch.h"

namespace vtok {
namespace cuda {

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("vtok cuda: launch of ") + what + " failed: " + cudaGetErrorString(err));
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline int element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    default: throw std::invalid_argument("vtok cuda: dtype must be float32, float16 or bfloat16");
  }
}

// Calls f(T{}) with the storage type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(half_t{}); return;
    case DType::kBFloat16: f(bf16_t{}); return;
    default: throw std::invalid_argument("vtok cuda: dtype must be float32, float16 or bfloat16");
  }
}

// Grid size for the flat grid-stride kernels: enough blocks to fill any current GPU (132 SMs x
// 8 resident blocks), never more than the work.
inline unsigned flat_blocks(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

// Per-video share of flat_blocks when the grid's y dimension runs over videos.
inline unsigned flat_blocks_per_video(int64_t work_items, int64_t batch) {
  const int64_t cap = (4096 + batch - 1) / batch;
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

}  // namespace cuda
}  // namespace vtok
