#include "csrc/ops/cpu/dropout_cpu.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <mutex>

#include "cuda/shared/philox.h"

namespace lorafuse::cpu {
namespace {

// Calls f(k, keep) for k in [0, in) of row t, drawing one Philox block per four elements.
template <typename F>
inline void for_each_keep(int64_t t, int64_t in, uint64_t seed, uint64_t offset, uint32_t threshold, F&& f) {
  const uint64_t e0 = static_cast<uint64_t>(t) * static_cast<uint64_t>(in);
  uint64_t group = ~uint64_t{0};
  philox::Uint4 words{};
  for (int64_t k = 0; k < in; ++k) {
    const uint64_t e = e0 + static_cast<uint64_t>(k);
    if ((e >> 2) != group) {
      group = e >> 2;
      words = philox::words_for_group(seed, offset, group);
    }
    f(k, philox::pick(words, static_cast<unsigned>(e & 3u)) >= threshold);
  }
}

constexpr int64_t kRowsPerTask = 16;

}  // namespace

uint64_t draw_seed() {
  auto* gen = at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

at::Tensor dropout_cast(const at::Tensor& x2, at::ScalarType dtype, uint64_t seed, uint64_t offset, double p) {
  const int64_t rows = x2.size(0), in = x2.size(1);
  at::Tensor out = at::empty({rows, in}, x2.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const int64_t rs = x2.stride(0), cs = x2.stride(1);
  const uint32_t threshold = philox::keep_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "lorafuse_dropout_cast", [&] {
    using in_t = scalar_t;
    const in_t* src = x2.const_data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES(dtype, "lorafuse_dropout_cast_out", [&] {
      using out_t = scalar_t;
      out_t* dst = out.mutable_data_ptr<out_t>();
      const out_t inv_keep = static_cast<out_t>(1.0 / (1.0 - p));
      at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const in_t* row = src + t * rs;
          out_t* orow = dst + t * in;
          if (p > 0.0) {
            for_each_keep(t, in, seed, offset, threshold, [&](int64_t k, bool kept) {
              orow[k] = kept ? static_cast<out_t>(row[k * cs]) * inv_keep : out_t(0);
            });
          } else {
            for (int64_t k = 0; k < in; ++k) orow[k] = static_cast<out_t>(row[k * cs]);
          }
        }
      });
    });
  });
  return out;
}

void dropout_mask_(at::Tensor& t, uint64_t seed, uint64_t offset, double p) {
  const int64_t rows = t.size(0), in = t.size(1);
  if (t.numel() == 0) return;
  const uint32_t threshold = philox::keep_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lorafuse_dropout_mask_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* d = t.mutable_data_ptr<scalar_t>();
    const acc_t kept_scale = static_cast<acc_t>(1.0 / (1.0 - p));
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* drow = d + row * in;
        for_each_keep(row, in, seed, offset, threshold, [&](int64_t k, bool kept) {
          drow[k] = kept ? static_cast<scalar_t>(static_cast<acc_t>(drow[k]) * kept_scale) : scalar_t(0);
        });
      }
    });
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
