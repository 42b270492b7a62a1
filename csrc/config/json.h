// JSON text parsed with a nesting bound, for every file lorafuse reads (private to csrc/: config, io and models use
// it; the bottom floor, so all may include it).
#pragma once

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>
#include <string>

namespace lorafuse::detail {

/// The deepest JSON a reader accepts by default: deeper nesting would exhaust the stack in dump() and destruction.
constexpr int kMaxJsonDepth = 64;

/// The JSON value in [begin, end), at most `max_depth` levels deep; a ValueError starting with `what` otherwise.
template <class Json = nlohmann::ordered_json>
Json parse_json(const char* begin, const char* end, const std::string& what, int max_depth = kMaxJsonDepth) {
  try {
    return Json::parse(begin, end, [&](int depth, typename Json::parse_event_t, Json&) {
      TORCH_CHECK_VALUE(depth <= max_depth, what, ": JSON nested deeper than ", max_depth, " levels");
      return true;
    });
  } catch (const typename Json::exception& e) {
    TORCH_CHECK_VALUE(false, what, ": not valid JSON (", e.what(), ")");
  }
}

template <class Json = nlohmann::ordered_json>
Json parse_json(const std::string& text, const std::string& what, int max_depth = kMaxJsonDepth) {
  return parse_json<Json>(text.data(), text.data() + text.size(), what, max_depth);
}

}  // namespace lorafuse::detail
