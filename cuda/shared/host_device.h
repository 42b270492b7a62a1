// LORAFUSE_HD: a function that both the CPU kernels (plain C++) and the CUDA kernels (nvcc) compile.
#pragma once

#if defined(__CUDACC__)
#define LORAFUSE_HD __host__ __device__ __forceinline__
#else
#define LORAFUSE_HD inline
#endif
