#pragma once
// Runs the CUDA kernels of csrc/cuda on the host, for tests on machines without a GPU: every
// thread of a block is an OS thread, __syncthreads is a block barrier and a warp shuffle is an
// exchange between two warp barriers, so a shuffle that not all 32 lanes reach hangs here as it
// would misbehave on a device. Blocks run one after another. Not fast; small shapes only.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define VTOK_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run sequentially, so one static instance per kernel is the block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};

namespace emu {

struct Block {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> slots;  // one per thread: the value a lane offers to a shuffle
};

inline thread_local dim3 thread_idx, block_idx;
inline thread_local Block* current = nullptr;
inline dim3 grid_dim, block_dim;

inline void run(dim3 grid, unsigned threads, void (*body)(const void*), const void* closure) {
  grid_dim = grid;
  block_dim = dim3{threads, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block block;
        block.block = std::make_unique<std::barrier<>>(threads);
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) block.warps.push_back(std::make_unique<std::barrier<>>(32));
        block.slots.assign(threads, 0.0f);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            thread_idx = dim3{t, 0, 0};
            block_idx = dim3{x, y, z};
            current = &block;
            body(closure);
            // An exited thread no longer holds back the barriers of the others (as on a GPU).
            block.block->arrive_and_drop();
            block.warps[t / 32]->arrive_and_drop();
          });
        for (auto& thread : pool) thread.join();
      }
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)

inline void __syncthreads() { emu::current->block->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int offset) {
  const unsigned t = emu::thread_idx.x;
  auto& warp = *emu::current->warps[t / 32];
  emu::current->slots[t] = value;
  warp.arrive_and_wait();
  const float other = emu::current->slots[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(offset))];
  warp.arrive_and_wait();
  return other;
}

inline int __any_sync(unsigned, int predicate) {
  const unsigned t = emu::thread_idx.x;
  auto& warp = *emu::current->warps[t / 32];
  emu::current->slots[t] = predicate ? 1.0f : 0.0f;
  warp.arrive_and_wait();
  int any = 0;
  for (unsigned lane = 0; lane < 32; ++lane) any |= emu::current->slots[(t & ~31u) | lane] != 0.0f;
  warp.arrive_and_wait();
  return any;
}

inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline uint4 __ldcs(const uint4* p) { return *p; }
