// Helpers shared by the libFuzzer targets: LibTorch set up for one thread,
// and a check that stops the fuzzer (a finding) when an invariant is broken.
#ifndef TLSERVE_FUZZ_FUZZ_UTIL_H_
#define TLSERVE_FUZZ_FUZZ_UTIL_H_

#include <ATen/Parallel.h>

#include <cstdio>
#include <cstdlib>

namespace tlserve::fuzz {

// One intra-op thread: the fuzzer runs one input at a time, and LibTorch's
// pools would only add noise (and memory) to every report.
inline void InitTorch() {
  at::set_num_threads(1);
  at::set_num_interop_threads(1);
}

// An invariant the code under test promises; a violation is a finding.
#define TLSERVE_FUZZ_CHECK(cond, ...)                         \
  do {                                                        \
    if (!(cond)) {                                            \
      std::fprintf(stderr, "fuzz check failed: %s: ", #cond); \
      std::fprintf(stderr, __VA_ARGS__);                      \
      std::fprintf(stderr, "\n");                             \
      std::abort();                                           \
    }                                                         \
  } while (0)

}  // namespace tlserve::fuzz

#endif  // TLSERVE_FUZZ_FUZZ_UTIL_H_
