// The one quantized-weight format of QLoRA and LQ-LoRA: NF-b codes in absmax blocks, the block statistics quantized
// again. Torch-free rules shared by the CPU kernels, the checks and the CUDA kernels.
//
// A format is four integers [bits, blocksize, stat_bits, stat_blocksize]:
// - the weight, read row-major, is cut into blocks of `blocksize` elements (a partial last block is a block of its
//   own); each element stores the index of the NF-`bits` code (cuda/shared/nf_code.h) nearest to w / absmax of its
//   block (ties to the lower code), in a bit stream, most significant bit first (for 4 bits: two per byte, the first
//   element in the high nibble, bitsandbytes' order). Indices are taken against the block's exact absmax (as
//   bitsandbytes does), whatever happens to the statistic afterwards;
// - stat_bits = 0: each block keeps its absmax in float32;
// - stat_bits = 8: bitsandbytes' double quantization: offset = mean(absmax), absmax − offset quantized with the
//   signed dynamic 8-bit code in blocks of stat_blocksize (bitsandbytes: 256), each block's scale kept in float32,
//   bfloat16 or float16 (bitsandbytes: float32);
// - stat_bits = 2 .. 7: the LQ-LoRA reference's second level: offset = min(absmax), absmax − offset (>= 0)
//   quantized with the unsigned uniform code k / (2^stat_bits − 1), k = 0 .. 2^stat_bits − 1, in blocks of
//   stat_blocksize, each block's scale (its largest value) kept in float32, bfloat16 or float16; the codes in a bit
//   stream as above.
// A statistic decodes as code[q] · scale (rounded to float32) + offset (rounded again), in that order for every
// stat_bits: bitsandbytes' dequantize_blockwise followed by its `absmax += offset`.
// Storage: bits + stat_bits / blocksize + (bits of the scale's dtype) / (blocksize · stat_blocksize) per weight, plus
// one float32 offset per matrix. NF4 with double quantization, bitsandbytes' QLoRA default, is [4, 64, 8, 256] with
// float32 scales: 4.127 bits per weight.
#pragma once

#include <cstdint>

#include "cuda/shared/host_device.h"

namespace lorafuse::nf {

struct Format {
  int64_t bits = 4;              // b: NF-b code of the weights, 2 .. 8
  int64_t blocksize = 64;        // B0: weights per absmax block, a power of two in [16, 4096]
  int64_t stat_bits = 8;         // b0: bits per quantized statistic, 0 (float32 absmax) or 2 .. 8
  int64_t stat_blocksize = 256;  // B1: statistics per scale block, a power of two in [16, 4096]; 0 with stat_bits = 0

  bool nested() const { return stat_bits > 0; }
  bool dynamic_statistics() const { return stat_bits == 8; }
};

/// Blocks of `blocksize` over n elements (a partial last block counts).
LORAFUSE_HD int64_t blocks_of(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

/// Bytes of a stream of n codes of `bits` bits.
LORAFUSE_HD int64_t stream_bytes(int64_t n, int64_t bits) { return (n * bits + 7) / 8; }

/// Code i of a bit stream (most significant bit first). Reads a second byte only when the code crosses into it.
LORAFUSE_HD uint32_t read_code(const uint8_t* stream, int64_t i, int64_t bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int64_t shift = 16 - bits - (bit & 7);  // position in the big-endian 16-bit window of bytes [byte, byte + 1]
  uint32_t window = static_cast<uint32_t>(stream[byte]) << 8;
  if ((bit & 7) + bits > 8) window |= stream[byte + 1];
  return (window >> shift) & ((1u << bits) - 1u);
}

/// A bit stream written code by code, most significant bit first, from a byte boundary on: put() each code, then
/// finish(pad) to fill a last byte the codes leave partial with copies of `pad` (the last copy cut at the byte's end).
/// Host and device code (the CPU and CUDA quantizers write through it).
struct BitWriter {
  uint8_t* out;
  int64_t bits;
  uint32_t acc = 0;
  int64_t filled = 0;

  LORAFUSE_HD BitWriter(uint8_t* stream, int64_t code_bits) : out(stream), bits(code_bits) {}
  LORAFUSE_HD void put(uint32_t code) {
    acc = (acc << bits) | code;
    filled += bits;
    while (filled >= 8) {
      filled -= 8;
      *out++ = static_cast<uint8_t>(acc >> filled);
      acc &= (1u << filled) - 1u;
    }
  }
  LORAFUSE_HD void finish(uint32_t pad) {
    if (filled == 0) return;
    while (filled < 8) {
      acc = (acc << bits) | pad;
      filled += bits;
    }
    *out = static_cast<uint8_t>(acc >> (filled - 8));
    filled = 0;
  }
};

/// Writes codes[0 .. count) as codes first .. first + count of a bit stream whose bytes [first·bits/8, ...) are
/// this call's own (first·bits is a multiple of 8). A last byte that the codes do not fill is filled with copies of
/// `pad` (the code of 0: bitsandbytes' padding of an odd 4-bit weight), the last copy cut at the byte's end.
inline void write_codes(const uint8_t* codes, int64_t count, int64_t bits, uint8_t* stream, int64_t first,
                        uint8_t pad) {
  BitWriter writer(stream + first * bits / 8, bits);
  for (int64_t i = 0; i < count; ++i) writer.put(codes[i]);
  writer.finish(pad);
}

/// The count − 1 midpoints between neighbouring values of an ascending code of `count` values, (v[i] + v[i+1]) / 2 in
/// float32: what every quantizer compares against (count_below). Returns count − 1.
inline int fill_midpoints(const float* code, int count, float* midpoints) {
  for (int i = 0; i + 1 < count; ++i) midpoints[i] = (code[i] + code[i + 1]) / 2.0f;
  return count - 1;
}

/// How many of the ascending values[0 .. count) lie strictly below x: the index of the code nearest to x when
/// `values` are the midpoints between neighbouring codes (a tie takes the lower code). Host and device code.
LORAFUSE_HD int count_below(const float* values, int count, float x) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (values[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

/// Bits per weight of a format whose statistic scales take `scale_bits` bits (32 for float32, 16 otherwise),
/// leaving out the one offset per matrix.
inline double bits_per_weight(const Format& f, int64_t scale_bits) {
  const double b = static_cast<double>(f.bits), b0 = static_cast<double>(f.blocksize);
  if (!f.nested()) return b + 32.0 / b0;
  return b + static_cast<double>(f.stat_bits) / b0 + static_cast<double>(scale_bits) / (b0 * f.stat_blocksize);
}

}  // namespace lorafuse::nf
