// JSON parsing with a nesting bound, for the files lorafuse reads (private to csrc/io).
#pragma once

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>
#include <string>

namespace lorafuse::io::detail {

/// The deepest JSON a reader accepts: deeper nesting would exhaust the stack in dump() and destruction.
constexpr int kMaxJsonDepth = 64;

/// The JSON value in [begin, end), at most kMaxJsonDepth levels deep; a ValueError starting with `what` otherwise.
inline nlohmann::ordered_json parse_json(const char* begin, const char* end, const std::string& what) {
  try {
    return nlohmann::ordered_json::parse(
        begin, end, [&](int depth, nlohmann::ordered_json::parse_event_t, nlohmann::ordered_json&) {
          TORCH_CHECK_VALUE(depth <= kMaxJsonDepth, what, ": JSON nested deeper than ", kMaxJsonDepth, " levels");
          return true;
        });
  } catch (const nlohmann::ordered_json::exception& e) {
    TORCH_CHECK_VALUE(false, what, ": not valid UTF-8 JSON (", e.what(), ")");
  }
}

inline nlohmann::ordered_json parse_json(const std::string& text, const std::string& what) {
  return parse_json(text.data(), text.data() + text.size(), what);
}

}  // namespace lorafuse::io::detail
