#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/adapter_table.h>
#include <lorafuse/ops/nf.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/init.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <tuple>
#include <unordered_map>

namespace lorafuse::nn {
namespace {

using json = nlohmann::ordered_json;

bool listed(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

// How many alive tables hold each adapter name. Never destroyed (nor its mutex): tables die at exit too.
std::mutex& held_mutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}
std::unordered_map<std::string, int64_t>& held_counts() {
  static auto* counts = new std::unordered_map<std::string, int64_t>();
  return *counts;
}

void count_held(const std::string& name, int64_t delta) {
  auto& counts = held_counts();
  if (delta > 0) {
    counts[name] += delta;
    return;
  }
  const auto it = counts.find(name);  // no allocation on the way down (destructors)
  if (it != counts.end() && (it->second += delta) <= 0) counts.erase(it);
}

}  // namespace

HeldAdapterNames::HeldAdapterNames(const HeldAdapterNames& other) : names_(other.names_) {
  std::lock_guard<std::mutex> lock(held_mutex());
  for (const auto& n : names_) count_held(n, 1);
}

HeldAdapterNames& HeldAdapterNames::operator=(const HeldAdapterNames& other) {
  if (this == &other) return *this;
  std::lock_guard<std::mutex> lock(held_mutex());
  for (const auto& n : other.names_) count_held(n, 1);
  for (const auto& n : names_) count_held(n, -1);
  names_ = other.names_;
  return *this;
}

HeldAdapterNames::~HeldAdapterNames() {
  std::lock_guard<std::mutex> lock(held_mutex());
  for (const auto& n : names_) count_held(n, -1);
}

void HeldAdapterNames::add(const std::string& name) {
  std::lock_guard<std::mutex> lock(held_mutex());
  count_held(name, 1);
  names_.push_back(name);
}

void HeldAdapterNames::remove(const std::string& name) {
  const auto it = std::find(names_.begin(), names_.end(), name);
  if (it == names_.end()) return;
  std::lock_guard<std::mutex> lock(held_mutex());
  count_held(name, -1);
  names_.erase(it);
}

std::vector<std::string> HeldAdapterNames::unknown(const std::vector<std::string>& names) {
  std::vector<std::string> out;
  std::lock_guard<std::mutex> lock(held_mutex());
  const auto& counts = held_counts();
  for (const auto& n : names) {
    if (n.empty() || n == "__base__" || counts.count(n) != 0 || listed(out, n)) continue;
    out.push_back(n);
  }
  return out;
}

std::vector<std::string> HeldAdapterNames::all() {
  std::vector<std::string> out;
  {
    std::lock_guard<std::mutex> lock(held_mutex());
    for (const auto& [name, count] : held_counts()) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string AdapterTable::join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return "[" + out + "]";
}

const LoraAdapterOptions& AdapterTable::options(const std::string& name, const char* what) const {
  const auto it = options_.find(name);
  TORCH_CHECK_VALUE(it != options_.end(), what, ": no adapter named \"", name, "\"; this layer has ", join(order_));
  return it->second;
}

bool AdapterTable::is_merged(const std::string& name) const { return listed(merged_, name); }

c10::ScalarType AdapterTable::check_add(const std::string& name, const LoraAdapterOptions& options,
                                        c10::ScalarType base_dtype) const {
  check_adapter_name(name);
  options.validate();
  TORCH_CHECK_VALUE(!has(name), "adapter_name: an adapter named \"", name, "\" already exists; this layer has ",
                    join(order_));
  TORCH_CHECK_TYPE(c10::isFloatingType(base_dtype), "base_layer: its weight is ", base_dtype,
                   "; lorafuse wraps floating-point linear layers (a quantized base needs its own base kind)");
  if (options.dtype()) {
    TORCH_CHECK_TYPE(*options.dtype() == base_dtype || *options.dtype() == at::kFloat,
                     "dtype: lora_A and lora_B must have the base weight's dtype (", base_dtype, ") or float32, found ",
                     *options.dtype());
  }
  return adapter_dtype(options, base_dtype);
}

c10::ScalarType adapter_dtype(const LoraAdapterOptions& options, c10::ScalarType base_dtype) {
  if (options.dtype()) return *options.dtype();
  return base_dtype == at::kHalf || base_dtype == at::kBFloat16 ? at::kFloat : base_dtype;
}

bool AdapterTable::add(const std::string& name, const LoraAdapterOptions& options, bool activate) {
  TORCH_CHECK_VALUE(!has(name), "adapter_name: an adapter named \"", name, "\" already exists; this layer has ",
                    join(order_));
  options_.emplace(name, options);
  order_.push_back(name);
  held_.add(name);
  if (active_.empty() && activate) {
    active_ = name;
    return true;
  }
  return false;
}

void AdapterTable::check_remove(const std::string& name) const {
  options(name, "delete_adapter");
  TORCH_CHECK_VALUE(!is_merged(name), "delete_adapter: adapter \"", name, "\" is merged; unmerge() first");
}

bool AdapterTable::remove(const std::string& name) {
  check_remove(name);
  options_.erase(name);
  order_.erase(std::find(order_.begin(), order_.end(), name));
  held_.remove(name);
  if (active_ != name) return false;
  active_ = order_.empty() ? std::string() : order_.front();
  return true;
}

bool AdapterTable::check_activate(const std::string& name) const {
  options(name, "set_adapter");
  return !merged_.empty() && name != active_;
}

void AdapterTable::activate(const std::string& name) {
  options(name, "set_adapter");
  active_ = name;
}

std::string AdapterTable::route(const std::optional<std::string>& scoped) const {
  const std::string& name = scoped ? *scoped : active_;
  TORCH_CHECK_NOT_IMPLEMENTED(name != AdapterScope::kMixedBatch,
                              "use_adapter with one adapter name per row (a mixed batch): lorafuse's C++ LoRA layers "
                              "run one adapter per forward so far; split the batch by adapter or use Python layers");
  if (!enabled_) return "";
  if (!merged_.empty()) {
    TORCH_CHECK_VALUE(name == active_, "AdapterScope(\"", name, "\"): this layer has ", join(merged_),
                      " merged into its weight; unmerge first to run other adapters per thread");
    if (is_merged(name)) return "";
  }
  return name;
}

std::vector<std::string> AdapterTable::plan_merge(const std::vector<std::string>& names) const {
  TORCH_CHECK_VALUE(enabled_, "merge: adapters are disabled in this layer; enable_adapters() first");
  std::vector<std::string> chosen = names;
  if (chosen.empty()) {
    TORCH_CHECK_VALUE(!active_.empty(), "merge: this layer has no active adapter; name the adapters to merge");
    chosen.push_back(active_);
  }
  std::vector<std::string> fresh, again;
  for (size_t i = 0; i < chosen.size(); ++i) {
    options(chosen[i], "merge");
    TORCH_CHECK_VALUE(std::find(chosen.begin(), chosen.begin() + i, chosen[i]) == chosen.begin() + i,
                      "merge: adapter \"", chosen[i], "\" is named twice");
    (is_merged(chosen[i]) ? again : fresh).push_back(chosen[i]);
  }
  // As PEFT: merging what is merged already is no error; it is left as it is, and said.
  if (!again.empty()) {
    TORCH_WARN("merge: ", join(again), " already merged in this layer; ",
               fresh.empty() ? std::string("nothing to do") : "merging " + join(fresh) + " only");
  }
  std::vector<std::string> all = merged_;
  all.insert(all.end(), fresh.begin(), fresh.end());
  return all;
}

void AdapterTable::check_unmerge() const {
  TORCH_CHECK_VALUE(!merged_.empty(), "unmerge: nothing is merged in this layer");
}

std::vector<std::string> AdapterTable::plan_unload() const {
  if (active_.empty() || is_merged(active_)) return {};
  std::vector<std::string> all = merged_;
  all.push_back(active_);
  return all;
}

std::vector<std::string> AdapterTable::unloaded_adapters() const {
  auto names = plan_unload();
  return names.empty() ? merged_ : names;
}

std::string AdapterTable::describe() const {
  std::ostringstream out;
  out << "adapters=[";
  for (size_t i = 0; i < order_.size(); ++i) {
    const auto& a = options_.at(order_[i]);
    out << (i ? ", " : "") << order_[i] << "(r=" << a.r() << ", lora_alpha=" << a.lora_alpha()
        << ", lora_dropout=" << a.lora_dropout() << (a.use_rslora() ? ", use_rslora=true" : "") << ")";
  }
  out << "], active=" << (active_.empty() ? "none" : active_);
  if (!enabled_) out << ", disabled";
  if (!merged_.empty()) out << ", merged=" << join(merged_);
  return out.str();
}

std::string AdapterTable::to_json() const {
  json adapters = json::array();
  for (const auto& name : order_) {
    json entry = json::parse(adapter_options_json(options_.at(name)));
    entry["name"] = name;
    adapters.push_back(std::move(entry));
  }
  return json{{"adapters", std::move(adapters)}, {"active", active_}, {"enabled", enabled_}, {"merged", merged_}}
      .dump();
}

AdapterTable AdapterTable::from_json(const std::string& text, const std::string& what) {
  AdapterTable table;
  try {
    const json j = json::parse(text);
    for (const auto& a : j.at("adapters")) {
      const auto name = a.at("name").get<std::string>();
      check_adapter_name(name);
      TORCH_CHECK_VALUE(!table.has(name), what, ": adapter \"", name, "\" is listed twice");
      table.options_.emplace(name, adapter_options_from_json(a.dump(), what));
      table.order_.push_back(name);
      table.held_.add(name);
    }
    table.active_ = j.at("active").get<std::string>();
    table.enabled_ = j.at("enabled").get<bool>();
    table.merged_ = j.at("merged").get<std::vector<std::string>>();
  } catch (const json::exception& e) {
    TORCH_CHECK_VALUE(false, what, ": cannot read the adapter table: ", e.what());
  }
  for (const auto& n : table.merged_) {
    TORCH_CHECK_VALUE(table.has(n), what, ": merged adapter \"", n, "\" is not in the table");
  }
  TORCH_CHECK_VALUE(table.active_.empty() || table.has(table.active_), what, ": active adapter \"", table.active_,
                    "\" is not in the table");
  return table;
}

namespace {

// torch.svd_lowrank(w, q, niter) (Halko et al.'s randomized SVD), step for step and with the same random draws from the
// default generator, as PEFT's "pissa_niter_N" calls it: (U [m, q], S [q], Vᴴ [q, n]) of w [m, n].
std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_lowrank(const at::Tensor& w, int64_t q, int64_t niter) {
  const bool wide = w.size(0) < w.size(1);  // torch works on the tall orientation
  const at::Tensor a = wide ? w.t() : w;
  const at::Tensor draws = at::randn({a.size(1), q}, a.options());
  at::Tensor basis = std::get<0>(at::linalg_qr(at::matmul(a, draws)));
  for (int64_t i = 0; i < niter; ++i) {
    basis = std::get<0>(at::linalg_qr(at::matmul(a.t(), basis)));
    basis = std::get<0>(at::linalg_qr(at::matmul(a, basis)));
  }
  auto [u, s, vh] = at::linalg_svd(at::matmul(basis.t(), a), /*full_matrices=*/false);
  u = at::matmul(basis, u);  // a ≈ u·diag(s)·vh
  if (wide) return {vh.t(), s, u.t()};
  return {u, s, vh};
}

}  // namespace

void init_adapter_weights(at::Tensor& a, at::Tensor& b, const LoraAdapterOptions& options, bool embedding) {
  torch::NoGradGuard no_grad;
  if (embedding) {
    if (options.init_lora_weights().kind() == InitLoraWeights::Kind::kRandom) {
      torch::nn::init::normal_(a);
    } else {
      torch::nn::init::zeros_(a);
    }
    torch::nn::init::normal_(b);
    return;
  }
  switch (options.init_lora_weights().kind()) {
    case InitLoraWeights::Kind::kDefault:
    case InitLoraWeights::Kind::kLoftq:
    case InitLoraWeights::Kind::kPissa:
    case InitLoraWeights::Kind::kPissaNiter:
    case InitLoraWeights::Kind::kOlora:
      torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));
      torch::nn::init::zeros_(b);
      break;
    case InitLoraWeights::Kind::kGaussian:
      torch::nn::init::normal_(a, 0.0, 1.0 / static_cast<double>(options.r()));
      torch::nn::init::zeros_(b);
      break;
    case InitLoraWeights::Kind::kRandom:
      torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));
      torch::nn::init::kaiming_uniform_(b, std::sqrt(5.0));
      break;
  }
}

void init_adapter_weights_from_base(const at::Tensor& base_weight, at::Tensor& a, at::Tensor& b,
                                    const LoraAdapterOptions& options) {
  torch::NoGradGuard no_grad;
  const auto kind = options.init_lora_weights().kind();
  if (kind == InitLoraWeights::Kind::kPissa || kind == InitLoraWeights::Kind::kPissaNiter ||
      kind == InitLoraWeights::Kind::kOlora) {
    // PEFT's pissa_init / olora_init, in float32: W = scale·B·A + the residual that the base keeps
    const double scale = options.scale();
    const int64_t r = options.r();
    const at::Tensor w = base_weight.to(at::kFloat);
    at::Tensor lora_a, lora_b;
    if (kind == InitLoraWeights::Kind::kPissa || kind == InitLoraWeights::Kind::kPissaNiter) {
      at::Tensor u, s, vh;
      if (kind == InitLoraWeights::Kind::kPissa) {
        std::tie(u, s, vh) = at::linalg_svd(w, /*full_matrices=*/false);
      } else {
        std::tie(u, s, vh) = svd_lowrank(w, r, options.init_lora_weights().niter());
      }
      const at::Tensor root = s.narrow(0, 0, r).div(scale).sqrt();  // [r]
      lora_a = vh.narrow(0, 0, r).mul(root.unsqueeze(1));           // diag(√S_r) · Vh_r  [r, in]
      lora_b = u.narrow(1, 0, r).mul(root.unsqueeze(0));            // U_r · diag(√S_r)   [out, r]
    } else {
      const auto [q, rr] = at::linalg_qr(w);
      lora_a = rr.narrow(0, 0, r);  // [r, in]
      lora_b = q.narrow(1, 0, r);   // [out, r]
    }
    const at::Tensor residual = w - scale * at::matmul(lora_b, lora_a);
    a.copy_(lora_a);
    b.copy_(lora_b);
    base_weight.copy_(residual);
    return;
  }
  TORCH_CHECK_VALUE(kind == InitLoraWeights::Kind::kLoftq, "init_adapter_weights_from_base: init_lora_weights \"",
                    options.init_lora_weights().str(), "\" does not start from the base weight");
  const auto& loftq = options.loftq_config();
  const LoftqInit init = loftq_init(base_weight, loftq.loftq_bits(), options.r(), loftq.loftq_iter());
  const double root = std::sqrt(options.scale());
  base_weight.copy_(init.qweight);
  a.copy_(init.lora_a.div(root));
  b.copy_(init.lora_b.div(root));
}

void check_loftq_weight(const std::string& path, const at::Tensor& weight, int64_t r, const AdapterTable* table,
                        const std::string& init) {
  TORCH_CHECK_VALUE(table == nullptr || table->merged().empty(), "init_lora_weights \"", init, "\": \"", path,
                    "\": its weight holds merged adapters now; unmerge them first");
  TORCH_CHECK_VALUE(weight.dim() == 2 && r <= std::min(weight.size(0), weight.size(1)), "init_lora_weights \"", init,
                    "\": \"", path, "\": r = ", r, " exceeds min(out, in) of its ", weight.sizes(), " weight");
  torch::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(weight.isfinite().all().item<bool>(), "init_lora_weights \"", init, "\": \"", path,
                    "\": its weight holds NaN or infinite values, which cannot be decomposed");
}

}  // namespace lorafuse::nn
