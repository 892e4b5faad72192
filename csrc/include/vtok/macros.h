#pragma once
// Lets one definition of the index math serve the CPU kernels, nvcc and NVRTC (CuPy).
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define VTOK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VTOK_HOST_DEVICE inline
#endif

#if defined(__CUDACC_RTC__)
// NVRTC has no <cstdint>; the kernels only need the fixed-width integers.
typedef long long int64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
// Nor <cmath>: the softmax helpers of index_math.h need INFINITY.
#if !defined(INFINITY)
#define INFINITY __int_as_float(0x7f800000)
#endif
#else
#include <cstdint>
#endif
