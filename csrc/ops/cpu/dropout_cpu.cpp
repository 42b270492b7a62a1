#include "csrc/ops/cpu/dropout_cpu.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cuda/shared/philox.h"

namespace lorafuse::cpu {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LORAFUSE_PHILOX_AVX2 1
// (hi, lo) of the 32x32-bit products m·c in each of the 8 lanes: mullo for the low halves, two 32x32→64 multiplies
// (the even lanes, then the odd ones shifted down) for the high halves.
__attribute__((target("avx2"), always_inline)) inline __m256i mulhilo8(__m256i m, __m256i c, __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(m, c);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(m, 32), _mm256_srli_epi64(c, 32));
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  return _mm256_mullo_epi32(m, c);
}

// philox::words_for_group for the 8·kVectors groups group0 .. (their high 32 bits equal: the caller checks),
// Philox-4x32-10 lane-parallel with AVX2, the same arithmetic as the scalar rounds; kVectors independent sets of 8 per
// round so that the multiplies' latency overlaps. out[4*i + j] = word j of group group0 + i, the order elements use
// them in.
template <int kVectors>
__attribute__((target("avx2"))) void philox_groups(uint64_t seed, uint64_t offset, uint64_t group0, uint32_t* out) {
  const uint64_t step = offset >> 2;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(step)));
    c1[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(step >> 32)));
    c2[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group0) + 8u * v)),
                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    c3[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group0 >> 32)));
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kVectors; ++v) {
      __m256i hi0, hi1;
      const __m256i lo0 = mulhilo8(m0, c0[v], &hi0);
      const __m256i lo1 = mulhilo8(m1, c2[v], &hi1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), key1);
      c1[v] = lo1;
      c3[v] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int v = 0; v < kVectors; ++v) {
    // lanes (c0, c1, c2, c3) → groups in order: 4x4 transposes within each 128-bit half, then the halves placed
    const __m256i t0 = _mm256_unpacklo_epi32(c0[v], c1[v]), t1 = _mm256_unpacklo_epi32(c2[v], c3[v]);
    const __m256i t2 = _mm256_unpackhi_epi32(c0[v], c1[v]), t3 = _mm256_unpackhi_epi32(c2[v], c3[v]);
    const __m256i g04 = _mm256_unpacklo_epi64(t0, t1), g15 = _mm256_unpackhi_epi64(t0, t1);
    const __m256i g26 = _mm256_unpacklo_epi64(t2, t3), g37 = _mm256_unpackhi_epi64(t2, t3);
    auto* o = reinterpret_cast<__m256i*>(out + 32 * v);
    _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(g04, g15, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(g26, g37, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(g04, g15, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(g26, g37, 0x31));
  }
}

bool philox_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("LORAFUSE_PHILOX_SCALAR") == nullptr;
  return has;
}
#endif

// The mask words of row t (elements t*in .. t*in + in - 1), in this thread's buffer.
inline const uint32_t* row_words(int64_t t, int64_t in, uint64_t seed, uint64_t offset) {
  thread_local std::vector<uint32_t> words;
  return mask_words(seed, offset, static_cast<uint64_t>(t) * static_cast<uint64_t>(in), in, words);
}

// out[k] = word[k] >= threshold ? in[k]·scale (computed in Acc, stored as Out) : +0, for k in [0, n). The product's
// bits are ANDed with an all-ones or all-zeros mask (a dropped NaN or infinity still gives 0): with no branch the
// compiler vectorizes the loop, which a select it kept as control flow (GCC 12, -O3) did not. out may be in itself
// (element k is read before it is written).
template <typename In, typename Out, typename Acc = Out>
inline void keep_scaled(const In* in, const uint32_t* word, int64_t n, uint32_t threshold, Acc scale, Out* out) {
  using Bits = std::conditional_t<sizeof(Out) == 8, uint64_t, std::conditional_t<sizeof(Out) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(Bits) == sizeof(Out), "a floating type of 2, 4 or 8 bytes");
  for (int64_t k = 0; k < n; ++k) {
    const Out v = static_cast<Out>(static_cast<Acc>(in[k]) * scale);
    Bits bits;
    std::memcpy(&bits, &v, sizeof(bits));
    bits &= static_cast<Bits>(-static_cast<Bits>(word[k] >= threshold));
    std::memcpy(&out[k], &bits, sizeof(bits));
  }
}

// Row `row` of t ([T, in] contiguous) times its keep mask / (1 - p), in place, from that row's words.
void mask_row(at::Tensor& t, int64_t row, const uint32_t* w, uint32_t threshold, double p) {
  const int64_t in = t.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lorafuse_dropout_mask_row", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* d = t.mutable_data_ptr<scalar_t>() + row * in;
    keep_scaled<scalar_t, scalar_t, acc_t>(d, w, in, threshold, static_cast<acc_t>(1.0 / (1.0 - p)), d);
  });
}

constexpr int64_t kRowsPerTask = 16;

}  // namespace

const uint32_t* mask_words(uint64_t seed, uint64_t offset, uint64_t e0, int64_t n, std::vector<uint32_t>& buffer) {
  const uint64_t first = e0 >> 2, last = (e0 + static_cast<uint64_t>(n) + 3) >> 2;  // groups [first, last)
  const uint64_t groups = last - first;
  buffer.resize(static_cast<size_t>(4 * groups));
  uint64_t g = first;
#ifdef LORAFUSE_PHILOX_AVX2
  if (philox_avx2()) {
    for (; g + 32 <= last && (g >> 32) == ((g + 31) >> 32); g += 32) {
      philox_groups<4>(seed, offset, g, buffer.data() + 4 * (g - first));
    }
    // a batch across a 2^32 boundary of the group number stops here: the scalar loop takes the rest
    for (; g + 8 <= last && (g >> 32) == ((g + 7) >> 32); g += 8) {
      philox_groups<1>(seed, offset, g, buffer.data() + 4 * (g - first));
    }
  }
#endif
  for (; g < last; ++g) {
    const philox::Uint4 w = philox::words_for_group(seed, offset, g);
    uint32_t* o = buffer.data() + 4 * (g - first);
    o[0] = w.x, o[1] = w.y, o[2] = w.z, o[3] = w.w;
  }
  return buffer.data() + (e0 & 3u);
}

uint64_t draw_seed() {
  auto* gen = at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

namespace {

// Row t of x2 (row stride rs, column stride cs, `in` columns) into orow as out_t: times its keep mask / (1 - p) when
// p > 0, else cast; when `also` is given, its row t is masked from the same words.
template <typename in_t, typename out_t>
inline void cast_row(const in_t* src, int64_t rs, int64_t cs, int64_t in, int64_t t, out_t* orow, uint64_t seed,
                     uint64_t offset, double p, uint32_t threshold, at::Tensor* also) {
  const in_t* row = src + t * rs;
  if (p == 0.0) {
    for (int64_t k = 0; k < in; ++k) orow[k] = static_cast<out_t>(row[k * cs]);
    return;
  }
  const out_t inv_keep = static_cast<out_t>(1.0 / (1.0 - p));
  const uint32_t* w = row_words(t, in, seed, offset);
  if (cs == 1) {
    keep_scaled(row, w, in, threshold, inv_keep, orow);
  } else {
    for (int64_t k = 0; k < in; ++k)
      orow[k] = w[k] >= threshold ? static_cast<out_t>(row[k * cs]) * inv_keep : out_t(0);
  }
  if (also != nullptr) mask_row(*also, t, w, threshold, p);
}

// Rows [t0, t0 + n) of x2 through cast_row into dst ([n, in] contiguous of dtype `dtype`).
void cast_rows(const at::Tensor& x2, at::ScalarType dtype, int64_t t0, int64_t n, void* dst, uint64_t seed,
               uint64_t offset, double p, at::Tensor* also) {
  const int64_t in = x2.size(1), rs = x2.stride(0), cs = x2.stride(1);
  const uint32_t threshold = p > 0.0 ? philox::keep_threshold(p) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "lorafuse_dropout_cast", [&] {
    using in_t = scalar_t;
    const in_t* src = x2.const_data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES(dtype, "lorafuse_dropout_cast_out", [&] {
      auto* out = static_cast<scalar_t*>(dst);
      for (int64_t t = t0; t < t0 + n; ++t)
        cast_row(src, rs, cs, in, t, out + (t - t0) * in, seed, offset, p, threshold, also);
    });
  });
}

// Rows per tile of the fused shrink: a tile of dropout(x) stays in the core's L2 cache between being written and
// being read by the GEMM (64 rows of 1,536 float32 columns: 384 KiB).
constexpr int64_t kTileRows = 64;

// body(tile, t0, n) for tiles of rows of dropout(x2) in dtype `acc`: each tile [n, in] is written into a buffer of
// the thread that runs it (parallel over tiles) and handed to body, which must be done with it when it returns.
template <typename Body>
void for_each_tile(const at::Tensor& x2, at::ScalarType acc, uint64_t seed, uint64_t offset, double p, at::Tensor* also,
                   const Body& body) {
  const int64_t rows = x2.size(0), in = x2.size(1);
  // at most kTileRows rows a tile, and a multiple of the threads' count of tiles of equal size (when there are rows
  // enough): each thread gets the same work
  if (rows == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t fewest = (rows + kTileRows - 1) / kTileRows;
  const int64_t wanted = std::min(rows, (fewest + threads - 1) / threads * threads);
  const int64_t tile_rows = (rows + wanted - 1) / wanted;
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  // body calls ATen ops: on OpenMP's worker threads they must see this thread's state (grad and inference mode, the
  // dispatch keys excluded below autograd), which a new thread does not inherit
  const at::ThreadLocalState state;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    thread_local std::vector<double> storage;  // double: aligned for either accumulation dtype
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * tile_rows, n = std::min(tile_rows, rows - t0);
      storage.resize(static_cast<size_t>((n * in * static_cast<int64_t>(c10::elementSize(acc)) + 7) / 8));
      cast_rows(x2, acc, t0, n, storage.data(), seed, offset, p, also);
      body(at::from_blob(storage.data(), {n, in}, at::TensorOptions().dtype(acc)), t0, n);
    }
  });
}

}  // namespace

at::Tensor lora_shrink(const at::Tensor& x2, const at::Tensor& a, uint64_t seed, uint64_t offset, double p) {
  const at::ScalarType acc = a.scalar_type();
  if (p == 0.0 && x2.scalar_type() == acc) return at::mm(x2, a.t());
  at::Tensor u = at::empty({x2.size(0), a.size(0)}, a.options());
  if (u.numel() == 0) return u;
  const at::Tensor a_t = a.t();
  for_each_tile(x2, acc, seed, offset, p, nullptr, [&](const at::Tensor& tile, int64_t t0, int64_t n) {
    at::Tensor rows = u.narrow(0, t0, n);
    at::mm_out(rows, tile, a_t);
  });
  return u;
}

at::Tensor lora_shrink_backward(const at::Tensor& x2, const at::Tensor& v, uint64_t seed, uint64_t offset, double p,
                                at::Tensor* masked) {
  TORCH_CHECK(masked == nullptr || (masked->is_contiguous() && masked->sizes() == x2.sizes()),
              "lora_shrink_backward: masked must be a contiguous [T, in] tensor of x2's shape");
  const at::ScalarType acc = v.scalar_type();
  if (p == 0.0 && x2.scalar_type() == acc) return at::mm(v.t(), x2);
  const int64_t threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, v.size(1), x2.size(1)}, v.options());  // per thread: [r, in]
  for_each_tile(x2, acc, seed, offset, p, p > 0.0 ? masked : nullptr,
                [&](const at::Tensor& tile, int64_t t0, int64_t n) {
                  at::Tensor mine = partial.select(0, at::get_thread_num());
                  mine.addmm_(v.narrow(0, t0, n).t(), tile);
                });
  return threads == 1 ? partial.select(0, 0) : partial.sum(0);
}

void dropout_mask_(at::Tensor& t, uint64_t seed, uint64_t offset, double p, const int64_t* rows) {
  const int64_t count = t.size(0), in = t.size(1);
  if (t.numel() == 0) return;
  const uint32_t threshold = philox::keep_threshold(p);
  at::parallel_for(0, count, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      mask_row(t, row, row_words(rows != nullptr ? rows[row] : row, in, seed, offset), threshold, p);
    }
  });
}

at::Tensor forward_rng_state(const at::Tensor& x, double p, uint64_t& seed) {
  at::Tensor rng_state = at::zeros({2}, x.options().dtype(at::kLong));
  seed = 0;
  if (p > 0.0) {
    seed = draw_seed();
    rng_state.mutable_data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  }
  return rng_state;
}

}  // namespace lorafuse::cpu
