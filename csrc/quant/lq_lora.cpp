#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <lorafuse/io/files.h>
#include <lorafuse/quant/lq_decompose.h>
#include <lorafuse/quant/lq_lora.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>

#include <ATen/core/grad_mode.h>
#include <unistd.h>

#include "csrc/config/json.h"

namespace lorafuse {
namespace {

using Json = nlohmann::ordered_json;

LqDecomposition decompose(const LqMatrix& m, const QuantChoice& choice, const LqLoraConfig& config) {
  return lq_decompose(m.weight, LqDecomposeOptions(config.r(), choice.format)
                                    .stat_dtype(choice.stat_dtype)
                                    .max_iters(config.max_iters())
                                    .tol(config.tol())
                                    .oversampling(config.oversampling())
                                    .power_iters(config.power_iters())
                                    .seed(config.seed())
                                    .fisher(m.fisher.defined() ? std::optional<at::Tensor>(m.fisher) : std::nullopt));
}

// Shortest round-trip text of a double (the cache's key compares these texts).
std::string exact(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

// A 64-bit FNV-1a hash of the tensor's float32 bytes (on the CPU), in hex: changes when any value does.
Json checksum(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  const at::Tensor f = t.detach().to(at::kCPU, at::kFloat).contiguous();
  const auto* bytes = static_cast<const unsigned char*>(f.const_data_ptr());
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0, n = static_cast<size_t>(f.numel()) * sizeof(float); i < n; ++i) {
    h = (h ^ bytes[i]) * 1099511628211ULL;
  }
  char buf[20];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// Everything the cost table depends on (not the budget).
Json cache_key(const std::vector<LqMatrix>& matrices, const LqLoraConfig& c) {
  Json key;
  key["table"] = "lorafuse lq_plan cost table, version 1";
  key["r"] = c.r();
  key["max_iters"] = c.max_iters();
  key["tol"] = exact(c.tol());
  key["oversampling"] = c.oversampling();
  key["power_iters"] = c.power_iters();
  key["seed"] = c.seed();
  Json configs = Json::array();
  for (const auto& q : c.configs()) configs.push_back(q.name());
  key["configs"] = configs;
  Json ms = Json::array();
  for (const auto& m : matrices) {
    ms.push_back({{"name", m.name},
                  {"shape", m.weight.sizes().vec()},
                  {"weight", checksum(m.weight)},
                  {"fisher", checksum(m.fisher)}});
  }
  key["matrices"] = ms;
  return key;
}

bool read_cache(const std::string& path, const Json& key, std::vector<std::vector<double>>& cost,
                std::vector<std::vector<double>>& storage) {
  if (path.empty() || !io::is_file(path)) return false;
  const std::string what = "lq_plan: cache_path \"" + path + "\"";
  const Json j = detail::parse_json(io::read_text(path, what), what);
  TORCH_CHECK_VALUE(j.is_object() && j.contains("key") && j.contains("cost") && j.contains("storage"), what,
                    ": expected a cost table written by lq_plan (key, cost, storage); remove the file or pass another "
                    "path");
  if (j["key"] != key) return false;  // another model or settings: computed again (and the file replaced)
  try {
    cost = j["cost"].get<std::vector<std::vector<double>>>();
    storage = j["storage"].get<std::vector<std::vector<double>>>();
  } catch (const Json::exception& e) {
    TORCH_CHECK_VALUE(false, what, ": cost and storage must be tables of numbers (", e.what(), ")");
  }
  const size_t n = key["matrices"].size(), k = key["configs"].size();
  bool fits = cost.size() == n && storage.size() == n;
  for (size_t i = 0; fits && i < n; ++i) fits = cost[i].size() == k && storage[i].size() == k;
  TORCH_CHECK_VALUE(fits, what, ": its table is not ", n, " matrices x ", k, " configurations as its key says");
  return true;
}

// The cache's temporary file: beside it, named for this process and call, so that runs at the same time never write
// into each other's file (the last rename wins, whole).
std::string temporary_of(const std::string& path) {
  static std::atomic<int64_t> counter{0};
  return path + ".tmp." + std::to_string(static_cast<long long>(::getpid())) + "." + std::to_string(counter++);
}

// Fails early (before the cost table is computed) when the cache cannot be written.
void check_writable(const std::string& path) {
  if (path.empty()) return;
  const std::string tmp = temporary_of(path);
  {
    std::ofstream probe(tmp, std::ios::binary | std::ios::trunc);
    TORCH_CHECK_VALUE(probe.good(), "LqLoraConfig: cache_path: cannot write beside \"", path,
                      "\" (its folder must exist and be writable)");
  }
  std::remove(tmp.c_str());
}

void write_cache(const std::string& path, const Json& key, const std::vector<std::vector<double>>& cost,
                 const std::vector<std::vector<double>>& storage) {
  if (path.empty()) return;
  Json j;
  j["key"] = key;
  j["cost"] = cost;
  j["storage"] = storage;
  const std::string tmp = temporary_of(path);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << j.dump();
    out.flush();
    TORCH_CHECK_VALUE(out.good(), "lq_plan: cache_path: cannot write \"", tmp, "\"");
  }
  TORCH_CHECK_VALUE(std::rename(tmp.c_str(), path.c_str()) == 0, "lq_plan: cache_path: cannot move \"", tmp, "\" to \"",
                    path, "\"");
}

void check_matrices(const std::vector<LqMatrix>& matrices, const LqLoraConfig& config) {
  TORCH_CHECK_VALUE(!matrices.empty(), "lq_plan: matrices: expected at least one weight matrix, found none");
  std::set<std::string> names;
  size_t with_fisher = 0;
  for (const auto& m : matrices) {
    const std::string where = "lq_plan: \"" + m.name + "\"";
    TORCH_CHECK_VALUE(names.insert(m.name).second, "lq_plan: matrices: the name \"", m.name, "\" is given twice");
    TORCH_CHECK_VALUE(m.weight.defined() && m.weight.dim() == 2, where, ": expected a 2-D weight [out, in], found ",
                      m.weight.defined() ? m.weight.sizes() : at::IntArrayRef{});
    const auto dtype = m.weight.scalar_type();
    TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, where,
                      ": weight: expected float32, bfloat16 or float16, found ", dtype);
    TORCH_CHECK_VALUE(!m.weight.is_meta(), where, ": weight: is on the meta device (it has no values); load it first");
    const int64_t smallest = std::min(m.weight.size(0), m.weight.size(1));
    TORCH_CHECK_VALUE(config.r() < smallest, where, ": r = ", config.r(), " must be below min(out, in) = ", smallest,
                      " of its weight ", m.weight.sizes(), "; lower r or leave this layer out of the targets");
    TORCH_CHECK_VALUE(m.weight.isfinite().all().item<bool>(), where, ": weight: expected finite values");
    if (!m.fisher.defined()) continue;
    ++with_fisher;
    TORCH_CHECK_VALUE(m.fisher.sizes() == m.weight.sizes(), where, ": fisher: expected the weight's shape ",
                      m.weight.sizes(), ", found ", m.fisher.sizes());
    TORCH_CHECK_VALUE(
        !m.fisher.is_meta() && m.fisher.isfinite().all().item<bool>() && m.fisher.ge(0).all().item<bool>(), where,
        ": fisher: expected finite values >= 0 (sums of squared gradients)");
    TORCH_CHECK_VALUE(m.fisher.gt(0).any().item<bool>(), where,
                      ": fisher: all zero (no gradient reached this weight); compute it on data that uses the layer");
  }
  // Fisher-weighted and plain errors are different units: one allocation compares them all
  TORCH_CHECK_VALUE(with_fisher == 0 || with_fisher == matrices.size(), "lq_plan: fisher: given for ", with_fisher,
                    " of the ", matrices.size(),
                    " matrices; give it for every matrix or for none (the allocation compares their errors)");
}

// Runs fn(t) for every task t in [0, count) on up to `threads` threads of ATen's intra-op pool (0: all of them), each
// taking the next task when it finishes one (matrices differ in size). A task's own ops then run on its thread alone:
// ATen runs a parallel region nested in another inline, and MKL inside one runs single-threaded. The first exception
// stops the others from starting new tasks and is rethrown here.
template <class Fn>
void for_each_task(int64_t count, int64_t threads, Fn&& fn) {
  const int64_t workers = std::min<int64_t>(count, threads > 0 ? threads : at::get_num_threads());
  if (workers <= 1) {
    for (int64_t t = 0; t < count; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next++; t < count && !failed; t = next++) {
        try {
          const at::NoGradGuard no_grad;  // grad mode is per thread
          fn(t);
        } catch (...) {
          failed = true;
          throw;
        }
      }
    }
  });
}

// A progress callback safe to call from the tasks' threads: one report at a time, `done` counted under the lock.
class SharedProgress {
 public:
  SharedProgress(const LqProgress& progress, std::string stage, int64_t total)
      : progress_(progress), stage_(std::move(stage)), total_(total) {}
  void step() {
    if (!progress_) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    progress_(stage_, ++done_, total_);
  }

 private:
  const LqProgress& progress_;
  std::string stage_;
  int64_t total_, done_ = 0;
  std::mutex mutex_;
};

}  // namespace

LqPlan lq_plan(const std::vector<LqMatrix>& matrices, const LqLoraConfig& config, const LqProgress& progress) {
  config.validate();
  check_matrices(matrices, config);
  at::NoGradGuard no_grad;
  const auto& configs = config.configs();
  const size_t n = matrices.size(), k = configs.size();
  double numel = 0, lora = 0;
  for (const auto& m : matrices) {
    numel += static_cast<double>(m.weight.numel());
    lora += static_cast<double>(config.r() * (m.weight.size(0) + m.weight.size(1)));
  }
  LqPlan plan;
  std::vector<int64_t> choice(n, 0);
  if (config.budget_bits().has_value()) {
    std::vector<double> bits(k);
    for (size_t c = 0; c < k; ++c) bits[c] = configs[c].bits_per_weight();
    const double lo = *std::min_element(bits.begin(), bits.end()), hi = *std::max_element(bits.begin(), bits.end());
    const double budget = *config.budget_bits();
    const auto text = [](double v) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%.3f", v);
      return std::string(buf);
    };
    TORCH_CHECK_VALUE(budget >= lo - 1e-12, "LqLoraConfig: budget_bits: ", budget,
                      " is below the smallest configuration's ", text(lo), " bits per weight");
    TORCH_CHECK_VALUE(budget <= hi + 1e-12, "LqLoraConfig: budget_bits: ", budget,
                      " is above the largest configuration's ", text(hi),
                      " bits per weight (every matrix would take it); ask for at most ", text(hi));
    const Json key = cache_key(matrices, config);
    plan.from_cache = read_cache(config.cache_path(), key, plan.cost, plan.storage);
    if (!plan.from_cache) {
      check_writable(config.cache_path());
      plan.cost.assign(n, std::vector<double>(k));
      plan.storage.assign(n, std::vector<double>(k));
      SharedProgress report(progress, "cost", static_cast<int64_t>(n * k));
      for_each_task(static_cast<int64_t>(n * k), config.threads(), [&](int64_t t) {
        const size_t i = static_cast<size_t>(t) / k, c = static_cast<size_t>(t) % k;
        const double e = decompose(matrices[i], configs[c], config).error;
        plan.cost[i][c] = e * e;
        plan.storage[i][c] = bits[c] * static_cast<double>(matrices[i].weight.numel());
        report.step();
      });
      write_cache(config.cache_path(), key, plan.cost, plan.storage);
    }
    plan.allocation = allocate_bits(plan.cost, plan.storage, budget * numel);
    choice = plan.allocation->choice;
  }
  plan.matrices.resize(n);
  SharedProgress report(progress, "decompose", static_cast<int64_t>(n));
  for_each_task(static_cast<int64_t>(n), config.threads(), [&](int64_t t) {
    const size_t i = static_cast<size_t>(t);
    const LqMatrix& m = matrices[i];
    const QuantChoice& q = configs[static_cast<size_t>(choice[i])];
    LqDecomposition d = decompose(m, q, config);
    LqMatrixPlan& p = plan.matrices[i];
    p.name = m.name;
    p.out_features = m.weight.size(0);
    p.in_features = m.weight.size(1);
    p.config = q;
    p.config_index = choice[i];
    p.bits = q.bits_per_weight();
    p.error = d.error;
    p.relative_error = d.norm > 0 ? d.error / d.norm : 0.0;
    p.iterations = static_cast<int64_t>(d.errors.size());
    p.best_iteration = d.best_iteration;
    p.l1 = d.l1;
    p.l2 = d.l2;
    p.q = d.q;
    report.step();
  });
  double stored = 0;
  for (const auto& p : plan.matrices) stored += p.bits * static_cast<double>(p.out_features * p.in_features);
  plan.average_bits = stored / numel;
  plan.average_bits_with_lora = (stored + 32.0 * lora) / numel;
  return plan;
}

}  // namespace lorafuse
