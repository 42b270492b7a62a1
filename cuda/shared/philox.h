// The LoRA dropout mask as a pure function of (seed, offset, element index), shared by the CPU and CUDA
// kernels. Nothing is stored: backward regenerates the forward's mask, and a CPU and a CUDA run with
// the same (seed, offset) draw the same mask. No torch headers: the CUDA kernels include this file too.
//
// Generator: Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
// Element e of x viewed as [T, in] (row-major logical index e = t*in + k, independent of x's strides)
// uses word (e mod 4) of philox(counter = (offset/4, e/4), key = seed): the low 64 counter bits hold
// offset/4 and the high 64 bits the element group, the layout torch's own CUDA kernels use (offset in the
// low half, thread in the high half). A call that reserved offsets [offset, offset + 4) from torch's CUDA
// generator therefore draws only from counters reserved for it, never from another kernel's.
#pragma once

#include <cstdint>

#include "cuda/shared/host_device.h"

namespace lorafuse::philox {

struct Uint4 {
  uint32_t x, y, z, w;
};

LORAFUSE_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

LORAFUSE_HD Uint4 philox4x32_10(Uint4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kM0, ctr.x, &hi0);
    const uint32_t lo1 = mulhilo(kM1, ctr.z, &hi1);
    ctr = Uint4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// Keep an element when its 32-bit word is >= threshold; P(keep) = 1 - threshold / 2^32 ≈ 1 - p.
LORAFUSE_HD uint32_t keep_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The four words for elements 4*group .. 4*group+3.
LORAFUSE_HD Uint4 words_for_group(uint64_t seed, uint64_t offset, uint64_t group) {
  const uint64_t step = offset >> 2;
  return philox4x32_10(Uint4{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                             static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32)},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

LORAFUSE_HD uint32_t pick(const Uint4& w, unsigned i) {
  return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
}

// Whether element e is kept.
LORAFUSE_HD bool keep(uint64_t seed, uint64_t offset, uint64_t e, uint32_t threshold) {
  return pick(words_for_group(seed, offset, e >> 2), static_cast<unsigned>(e & 3u)) >= threshold;
}

}  // namespace lorafuse::philox
