// The training jobs' cache of frozen-backbone features, keyed by backbone
// and example: a head-only job on a dataset it has seen before skips the
// forward passes. Bounded by bytes; the least recently used entries go
// first. In memory only (a restart starts empty). Thread-safe: the job
// workers share it.
#ifndef TLSERVE_SERVER_CORE_FEATURE_CACHE_H_
#define TLSERVE_SERVER_CORE_FEATURE_CACHE_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tlserve {

class FeatureCache {
 public:
  // 0 disables the cache.
  explicit FeatureCache(int64_t max_bytes) : max_bytes_(max_bytes) {}

  // The cached tensor (now the most recently used), or an undefined one.
  at::Tensor Get(const std::string& key);
  // Stores (or replaces) `value`, then evicts least recently used entries
  // until the total is within the bound; a value larger than the bound is
  // not stored.
  void Put(const std::string& key, at::Tensor value);

  int64_t bytes() const {
    absl::MutexLock lock(&mu_);
    return bytes_;
  }
  size_t size() const {
    absl::MutexLock lock(&mu_);
    return index_.size();
  }

 private:
  using Entry = std::pair<std::string, at::Tensor>;
  void Erase(std::list<Entry>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t max_bytes_;
  mutable absl::Mutex mu_;
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::list<Entry> lru_ ABSL_GUARDED_BY(mu_);  // most recently used first
  std::unordered_map<std::string, std::list<Entry>::iterator> index_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_FEATURE_CACHE_H_
