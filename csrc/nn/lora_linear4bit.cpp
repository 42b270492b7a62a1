#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/linear.h>
#include <lorafuse/nn/lora_linear4bit.h>
#include <lorafuse/ops/lora_add.h>
#include <lorafuse/ops/merge.h>
#include <lorafuse/ops/nf.h>
#include <lorafuse/ops/nf4.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/serialize/archive.h>

namespace lorafuse::nn {
namespace {

const char* const kUnmerged[] = {"packed_unmerged", "absmax_unmerged", "nested_absmax_unmerged", "offset_unmerged"};

}  // namespace

LoraLinear4bitImpl::LoraLinear4bitImpl(Linear4bit base, const LoraAdapterOptions& adapter,
                                       const std::string& adapter_name) {
  TORCH_CHECK_VALUE(!base.is_empty(), "base: expected a lorafuse::nn::Linear4bit, found an empty holder");
  adapters_.table().check_add(adapter_name, adapter, base->options.compute_dtype());
  pending_base_ = std::move(base);
  reset();
  add_adapter(adapter_name, adapter, /*activate=*/true);
}

at::TensorOptions LoraLinear4bitImpl::base_options() const {
  return at::TensorOptions().device(base_layer->packed.device()).dtype(base_layer->options.compute_dtype());
}

void LoraLinear4bitImpl::reset() {
  Linear4bit base = std::move(pending_base_);
  pending_base_ = nullptr;
  const bool wrapping = !base.is_empty();
  if (!wrapping) {
    // Cloneable::clone: a placeholder sharing the original's base (no allocation) that clone() then replaces.
    TORCH_CHECK(!base_layer.is_empty(), "LoraLinear4bit::reset: no base layer to wrap");
    base = Linear4bit(std::make_shared<Linear4bitImpl>(*base_layer));
  }
  base_layer = register_module("base_layer", base);
  if (wrapping && base_layer->bias.defined()) base_layer->bias.set_requires_grad(false);
  adapters_.reset(*this, in_features(), out_features(), base_options());
  lora_A = adapters_.lora_A;
  lora_B = adapters_.lora_B;
  const auto bytes = base_layer->packed.options();
  packed_unmerged_ = register_buffer(kUnmerged[0], at::empty({0}, bytes));
  absmax_unmerged_ = register_buffer(kUnmerged[1], at::empty({0}, base_layer->absmax.options()));
  nested_absmax_unmerged_ = register_buffer(kUnmerged[2], at::empty({0}, bytes.dtype(at::kFloat)));
  offset_unmerged_ = register_buffer(kUnmerged[3], at::empty({0}, bytes.dtype(at::kFloat)));
  merge_error_ = register_buffer("merge_error", at::empty({0}, bytes.dtype(at::kDouble)));
}

std::shared_ptr<torch::nn::Module> LoraLinear4bitImpl::clone(const std::optional<torch::Device>& device) const {
  check_cloneable(*this, "LoraLinear4bit::clone");
  auto copy = torch::nn::Cloneable<LoraLinear4bitImpl>::clone(device);
  copy_requires_grad(*this, *copy);
  std::dynamic_pointer_cast<LoraLinear4bitImpl>(copy)->adapters_.refresh_routes();
  return copy;
}

at::Tensor LoraLinear4bitImpl::forward(const at::Tensor& x) {
  if (const auto rows = AdapterScope::rows()) {
    return adapters_.mixed_forward(
        *rows, x, is_training(), [&] { return base_layer->forward(x); },
        [&](const LoraAdapters::Route& r) { return routed_forward(x, r); });
  }
  const auto route = adapters_.route();
  if (!route) return base_layer->forward(x);
  return routed_forward(x, *route);
}

at::Tensor LoraLinear4bitImpl::routed_forward(const at::Tensor& x, const LoraAdapters::Route& route) {
  const Linear4bitImpl& base = *base_layer;  // the layer and its branch in one op (nf_lora_linear where it applies)
  return lorafuse::lora_linear_nf(
      x, base.packed, base.absmax, base.nested_absmax, base.offset, base.options.format(), base.options.out_features(),
      base.bias.defined() ? std::optional<at::Tensor>(base.bias) : std::nullopt, base.options.compute_dtype(),
      route.a->weight, route.b->weight, route.scale, is_training() ? route.dropout : 0.0);
}

void LoraLinear4bitImpl::add_adapter(const std::string& name, const LoraAdapterOptions& options, bool activate) {
  adapters_.add(*this, name, options, activate, base_options(), {},
                "this layer's base is already quantized (Linear4bit): start LoftQ from the full-precision model, "
                "then quantize it (QuantConfig with double_quant false and blocksize 64 stores exactly its Q at 4 "
                "bits)");
}

void LoraLinear4bitImpl::set_adapter(const std::string& name) {
  adapters_.activate(name, [this] { unmerge(); });
}

void LoraLinear4bitImpl::clear_active_adapter() {
  adapters_.clear_active([this] { unmerge(); });
}

void LoraLinear4bitImpl::delete_adapter(const std::string& name) { adapters_.remove(name); }

void LoraLinear4bitImpl::disable_adapters() {
  adapters_.disable([this] { unmerge(); });
}

void LoraLinear4bitImpl::enable_adapters() { adapters_.enable(); }

void LoraLinear4bitImpl::merge(const std::vector<std::string>& adapter_names, bool requantize) {
  const auto everything = adapters_.table().plan_merge(adapter_names);
  if (everything == adapters_.table().merged()) return;  // merged already (plan_merge said so)
  TORCH_CHECK_VALUE(
      requantize,
      "merge: the base is 4-bit or quantized otherwise (lorafuse::nn::Linear4bit); merging rounds W + scale·B·A to "
      "its bits again and changes the layer's outputs. Ask for it with requantize = true (merge_error() "
      "then reports the cost; unmerge() restores the bytes exactly), keep the adapter as a separate "
      "branch, or merge_and_unload for a dense layer holding dequantized W + the adapter");
  torch::NoGradGuard no_grad;
  auto& base = *base_layer;
  // Every merge starts from the unmerged bytes, so merging adapters one by one rounds once.
  const bool was_merged = merged();
  const at::Tensor packed = was_merged ? packed_unmerged_ : base.packed;
  const at::Tensor absmax = was_merged ? absmax_unmerged_ : base.absmax;
  const at::Tensor nested = was_merged ? nested_absmax_unmerged_ : base.nested_absmax;
  const at::Tensor offset = was_merged ? offset_unmerged_ : base.offset;
  std::vector<at::Tensor> as, bs, magnitudes;  // no DoRA over a 4-bit base: magnitudes stay undefined
  std::vector<double> scales;
  adapters_.merge_inputs(everything, as, bs, scales, magnitudes);
  const NfMerge result = lorafuse::nf_merge(packed, absmax, nested, offset, base.options.format(),
                                            {out_features(), in_features()}, as, bs, scales);
  if (!was_merged) {
    packed_unmerged_.set_data(base.packed.detach());
    absmax_unmerged_.set_data(base.absmax.detach());
    nested_absmax_unmerged_.set_data(base.nested_absmax.detach());
    offset_unmerged_.set_data(base.offset.detach());
  }
  base.packed.set_data(result.weight.packed);
  base.absmax.set_data(result.weight.absmax);
  base.nested_absmax.set_data(result.weight.nested_absmax);
  base.offset.set_data(result.weight.offset);
  merge_error_.set_data(at::tensor({result.output_error, result.adapter_error}, at::kDouble).to(base.packed.device()));
  adapters_.table().set_merged(everything);
}

void LoraLinear4bitImpl::unmerge() {
  adapters_.table().check_unmerge();
  torch::NoGradGuard no_grad;
  auto& base = *base_layer;
  base.packed.set_data(packed_unmerged_.detach());
  base.absmax.set_data(absmax_unmerged_.detach());
  base.nested_absmax.set_data(nested_absmax_unmerged_.detach());
  base.offset.set_data(offset_unmerged_.detach());
  drop_unmerged_copy();
}

void LoraLinear4bitImpl::drop_unmerged_copy() {
  for (at::Tensor* t : {&packed_unmerged_, &absmax_unmerged_, &nested_absmax_unmerged_, &offset_unmerged_}) {
    t->set_data(at::empty({0}, t->options()));
  }
  merge_error_.set_data(at::empty({0}, merge_error_.options()));
  adapters_.table().set_merged({});
}

std::optional<MergeError> LoraLinear4bitImpl::merge_error() const {
  if (merge_error_.numel() != 2) return std::nullopt;
  const at::Tensor e = merge_error_.to(at::kCPU);
  return MergeError{e[0].item<double>(), e[1].item<double>()};
}

torch::nn::Linear LoraLinear4bitImpl::dense_merged() const {
  const bool was_merged = merged();
  // From the unmerged bytes with every adapter a requantized merge holds (and the active one, as merge_and_unload
  // merges it), so the dense weight rounds once.
  const auto everything = adapters_.table().unloaded_adapters();
  torch::NoGradGuard no_grad;
  const auto& base = *base_layer;
  at::Tensor weight = lorafuse::dequantize_nf(
      was_merged ? packed_unmerged_ : base.packed, was_merged ? absmax_unmerged_ : base.absmax,
      was_merged ? nested_absmax_unmerged_ : base.nested_absmax, was_merged ? offset_unmerged_ : base.offset,
      base.options.format(), {out_features(), in_features()}, at::kFloat);
  if (!everything.empty()) {
    std::vector<at::Tensor> as, bs, magnitudes;  // no DoRA over a 4-bit base: magnitudes stay undefined
    std::vector<double> scales;
    adapters_.merge_inputs(everything, as, bs, scales, magnitudes);
    weight = lorafuse::lora_merge(weight, as, bs, scales);  // checks finiteness
  }
  auto dense = make_linear(in_features(), out_features(), base.bias.defined(), base_options());
  dense->weight.copy_(weight);
  dense->weight.set_requires_grad(false);
  if (base.bias.defined()) {
    dense->bias.copy_(base.bias);
    dense->bias.set_requires_grad(base.bias.requires_grad());
  }
  return dense;
}

torch::nn::Linear LoraLinear4bitImpl::merge_and_unload() {
  auto dense = dense_merged();  // may fail: nothing has changed yet
  if (merged()) unmerge();
  while (!adapter_names().empty()) delete_adapter(adapter_names().back());
  return dense;
}

void LoraLinear4bitImpl::save(torch::serialize::OutputArchive& archive) const {
  torch::nn::Module::save(archive);
  adapters_.save(archive);
}

void LoraLinear4bitImpl::load(torch::serialize::InputArchive& archive) {
  adapters_.load(archive, *this, base_options(), "LoraLinear4bit::load");
  torch::nn::Module::load(archive);  // reads the unmerged bytes and the merge error as saved
}

void LoraLinear4bitImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::LoraLinear4bit(in_features=" << in_features() << ", out_features=" << out_features()
         << ", bias=" << (base_layer->bias.defined() ? "true" : "false")
         << (base_layer->options.is_nf4() ? ", nf4" : ", nf" + std::to_string(base_layer->options.bits()))
         << ", blocksize=" << base_layer->options.blocksize()
         << ", compute_dtype=" << base_layer->options.compute_dtype() << ", " << adapters().describe() << ")";
}

}  // namespace lorafuse::nn
