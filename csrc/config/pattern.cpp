#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <c10/util/Exception.h>

#include "csrc/config/pattern.h"

#include <mutex>
#include <unordered_map>

namespace lorafuse::detail {
namespace {

constexpr size_t kCacheLimit = 4096;  // patterns kept compiled; the cache starts again past that

}  // namespace

std::shared_ptr<const Pattern> Pattern::compile(const std::string& regex, const char* field) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<const Pattern>> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(regex);
    if (it != cache.end()) return it->second;
  }
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(regex.data()), regex.size(),
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR reason[256];
    pcre2_get_error_message(error, reason, sizeof(reason));
    TORCH_CHECK_VALUE(false, field, ": \"", regex, "\" is not a valid regular expression (",
                      reinterpret_cast<const char*>(reason), " at offset ", offset, ")");
  }
  std::shared_ptr<const Pattern> pattern(new Pattern(code));
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= kCacheLimit) cache.clear();
  cache.emplace(regex, pattern);
  return pattern;
}

Pattern::~Pattern() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

bool Pattern::run(const std::string& s, unsigned options, std::string* group, const char* name) const {
  auto* code = static_cast<pcre2_code*>(code_);
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
      pcre2_match_data_create_from_pattern(code, nullptr), &pcre2_match_data_free);
  TORCH_CHECK(data != nullptr, "regular expression: out of memory");
  const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0, options, data.get(), nullptr);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  TORCH_CHECK(rc >= 0, "regular expression: matching \"", s, "\" failed (PCRE2 error ", rc, ")");
  if (group != nullptr) {
    const int n = name == nullptr ? 1 : pcre2_substring_number_from_name(code, reinterpret_cast<PCRE2_SPTR>(name));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
    const bool set = n > 0 && n < rc && ovector[2 * n] != PCRE2_UNSET;
    *group = set ? s.substr(ovector[2 * n], ovector[2 * n + 1] - ovector[2 * n]) : std::string();
  }
  return true;
}

bool Pattern::fullmatch(const std::string& s) const {
  return run(s, PCRE2_ANCHORED | PCRE2_ENDANCHORED, nullptr, nullptr);
}

bool Pattern::match(const std::string& s, std::string* group, const char* name) const {
  return run(s, PCRE2_ANCHORED, group, name);
}

}  // namespace lorafuse::detail
