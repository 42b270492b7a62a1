// CPU kernels of lora_segments and lora_multi_add: adapter by adapter, its rows gathered (cast to the accumulation
// dtype and masked with their own rows' dropout words), the shrink and expand as lora_add computes them (add_expand_),
// the rows written back. Backward: the same gathers, each adapter's gradients from its rows alone.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <lorafuse/ops/lora_multi.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "csrc/ops/common/lora_linear_checks.h"
#include "csrc/ops/common/lora_multi_backward.h"
#include "csrc/ops/common/lora_multi_checks.h"
#include "csrc/ops/cpu/dropout_cpu.h"
#include "csrc/ops/cpu/lora_linear_cpu.h"

namespace lorafuse::cpu {
namespace {

constexpr const char* kOp = "lorafuse.lora_multi_add";

// The CPU's dropout of gathered rows: the Philox words of their own batch rows (seed, offset 0); none when p = 0.
detail::RowMask cpu_row_mask(uint64_t seed, double p) {
  if (p <= 0.0) return {};
  return [seed, p](at::Tensor& rows, const at::Tensor& row_ids) {
    dropout_mask_(rows, seed, /*offset=*/0, p, row_ids.const_data_ptr<int64_t>());
  };
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_multi_add_forward_cpu(const at::Tensor& base_out, const at::Tensor& x,
                                                              at::TensorList lora_a, at::TensorList lora_b,
                                                              at::ArrayRef<double> scale, const at::Tensor& order,
                                                              const at::Tensor& offsets, double dropout_p) {
  detail::check_lora_multi_add_args(kOp, base_out, x, lora_a, lora_b, scale, order, offsets, dropout_p,
                                    /*values=*/true);
  const int64_t in = x.size(-1), out = base_out.size(-1);
  const int64_t tokens = detail::leading_numel(x.sizes());
  uint64_t seed = 0;
  at::Tensor rng_state = forward_rng_state(x, dropout_p, seed);
  const at::Tensor x2 = x.reshape({tokens, in});
  at::Tensor y2 = base_out.reshape({tokens, out}).clone(at::MemoryFormat::Contiguous);
  const at::Tensor rows = detail::adapter_rows(order, offsets).contiguous();  // [T'] the rows with an adapter
  const detail::RowMask mask = cpu_row_mask(seed, dropout_p);
  struct Segment {
    int64_t adapter, start, n;
  };
  std::vector<Segment> segments;
  detail::for_each_segment(offsets, [&](int64_t i, int64_t start, int64_t n) { segments.push_back({i, start, n}); });

  // The lean path: x, base_out and every adapter in one dtype that is also the accumulation dtype (float32 or
  // float64), all contiguous. Each chunk of a segment's rows is gathered (and masked) into a per-thread buffer, its
  // two GEMMs run on views of raw buffers (no per-chunk tensor ops around them), and its rows are added into y in
  // place: x is read once and y updated once, as lora_add does, with the chunks in parallel. A mixed batch runs this
  // in every LoRA layer, so what surrounds the GEMMs matters.
  const at::ScalarType acc = detail::lora_acc_dtype(x, lora_a[0]);
  bool lean = x.scalar_type() == acc && y2.scalar_type() == acc && x2.is_contiguous();
  for (size_t i = 0; lean && i < lora_a.size(); ++i) {
    lean = lora_a[i].scalar_type() == acc && lora_b[i].scalar_type() == acc && lora_a[i].is_contiguous() &&
           lora_b[i].is_contiguous();
  }
  if (lean) {
    constexpr int64_t kChunk = 128;  // rows per chunk: bounds the buffers, splits large segments across threads
    std::vector<Segment> chunks;
    for (const auto& sg : segments) {
      for (int64_t c = 0; c < sg.n; c += kChunk)
        chunks.push_back({sg.adapter, sg.start + c, std::min(kChunk, sg.n - c)});
    }
    int64_t max_r = 0;
    for (const auto& a : lora_a) max_r = std::max(max_r, a.size(0));
    const auto opts = y2.options();
    // the GEMMs below run on OpenMP's worker threads, which do not inherit this thread's state (below autograd)
    const at::ThreadLocalState state;
    const int64_t* row_of = rows.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(acc, "lorafuse_lora_multi_add_lean", [&] {
      const scalar_t* xp = x2.const_data_ptr<scalar_t>();
      scalar_t* yp = y2.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
        const at::ThreadLocalStateGuard guard(state);  // the caller's grad mode and dispatch keys on this worker
        at::Tensor xs_buf = at::empty({kChunk, in}, opts), u_buf = at::empty({kChunk, max_r}, opts);
        at::Tensor d_buf = at::empty({kChunk, out}, opts);
        for (int64_t k = begin; k < end; ++k) {
          const auto [i, start, n] = chunks[static_cast<size_t>(k)];
          const int64_t r = lora_a[i].size(0);
          scalar_t* xs_p = xs_buf.mutable_data_ptr<scalar_t>();
          for (int64_t j = 0; j < n; ++j) std::copy_n(xp + row_of[start + j] * in, in, xs_p + j * in);
          at::Tensor xs = xs_buf.narrow(0, 0, n);
          if (mask) mask(xs, rows.narrow(0, start, n));
          const at::Tensor a_t = at::from_blob(lora_a[i].data_ptr(), {in, r}, {1, in}, opts);  // Aᵀ [in, r]
          const at::Tensor b_t = at::from_blob(lora_b[i].data_ptr(), {r, out}, {1, r}, opts);  // Bᵀ [r, out]
          at::Tensor u = at::from_blob(u_buf.mutable_data_ptr<scalar_t>(), {n, r}, opts);      // [n, r]
          at::Tensor d = d_buf.narrow(0, 0, n);                                                // [n, out]
          at::mm_out(u, xs, a_t);
          at::mm_out(d, u, b_t);
          const scalar_t sc = static_cast<scalar_t>(scale[i]);
          const scalar_t* dp = d_buf.const_data_ptr<scalar_t>();
          for (int64_t j = 0; j < n; ++j) {  // y[row] += scale·d[j] (rows are distinct: no two chunks share one)
            scalar_t* yr = yp + row_of[start + j] * out;
            const scalar_t* dr = dp + j * out;
            for (int64_t o = 0; o < out; ++o) yr[o] += sc * dr[o];
          }
        }
      });
    });
    return {y2.view(base_out.sizes()), rng_state};
  }

  // Any other dtypes: the rows gathered once in segment order, each segment's branch into its slice of delta, then one
  // scatter-add (each row once): y = base_out + delta, delta rounded to y's dtype first for 16-bit outputs as lora_add
  // does.
  const at::Tensor sorted = x2.index_select(0, rows);  // [T', in]
  const at::ScalarType delta_dtype = y2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor delta = at::empty({rows.size(0), out}, y2.options().dtype(delta_dtype));
  const at::ThreadLocalState state;
  at::parallel_for(0, static_cast<int64_t>(segments.size()), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t k = begin; k < end; ++k) {
      const auto [i, start, n] = segments[static_cast<size_t>(k)];
      const at::ScalarType acc_i = detail::lora_acc_dtype(x, lora_a[i]);
      const at::Tensor u = at::mm(detail::segment_rows(sorted, order, start, n, acc_i, mask), lora_a[i].to(acc_i).t());
      delta.narrow(0, start, n).copy_(at::mm(u, lora_b[i].to(acc_i).t()).mul_(scale[i]));  // [n, out]
    }
  });
  y2.index_add_(0, rows, delta.to(y2.scalar_type()));
  return {y2.view(base_out.sizes()), rng_state};
}

at::Tensor lora_multi_add_cpu(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                              at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& order,
                              const at::Tensor& offsets, double dropout_p) {
  return std::get<0>(lora_multi_add_forward_cpu(base_out, x, lora_a, lora_b, scale, order, offsets, dropout_p));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_multi_add_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
    at::ArrayRef<double> scale, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& rng_state,
    double dropout_p, std::array<bool, 3> output_mask) {
  constexpr const char* op = "lorafuse.lora_multi_add_backward";
  detail::check_lora_multi_add_backward_args(op, grad_out, x, lora_a, lora_b, scale, order, offsets, rng_state,
                                             dropout_p);
  const auto seed = static_cast<uint64_t>(rng_state.cpu().const_data_ptr<int64_t>()[0]);
  return detail::lora_multi_backward(grad_out, x, lora_a, lora_b, scale, order, offsets, output_mask,
                                     cpu_row_mask(seed, dropout_p));
}

// Per token: the rows grouped by adapter here, then the segmented kernel (on the CPU both are the same GEMMs).
at::Tensor lora_token_add_cpu(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                              at::TensorList lora_b, at::ArrayRef<double> scale, const at::Tensor& row_adapter) {
  detail::check_lora_token_add_args("lorafuse.lora_token_add", base_out, x, lora_a, lora_b, scale, row_adapter,
                                    /*values=*/true);
  const auto [order, offsets] = lora_segments(row_adapter, static_cast<int64_t>(lora_a.size()));
  return lora_multi_add_cpu(base_out, x, lora_a, lora_b, scale, order, offsets, 0.0);
}

// lora_segments on the CPU: a counting sort (stable), the composite's result without its sort and scans.
std::tuple<at::Tensor, at::Tensor> lora_segments_cpu(const at::Tensor& row_adapter, int64_t num_adapters) {
  detail::check_lora_segments_args("lorafuse.lora_segments", row_adapter, num_adapters);
  const at::Tensor ra = row_adapter.contiguous();
  const int64_t t = ra.numel();
  const int64_t* v = ra.const_data_ptr<int64_t>();
  at::Tensor offsets = at::zeros({num_adapters + 1}, ra.options());
  at::Tensor order = at::empty({t}, ra.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t j = 0; j < t; ++j) {
    if (v[j] >= 0) ++off[v[j] + 1];
  }
  for (int64_t i = 0; i < num_adapters; ++i) off[i + 1] += off[i];
  std::vector<int64_t> next(off, off + num_adapters);
  int64_t base = off[num_adapters];  // the base's rows after every adapter's
  for (int64_t j = 0; j < t; ++j) o[v[j] >= 0 ? next[static_cast<size_t>(v[j])]++ : base++] = j;
  return {order, offsets};
}

}  // namespace lorafuse::cpu

TORCH_LIBRARY_IMPL(lorafuse, CPU, m) {
  m.impl("lora_segments", &lorafuse::cpu::lora_segments_cpu);
  m.impl("lora_multi_add", &lorafuse::cpu::lora_multi_add_cpu);
  m.impl("lora_multi_add_forward", &lorafuse::cpu::lora_multi_add_forward_cpu);
  m.impl("lora_multi_add_backward", &lorafuse::cpu::lora_multi_add_backward_cpu);
  m.impl("lora_token_add", &lorafuse::cpu::lora_token_add_cpu);
}
