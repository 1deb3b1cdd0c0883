#!/usr/bin/env bash
# The checking builds, run by scripts/test.sh (so by CI) after the normal tests:
#   asan  clang build in build-asan/ with ASan + UBSan (and libFuzzer coverage),
#         then the C++ tests (CTest label `sanitize`) under it;
#   fuzz  each fuzzer in fuzz/ from that tree for FUZZ_SECONDS (default 60),
#         seeded from fuzz/corpus/<fuzzer>/; a crash is saved in fuzz/crashes/<fuzzer>/;
#   tsa   clang -Wthread-safety -Werror (TLSERVE_THREAD_SAFETY) over every C++ file
#         of build-tsa/ with -fsyntax-only (no code generated: the locking is
#         checked by the front end, and a full clang build would take longer);
#         tests and benchmarks only where they take locks (scripts/syntax_check.py).
# Exit status 0 only when every phase passes; all phases run even if one fails.
#   scripts/sanitize.sh [asan|fuzz|tsa ...]     (default: all three)
#   TLSERVE_SKIP_SANITIZE=1 skips everything (for a quick local scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${TLSERVE_SKIP_SANITIZE:-0}" = 1 ]; then
  echo "sanitize: skipped (TLSERVE_SKIP_SANITIZE=1)" >&2
  exit 0
fi
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(asan fuzz tsa)
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
CXX_CLANG=${CXX_CLANG:-clang++-14}
export ASAN_SYMBOLIZER_PATH=${ASAN_SYMBOLIZER_PATH:-$(command -v llvm-symbolizer-14 || true)}
SUPP=$PWD/scripts/sanitizers
# Low priority: this machine is shared with whoever is working on it.
NICE=(nice -n 19)

declare -A took status
failed=0
run_phase() {
  local name=$1 start=$SECONDS
  echo "=== sanitize: $name" >&2
  if "phase_$name"; then status[$name]=ok; else status[$name]=FAILED; failed=1; fi
  took[$name]=$((SECONDS - start))
  echo "=== sanitize: $name ${status[$name]} in ${took[$name]}s" >&2
}

phase_asan() {
  # -O1 with asserts (no NDEBUG), line tables for symbolized reports.
  if [ ! -f build-asan/build.ninja ]; then
    "${NICE[@]}" cmake -S . -B build-asan -G Ninja -DCMAKE_CXX_COMPILER="$CXX_CLANG" \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 \
      -DTLSERVE_SANITIZE=address,undefined -DTLSERVE_FUZZ=ON >/dev/null || return 1
  fi
  "${NICE[@]}" cmake --build build-asan || return 1
  # The options (ASAN_OPTIONS, UBSAN_OPTIONS, LSAN_OPTIONS) are set per test
  # by tests/CMakeLists.txt from TLSERVE_SANITIZER_ENV.
  (cd build-asan && "${NICE[@]}" ctest -L sanitize --output-on-failure --timeout 1200)
}

phase_fuzz() {
  [ -d build-asan/bin ] || { echo "fuzz: build-asan/ is not built (run the asan phase)" >&2; return 1; }
  local ok=0 f name work crashes
  for f in fuzz/corpus/*/; do
    name=$(basename "$f")
    [ -x "build-asan/bin/$name" ] || { echo "fuzz: no build-asan/bin/$name" >&2; ok=1; continue; }
    work=build-asan/fuzz-corpus/$name
    crashes=fuzz/crashes/$name
    mkdir -p "$work" "$crashes"
    # Small memory and time per input: the fuzzers use 1<<20-pixel budgets,
    # so anything bigger or slower is itself a finding. Leaks are not checked
    # per input (LibTorch keeps caches that LSan would count); the asan test
    # phase checks leaks at exit.
    if ! ASAN_OPTIONS=halt_on_error=1:detect_leaks=0:allocator_may_return_null=0 \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:suppressions=$SUPP/ubsan.supp \
      "${NICE[@]}" "build-asan/bin/$name" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2560 \
      -timeout=30 -print_final_stats=1 -artifact_prefix="$crashes/" "$work" "$f" \
      >"build-asan/fuzz-$name.log" 2>&1; then
      echo "fuzz: $name FOUND A BUG; reproducer in $crashes/, log build-asan/fuzz-$name.log:" >&2
      grep -E "ERROR|runtime error|fuzz check failed|SUMMARY|Test unit written" \
        "build-asan/fuzz-$name.log" | head -20 >&2
      ok=1
    else
      echo "fuzz: $name $(grep -E '^stat::number_of_executed_units' "build-asan/fuzz-$name.log" |
        awk '{print $2}') inputs in ${FUZZ_SECONDS}s, no finding" >&2
      rmdir "$crashes" 2>/dev/null || true
    fi
  done
  return $ok
}

phase_tsa() {
  # A configured tree gives the exact flags of every file (compile_commands.json).
  # Precompiled headers are off: -fsyntax-only makes no .pch.
  if [ ! -f build-tsa/build.ninja ]; then
    "${NICE[@]}" cmake -S . -B build-tsa -G Ninja -DCMAKE_CXX_COMPILER="$CXX_CLANG" \
      -DCMAKE_BUILD_TYPE=Debug -DCMAKE_DISABLE_PRECOMPILE_HEADERS=ON \
      -DTLSERVE_THREAD_SAFETY=ON >/dev/null || return 1
  fi
  # The generated protobuf headers are the only build outputs own files include.
  "${NICE[@]}" cmake --build build-tsa --target tlserve_proto_headers || return 1
  /usr/bin/python3 scripts/syntax_check.py build-tsa/compile_commands.json
}

for p in "${phases[@]}"; do run_phase "$p"; done
summary=""
for p in "${phases[@]}"; do summary+=" $p ${status[$p]} ${took[$p]}s;"; done
echo "sanitize:${summary%;}" >&2
exit $failed
