// LoraLinear's module archives (torch::save / torch::load): the parameters and buffers as Module::save writes
// them, plus the adapter table (options, order, active, disabled, merged) so that a fresh LoraLinear can be
// loaded into. The table is the metadata of a safetensors blob (the project's safetensors code, no tensors)
// stored as a uint8 tensor under "lorafuse_state". Archives from before this format (a tab-separated string)
// are refused with a message saying so.
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <lorafuse/io/safetensors.h>
#include <lorafuse/nn/lora_linear.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

namespace lorafuse::nn {
namespace {

using json = nlohmann::ordered_json;
constexpr const char* kStateKey = "lorafuse_state";
constexpr const char* kFormat = "lorafuse.LoraLinear.state/2";

bool listed(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

}  // namespace

void LoraLinearImpl::save(torch::serialize::OutputArchive& archive) const {
  torch::nn::Module::save(archive);
  json adapters = json::array();
  for (const auto& name : order_) {
    json entry = json::parse(adapter_options_json(adapters_.at(name)));
    entry["name"] = name;
    adapters.push_back(std::move(entry));
  }
  const std::map<std::string, std::string> metadata = {{"format", kFormat},
                                                       {"active", active_},
                                                       {"disabled", disabled_ ? "1" : "0"},
                                                       {"merged", json(merged_).dump()},
                                                       {"adapters", adapters.dump()}};
  const std::string bytes = io::serialize_safetensors({}, metadata);
  at::Tensor blob = at::empty({static_cast<int64_t>(bytes.size())}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(blob.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  archive.write(kStateKey, blob, /*is_buffer=*/true);
}

void LoraLinearImpl::load(torch::serialize::InputArchive& archive) {
  at::Tensor blob;
  c10::IValue value;
  if (archive.try_read(kStateKey, value)) {
    TORCH_CHECK_VALUE(!value.isString(), "LoraLinear::load: this archive was written by an older lorafuse (its "
                      "adapter table is a text record); load it with that version and save it again, or save the "
                      "adapters with save_adapter and load them with load_adapter");
    TORCH_CHECK_VALUE(value.isTensor(), "LoraLinear::load: the archive's ", kStateKey, " is not a tensor");
    blob = value.toTensor().to(at::kCPU).contiguous();  // torch::load(..., device) moves it with the rest
  }
  if (blob.defined()) {
    const auto state = io::parse_safetensors(blob.data_ptr<uint8_t>(), static_cast<size_t>(blob.numel()),
                                             "LoraLinear archive state");
    const auto field = [&](const char* key) -> const std::string& {
      const auto it = state.metadata.find(key);
      TORCH_CHECK_VALUE(it != state.metadata.end(), "LoraLinear::load: the archive's adapter state lacks \"", key,
                        "\"");
      return it->second;
    };
    TORCH_CHECK_VALUE(field("format") == kFormat, "LoraLinear::load: unknown adapter state format \"",
                      field("format"), "\"; expected ", kFormat);
    // Read and check the whole table before changing anything.
    std::vector<std::string> names, merged_names;
    std::vector<LoraAdapterOptions> options_read;
    try {
      for (const auto& a : json::parse(field("adapters"))) {
        names.push_back(a.at("name").get<std::string>());
        options_read.push_back(adapter_options_from_json(a.dump(), "LoraLinear::load"));
      }
      merged_names = json::parse(field("merged")).get<std::vector<std::string>>();
    } catch (const json::exception& e) {
      TORCH_CHECK_VALUE(false, "LoraLinear::load: cannot read the archive's adapter table: ", e.what());
    }
    const std::string active = field("active");
    for (size_t i = 0; i < names.size(); ++i) {
      check_adapter_name(names[i]);
      if (has_adapter(names[i])) {
        TORCH_CHECK_VALUE(adapters_.at(names[i]).r() == options_read[i].r(), "LoraLinear::load: adapter \"",
                          names[i], "\" has r=", options_read[i].r(), " in the archive but r=",
                          adapters_.at(names[i]).r(), " in this layer");
      }
    }
    for (const auto& mine : order_) {
      TORCH_CHECK_VALUE(listed(names, mine), "LoraLinear::load: this layer has adapter \"", mine,
                        "\" but the archive has only ", json(names).dump());
    }
    for (const auto& n : merged_names) {
      TORCH_CHECK_VALUE(listed(names, n), "LoraLinear::load: merged adapter \"", n, "\" is not in the archive");
    }
    TORCH_CHECK_VALUE(active.empty() || listed(names, active), "LoraLinear::load: active adapter \"", active,
                      "\" is not in the archive");
    for (size_t i = 0; i < names.size(); ++i) {
      if (has_adapter(names[i])) {
        adapters_.at(names[i]) = options_read[i];
      } else {
        add_adapter(names[i], options_read[i]);
      }
    }
    order_ = names;          // the archive's order
    merged_ = merged_names;  // Module::load below reads weight_unmerged as saved
    active_ = active;
    disabled_ = field("disabled") == "1";
    apply_trainability();
    refresh_routes();
  }
  torch::nn::Module::load(archive);
}

}  // namespace lorafuse::nn
