// lorafuse::AdapterScope — which adapter the LoRA layers run on the current thread: the one per-thread
// routing mechanism (the Python front's lorafuse.use_adapter opens these same scopes).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace lorafuse::nn {

class RowAdapters;

/// For the current thread, while it lives: every LoraLinear runs adapter `adapter_name` instead of its
/// active adapter; a layer without it runs as its base, and "" runs every layer as its base. Scopes nest:
/// the innermost open scope of the thread decides, and a scope that closes out of order (e.g. in a
/// suspended generator) removes only itself. This is how threads serve different adapters of one model at
/// once (see the thread-safety contract in <lorafuse/peft/adapters.h>). A layer with a merged adapter accepts
/// only its active adapter in a scope. Autograd recomputation (activation checkpointing) runs in backward:
/// keep backward inside the same scope.
class AdapterScope {
 public:
  explicit AdapterScope(std::string adapter_name);
  /// A mixed batch (PEFT's adapter_names): row i of every LoRA layer's input runs adapter row_adapters[i] ("" or
  /// "__base__": the base model); a batch of k·n rows for n names gives each name k consecutive rows (generate's
  /// beams). The base runs once for the whole batch and each row adds its own adapter (lorafuse::lora_multi_add).
  /// Names that no LoRA layer holds are a ValueError (all listed). Layers refuse it when merged; a layer without a
  /// row's adapter runs its base for that row. Training works: each adapter's gradients come from its rows.
  explicit AdapterScope(std::vector<std::string> row_adapters);
  /// The same with names checked already (Python's use_adapter opens its scopes so).
  explicit AdapterScope(std::shared_ptr<const RowAdapters> rows);
  ~AdapterScope();
  AdapterScope(const AdapterScope&) = delete;
  AdapterScope& operator=(const AdapterScope&) = delete;
  /// The innermost open scope's adapter on this thread (kMixedBatch for a mixed batch), or nullopt outside any scope.
  static std::optional<std::string> current();
  /// The innermost open scope's per-row adapters when it is a mixed batch, else null.
  static std::shared_ptr<const RowAdapters> rows();
  /// The name current() gives for a mixed batch: no adapter can have it (it holds a control character), so a layer
  /// that does not look at rows() refuses it rather than run the batch through one adapter.
  static constexpr const char* kMixedBatch = "\x1fmixed batch";

 private:
  uint64_t id_;
};

}  // namespace lorafuse::nn
