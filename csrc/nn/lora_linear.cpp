#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/ops/lora_linear.h>
#include <lorafuse/ops/merge.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cmath>

namespace lorafuse::nn {
namespace {

constexpr const char* kBackup = "weight_unmerged";

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return "[" + out + "]";
}

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}


}  // namespace

LoraLinearImpl::LoraLinearImpl(const LoraLinearOptions& options_) : options(options_) {
  check_adapter_name(options.adapter_name());
  options.adapter().validate();
  pending_base_ = make_linear(options.in_features(), options.out_features(), options.bias());
  reset();
  add_adapter(options.adapter_name(), options.adapter());
}

LoraLinearImpl::LoraLinearImpl(torch::nn::Linear base, const LoraAdapterOptions& adapter,
                               const std::string& adapter_name)
    : options(0, 0) {
  TORCH_CHECK_VALUE(!base.is_empty(), "base: expected a torch::nn::Linear, found an empty holder");
  check_adapter_name(adapter_name);
  adapter.validate();
  options = LoraLinearOptions(base->options.in_features(), base->options.out_features())
                .bias(base->options.bias())
                .adapter_name(adapter_name)
                .adapter(adapter);
  pending_base_ = std::move(base);
  reset();
  add_adapter(adapter_name, adapter);
}

void LoraLinearImpl::reset() {
  torch::nn::Linear base = std::move(pending_base_);
  pending_base_ = nullptr;
  const bool wrapping = !base.is_empty();
  if (!wrapping) {
    // Cloneable::clone: this is a copy whose base_layer still points at the original's. A placeholder
    // sharing it (no allocation) keeps the structure; clone() then overwrites it with a deep copy.
    TORCH_CHECK(!base_layer.is_empty(), "LoraLinear::reset: no base layer to wrap");
    base = torch::nn::Linear(std::make_shared<torch::nn::LinearImpl>(*base_layer));
  }
  base_layer = register_module("base_layer", base);
  if (wrapping) {  // the base is frozen; inject_lora's `bias` may thaw the bias again
    base_layer->weight.set_requires_grad(false);
    if (base_layer->bias.defined()) base_layer->bias.set_requires_grad(false);
  }
  lora_A = register_module("lora_A", torch::nn::ModuleDict());
  lora_B = register_module("lora_B", torch::nn::ModuleDict());
  for (const auto& name : order_) {
    create_adapter_weights(name, adapters_.at(name));
    init_adapter_weights(name);
  }
  // Holds the unmerged weight while anything is merged, else nothing ([0]). Registered, so that it
  // moves with to(), is cloned and is saved; set_data swaps its contents without touching the registry.
  weight_unmerged_ = register_buffer(kBackup, at::empty({0}, base_layer->weight.options()));
  apply_trainability();
  refresh_routes();
}

void LoraLinearImpl::refresh_routes() {
  auto table = std::make_shared<RouteTable>();
  for (const auto& name : order_) {
    const auto& adapter = adapters_.at(name);
    table->emplace(name, Route{std::dynamic_pointer_cast<torch::nn::LinearImpl>(lora_A[name]),
                               std::dynamic_pointer_cast<torch::nn::LinearImpl>(lora_B[name]), adapter.scale(),
                               adapter.lora_dropout()});
  }
  std::lock_guard<std::mutex> lock(route_lock_.mutex);
  routes_ = std::move(table);
}

std::shared_ptr<const LoraLinearImpl::RouteTable> LoraLinearImpl::routes() const {
  std::lock_guard<std::mutex> lock(route_lock_.mutex);
  return routes_;
}

void LoraLinearImpl::reset_parameters() {
  for (const auto& name : order_) init_adapter_weights(name);
}

std::shared_ptr<torch::nn::Module> LoraLinearImpl::clone(const std::optional<torch::Device>& device) const {
  check_cloneable(*this, "LoraLinear::clone");
  auto copy = torch::nn::Cloneable<LoraLinearImpl>::clone(device);
  copy_requires_grad(*this, *copy);
  // Cloneable::clone puts fresh adapter modules into lora_A / lora_B after reset(): route to those.
  std::dynamic_pointer_cast<LoraLinearImpl>(copy)->refresh_routes();
  return copy;
}

const LoraAdapterOptions& LoraLinearImpl::known(const std::string& name, const char* what) const {
  auto it = adapters_.find(name);
  TORCH_CHECK_VALUE(it != adapters_.end(), what, ": no adapter named \"", name, "\"; this layer has ", join(order_));
  return it->second;
}

const LoraAdapterOptions& LoraLinearImpl::adapter_options(const std::string& name) const {
  return known(name, "adapter_options");
}

at::Tensor& LoraLinearImpl::lora_a(const std::string& name) {
  known(name, "lora_a");
  return lora_A[name]->as<torch::nn::LinearImpl>()->weight;
}

at::Tensor& LoraLinearImpl::lora_b(const std::string& name) {
  known(name, "lora_b");
  return lora_B[name]->as<torch::nn::LinearImpl>()->weight;
}

at::Tensor LoraLinearImpl::delta_weight(const std::string& name) const {
  const auto& adapter = known(name, "delta_weight");
  const auto& a = lora_A->operator[](name)->as<torch::nn::LinearImpl>()->weight;  // [r, in]
  const auto& b = lora_B->operator[](name)->as<torch::nn::LinearImpl>()->weight;  // [out, r]
  torch::NoGradGuard no_grad;
  return lorafuse::lora_delta_weight(a, b, adapter.scale());  // [out, in]
}

void LoraLinearImpl::create_adapter_weights(const std::string& name, const LoraAdapterOptions& adapter) {
  const auto& w = base_layer->weight;
  const auto base_dtype = w.scalar_type();
  const bool half = base_dtype == at::kHalf || base_dtype == at::kBFloat16;
  const auto dtype = adapter.dtype().value_or(half ? at::kFloat : base_dtype);
  const auto tensor_options = w.options().dtype(dtype);
  lora_A->update({{name, make_linear(options.in_features(), adapter.r(), false, tensor_options).ptr()}});
  lora_B->update({{name, make_linear(adapter.r(), options.out_features(), false, tensor_options).ptr()}});
}

void LoraLinearImpl::init_adapter_weights(const std::string& name) {
  const auto& adapter = adapters_.at(name);
  auto& a = lora_a(name);
  auto& b = lora_b(name);
  torch::NoGradGuard no_grad;
  switch (adapter.init_lora_weights().kind()) {
    case InitLoraWeights::Kind::kDefault:
      torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));
      torch::nn::init::zeros_(b);
      break;
    case InitLoraWeights::Kind::kGaussian:
      torch::nn::init::normal_(a, 0.0, 1.0 / static_cast<double>(adapter.r()));
      torch::nn::init::zeros_(b);
      break;
    case InitLoraWeights::Kind::kRandom:
      torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));
      torch::nn::init::kaiming_uniform_(b, std::sqrt(5.0));
      break;
  }
}

void LoraLinearImpl::apply_trainability() {
  for (const auto& name : order_) {
    const bool train = name == active_;
    lora_a(name).set_requires_grad(train);
    lora_b(name).set_requires_grad(train);
  }
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& x) {
  const std::optional<std::string> scoped = AdapterScope::current();
  const std::string& name = scoped ? *scoped : active_;
  if (disabled_) return base_layer->forward(x);
  if (!merged_.empty()) {
    TORCH_CHECK_VALUE(name == active_, "LoraLinear: AdapterScope(\"", name, "\") on a layer with ", join(merged_),
                      " merged into its weight; unmerge first to run other adapters per thread");
    if (contains(merged_, name)) return base_layer->forward(x);
  }
  if (name.empty()) return base_layer->forward(x);
  const auto table = routes();  // a consistent snapshot, whatever other threads add or remove meanwhile
  const auto it = table->find(name);
  if (it == table->end()) return base_layer->forward(x);  // a scope's adapter that this layer lacks
  const Route& route = it->second;
  const double p = is_training() ? route.dropout : 0.0;
  const auto& w = base_layer->weight;
  const auto& bias = base_layer->bias;
  const auto& a = route.a->weight;
  const auto& b = route.b->weight;
  if (w.requires_grad()) {
    // The fused op never computes a weight gradient; a caller who thawed the base weight gets the
    // unfused chain, which does.
    namespace F = torch::nn::functional;
    auto dropped = p > 0 ? F::dropout(x, F::DropoutFuncOptions().p(p).training(true)) : x;
    auto lora = F::linear(F::linear(dropped.to(a.scalar_type()), a), b).mul(route.scale);
    return base_layer->forward(x).add(lora.to(x.scalar_type()));
  }
  return lorafuse::lora_linear(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, a, b, route.scale,
                               p);
}

void LoraLinearImpl::add_adapter(const std::string& name, const LoraAdapterOptions& adapter) {
  add_adapter(name, adapter, /*activate=*/true);
}

void LoraLinearImpl::add_adapter(const std::string& name, const LoraAdapterOptions& adapter, bool activate) {
  check_adapter_name(name);
  adapter.validate();
  TORCH_CHECK_VALUE(!has_adapter(name), "adapter_name: an adapter named \"", name, "\" already exists; this layer has ",
                    join(order_));
  if (adapter.dtype()) {
    const auto base_dtype = base_layer->weight.scalar_type();
    TORCH_CHECK_TYPE(*adapter.dtype() == base_dtype || *adapter.dtype() == at::kFloat,
                     "dtype: lora_A and lora_B must have the base weight's dtype (", base_dtype, ") or float32, found ",
                     *adapter.dtype());
  }
  create_adapter_weights(name, adapter);
  adapters_.emplace(name, adapter);
  order_.push_back(name);
  init_adapter_weights(name);
  if (active_.empty() && activate) {
    active_ = name;
    apply_trainability();
  } else {  // only the new adapter's flags: other threads may be running the others
    lora_a(name).set_requires_grad(false);
    lora_b(name).set_requires_grad(false);
  }
  refresh_routes();
}

void LoraLinearImpl::set_adapter(const std::string& name) {
  known(name, "set_adapter");
  if (merged() && name != active_) unmerge();
  active_ = name;
  apply_trainability();
}

void LoraLinearImpl::clear_active_adapter() {
  if (merged()) unmerge();
  active_.clear();
  apply_trainability();
}

void LoraLinearImpl::delete_adapter(const std::string& name) {
  known(name, "delete_adapter");
  TORCH_CHECK_VALUE(!contains(merged_, name), "delete_adapter: adapter \"", name, "\" is merged; unmerge() first");
  lora_A->pop(name);
  lora_A->unregister_module(name);
  lora_B->pop(name);
  lora_B->unregister_module(name);
  adapters_.erase(name);
  order_.erase(std::find(order_.begin(), order_.end(), name));
  refresh_routes();
  if (active_ == name) {
    active_ = order_.empty() ? std::string() : order_.front();
    apply_trainability();
  }
}

void LoraLinearImpl::disable_adapters() {
  if (merged()) unmerge();
  disabled_ = true;
}

void LoraLinearImpl::enable_adapters() { disabled_ = false; }

void LoraLinearImpl::merge(const std::vector<std::string>& adapter_names) {
  std::vector<std::string> names = adapter_names;
  if (names.empty()) {
    TORCH_CHECK_VALUE(!active_.empty(), "merge: this layer has no active adapter; name the adapters to merge");
    names.push_back(active_);
  }
  TORCH_CHECK_VALUE(!disabled_, "merge: adapters are disabled in this layer; enable_adapters() first");
  merge_into_base(names);
}

void LoraLinearImpl::merge_into_base(const std::vector<std::string>& names) {
  for (size_t i = 0; i < names.size(); ++i) {
    known(names[i], "merge");
    TORCH_CHECK_VALUE(!contains(merged_, names[i]), "merge: adapter \"", names[i], "\" is already merged");
    TORCH_CHECK_VALUE(std::find(names.begin(), names.begin() + i, names[i]) == names.begin() + i, "merge: adapter \"",
                      names[i], "\" is named twice");
  }
  torch::NoGradGuard no_grad;
  auto& w = base_layer->weight;
  // Every merge starts from the unmerged weight, so merging adapters one by one rounds once.
  const at::Tensor& original = merged() ? weight_unmerged_ : w;
  std::vector<std::string> all = merged_;
  all.insert(all.end(), names.begin(), names.end());
  std::vector<at::Tensor> as, bs;
  std::vector<double> scales;
  for (const auto& name : all) {
    as.push_back(lora_a(name));
    bs.push_back(lora_b(name));
    scales.push_back(adapters_.at(name).scale());
  }
  const at::Tensor merged_weight = lorafuse::lora_merge(original, as, bs, scales);  // checks finiteness
  if (!merged()) weight_unmerged_.set_data(w.clone());
  w.copy_(merged_weight);
  merged_ = std::move(all);
}

void LoraLinearImpl::drop_unmerged_copy() {
  weight_unmerged_.set_data(at::empty({0}, base_layer->weight.options()));
  merged_.clear();
}

void LoraLinearImpl::unmerge() {
  TORCH_CHECK_VALUE(merged(), "unmerge: nothing is merged in this layer");
  torch::NoGradGuard no_grad;
  base_layer->weight.copy_(weight_unmerged_);
  drop_unmerged_copy();
}

torch::nn::Linear LoraLinearImpl::merge_and_unload() {
  if (!active_.empty() && !contains(merged_, active_)) merge_into_base({active_});
  if (merged()) drop_unmerged_copy();
  while (!order_.empty()) delete_adapter(order_.back());
  return base_layer;
}

void LoraLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::LoraLinear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << (base_layer->bias.defined() ? "true" : "false")
         << ", adapters=[";
  for (size_t i = 0; i < order_.size(); ++i) {
    const auto& a = adapters_.at(order_[i]);
    stream << (i ? ", " : "") << order_[i] << "(r=" << a.r() << ", lora_alpha=" << a.lora_alpha()
           << ", lora_dropout=" << a.lora_dropout() << (a.use_rslora() ? ", use_rslora=true" : "") << ")";
  }
  stream << "], active=" << (active_.empty() ? "none" : active_);
  if (disabled_) stream << ", disabled";
  if (merged()) stream << ", merged=" << join(merged_);
  stream << ")";
}

}  // namespace lorafuse::nn
