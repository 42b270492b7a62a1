// The adapter state in a LoRA layer's module archives (torch::save / torch::load): beside the parameters and buffers
// that Module::save writes, the adapter table (options, order, active, disabled, merged) so that a fresh layer can be
// loaded into. The table is the metadata of a safetensors blob (the project's safetensors code, no tensors)
// stored as a uint8 tensor under "lorafuse_state". Archives from before this format (a tab-separated string)
// are refused with a message saying so.
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/nn/lora_adapters.h>
#include <torch/serialize/archive.h>

#include <cstring>
#include <nlohmann/json.hpp>

namespace lorafuse::nn {
namespace {

using json = nlohmann::ordered_json;
constexpr const char* kStateKey = "lorafuse_state";
constexpr const char* kFormat = "lorafuse.LoraLinear.state/2";

}  // namespace

void LoraAdapters::save(torch::serialize::OutputArchive& archive) const {
  const json table = json::parse(table_.to_json());
  const std::map<std::string, std::string> metadata = {{"format", kFormat},
                                                       {"active", table.at("active").get<std::string>()},
                                                       {"disabled", table.at("enabled").get<bool>() ? "0" : "1"},
                                                       {"merged", table.at("merged").dump()},
                                                       {"adapters", table.at("adapters").dump()}};
  const std::string bytes = io::serialize_safetensors({}, metadata);
  at::Tensor blob = at::empty({static_cast<int64_t>(bytes.size())}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(blob.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  archive.write(kStateKey, blob, /*is_buffer=*/true);
}

void LoraAdapters::load(torch::serialize::InputArchive& archive, torch::nn::Module& owner,
                        const at::TensorOptions& base, const char* what, const at::Tensor& dense_weight) {
  at::Tensor blob;
  c10::IValue value;
  if (archive.try_read(kStateKey, value)) {
    TORCH_CHECK_VALUE(!value.isString(), what,
                      ": this archive was written by an older lorafuse (its "
                      "adapter table is a text record); load it with that version and save it again, or save the "
                      "adapters with save_adapter and load them with load_adapter");
    TORCH_CHECK_VALUE(value.isTensor(), what, ": the archive's ", kStateKey, " is not a tensor");
    blob = value.toTensor().to(at::kCPU).contiguous();  // torch::load(..., device) moves it with the rest
  }
  if (blob.defined()) {
    const auto state = io::parse_safetensors(blob.data_ptr<uint8_t>(), static_cast<size_t>(blob.numel()), what);
    const auto field = [&](const char* key) -> const std::string& {
      const auto it = state.metadata.find(key);
      TORCH_CHECK_VALUE(it != state.metadata.end(), what, ": the archive's adapter state lacks \"", key, "\"");
      return it->second;
    };
    TORCH_CHECK_VALUE(field("format") == kFormat, what, ": unknown adapter state format \"", field("format"),
                      "\"; expected ", kFormat);
    // Read and check the whole table before changing anything.
    json table;
    try {
      table = json{{"adapters", json::parse(field("adapters"))},
                   {"active", field("active")},
                   {"enabled", field("disabled") != "1"},
                   {"merged", json::parse(field("merged"))}};
    } catch (const json::exception& e) {
      TORCH_CHECK_VALUE(false, what, ": cannot read the archive's adapter table: ", e.what());
    }
    AdapterTable loaded = AdapterTable::from_json(table.dump(), what);
    for (const auto& name : loaded.names()) {
      if (table_.has(name)) {
        const auto r = loaded.options(name).r();
        TORCH_CHECK_VALUE(table_.options(name).r() == r, what, ": adapter \"", name, "\" has r=", r,
                          " in the archive but r=", table_.options(name).r(), " in this layer");
        const bool dora = loaded.options(name).use_dora();
        TORCH_CHECK_VALUE(table_.options(name).use_dora() == dora, what, ": adapter \"", name, "\" is ",
                          dora ? "a DoRA adapter in the archive but not in this layer"
                               : "a DoRA adapter in this layer but not in the archive");
      }
    }
    for (const auto& mine : table_.names()) {
      TORCH_CHECK_VALUE(loaded.has(mine), what, ": this layer has adapter \"", mine, "\" but the archive has only ",
                        AdapterTable::join(loaded.names()));
    }
    for (const auto& name : loaded.names()) {
      if (!table_.has(name)) add(owner, name, loaded.options(name), /*activate=*/false, base, dense_weight);
    }
    table_ = std::move(loaded);  // the archive's options, order, active adapter and merge state
    apply_trainability();        // the owner's Module::load then reads the weights (and its unmerged copy) as saved
    refresh_routes();
  }
}

}  // namespace lorafuse::nn
