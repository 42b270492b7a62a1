// lorafuse::nn::LoraAdapters — the adapter side of a LoRA layer, whatever its base: the `lora_A` / `lora_B`
// module dicts it registers in its owner, the AdapterTable (the rules), the snapshot of what forward reads, and the
// adapter state in module archives. LoraLinear (a dense base) and LoraLinear4bit (a 4-bit base) each keep one, so
// adding, switching, removing, trainability and archives are written once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>
#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/adapter_table.h>
#include <lorafuse/nn/row_adapters.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/linear.h>

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace torch::serialize {
class InputArchive;
class OutputArchive;
}  // namespace torch::serialize

namespace lorafuse::nn {

/// A DoRA adapter's magnitude vector: the parameter `weight` [out] (PEFT's `lora_magnitude_vector.<name>.weight`).
class DoraMagnitudeImpl : public torch::nn::Cloneable<DoraMagnitudeImpl> {
 public:
  explicit DoraMagnitudeImpl(int64_t out_features = 0, const at::TensorOptions& options = {})
      : out_features_(out_features), options_(options) {
    reset();
  }
  /// Registers a fresh (uninitialised) weight [out].
  void reset() override;
  at::Tensor weight;

 private:
  int64_t out_features_;
  at::TensorOptions options_;
};
TORCH_MODULE(DoraMagnitude);

class LoraAdapters {
 public:
  /// What forward reads of one adapter.
  struct Route {
    std::shared_ptr<torch::nn::LinearImpl> a, b;  // weights [r, in] and [out, r]
    double scale;
    double dropout;
    std::shared_ptr<DoraMagnitudeImpl> magnitude;  // a DoRA adapter's magnitude vector, else null
  };

  /// (Re)registers `lora_A`, `lora_B` and `lora_magnitude_vector` in `owner` with fresh weights for every adapter the
  /// table lists, made on `base`'s device with each adapter's dtype (adapter_dtype over `base`'s dtype), then
  /// trainability and routes. `dense_weight`: the layer's full-precision weight [out, in], which DoRA magnitudes start
  /// from (undefined for a base without one, which holds no DoRA adapter).
  /// `embedding`: an embedding layer's adapters (in, out = num_embeddings, embedding_dim), registered as
  /// `lora_embedding_A` / `lora_embedding_B` and started as PEFT starts them (init_adapter_weights' embedding rule).
  void reset(torch::nn::Module& owner, int64_t in_features, int64_t out_features, const at::TensorOptions& base,
             const at::Tensor& dense_weight = {}, bool embedding = false);
  /// Re-initialises every adapter's A and B as its init_lora_weights says (and a DoRA magnitude from `dense_weight`).
  void reset_parameters(const at::Tensor& dense_weight = {});

  /// Adds adapter `name` (checked against the table; `base` gives the device and the base dtype). The first one
  /// becomes active unless `activate` is false. `dense_weight`: the layer's full-precision weight [out, in], which
  /// LoftQ (init_lora_weights "loftq") replaces by its quantized value and a DoRA magnitude starts from (the row norms
  /// of W + scale·B·A); undefined for a base without one (LoftQ and DoRA refused, `refusal` saying why).
  /// `owner`: the layer (a DoRA adapter's magnitude goes into its `lora_magnitude_vector`, registered with the first).
  void add(torch::nn::Module& owner, const std::string& name, const LoraAdapterOptions& options, bool activate,
           const at::TensorOptions& base, const at::Tensor& dense_weight = {}, const std::string& refusal = "");
  /// Makes `name` the active adapter / none; only the active adapter's A and B require grad. When the table says
  /// the layer must unmerge first (switching away from a merged adapter), `unmerge` runs before.
  void activate(const std::string& name, const std::function<void()>& unmerge);
  void clear_active(const std::function<void()>& unmerge);
  /// Adapters disabled (unmerging first if anything is merged; every adapter frozen until enable or a switch, as in
  /// PEFT) / enabled again (the active one trains).
  void disable(const std::function<void()>& unmerge);
  /// Removes adapter `name` (table.check_remove first).
  void remove(const std::string& name);
  void enable() {
    table_.set_enabled(true);
    apply_trainability();
  }

  const AdapterTable& table() const noexcept { return table_; }
  AdapterTable& table() noexcept { return table_; }
  at::Tensor& lora_a(const std::string& name);
  at::Tensor& lora_b(const std::string& name);
  /// A DoRA adapter's magnitude vector [out] (lora_magnitude_vector.<name>.weight); ValueError for another adapter.
  at::Tensor& lora_magnitude(const std::string& name);
  /// scale · B · A in float32 [out, in] (lorafuse::lora_delta_weight).
  at::Tensor delta_weight(const std::string& name) const;
  /// The A, B, scale and magnitude (undefined unless DoRA) of each named adapter, for lorafuse::lora_merge.
  void merge_inputs(const std::vector<std::string>& names, std::vector<at::Tensor>& as, std::vector<at::Tensor>& bs,
                    std::vector<double>& scales, std::vector<at::Tensor>& magnitudes) const;

  /// Merging into a dense weight held in place (a Linear's [out, in], or with `transposed` an embedding's [num, dim],
  /// the transpose of its [out, in]): folds `everything` (a plan of the table) in with lorafuse::lora_merge, from the
  /// unmerged weight, which `unmerged` keeps from the first merge on (so merging one by one rounds once, and
  /// unmerge_dense restores it exactly).
  void merge_dense(at::Tensor& weight, bool transposed, at::Tensor& unmerged,
                   const std::vector<std::string>& everything);
  /// Restores the unmerged weight exactly (an error when nothing is merged).
  void unmerge_dense(at::Tensor& weight, at::Tensor& unmerged);
  /// merge_and_unload for a dense weight: merges the active adapter for good (plan_unload), forgets the unmerged copy
  /// and removes every adapter.
  void unload_dense(at::Tensor& weight, bool transposed, at::Tensor& unmerged);

  /// The adapter forward runs now (the table's route under the thread's AdapterScope), or nullopt: the base alone.
  std::optional<Route> route() const;
  /// The route of adapter `name` as the routes hold it now, or nullopt (removed meanwhile).
  std::optional<Route> route_of(const std::string& name) const;
  /// The names the routes hold now (a consistent snapshot).
  std::vector<std::string> routed_names() const;
  /// Points the routes at the adapter modules registered now (after Cloneable::clone put fresh ones in).
  void refresh_routes();
  /// A forward under a mixed-batch scope (AdapterScope::rows(), one adapter per row): `base()` once for the whole
  /// batch, then each row's adapter (lorafuse::lora_multi_add); rows of adapters this layer lacks and "__base__" rows
  /// keep the base's output. `single(route)` runs the layer with one adapter for every row (all rows name it).
  at::Tensor mixed_forward(const RowAdapters& rows, const at::Tensor& x, bool training,
                           const std::function<at::Tensor()>& base,
                           const std::function<at::Tensor(const Route&)>& single) const;

  /// Writes the table (options, order, active, enabled, merged) into `archive`.
  void save(torch::serialize::OutputArchive& archive) const;
  /// Reads what save() wrote, if the archive has it: adapters it lacks are added first (on `base`), then the table
  /// becomes the archive's. `what` prefixes the errors ("LoraLinear::load").
  /// `dense_weight`: as for add (a DoRA adapter in the archive starts from it before its values are read).
  void load(torch::serialize::InputArchive& archive, torch::nn::Module& owner, const at::TensorOptions& base,
            const char* what, const at::Tensor& dense_weight = {});

  torch::nn::ModuleDict lora_A{nullptr};  // one Linear(in, r, bias=false) per adapter
  torch::nn::ModuleDict lora_B{nullptr};  // one Linear(r, out, bias=false) per adapter
  // one DoraMagnitude per DoRA adapter; registered with the first DoRA adapter (archives without DoRA have none)
  torch::nn::ModuleDict lora_magnitude_vector{nullptr};

 private:
  using RouteTable = std::unordered_map<std::string, Route>;
  // A mutex that a copy (Cloneable::clone) gets fresh.
  struct RouteLock {
    RouteLock() = default;
    RouteLock(const RouteLock&) {}
    RouteLock& operator=(const RouteLock&) { return *this; }
    std::mutex mutex;
  };
  void create_weights(torch::nn::Module& owner, const std::string& name, const at::TensorOptions& options,
                      const LoraAdapterOptions& adapter);
  void init_magnitude(const std::string& name, const at::Tensor& dense_weight);
  std::vector<torch::nn::ModuleDict*> dicts_of(const std::string& name);
  std::shared_ptr<const RouteTable> snapshot() const;
  void apply_trainability();

  int64_t in_features_ = 0, out_features_ = 0;
  bool embedding_ = false;
  AdapterTable table_;
  // Replaced as a whole (copy on write) whenever adapters are added, removed or reloaded, so that forward on other
  // threads sees a consistent table while load_adapter or delete_adapter runs.
  std::shared_ptr<const RouteTable> routes_;
  mutable RouteLock route_lock_;
};

}  // namespace lorafuse::nn
