// The native harnesses' checks (test/native/*_check.cc): each is counted, a failed one printed with the program's
// name; the harness prints the totals and exits 1 when any failed.
#pragma once

#include <cstdio>
#include <string>

namespace skv_check {

inline int failures = 0, checks = 0;
inline const char* program = "check";

inline void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "%s: FAILED: %s\n", program, what.c_str());
  }
}

}  // namespace skv_check
