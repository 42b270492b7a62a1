// LQ-LoRA's numerics for the Python front: the bit allocation and the decomposition of one matrix.
#include <lorafuse/quant/bit_allocation.h>
#include <lorafuse/quant/lq_decompose.h>

#include "csrc/python/convert.h"

namespace lorafuse::python {

void bind_quant(py::module& m) {
  m.def(
      "_allocate_bits",
      [](const std::vector<std::vector<double>>& cost, const std::vector<std::vector<double>>& storage, double budget,
         int64_t max_nodes, double relative_gap) {
        const auto r = translating([&] {
          py::gil_scoped_release no_gil;  // plain C++ on vectors: other Python threads may run meanwhile
          return allocate_bits(cost, storage, budget,
                               BitAllocationOptions().max_nodes(max_nodes).relative_gap(relative_gap));
        });
        return std::make_tuple(r.choice, r.cost, r.storage, r.lower_bound, r.gap, r.optimal, r.nodes);
      },
      py::arg("cost"), py::arg("storage"), py::arg("budget"), py::arg("max_nodes"), py::arg("relative_gap"),
      "lorafuse::allocate_bits (LQ-LoRA's bit allocation): (choice, cost, storage, lower_bound, gap, optimal, "
      "nodes).");
  m.def(
      "_lq_decompose",
      [](const at::Tensor& weight, int64_t rank, const std::vector<int64_t>& format, at::ScalarType stat_dtype,
         int64_t max_iters, double tol, int64_t oversampling, int64_t power_iters, uint64_t seed,
         std::optional<at::Tensor> fisher) {
        const auto r = translating([&] {
          py::gil_scoped_release no_gil;  // ATen work: other Python threads (other matrices) may run meanwhile
          return lq_decompose(weight, LqDecomposeOptions(rank, format)
                                          .stat_dtype(stat_dtype)
                                          .max_iters(max_iters)
                                          .tol(tol)
                                          .oversampling(oversampling)
                                          .power_iters(power_iters)
                                          .seed(seed)
                                          .fisher(fisher));
        });
        return py::make_tuple(r.l1, r.l2, py::make_tuple(r.q.packed, r.q.absmax, r.q.nested_absmax, r.q.offset),
                              r.error, r.norm, r.errors, r.best_iteration);
      },
      py::arg("weight"), py::arg("rank"), py::arg("format"), py::arg("stat_dtype"), py::arg("max_iters"),
      py::arg("tol"), py::arg("oversampling"), py::arg("power_iters"), py::arg("seed"), py::arg("fisher"),
      "lorafuse::lq_decompose: (l1, l2, (packed, absmax, nested_absmax, offset), error, norm, errors, "
      "best_iteration).");
}

}  // namespace lorafuse::python
