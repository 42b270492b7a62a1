// lorafuse::nn::LoraLinear — a frozen torch::nn::Linear with named LoRA adapters.
#pragma once

#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/adapter_table.h>
#include <lorafuse/nn/lora_adapters.h>
#include <lorafuse/nn/lora_layer.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lorafuse::nn {

/// Options of a LoraLinear that makes its own base layer. The first adapter's options are a
/// LoraAdapterOptions (composed, not repeated):
///   LoraLinear(LoraLinearOptions(4096, 4096).adapter(LoraAdapterOptions(16).lora_alpha(32)))
struct LoraLinearOptions {
  LoraLinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  /// Size of each input sample.
  TORCH_ARG(int64_t, in_features);
  /// Size of each output sample.
  TORCH_ARG(int64_t, out_features);
  /// Whether the base layer has a bias.
  TORCH_ARG(bool, bias) = true;
  /// The first adapter's name.
  TORCH_ARG(std::string, adapter_name) = "default";
  /// The first adapter's options (rank, lora_alpha, dropout, rsLoRA, init, dtype).
  TORCH_ARG(LoraAdapterOptions, adapter);
};

/// y = base(x) + scale · (dropout(x)·Aᵀ)·Bᵀ for the active adapter, through lorafuse::lora_linear.
///
/// Wraps a frozen base torch::nn::Linear (registered as `base_layer`, sharing its weight and bias) and
/// holds named adapters as PEFT does: `lora_A.<name>.weight` [r, in] and `lora_B.<name>.weight`
/// [out, r]. One adapter is active at a time; only its A and B require grad. Switching adapters,
/// disabling and enabling them move no data. While adapters are disabled, or when none is active, the
/// layer is the plain base linear.
///
/// merge() folds scale·B·A (computed in float32) into the base weight, so the layer costs exactly what
/// the base costs; it keeps the unmerged weight (the buffer `weight_unmerged`, empty otherwise) so that unmerge()
/// restores it bit for bit. merge_and_unload() merges for good and hands back the plain Linear.
class LoraLinearImpl : public torch::nn::Cloneable<LoraLinearImpl>, public LoraLayer {
 public:
  /// A new base Linear(in_features, out_features) with one adapter of rank r.
  LoraLinearImpl(int64_t in_features, int64_t out_features, int64_t r = 8)
      : LoraLinearImpl(LoraLinearOptions(in_features, out_features).adapter(LoraAdapterOptions(r))) {}
  /// A new base Linear (kaiming-initialised as torch::nn::Linear) with the first adapter of `options`.
  explicit LoraLinearImpl(const LoraLinearOptions& options);
  /// Wraps `base` (not copied: the layer shares its weight and bias and freezes them) with one adapter.
  LoraLinearImpl(torch::nn::Linear base, const LoraAdapterOptions& adapter,
                 const std::string& adapter_name = "default");

  /// Registers base_layer, lora_A and lora_B, and fresh weights for every adapter this layer lists.
  void reset() override;
  /// Re-initialises every adapter's A and B as its init_lora_weights says; the base is untouched.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  /// Cloneable::clone, keeping which parameters require grad and the unmerged weight.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;
  /// Writes the parameters plus the adapters' options, the active adapter and the merge state.
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Reads what save() wrote; adapters in the archive that this layer lacks are added first.
  void load(torch::serialize::InputArchive& archive) override;

  /// [..., in] → [..., out]. Under a mixed-batch AdapterScope (one adapter per row), each row runs its own adapter.
  at::Tensor forward(const at::Tensor& x);

  // ---- adapters ------------------------------------------------------------------------------
  /// Adds adapter `name` (an error if it exists or the options are bad). The first adapter becomes the
  /// active one; a later one is added beside it, inactive and frozen, until set_adapter(name).
  void add_adapter(const std::string& name, const LoraAdapterOptions& options);
  /// As above; with `activate` false the new adapter never becomes the active one (a layer with no active
  /// adapter keeps none), which is how adapters are loaded beside others while threads run forward.
  void add_adapter(const std::string& name, const LoraAdapterOptions& options, bool activate) override;
  /// Makes `name` the active adapter (only its A and B require grad). O(1): nothing is allocated or
  /// copied. Switching away from the active adapter of a merged layer unmerges it first (exactly), as
  /// PEFT does, so that a merged adapter never adds to another one.
  void set_adapter(const std::string& name) override;
  /// No adapter active: the layer is its base (what a model-wide set_adapter does to layers that lack
  /// the adapter it activates). Unmerges first, as set_adapter.
  void clear_active_adapter() override;
  /// Removes adapter `name`; a merged adapter must be unmerged first. If it was active, the first
  /// remaining adapter (if any) becomes active.
  void delete_adapter(const std::string& name) override;
  /// The base alone from now on (unmerging first if anything is merged).
  void disable_adapters() override;
  void enable_adapters() override;
  /// Names, options, the active adapter, enabled, merged (adapter_names(), active_adapter(), merged() ... read it).
  const AdapterTable& adapters() const noexcept override { return adapters_.table(); }
  /// lora_A.<name>.weight [r, in] and lora_B.<name>.weight [out, r].
  at::Tensor& lora_a(const std::string& name) override { return adapters_.lora_a(name); }
  at::Tensor& lora_b(const std::string& name) override { return adapters_.lora_b(name); }
  at::Tensor& lora_magnitude(const std::string& name) override { return adapters_.lora_magnitude(name); }
  /// scale · B · A in float32 [out, in] (lorafuse::lora_delta_weight).
  at::Tensor delta_weight(const std::string& name) const { return adapters_.delta_weight(name); }

  // ---- merging -------------------------------------------------------------------------------
  /// Folds the named adapters (default: the active one) into the base weight, in float32 from the
  /// unmerged weight; adapters merged already are left as they are, with a warning (PEFT's behaviour). Errors: an
  /// unknown or repeated adapter, disabled adapters, a non-finite result (the weight
  /// is then left as it was). `requantize` has no meaning for a dense base and is ignored.
  void merge(const std::vector<std::string>& adapter_names = {}, bool requantize = false) override;
  /// Restores the unmerged base weight exactly. An error when nothing is merged.
  void unmerge() override;
  /// Merges the active adapter (unless merged already; also while adapters are disabled, as PEFT does),
  /// drops the unmerged copy and the adapters, and returns the base Linear, which then holds
  /// W + scale·B·A. This layer is left without adapters: its base alone.
  torch::nn::Linear merge_and_unload();

  // ---- LoraLayer --------------------------------------------------------------------------------
  torch::nn::Module& module() override { return *this; }
  at::Tensor lora_forward(const at::Tensor& x) override { return forward(x); }
  int64_t in_features() const override { return options.in_features(); }
  int64_t out_features() const override { return options.out_features(); }
  at::Tensor base_bias() const override { return base_layer->bias; }
  std::shared_ptr<torch::nn::Module> unload_merged() override { return merge_and_unload().ptr(); }
  std::shared_ptr<torch::nn::Module> base_module() const override { return base_layer.ptr(); }
  std::shared_ptr<torch::nn::Module> shallow_copy() const override { return std::make_shared<LoraLinearImpl>(*this); }

  /// The wrapped base layer.
  torch::nn::Linear base_layer{nullptr};
  /// One Linear(in, r, bias=false) per adapter: weight [r, in].
  torch::nn::ModuleDict lora_A{nullptr};
  /// One Linear(r, out, bias=false) per adapter: weight [out, r].
  torch::nn::ModuleDict lora_B{nullptr};
  /// Shape of the base and the first adapter.
  LoraLinearOptions options;

 private:
  at::TensorOptions base_options() const { return base_layer->weight.options(); }
  at::Tensor routed_forward(const at::Tensor& x, const LoraAdapters::Route& route);
  void merge_into_base(const std::vector<std::string>& everything);

  torch::nn::Linear pending_base_{nullptr};  // consumed by the first reset() of the wrapping constructor
  LoraAdapters adapters_;
  at::Tensor weight_unmerged_;  // buffer: the unmerged weight while anything is merged, else [0]
};

TORCH_MODULE(LoraLinear);

}  // namespace lorafuse::nn
