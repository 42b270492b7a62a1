#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_linear.h>
#include <lorafuse/ops/dora.h>
#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/lora_linear.h>
#include <lorafuse/ops/merge.h>
#include <torch/serialize/archive.h>

namespace lorafuse::nn {
namespace {

constexpr const char* kBackup = "weight_unmerged";

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
  adapters_.table().check_add(adapter_name, adapter, base->weight.scalar_type());
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
  adapters_.reset(*this, options.in_features(), options.out_features(), base_options(), base_layer->weight);
  lora_A = adapters_.lora_A;
  lora_B = adapters_.lora_B;
  // Holds the unmerged weight while anything is merged, else nothing ([0]). Registered, so that it
  // moves with to(), is cloned and is saved; set_data swaps its contents without touching the registry.
  weight_unmerged_ = register_buffer(kBackup, at::empty({0}, base_layer->weight.options()));
}

void LoraLinearImpl::reset_parameters() { adapters_.reset_parameters(base_layer->weight); }

std::shared_ptr<torch::nn::Module> LoraLinearImpl::clone(const std::optional<torch::Device>& device) const {
  check_cloneable(*this, "LoraLinear::clone");
  auto copy = torch::nn::Cloneable<LoraLinearImpl>::clone(device);
  copy_requires_grad(*this, *copy);
  // Cloneable::clone puts fresh adapter modules into lora_A / lora_B after reset(): route to those.
  std::dynamic_pointer_cast<LoraLinearImpl>(copy)->adapters_.refresh_routes();
  return copy;
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& x) {
  if (const auto rows = AdapterScope::rows()) {
    return adapters_.mixed_forward(
        *rows, x, is_training(), [&] { return base_layer->forward(x); },
        [&](const LoraAdapters::Route& r) { return routed_forward(x, r); });
  }
  const auto route = adapters_.route();
  if (!route) return base_layer->forward(x);
  return routed_forward(x, *route);
}

at::Tensor LoraLinearImpl::routed_forward(const at::Tensor& x, const LoraAdapters::Route& route) {
  const double p = is_training() ? route.dropout : 0.0;
  const auto& w = base_layer->weight;
  const auto& bias = base_layer->bias;
  const auto& a = route.a->weight;
  const auto& b = route.b->weight;
  const auto bias_opt = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  if (route.magnitude) {  // DoRA; a thawed weight: the base's own forward gives x·Wᵀ + b
    const auto base_out = w.requires_grad() ? std::optional<at::Tensor>(base_layer->forward(x)) : std::nullopt;
    return lorafuse::dora_linear(x, w, bias_opt, a, b, route.scale, p, route.magnitude->weight, base_out);
  }
  if (w.requires_grad()) {
    // The fused op never computes a weight gradient; a caller who thawed the base weight gets the base's own
    // forward (autograd through its GEMM) and lora_add for the branch, as Python's call-as-is base kind.
    return lorafuse::lora_branch(base_layer->forward(x), x, a, b, route.scale, p);
  }
  return lorafuse::lora_linear(x, w, bias_opt, a, b, route.scale, p);
}

void LoraLinearImpl::add_adapter(const std::string& name, const LoraAdapterOptions& adapter) {
  add_adapter(name, adapter, /*activate=*/true);
}

void LoraLinearImpl::add_adapter(const std::string& name, const LoraAdapterOptions& adapter, bool activate) {
  adapters_.add(*this, name, adapter, activate, base_options(), base_layer->weight);
}

void LoraLinearImpl::set_adapter(const std::string& name) {
  adapters_.activate(name, [this] { unmerge(); });
}

void LoraLinearImpl::clear_active_adapter() {
  adapters_.clear_active([this] { unmerge(); });
}

void LoraLinearImpl::delete_adapter(const std::string& name) { adapters_.remove(name); }

void LoraLinearImpl::disable_adapters() {
  adapters_.disable([this] { unmerge(); });
}

void LoraLinearImpl::enable_adapters() { adapters_.enable(); }

void LoraLinearImpl::merge(const std::vector<std::string>& adapter_names, bool /*requantize*/) {
  const auto everything = adapters_.table().plan_merge(adapter_names);
  if (everything == adapters_.table().merged()) return;  // merged already (plan_merge said so)
  merge_into_base(everything);
}

void LoraLinearImpl::merge_into_base(const std::vector<std::string>& everything) {
  adapters_.merge_dense(base_layer->weight, /*transposed=*/false, weight_unmerged_, everything);
}

void LoraLinearImpl::unmerge() { adapters_.unmerge_dense(base_layer->weight, weight_unmerged_); }

torch::nn::Linear LoraLinearImpl::merge_and_unload() {
  adapters_.unload_dense(base_layer->weight, /*transposed=*/false, weight_unmerged_);
  return base_layer;
}

void LoraLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::LoraLinear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << (base_layer->bias.defined() ? "true" : "false")
         << ", " << adapters().describe() << ")";
}

void LoraLinearImpl::save(torch::serialize::OutputArchive& archive) const {
  torch::nn::Module::save(archive);
  adapters_.save(archive);
}

void LoraLinearImpl::load(torch::serialize::InputArchive& archive) {
  adapters_.load(archive, *this, base_options(), "LoraLinear::load", base_layer->weight);
  torch::nn::Module::load(archive);  // reads weight_unmerged as saved
}

}  // namespace lorafuse::nn
