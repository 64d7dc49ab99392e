// The C++ tests' results: one "[  OK  ] name" or "[ FAIL ] name: detail" line
// per check, and a last line "N passed, M failed" that tests/test_transport_cpp.py
// reads. Header-only; one test binary per translation unit.
#pragma once

#include <cstdio>
#include <string>

namespace fastps_test {

inline int passed = 0;
inline int failed = 0;

inline void report(bool ok, const char* name, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "[  OK  ]" : "[ FAIL ]", name, detail.empty() ? "" : ": ", detail.c_str());
  (ok ? passed : failed) += 1;
}

// Prints the summary line; the exit status of main().
inline int summary() {
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace fastps_test
