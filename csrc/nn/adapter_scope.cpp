#include <lorafuse/config/adapter_options.h>
#include <lorafuse/nn/adapter_scope.h>

#include <atomic>
#include <utility>
#include <vector>

namespace lorafuse::nn {
namespace {

// This thread's open scopes, innermost last, by id (names held by value).
thread_local std::vector<std::pair<uint64_t, std::string>> t_scopes;
std::atomic<uint64_t> next_scope_id{1};

}  // namespace

AdapterScope::AdapterScope(std::string adapter_name) : id_(next_scope_id++) {
  if (!adapter_name.empty() && adapter_name != kMixedBatch) check_adapter_name(adapter_name);
  t_scopes.emplace_back(id_, std::move(adapter_name));
}

AdapterScope::~AdapterScope() {
  for (auto it = t_scopes.rbegin(); it != t_scopes.rend(); ++it) {
    if (it->first == id_) {
      t_scopes.erase(std::next(it).base());
      return;
    }
  }
}

std::optional<std::string> AdapterScope::current() {
  if (t_scopes.empty()) return std::nullopt;
  return t_scopes.back().second;
}

}  // namespace lorafuse::nn
