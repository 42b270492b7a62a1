// The quantized-weight format's CPU kernels (cuda/shared/nf_format.h): quantize / dequantize, the linear layer and the
// LoRA layer over it, for every format; NF4 (4 bits, bitsandbytes' statistics) bit-exact with bitsandbytes' CPU
// backend. This file is compiled without floating-point contraction (CMakeLists.txt): every product and sum is rounded
// on its own, as bitsandbytes' code rounds them.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "csrc/ops/common/lora_linear_checks.h"
#include "csrc/ops/common/nf_checks.h"
#include "csrc/ops/cpu/dropout_cpu.h"
#include "csrc/ops/cpu/lora_linear_cpu.h"
#include "cuda/shared/nf4.h"
#include "cuda/shared/nf_code.h"
#include "cuda/shared/nf_format.h"

namespace lorafuse::cpu {
namespace {

// A code table with its midpoints: the index of x is how many midpoints lie strictly below it (ties to the lower code).
struct CodeTable {
  std::vector<float> values, midpoints;
  explicit CodeTable(std::vector<float> v) : values(std::move(v)) {
    midpoints.resize(values.empty() ? 0 : values.size() - 1);
    nf::fill_midpoints(values.data(), static_cast<int>(values.size()), midpoints.data());
  }
  uint8_t index_of(float x) const {
    return static_cast<uint8_t>(nf::count_below(midpoints.data(), static_cast<int>(midpoints.size()), x));
  }
  // index_of for x[0 .. n): up to 15 midpoints (4 bits or fewer) every midpoint is compared with every x, a loop the
  // compiler vectorises over x (the table padded with +inf, below no x); wider codes search.
  void indices(const float* x, int64_t n, uint8_t* out) const {
    if (midpoints.size() > 15) {
      for (int64_t i = 0; i < n; ++i) out[i] = index_of(x[i]);
      return;
    }
    float mid[15];
    for (size_t k = 0; k < 15; ++k) mid[k] = k < midpoints.size() ? midpoints[k] : INFINITY;
    for (int64_t i = 0; i < n; ++i) out[i] = 0;
    for (int k = 0; k < 15; ++k) {
      const float m = mid[k];
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(out[i] + (m < x[i] ? 1 : 0));
    }
  }
};

const CodeTable& weight_code(int64_t bits) {
  static const std::vector<CodeTable> tables = [] {
    std::vector<CodeTable> t;
    for (int b = 0; b <= nf::kMaxBits; ++b) {
      t.emplace_back(b < nf::kMinBits ? std::vector<float>{0.0f} : detail::weight_code(b));
    }
    return t;
  }();
  return tables[static_cast<size_t>(bits)];
}

// First level: one absmax per block; the codes of a block written as its own bytes of the bit stream (blocksizes are
// multiples of 8, so a byte never holds two blocks). Full blocks scale by the reciprocal of their absmax; a partial
// last block divides by its absmax clamped to kMinAbsmax, which is also what it stores — bitsandbytes' arithmetic,
// kept for its bits. For 4 bits the NF-4 table and its midpoints are bitsandbytes' (nf4::index_of counts the same).
void quantize_blocks(const float* w, int64_t n, const nf::Format& f, float* absmax, uint8_t* packed) {
  const int64_t blocksize = f.blocksize;
  const int64_t blocks = nf::blocks_of(n, blocksize);
  const CodeTable& table = weight_code(f.bits);
  const uint8_t pad = table.index_of(0.0f);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(static_cast<size_t>(blocksize));
    std::vector<float> scaled(static_cast<size_t>(blocksize));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      float am = 0.0f;
      for (int64_t i = 0; i < len; ++i) am = std::max(am, std::fabs(w[start + i]));
      const bool full = len == blocksize;
      if (full) {
        absmax[b] = am;
        const float inv = 1.0f / std::max(am, nf4::kMinAbsmax);
        for (int64_t i = 0; i < len; ++i) scaled[i] = std::clamp(w[start + i] * inv, -1.0f, 1.0f);
      } else {
        am = std::max(am, nf4::kMinAbsmax);
        absmax[b] = am;
        for (int64_t i = 0; i < len; ++i) scaled[i] = std::clamp(w[start + i] / am, -1.0f, 1.0f);
      }
      table.indices(scaled.data(), len, codes.data());
      nf::write_codes(codes.data(), len, f.bits, packed, start, pad);
    }
  });
}

// A float32 value as the statistics' scale dtype stores it (rounded to nearest), back in float32.
float as_stat_dtype(float v, at::ScalarType dtype) {
  if (dtype == at::kHalf) return static_cast<float>(c10::Half(v));
  if (dtype == at::kBFloat16) return static_cast<float>(c10::BFloat16(v));
  return v;
}

// Second level (double quantization) of the centred statistics v (absmax − offset) in blocks of stat_blocksize: each
// block's scale = its largest |v|, rounded to stat_dtype (that rounded value is what quantizes and what is stored);
// 8 bits: bitsandbytes' quantize_blockwise with the dynamic code through the 65536-point table its CPU kernel uses;
// fewer: the uniform code, nearest level with ties to the lower one. The codes written as a bit stream.
void quantize_statistics(const float* v, int64_t n, const nf::Format& f, at::ScalarType stat_dtype, float* scales,
                         uint8_t* stream) {
  const std::vector<uint8_t>& lut = detail::dynamic_lut();
  const CodeTable uniform(f.dynamic_statistics() ? std::vector<float>{0.0f} : detail::statistics_code(f.stat_bits));
  const int64_t blocks = nf::blocks_of(n, f.stat_blocksize);
  std::vector<uint8_t> codes(static_cast<size_t>(f.stat_blocksize));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * f.stat_blocksize;
    const int64_t len = std::min(f.stat_blocksize, n - start);
    float am = 0.0f;
    for (int64_t i = 0; i < len; ++i) am = std::max(am, std::fabs(v[start + i]));
    am = as_stat_dtype(am, stat_dtype);
    TORCH_CHECK_VALUE(std::isfinite(am), "lorafuse.quantize_nf: stat_dtype: a block of statistics has scale ", am,
                      " in ", stat_dtype, ", which cannot hold it; use float32 scales");
    scales[b] = am;
    if (am == 0.0f) {
      std::fill(codes.begin(), codes.begin() + len, uint8_t{0});
    } else if (f.dynamic_statistics()) {
      const float inv = 1.0f / am;
      for (int64_t i = 0; i < len; ++i) codes[i] = lut[nf4::lut_position(v[start + i] * inv)];
    } else {
      for (int64_t i = 0; i < len; ++i) codes[i] = uniform.index_of(std::clamp(v[start + i] / am, 0.0f, 1.0f));
    }
    nf::write_codes(codes.data(), len, f.stat_bits, stream, start, 0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf_cpu(const at::Tensor& weight,
                                                                           at::IntArrayRef format,
                                                                           at::ScalarType stat_dtype) {
  constexpr const char* op = "lorafuse.quantize_nf";
  const nf::Format f = detail::parse_nf_format(op, format);
  detail::check_quantize_nf_args(op, weight, f, stat_dtype);
  const at::Tensor flat = weight.reshape(-1).to(at::kFloat).contiguous();  // row-major, as bitsandbytes reads it
  detail::check_nf_finite(op, flat);
  const int64_t n = flat.numel();
  const int64_t blocks = nf::blocks_of(n, f.blocksize);
  const auto f32 = flat.options();
  at::Tensor packed = at::empty({nf::stream_bytes(n, f.bits), 1}, f32.dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, f32);
  quantize_blocks(flat.data_ptr<float>(), n, f, absmax.data_ptr<float>(), packed.data_ptr<uint8_t>());
  if (!f.nested()) return {packed, absmax, at::empty({0}, f32), at::empty({0}, f32)};
  // 8 bits: the same reduction bitsandbytes' absmax.mean() runs; fewer: the reference's minimum (v >= 0)
  const at::Tensor offset = detail::statistics_offset(f, absmax);
  const at::Tensor centred = absmax.sub(offset).contiguous();
  at::Tensor codes = at::empty({nf::stream_bytes(blocks, f.stat_bits)}, f32.dtype(at::kByte));
  at::Tensor scales = at::empty({nf::blocks_of(blocks, f.stat_blocksize)}, f32);
  quantize_statistics(centred.data_ptr<float>(), blocks, f, stat_dtype, scales.data_ptr<float>(),
                      codes.data_ptr<uint8_t>());
  return {packed, codes, scales.to(stat_dtype), offset};
}

// The float32 statistic of each block of the n weights: absmax itself, or decoded from its code (code · scale, then
// + offset, each rounded on its own as bitsandbytes' dequantize_blockwise and its `absmax += offset` do).
at::Tensor block_scales(const nf::Format& f, int64_t n, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset) {
  if (!f.nested()) return absmax.to(at::kFloat).contiguous();
  const int64_t blocks = nf::blocks_of(n, f.blocksize);
  at::Tensor scales = at::empty({blocks}, absmax.options().dtype(at::kFloat));
  float* s = scales.data_ptr<float>();
  const at::Tensor codes = absmax.contiguous();
  const at::Tensor nest = nested_absmax->to(at::kFloat).contiguous();
  const uint8_t* q = codes.data_ptr<uint8_t>();
  const float* na = nest.data_ptr<float>();
  const float off = offset->to(at::kFloat).reshape(-1)[0].item<float>();
  const std::vector<float>& code = detail::statistics_code(f.stat_bits);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint32_t index = f.stat_bits == 8 ? q[b] : nf::read_code(q, b, f.stat_bits);
    const float decoded = code[index] * na[b / f.stat_blocksize];
    s[b] = decoded + off;
  }
  return scales;
}

// The two code values of every byte (first element in the high nibble).
struct PairTable {
  float rows[256][2];
  PairTable() {
    for (int b = 0; b < 256; ++b) {
      rows[b][0] = nf4::kCode[nf4::high(static_cast<uint8_t>(b))];
      rows[b][1] = nf4::kCode[nf4::low(static_cast<uint8_t>(b))];
    }
  }
  const float* operator[](uint8_t byte) const { return rows[byte]; }
};
const PairTable kPairs;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LORAFUSE_NF4_AVX2 1
// Bytes [0, count) of one block → 2·count floats, 4 bytes (8 elements) per step with AVX2 (compiled for AVX2 here
// only; called only when the CPU has it): each byte's two nibbles become two int32 lanes, the 16-entry code table
// is two 8-lane permutes blended on bit 3, then one multiply by the block's scale — the same IEEE products as the
// scalar loop, so the same bits. kStream: non-temporal stores (for an output larger than the cores' L2 caches,
// which would reach memory anyway: they skip reading each line before writing it, which halved the dequantization
// of a cold 16 MiB tile on a 2-core Xeon, 2.1 → 1.05 ms); store_fence() after them. Returns how many bytes it did.
template <bool kStream>
__attribute__((target("avx2"))) int64_t dequantize_pairs_avx2(const uint8_t* bytes, int64_t count, float scale,
                                                              float* out) {
  const __m256 low_codes = _mm256_loadu_ps(nf4::kCode);
  const __m256 high_codes = _mm256_loadu_ps(nf4::kCode + 8);
  const __m256 factor = _mm256_set1_ps(scale);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);  // first element: the high nibble
  const __m256i nibble = _mm256_set1_epi32(15);
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    uint32_t word;
    std::memcpy(&word, bytes + j, 4);
    const __m128i pairs = _mm_cvtsi32_si128(static_cast<int>(word));
    const __m256i lanes = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(pairs, pairs));  // b0 b0 b1 b1 b2 b2 b3 b3
    const __m256i index = _mm256_and_si256(_mm256_srlv_epi32(lanes, shifts), nibble);
    const __m256 high_half = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));  // sign bit = index >= 8
    const __m256 code = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_codes, index),
                                         _mm256_permutevar8x32_ps(high_codes, index), high_half);
    if constexpr (kStream) {
      _mm256_stream_ps(out + 2 * j, _mm256_mul_ps(code, factor));  // 32-byte aligned: the caller checked
    } else {
      _mm256_storeu_ps(out + 2 * j, _mm256_mul_ps(code, factor));
    }
  }
  return j;
}

__attribute__((target("avx2"))) void store_fence() { _mm_sfence(); }

// LORAFUSE_NF4_SCALAR=1 forces the scalar loop (the tests compare both paths).
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("LORAFUSE_NF4_SCALAR") == nullptr;
  return has;
}
#endif

// Whether dequantizing `bytes` of float32 output should bypass the caches: at least what the L2 caches of the threads
// that write it hold (a smaller output stays cached for the GEMM that reads it next; one that fills them is evicted
// by the GEMM's own operands: streaming a 1024 x 1024 layer's 4 MiB on a 2-core Xeon with 2 MiB L2 per core took its
// QLoRA step at T = 2048 from 1.03x to 1.01x the float32 LoRA step, and left T = 512 unchanged).
bool stream_output(int64_t bytes) {
  static const int64_t l2 = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long size = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long size = 0;
#endif
    return size > 0 ? static_cast<int64_t>(size) : int64_t{1} << 21;  // 2 MiB when the system does not say
  }();
  return bytes >= l2 * at::get_num_threads();
}

// The codes of elements [i, stop) of one block (bit stream, `kBits` bits each) → code · scale.
template <int kBits>
void dequantize_codes(const uint8_t* packed, const float* code, float scale, int64_t i, int64_t stop, float* out) {
  for (; i < stop; ++i) out[i] = code[nf::read_code(packed, i, kBits)] * scale;
}

// Elements [begin, end) of a weight of another bit width than 4, block by block (its scale read once).
void dequantize_range_bits(const uint8_t* packed, const float* scales, const nf::Format& f, int64_t begin, int64_t end,
                           float* out) {
  const int64_t blocksize = f.blocksize;
  const float* code = weight_code(f.bits).values.data();
  const int64_t first = begin / blocksize;
  const int64_t last = (end + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  at::parallel_for(first, last, grain, [&](int64_t b0, int64_t b1) {
    float* o = out - begin;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = std::max(begin, b * blocksize), stop = std::min(end, (b + 1) * blocksize);
      switch (f.bits) {
        case 2:
          dequantize_codes<2>(packed, code, scales[b], i, stop, o);
          break;
        case 3:
          dequantize_codes<3>(packed, code, scales[b], i, stop, o);
          break;
        case 5:
          dequantize_codes<5>(packed, code, scales[b], i, stop, o);
          break;
        case 6:
          dequantize_codes<6>(packed, code, scales[b], i, stop, o);
          break;
        case 7:
          dequantize_codes<7>(packed, code, scales[b], i, stop, o);
          break;
        default:
          dequantize_codes<8>(packed, code, scales[b], i, stop, o);
          break;
      }
    }
  });
}

// Elements [begin, end) of the weight (row-major flat indices) in float32: code · the scale of its block. Block by
// block (its scale read once); 4 bits a byte (two elements) at a time.
void dequantize_range(const uint8_t* packed, const float* scales, const nf::Format& f, int64_t begin, int64_t end,
                      float* out) {
  if (f.bits != 4) return dequantize_range_bits(packed, scales, f, begin, end, out);
  const int64_t blocksize = f.blocksize;
  const int64_t first = begin / blocksize;
  const int64_t last = (end + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
#ifdef LORAFUSE_NF4_AVX2
  const bool stream = cpu_has_avx2() && stream_output((end - begin) * static_cast<int64_t>(sizeof(float)));
#endif
  at::parallel_for(first, last, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = scales[b];
      int64_t i = std::max(begin, b * blocksize);
      const int64_t stop = std::min(end, (b + 1) * blocksize);
      float* o = out - begin;
      if (i < stop && (i & 1)) {
        o[i] = nf4::kCode[nf4::low(packed[i >> 1])] * scale;
        ++i;
      }
      const uint8_t* bytes = packed + (i >> 1);
      float* pairs_out = o + i;
      const int64_t count = (stop - i) / 2;
      int64_t j = 0;
#ifdef LORAFUSE_NF4_AVX2
      if (cpu_has_avx2()) {
        j = stream && reinterpret_cast<uintptr_t>(pairs_out) % 32 == 0
                ? dequantize_pairs_avx2<true>(bytes, count, scale, pairs_out)
                : dequantize_pairs_avx2<false>(bytes, count, scale, pairs_out);
      }
#endif
      for (; j < count; ++j) {  // both codes of a byte from one table row
        const float* pair = kPairs[bytes[j]];
        pairs_out[2 * j] = pair[0] * scale;
        pairs_out[2 * j + 1] = pair[1] * scale;
      }
      i += 2 * count;
      if (i < stop) o[i] = nf4::kCode[nf4::high(packed[i >> 1])] * scale;
    }
#ifdef LORAFUSE_NF4_AVX2
    if (stream) store_fence();  // this thread's non-temporal stores visible before the GEMM reads them
#endif
  });
}

// Rows of W per tile: about 16 MiB of float32 — small against the dense weight of a large layer (a 4096 x 11008 one is
// 180 MiB), large enough that the GEMMs on the tiles run at the speed of one GEMM on the whole weight (with 4 MiB
// tiles a 2048 x 2048 layer's forward took ~7% longer on a 2-core Xeon: the GEMMs' own per-call packing and
// thread start-up, four times over).
int64_t tile_rows(int64_t in_features) { return std::max<int64_t>(1, (int64_t{1} << 22) / in_features); }

// A quantized weight as the kernels read it: its format, bytes and per-block float32 statistics.
struct Weight {
  nf::Format format;
  at::Tensor packed, scales;
};

Weight weight_of(const nf::Format& f, int64_t n, const at::Tensor& packed, const at::Tensor& absmax,
                 const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset) {
  return {f, packed.contiguous(), block_scales(f, n, absmax, nested_absmax, offset)};
}

at::Tensor dequantize_nf_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                             at::IntArrayRef format, at::IntArrayRef shape, at::ScalarType dtype) {
  constexpr const char* op = "lorafuse.dequantize_nf";
  const nf::Format f = detail::parse_nf_format(op, format);
  detail::check_dequantize_nf_args(op, packed, absmax, nested_absmax, offset, f, shape, dtype);
  int64_t n = 1;
  for (const auto d : shape) n *= d;
  const Weight w = weight_of(f, n, packed, absmax, nested_absmax, offset);
  at::Tensor out = at::empty({n}, packed.options().dtype(at::kFloat));
  dequantize_range(w.packed.data_ptr<uint8_t>(), w.scales.data_ptr<float>(), f, 0, n, out.data_ptr<float>());
  return out.to(dtype).reshape(shape);
}

// Runs fn(row0, rows, tile) over W [out, in] a tile of rows at a time; the tile is [rows, in] in `dtype` (W as the
// layer computes with it: dequantized in float32, rounded once to dtype).
template <class Fn>
void for_each_tile(const Weight& w, int64_t out_features, int64_t in_features, at::ScalarType dtype, Fn&& fn) {
  const int64_t step = tile_rows(in_features);
  // One scratch buffer per thread, kept between calls (at most one tile, ~16 MiB): freshly mapped pages each call cost
  // their page faults and made the GEMM on them measurably slower on a 2-core Xeon.
  thread_local at::Tensor scratch;
  const int64_t need = std::min(step, out_features) * in_features;
  if (!scratch.defined() || scratch.numel() < need) scratch = at::empty({need}, w.packed.options().dtype(at::kFloat));
  const at::Tensor buffer = scratch.narrow(0, 0, need).view({std::min(step, out_features), in_features});
  for (int64_t row0 = 0; row0 < out_features; row0 += step) {
    const int64_t rows = std::min(step, out_features - row0);
    at::Tensor tile = buffer.narrow(0, 0, rows);
    dequantize_range(w.packed.data_ptr<uint8_t>(), w.scales.data_ptr<float>(), w.format, row0 * in_features,
                     (row0 + rows) * in_features, tile.data_ptr<float>());
    fn(row0, rows, dtype == at::kFloat ? tile : tile.to(dtype));
  }
}

// x2 [T, in] · Wᵀ (+ bias) → [T, out_features] in x2's dtype, a tile of W's rows at a time, each tile's GEMM writing
// straight into y's columns (a BLAS matrix with leading dimension out_features: no copy).
at::Tensor nf_matmul(const at::Tensor& x2, const Weight& w, int64_t out_features,
                     const std::optional<at::Tensor>& bias) {
  at::Tensor y = at::empty({x2.size(0), out_features}, x2.options());
  const bool has_bias = bias.has_value() && bias->defined();
  for_each_tile(w, out_features, x2.size(1), x2.scalar_type(), [&](int64_t row0, int64_t rows, const at::Tensor& t) {
    at::Tensor part = y.narrow(1, row0, rows);
    if (has_bias) {
      at::addmm_out(part, bias->narrow(0, row0, rows), x2, t.t());  // as F.linear adds its bias
    } else {
      at::mm_out(part, x2, t.t());
    }
  });
  return y;
}

// dx [T, in] (+)= dy [T, out] · W in dy's dtype (float32 or float64), W in `dtype` (as the forward computes with it)
// widened to dy's; `accumulate`: dx already holds a term that the tiles add to, else the first tile writes it.
void nf_matmul_backward(const at::Tensor& dy, const Weight& w, int64_t in_features, at::ScalarType dtype,
                        at::Tensor& dx, bool accumulate) {
  const auto acc = dy.scalar_type();
  for_each_tile(w, dy.size(1), in_features, dtype, [&](int64_t row0, int64_t rows, const at::Tensor& t) {
    const at::Tensor wa = t.scalar_type() == acc ? t : t.to(acc);
    if (row0 == 0 && !accumulate) {
      at::mm_out(dx, dy.narrow(1, 0, rows), wa);
    } else {
      dx.addmm_(dy.narrow(1, row0, rows), wa);
    }
  });
}

at::Tensor nf_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                         at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lorafuse.nf_linear";
  const nf::Format f = detail::parse_nf_format(op, format);
  const int64_t in_features = x.dim() >= 1 ? x.size(-1) : 0;
  detail::check_nf_linear_args(op, x, in_features, packed, absmax, nested_absmax, offset, f, out_features, in_features,
                               bias);
  const Weight w = weight_of(f, out_features * in_features, packed, absmax, nested_absmax, offset);
  const at::Tensor y = nf_matmul(x.reshape({-1, in_features}), w, out_features, bias);
  return y.view(detail::with_last(x.sizes(), out_features));
}

at::Tensor nf_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& offset, at::IntArrayRef format,
                                  int64_t in_features) {
  constexpr const char* op = "lorafuse.nf_linear_backward";
  const nf::Format f = detail::parse_nf_format(op, format);
  const int64_t out_features = grad_out.dim() >= 1 ? grad_out.size(-1) : 0;
  detail::check_nf_linear_args(op, grad_out, out_features, packed, absmax, nested_absmax, offset, f, out_features,
                               in_features, std::nullopt);
  const auto dtype = grad_out.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor dy = grad_out.reshape({-1, out_features}).to(acc);
  at::Tensor dx = at::empty({dy.size(0), in_features}, dy.options());
  const Weight w = weight_of(f, out_features * in_features, packed, absmax, nested_absmax, offset);
  nf_matmul_backward(dy, w, in_features, dtype, dx, /*accumulate=*/false);
  return dx.to(dtype).view(detail::with_last(grad_out.sizes(), in_features));
}

// ---- nf_lora_linear: the LoRA layer over a quantized base in one kernel. The forward is nf_linear's tiles, then the
// LoRA expand added into that output in place (lora_add's arithmetic, without its copy of the base output); the
// backward writes dX's LoRA term first (lora_linear_backward without weight, in x's dtype) and adds the dY·W tiles onto
// it, so for a float32 x dX is one buffer instead of two tensors that autograd then sums (a half-precision x: the LoRA
// term widened to float32, the tiles added there, one rounding back).
constexpr const char* kLoraOp = "lorafuse.nf_lora_linear";

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf_lora_linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, at::IntArrayRef format,
    int64_t out_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
    double scale, double dropout_p) {
  const nf::Format f = detail::parse_nf_format(kLoraOp, format);
  detail::check_nf_lora_linear_args(kLoraOp, x, packed, absmax, nested_absmax, offset, f, out_features, bias, lora_a,
                                    lora_b, scale, dropout_p);
  const int64_t in = x.size(-1);
  const at::ScalarType acc = detail::lora_acc_dtype(x, lora_a);
  const at::Tensor x2 = x.reshape({detail::leading_numel(x.sizes()), in});  // [T, in]
  uint64_t seed = 0;
  at::Tensor rng_state = forward_rng_state(x, dropout_p, seed);
  at::Tensor u = lora_shrink(x2, lora_a.to(acc), seed, /*offset=*/0, dropout_p);  // [T, r]
  const Weight w = weight_of(f, out_features * in, packed, absmax, nested_absmax, offset);
  at::Tensor y2 = nf_matmul(x2, w, out_features, bias);
  add_expand_(y2, u, lora_b, scale);  // lora_add's arithmetic, in place
  return {y2.view(detail::with_last(x.sizes(), out_features)), u, rng_state};
}

at::Tensor nf_lora_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              at::IntArrayRef format, int64_t out_features, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p) {
  return std::get<0>(nf_lora_linear_forward_cpu(x, packed, absmax, nested_absmax, offset, format, out_features, bias,
                                                lora_a, lora_b, scale, dropout_p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf_lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset, at::IntArrayRef format,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& rng_state, double scale,
    double dropout_p, std::array<bool, 4> output_mask) {
  constexpr const char* op = "lorafuse.nf_lora_linear_backward";
  const nf::Format f = detail::parse_nf_format(op, format);
  detail::check_nf_lora_linear_backward_args(op, grad_out, x, packed, absmax, nested_absmax, offset, f, lora_a, lora_b,
                                             u, rng_state, scale, dropout_p);
  auto [gx, ga, gb, gbias] =
      lora_linear_backward_cpu(grad_out, x, std::nullopt, lora_a, lora_b, u, rng_state, scale, dropout_p, output_mask);
  if (!output_mask[0]) return {gx, ga, gb, gbias};
  const int64_t in = x.size(-1), out = lora_b.size(0);
  const auto dtype = x.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor dy = grad_out.reshape({-1, out}).to(acc);
  at::Tensor dx = gx.reshape({-1, in});
  if (dtype != acc) dx = dx.to(acc);  // a half-precision dX: the tiles added in float32, rounded back once
  const Weight w = weight_of(f, out * in, packed, absmax, nested_absmax, offset);
  nf_matmul_backward(dy, w, in, dtype, dx, /*accumulate=*/true);
  return {dx.to(dtype).view(x.sizes()), ga, gb, gbias};
}

}  // namespace
}  // namespace lorafuse::cpu

TORCH_LIBRARY_IMPL(lorafuse, CPU, m) {
  m.impl("quantize_nf", &lorafuse::cpu::quantize_nf_cpu);
  m.impl("dequantize_nf", &lorafuse::cpu::dequantize_nf_cpu);
  m.impl("nf_linear", &lorafuse::cpu::nf_linear_cpu);
  m.impl("nf_linear_backward", &lorafuse::cpu::nf_linear_backward_cpu);
  m.impl("nf_lora_linear", &lorafuse::cpu::nf_lora_linear_cpu);
  m.impl("nf_lora_linear_forward", &lorafuse::cpu::nf_lora_linear_forward_cpu);
  m.impl("nf_lora_linear_backward", &lorafuse::cpu::nf_lora_linear_backward_cpu);
}
