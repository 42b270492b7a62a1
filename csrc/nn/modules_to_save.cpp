#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <lorafuse/nn/adapter_scope.h>
#include <lorafuse/nn/base_kind.h>
#include <lorafuse/nn/lora_layer.h>
#include <lorafuse/nn/modules_to_save.h>
#include <lorafuse/nn/row_adapters.h>
#include <torch/serialize/archive.h>

#include <cstring>

namespace lorafuse::nn {
namespace {

void put(torch::nn::ModuleDict& dict, const std::string& name, std::shared_ptr<torch::nn::Module> module) {
  dict->update(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{{name, std::move(module)}});
}

constexpr const char* kStateKey = "modules_to_save_state";  // the table as JSON bytes (a buffer in archives)

const BaseKind& callable_kind(const torch::nn::Module& module, const char* what) {
  const BaseKind* kind = base_kind_of(module);
  TORCH_CHECK_VALUE(kind != nullptr, what, ": modules_to_save: lorafuse keeps a C++ module whole when it can call it: ",
                    "a torch::nn::Linear or Embedding, found ", module.name());
  TORCH_CHECK_VALUE(!kind->attention(), what,
                    ": modules_to_save: an attention takes query, key and value, which a modules-to-save layer does "
                    "not pass on in C++; keep a Linear or Embedding whole");
  TORCH_CHECK_VALUE(std::strcmp(kind->name(), "linear4bit") != 0, what,
                    ": modules_to_save: a 4-bit layer cannot train whole (its copy would be 4-bit too); keep the "
                    "module in full precision or adapt it with LoRA");
  return *kind;
}

}  // namespace

ModulesToSaveImpl::ModulesToSaveImpl(std::shared_ptr<torch::nn::Module> original, const std::string& adapter_name,
                                     const LoraAdapterOptions& options, bool activate) {
  TORCH_CHECK_VALUE(original != nullptr, "ModulesToSave: original: expected a module, found null");
  TORCH_CHECK_VALUE(as_lora_layer(original.get()) == nullptr && as_saved_module(original.get()) == nullptr,
                    "ModulesToSave: original: a LoRA or modules-to-save layer (", original->name(),
                    ") cannot be kept whole again");
  callable_kind(*original, "ModulesToSave");
  pending_ = std::move(original);
  reset();
  add_adapter(adapter_name, options, activate);
}

void ModulesToSaveImpl::reset() {
  std::shared_ptr<torch::nn::Module> original = std::move(pending_);
  pending_ = nullptr;
  torch::nn::ModuleDict copies;
  if (original == nullptr) {  // Cloneable::clone: placeholders sharing the original's tensors, then overwritten
    TORCH_CHECK(original_module != nullptr, "ModulesToSave::reset: no module to wrap");
    original = base_kind_of(*original_module)->shallow_copy(*original_module);
    for (const auto& [name, copy] : modules_to_save->items()) {
      put(copies, name, base_kind_of(*copy)->shallow_copy(*copy));
    }
  }
  original_module = register_module("original_module", std::move(original));
  modules_to_save = register_module("modules_to_save", copies);
  for (auto& p : original_module->parameters()) p.set_requires_grad(false);
}

std::shared_ptr<torch::nn::Module> ModulesToSaveImpl::shallow_copy() const {
  return std::make_shared<ModulesToSaveImpl>(*this);
}

std::shared_ptr<torch::nn::Module> ModulesToSaveImpl::clone(const std::optional<torch::Device>& device) const {
  check_cloneable(*this, "ModulesToSave::clone");
  auto copy = torch::nn::Cloneable<ModulesToSaveImpl>::clone(device);
  copy_requires_grad(*this, *copy);
  return copy;
}

void ModulesToSaveImpl::add_adapter(const std::string& name, const LoraAdapterOptions& options, bool activate) {
  table_.check_add(name, options, at::kFloat);
  TORCH_CHECK_VALUE(!modules_to_save->contains(name), "add_adapter: adapter_name: \"", name,
                    "\" has a copy here already");
  auto copy = original_module->clone();
  for (auto& p : copy->parameters()) p.set_requires_grad(false);
  put(modules_to_save, name, copy);
  if (table_.add(name, options, activate)) apply_trainability();
}

void ModulesToSaveImpl::set_adapter(const std::string& name) {
  table_.check_activate(name);
  table_.activate(name);
  apply_trainability();
}

void ModulesToSaveImpl::clear_active_adapter() {
  table_.clear_active();
  apply_trainability();
}

void ModulesToSaveImpl::delete_adapter(const std::string& name) {
  table_.check_remove(name);
  table_.remove(name);
  modules_to_save->pop(name);
  apply_trainability();
}

void ModulesToSaveImpl::disable_adapters() {
  table_.set_enabled(false);
  for (const auto& [name, copy] : modules_to_save->items()) {
    for (auto& p : copy->parameters()) p.set_requires_grad(false);
  }
}

void ModulesToSaveImpl::enable_adapters() {
  table_.set_enabled(true);
  apply_trainability();
}

void ModulesToSaveImpl::apply_trainability() {
  for (const auto& [name, copy] : modules_to_save->items()) {
    const bool train = table_.trains(name);
    for (auto& p : copy->parameters()) p.set_requires_grad(train);
  }
}

std::shared_ptr<torch::nn::Module> ModulesToSaveImpl::module_for(const std::string& name) const {
  TORCH_CHECK_VALUE(modules_to_save->contains(name), "modules_to_save: no copy for adapter \"", name,
                    "\"; the copies here: ", AdapterTable::join(table_.names()));
  return (*modules_to_save)[name];
}

std::shared_ptr<torch::nn::Module> ModulesToSaveImpl::unloaded() const {
  return table_.active().empty() ? original_module : module_for(table_.active());
}

at::Tensor ModulesToSaveImpl::run(const std::string& name, const at::Tensor& x) {
  const auto& m = name.empty() || !modules_to_save->contains(name) ? original_module : (*modules_to_save)[name];
  return base_kind_of(*m)->forward(*m, x);
}

at::Tensor ModulesToSaveImpl::forward(const at::Tensor& x) {
  if (const auto rows = AdapterScope::rows()) {
    // rows as RowAdapters counts them: x's first dimension (a 1-D x is one row); each group runs its own copy
    const int64_t n = x.dim() >= 2 ? x.size(0) : 1;
    const auto groups = rows->row_groups(n, table_.enabled() ? table_.names() : std::vector<std::string>{});
    if (groups.size() == 1) return run(groups.front().first, x);
    at::Tensor out;
    for (const auto& [name, indices] : groups) {
      const at::Tensor index = at::tensor(indices, at::TensorOptions().dtype(at::kLong)).to(x.device());
      const at::Tensor y = run(name, x.index_select(0, index));
      if (!out.defined()) {
        auto sizes = y.sizes().vec();
        sizes[0] = n;
        out = at::zeros(sizes, y.options());
      }
      out = out.index_copy(0, index, y);
    }
    return out;
  }
  return run(table_.route(AdapterScope::current()), x);
}

void ModulesToSaveImpl::pretty_print(std::ostream& stream) const {
  stream << "lorafuse::nn::ModulesToSave(" << original_module->name() << ", " << table_.describe() << ")";
}

void ModulesToSaveImpl::save(torch::serialize::OutputArchive& archive) const {
  torch::nn::Module::save(archive);
  const std::string text = table_.to_json();
  at::Tensor blob = at::empty({static_cast<int64_t>(text.size())}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(blob.data_ptr<uint8_t>(), text.data(), text.size());
  archive.write(kStateKey, blob, /*is_buffer=*/true);
}

void ModulesToSaveImpl::load(torch::serialize::InputArchive& archive) {
  c10::IValue value;
  TORCH_CHECK_VALUE(archive.try_read(kStateKey, value) && value.isTensor(),
                    "ModulesToSave::load: the archive has no modules_to_save state (", kStateKey, ")");
  const at::Tensor blob = value.toTensor().to(at::kCPU).contiguous();
  AdapterTable table = AdapterTable::from_json(
      std::string(reinterpret_cast<const char*>(blob.data_ptr<uint8_t>()), static_cast<size_t>(blob.numel())),
      "ModulesToSave::load");
  // the copies the archive holds, made before their tensors are read into them
  torch::nn::ModuleDict copies;
  for (const auto& name : table.names()) {
    put(copies, name, modules_to_save->contains(name) ? (*modules_to_save)[name] : original_module->clone());
  }
  modules_to_save = replace_module("modules_to_save", copies);
  table_ = std::move(table);
  torch::nn::Module::load(archive);
  apply_trainability();
}

void check_saved_module(const torch::nn::Module& module, const std::string& path) {
  const std::string what = "\"" + path + "\"";
  TORCH_CHECK_VALUE(as_lora_layer(&module) == nullptr, "modules_to_save: ", what, " is a LoRA layer (", module.name(),
                    "); a module trains either whole (modules_to_save) or through LoRA, not both");
  callable_kind(module, what.c_str());
}

ModulesToSaveImpl* as_saved_module(torch::nn::Module* module) {
  return module == nullptr ? nullptr : module->as<ModulesToSaveImpl>();
}

}  // namespace lorafuse::nn
