// lorafuse::AdapterScope — which adapter the LoRA layers run on the current thread: the one per-thread
// routing mechanism (the Python front's lorafuse.use_adapter opens these same scopes).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace lorafuse::nn {

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
  ~AdapterScope();
  AdapterScope(const AdapterScope&) = delete;
  AdapterScope& operator=(const AdapterScope&) = delete;
  /// The innermost open scope's adapter on this thread, or nullopt outside any scope.
  static std::optional<std::string> current();
  /// The scope name of a mixed batch (Python's use_adapter with one adapter per row, which Python layers route
  /// themselves): no adapter can have it (it holds a control character), and a C++ layer refuses it rather than run
  /// the batch through one adapter.
  static constexpr const char* kMixedBatch = "\x1fmixed batch";

 private:
  uint64_t id_;
};

}  // namespace lorafuse::nn
