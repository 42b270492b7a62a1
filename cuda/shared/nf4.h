// The 4-bit NormalFloat (NF4) format as bitsandbytes stores it, and the 8-bit "dynamic" code that quantizes its
// block statistics again (double quantization): code tables and the per-element rules, shared by the CPU and CUDA
// kernels. No torch headers.
//
// NF4 (Dettmers et al., "QLoRA", 2023): a weight is split into blocks of `blocksize` consecutive elements (row-major;
// a partial last block is a block of its own); each block stores absmax = max|w| in float32 and each element the
// index of the NF4 code nearest to w / absmax (ties to the lower code). Two indices per byte, the first element in
// the high nibble. Double quantization stores absmax − mean(absmax) with the dynamic 8-bit code in blocks of 256,
// one float32 absmax per 256 blocks.
#pragma once

#include <cstdint>

#include "cuda/shared/host_device.h"

namespace lorafuse::nf4 {

/// bitsandbytes' NF4 code values (get_4bit_type("nf4")), written as the decimal doubles it uses and rounded to float
/// as it rounds them.
constexpr float kCode[16] = {
    static_cast<float>(-1.0),                static_cast<float>(-0.6961928009986877),
    static_cast<float>(-0.5250730514526367), static_cast<float>(-0.39491748809814453),
    static_cast<float>(-0.28444138169288635), static_cast<float>(-0.18477343022823334),
    static_cast<float>(-0.09105003625154495), 0.0f,
    static_cast<float>(0.07958029955625534), static_cast<float>(0.16093020141124725),
    static_cast<float>(0.24611230194568634), static_cast<float>(0.33791524171829224),
    static_cast<float>(0.44070982933044434), static_cast<float>(0.5626170039176941),
    static_cast<float>(0.7229568362236023),  1.0f};

/// Block sizes bitsandbytes accepts for 4-bit quantization.
constexpr int64_t kBlocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
/// Block size of the second-level (double) quantization of the statistics.
constexpr int64_t kNestedBlocksize = 256;
/// The smallest absmax a partial last block is divided by (bitsandbytes clamps it so; full blocks are not).
constexpr float kMinAbsmax = 1e-38f;

/// The NF4 index of x (x = w / absmax, within [-1, 1]): how many midpoints between neighbouring codes lie strictly
/// below x, so a value exactly between two codes takes the lower one. Host code (the CPU kernels); the CUDA kernels
/// count the same midpoints, which they get as kernel parameters (cuda/nf/nf_kernel.cuh).
inline uint8_t index_of(float x) {
  uint8_t index = 0;
  for (int i = 0; i < 15; ++i) {
    const float midpoint = (kCode[i] + kCode[i + 1]) / 2.0f;
    index += midpoint < x ? 1 : 0;
  }
  return index;
}

/// Two indices in one byte: the first element in the high nibble.
LORAFUSE_HD uint8_t pack(uint8_t first, uint8_t second) { return static_cast<uint8_t>((first << 4) | second); }
LORAFUSE_HD uint8_t high(uint8_t byte) { return byte >> 4; }
LORAFUSE_HD uint8_t low(uint8_t byte) { return byte & 0x0F; }

/// Double quantization of the statistics, as bitsandbytes' CPU kernel does it: x = v / absmax (absmax > 0) is
/// mapped to [0, 65535] and looked up in a table that gives, for each of those 65536 points, the dynamic code
/// whose midpoint interval holds it.
constexpr int kLutSize = 65536;

/// The table for a sorted 256-entry code: lut[i] = index of the code nearest to -1 + 2i/65535.
inline void build_lut(const float* code, uint8_t* lut) {
  float midpoints[255];
  for (int i = 0; i < 255; ++i) midpoints[i] = 0.5f * (code[i] + code[i + 1]);
  int index = 0;
  for (int i = 0; i < kLutSize; ++i) {
    const float point = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kLutSize - 1);
    while (index < 255 && midpoints[index] < point) ++index;
    lut[i] = static_cast<uint8_t>(index);
  }
}

/// The table position of x (clamped to [-1, 1]).
LORAFUSE_HD uint16_t lut_position(float x) {
  x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
  const float scaled = (x + 1.0f) * 0.5f;
  const float position = scaled * static_cast<float>(kLutSize - 1);
  return static_cast<uint16_t>(position + 0.5f);
}

}  // namespace lorafuse::nf4
