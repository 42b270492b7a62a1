// LQ-LoRA's numerics for the Python front: the bit allocation and the decomposition of one matrix.
#include <lorafuse/config/lq_lora_config.h>
#include <lorafuse/peft/lq_lora.h>
#include <lorafuse/quant/bit_allocation.h>
#include <lorafuse/quant/lq_decompose.h>
#include <lorafuse/quant/lq_lora.h>

#include "csrc/python/convert.h"

namespace lorafuse::python {

namespace {

using ChoiceFields = std::tuple<std::vector<int64_t>, at::ScalarType>;

std::vector<ChoiceFields> choice_fields(const std::vector<QuantChoice>& grid) {
  std::vector<ChoiceFields> out;
  for (const auto& c : grid) out.emplace_back(c.format, c.stat_dtype);
  return out;
}

// lorafuse.LqLoraConfig's numeric fields as the C++ config.
LqLoraConfig lq_config(std::optional<double> budget_bits, int64_t r, double lora_alpha,
                       const std::vector<ChoiceFields>& configs, int64_t max_iters, double tol, int64_t oversampling,
                       int64_t power_iters, uint64_t seed, const std::string& cache_path, int64_t threads) {
  std::vector<QuantChoice> choices;
  for (const auto& [format, dtype] : configs) choices.push_back({format, dtype});
  return LqLoraConfig()
      .budget_bits(budget_bits)
      .r(r)
      .lora_alpha(lora_alpha)
      .configs(choices)
      .max_iters(max_iters)
      .tol(tol)
      .oversampling(oversampling)
      .power_iters(power_iters)
      .seed(seed)
      .cache_path(cache_path)
      .threads(threads);
}

// A Python callable (stage, done, total) as lq_plan's progress, called with the GIL taken back; none: no progress.
LqProgress progress_of(const std::optional<py::function>& progress) {
  if (!progress.has_value()) return {};
  return [fn = *progress](const std::string& stage, int64_t done, int64_t total) {
    py::gil_scoped_acquire gil;
    fn(stage, done, total);
  };
}

// lorafuse::LqPlan as Python reads it (lorafuse/quant/lq_lora.py).
py::tuple plan_tuple(const LqPlan& plan) {
  py::list rows;
  for (const auto& p : plan.matrices) {
    rows.append(py::make_tuple(p.name, p.out_features, p.in_features, p.config_index, p.bits, p.error, p.relative_error,
                               p.iterations, p.best_iteration, p.l1, p.l2,
                               py::make_tuple(p.q.packed, p.q.absmax, p.q.nested_absmax, p.q.offset)));
  }
  py::object allocation = py::none();
  if (plan.allocation.has_value()) {
    const auto& a = *plan.allocation;
    allocation = py::make_tuple(a.choice, a.cost, a.storage, a.lower_bound, a.gap, a.optimal, a.nodes);
  }
  return py::make_tuple(rows, plan.cost, plan.storage, allocation, plan.average_bits, plan.average_bits_with_lora,
                        plan.from_cache);
}

}  // namespace

void bind_quant(py::module& m) {
  m.def(
      "_lq_grid",
      [](const std::string& which) { return choice_fields(which == "paper" ? lq_paper_grid() : lq_default_grid()); },
      py::arg("which"),
      "lorafuse::lq_default_grid() (\"default\") or lq_paper_grid() (\"paper\"): (format, stat_dtype).");
  m.def(
      "_quant_choice_name",
      [](const std::vector<int64_t>& format, at::ScalarType dtype) {
        return translating([&] { return QuantChoice{format, dtype}.name(); });
      },
      py::arg("format"), py::arg("stat_dtype"), "lorafuse::QuantChoice::name().");
  m.def(
      "_validate_lq_lora_config",
      [](std::optional<double> budget_bits, int64_t r, double lora_alpha, const std::vector<ChoiceFields>& configs,
         int64_t max_iters, double tol, int64_t oversampling, int64_t power_iters, uint64_t seed, int64_t threads) {
        translating([&] {
          lq_config(budget_bits, r, lora_alpha, configs, max_iters, tol, oversampling, power_iters, seed, "", threads)
              .validate();
        });
      },
      "Raises ValueError unless the lorafuse.LqLoraConfig fields are valid (the C++ LqLoraConfig's rules).");
  m.def(
      "_lq_plan",
      [](const std::vector<std::tuple<std::string, at::Tensor, std::optional<at::Tensor>>>& matrices,
         std::optional<double> budget_bits, int64_t r, double lora_alpha, const std::vector<ChoiceFields>& configs,
         int64_t max_iters, double tol, int64_t oversampling, int64_t power_iters, uint64_t seed,
         const std::string& cache_path, int64_t threads, const std::optional<py::function>& progress) {
        std::vector<LqMatrix> ms;
        for (const auto& [name, weight, fisher] : matrices) ms.push_back({name, weight, fisher.value_or(at::Tensor())});
        const auto config = lq_config(budget_bits, r, lora_alpha, configs, max_iters, tol, oversampling, power_iters,
                                      seed, cache_path, threads);
        const LqProgress report = progress_of(progress);
        const LqPlan plan = warning_in_python([&] {
          py::gil_scoped_release no_gil;  // ATen work; the progress callback takes the GIL back
          return lq_plan(ms, config, report);
        });
        return plan_tuple(plan);
      },
      py::arg("matrices"), py::arg("budget_bits"), py::arg("r"), py::arg("lora_alpha"), py::arg("configs"),
      py::arg("max_iters"), py::arg("tol"), py::arg("oversampling"), py::arg("power_iters"), py::arg("seed"),
      py::arg("cache_path"), py::arg("threads"), py::arg("progress"),
      "lorafuse::lq_plan: (matrices [(name, out, in, config_index, bits, error, relative_error, iterations, "
      "best_iteration, l1, l2, (packed, absmax, nested_absmax, offset))], cost, storage, allocation or None, "
      "average_bits, average_bits_with_lora, from_cache).");
  m.def(
      "_cpp_lq_lora",
      [](torch::nn::Module& module, std::optional<double> budget_bits, int64_t r, double lora_alpha,
         const std::vector<ChoiceFields>& configs, int64_t max_iters, double tol, int64_t oversampling,
         int64_t power_iters, uint64_t seed, const std::string& cache_path, int64_t threads, const std::string& targets,
         const std::string& adapter_name, const std::map<std::string, at::Tensor>& fisher,
         const std::optional<py::function>& progress) {
        const auto config = lq_config(budget_bits, r, lora_alpha, configs, max_iters, tol, oversampling, power_iters,
                                      seed, cache_path, threads);
        const LqProgress report = progress_of(progress);
        const LqPlan plan = translating([&] {
          py::gil_scoped_release no_gil;
          return lq_lora(module, config, config_from(targets), adapter_name, fisher, report);
        });
        return plan_tuple(plan);
      },
      py::arg("module"), py::arg("budget_bits"), py::arg("r"), py::arg("lora_alpha"), py::arg("configs"),
      py::arg("max_iters"), py::arg("tol"), py::arg("oversampling"), py::arg("power_iters"), py::arg("seed"),
      py::arg("cache_path"), py::arg("threads"), py::arg("targets"), py::arg("adapter_name"), py::arg("fisher"),
      py::arg("progress"),
      "lorafuse::lq_lora on a bound C++ module (targets: a LoraConfig as JSON); the plan as _lq_plan returns it.");
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
