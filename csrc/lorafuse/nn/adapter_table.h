// lorafuse::nn::AdapterTable — a LoRA layer's adapters by name and every rule over them: which one is active,
// whether adapters are disabled, which are merged, what forward runs under a scope, what a merge folds in, how
// A and B start. No tensors live here: each layer (the C++ LoraLinear, Python's lorafuse.nn.Linear, later base
// kinds) keeps its weights and asks its table, so that the rules and their messages exist once for C++ and Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <lorafuse/config/adapter_options.h>

#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace lorafuse::nn {

/// The adapter names that the AdapterTables alive in this process hold (every LoRA layer's, C++ and Python): what a
/// per-row scope checks its names against, as a model-wide list would (a name no layer holds is a typo, not the base).
// (A moved-from table keeps its names counted until it is destroyed: there are no move operations, moves copy.)
class HeldAdapterNames {
 public:
  HeldAdapterNames() = default;
  HeldAdapterNames(const HeldAdapterNames& other);
  HeldAdapterNames& operator=(const HeldAdapterNames& other);
  ~HeldAdapterNames();
  void add(const std::string& name);
  void remove(const std::string& name);

  /// The names of `names` that no table holds, each once in first-appearance order ("" and "__base__" skipped).
  static std::vector<std::string> unknown(const std::vector<std::string>& names);
  /// Every name some table holds, sorted.
  static std::vector<std::string> all();

 private:
  std::vector<std::string> names_;
};

class AdapterTable {
 public:
  // ---- what the table holds -------------------------------------------------------------------
  /// Adapter names in the order they were added.
  const std::vector<std::string>& names() const noexcept { return order_; }
  bool has(const std::string& name) const { return options_.count(name) != 0; }
  /// The options of `name`; a ValueError prefixed with `what` (the caller's operation) when there is none.
  const LoraAdapterOptions& options(const std::string& name, const char* what = "adapter_options") const;
  /// The active adapter, or "" when none is.
  const std::string& active() const noexcept { return active_; }
  bool enabled() const noexcept { return enabled_; }
  /// The adapters folded into the base weight, in the order they were merged (empty: nothing is merged).
  const std::vector<std::string>& merged() const noexcept { return merged_; }
  bool is_merged(const std::string& name) const;
  /// Whether `name`'s A and B train: only the active adapter's do (disable_adapters freezes them all until the next
  /// enable or switch, as PEFT does).
  bool trains(const std::string& name) const { return !name.empty() && name == active_; }

  // ---- adding and removing ----------------------------------------------------------------------
  /// Checks that adapter `name` with `options` can be added to a layer whose base weight has `base_dtype`
  /// (a valid name not present yet, valid options, a floating-point base, an adapter dtype that is the base's
  /// or float32) and returns the dtype of its A and B: options.dtype(), else float32 for a float16/bfloat16
  /// base, else the base's dtype.
  c10::ScalarType check_add(const std::string& name, const LoraAdapterOptions& options,
                            c10::ScalarType base_dtype) const;
  /// Records `name` (checked by check_add). The first adapter becomes active unless `activate` is false; returns
  /// whether it did (then every adapter's trainability changes; else only the new one's, frozen).
  bool add(const std::string& name, const LoraAdapterOptions& options, bool activate);
  /// Checks that `name` can be removed: present and not merged.
  void check_remove(const std::string& name) const;
  /// Removes `name`; if it was active the first remaining adapter (if any) becomes active. Returns whether the
  /// active adapter changed.
  bool remove(const std::string& name);

  // ---- which adapter runs -----------------------------------------------------------------------
  /// Checks `name` for set_adapter; returns whether the layer must unmerge first (switching away from the
  /// active adapter of a merged layer, as PEFT does, so that a merged adapter never adds to another one).
  bool check_activate(const std::string& name) const;
  /// Makes `name` active (checked by check_activate).
  void activate(const std::string& name);
  /// For clear_active_adapter (no adapter active: the layer is its base): whether the layer must unmerge first.
  bool check_clear() const noexcept { return !merged_.empty(); }
  void clear_active() noexcept { active_.clear(); }
  void set_enabled(bool enabled) noexcept { enabled_ = enabled; }
  /// The adapter that forward runs ("" for the base alone): the active one, or `scoped` (the innermost
  /// AdapterScope's name on this thread, "" running the base) while a scope is open. Disabled adapters and a
  /// merged adapter run the base; a scope naming another adapter than the one merged into the weight is a
  /// ValueError. Reads no adapter options (forward may run while another thread adds adapters): a name the
  /// layer lacks comes back as it is, and the layer, finding no weights for it, runs the base.
  std::string route(const std::optional<std::string>& scoped) const;

  // ---- merging ----------------------------------------------------------------------------------
  /// Checks a merge of `names` (empty: the active adapter) and returns every adapter the merged weight then
  /// holds, those merged before first (merges start from the unmerged weight, so merging one by one rounds
  /// once). Errors: disabled adapters, no active adapter, an unknown or repeated name. A name merged already is left
  /// as it is with a warning (TORCH_WARN), as PEFT does: when all are, the result is merged() (nothing to do).
  std::vector<std::string> plan_merge(const std::vector<std::string>& names) const;
  /// The adapters folded into the weight now (a plan_merge result, or {} after an unmerge).
  void set_merged(std::vector<std::string> names) { merged_ = std::move(names); }
  /// An error unless something is merged.
  void check_unmerge() const;
  /// What merge_and_unload folds in for good: every adapter the weight then holds (as plan_merge; the active
  /// one added unless merged already, also while disabled, as PEFT does), or {} when nothing is to be folded.
  std::vector<std::string> plan_unload() const;
  /// Every adapter the weight holds after merge_and_unload: plan_unload(), or what is merged already when that is
  /// empty (a base rebuilt from its unmerged state, as a 4-bit base's dense replacement is, must add these).
  std::vector<std::string> unloaded_adapters() const;

  // ---- text and state ---------------------------------------------------------------------------
  /// "adapters=[default(r=8, lora_alpha=8, lora_dropout=0)], active=default[, disabled][, merged=[...]]".
  std::string describe() const;
  /// The whole table as JSON: {"adapters": [{name, options...}], "active", "enabled", "merged"} (module archives,
  /// Python pickling).
  std::string to_json() const;
  /// A table from to_json's text, checked as a whole (names, options, active and merged adapters listed);
  /// ValueErrors are prefixed with `what`.
  static AdapterTable from_json(const std::string& text, const std::string& what);

  /// "[a, b]": how messages list names.
  static std::string join(const std::vector<std::string>& names);

 private:
  std::unordered_map<std::string, LoraAdapterOptions> options_;
  std::vector<std::string> order_;
  HeldAdapterNames held_;  // order_'s names, counted process-wide
  std::string active_;
  bool enabled_ = true;
  std::vector<std::string> merged_;
};

/// The dtype of an adapter's A and B over a base weight of `base_dtype`: options.dtype(), else float32 for a
/// float16/bfloat16 base (as PEFT keeps adapters in float32), else the base's dtype.
c10::ScalarType adapter_dtype(const LoraAdapterOptions& options, c10::ScalarType base_dtype);

/// Sets a new adapter's weights as its init_lora_weights says (A [r, in], B [out, r]; PEFT's rules):
/// true: A kaiming-uniform (a = √5), B zeros; "gaussian": A normal(0, 1/r), B zeros; false: both kaiming-uniform.
/// "loftq" needs the layer's full-precision weight (init_adapter_weights_loftq); here, where it is not at hand (a
/// clone's or reset_parameters' re-initialisation, whose weights are then copied or loaded), it starts as true does.
///
/// `embedding`: an embedding layer's adapter (PEFT's lora_embedding_A [r, num_embeddings], lora_embedding_B
/// [embedding_dim, r]), which PEFT starts the other way round: A zeros and B normal(0, 1) (init true or a string),
/// both normal(0, 1) (false).
void init_adapter_weights(at::Tensor& a, at::Tensor& b, const LoraAdapterOptions& options, bool embedding = false);

/// The initialisations that start from the dense base weight W [out, in] and change it in place (s = options.scale()):
///   "loftq"  W replaced by its quantized value Q (lorafuse::loftq_init with options.loftq_config(), in W's dtype), A
///            and B set to R/√s and L/√s so that Q + s·B·A ≈ W. PEFT sets A = R, B = L whatever the scale: the same
///            start when s = 1 (lora_alpha = r), otherwise PEFT's layer starts at Q + s·L·R;
///   "pissa"  PEFT's PiSSA: with W = U·S·Vh (exact SVD, float32), A = diag(√(S_r/s))·Vh_r, B = U_r·diag(√(S_r/s)), and
///            W keeps W − s·B·A;
///   "olora"  PEFT's OLoRA: with W = Q·R, A = R[:r], B = Q[:, :r], and W keeps W − s·B·A.
void init_adapter_weights_from_base(const at::Tensor& base_weight, at::Tensor& a, at::Tensor& b,
                                    const LoraAdapterOptions& options);

/// A ValueError naming the layer at `path` (and `init`, the initialisation) unless an initialisation that starts from
/// the base weight (LoftQ, PiSSA, OLoRA) can start an adapter of rank r over this full-precision weight [out, in]:
/// r <= min(out, in), finite values, and (for a LoRA layer, `table` its adapters) nothing merged into it. Every LoRA
/// layer (C++ and Python) asks it before such an adapter, inject_lora of every targeted layer before it changes any.
void check_loftq_weight(const std::string& path, const at::Tensor& weight, int64_t r,
                        const AdapterTable* table = nullptr, const std::string& init = "loftq");

}  // namespace lorafuse::nn
