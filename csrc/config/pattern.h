// Regular expressions as Python's re module reads the ones PEFT configs hold (private to csrc/config): PCRE2, the
// maintained Perl-compatible library (Debian's libpcre2-dev), takes what std::regex's ECMAScript grammar rejects and
// PEFT users write: (?i), lookbehinds, (?P<name>...), possessive and atomic groups, \A. Unicode classes as Python's
// (PCRE2_UCP). Known differences from Python 3.11's re: \Z also matches before a final newline, and PCRE2 10.42 reads
// x{,n} as literal text (Python: zero to n times).
#pragma once

#include <memory>
#include <string>

namespace lorafuse::detail {

class Pattern {
 public:
  /// The compiled `regex` (compiled once and cached, thread-safe); a ValueError naming `field` and the library's
  /// reason when it is not a valid regular expression.
  static std::shared_ptr<const Pattern> compile(const std::string& regex, const char* field);
  ~Pattern();
  Pattern(const Pattern&) = delete;
  Pattern& operator=(const Pattern&) = delete;

  /// Python's re.fullmatch(regex, s).
  bool fullmatch(const std::string& s) const;
  /// Python's re.match(regex, s) (anchored at the start only); `group` gets the text of the group named `name` (the
  /// first group when `name` is null; "" when it took no part) when given.
  bool match(const std::string& s, std::string* group = nullptr, const char* name = nullptr) const;

 private:
  explicit Pattern(void* code) : code_(code) {}
  bool run(const std::string& s, unsigned options, std::string* group, const char* name) const;
  void* code_;  // pcre2_code_8*
};

}  // namespace lorafuse::detail
