// A minimal check macro for the plugin's C++ tests: prints each failed condition and counts it, so
// one run reports every failure; main() returns non-zero when `failures` > 0.
#pragma once

#include <cstdio>

inline int failures = 0;

#define CHECK(cond)                                               \
  do {                                                            \
    if (!(cond)) {                                                \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                 \
    }                                                             \
  } while (0)
