#include "server/core/feature_cache.h"

namespace tlserve {
namespace {
int64_t Bytes(const at::Tensor& t) { return static_cast<int64_t>(t.numel() * t.element_size()); }
}  // namespace

at::Tensor FeatureCache::Get(const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return {};
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->second;
}

void FeatureCache::Put(const std::string& key, at::Tensor value) {
  absl::MutexLock lock(&mu_);
  if (auto it = index_.find(key); it != index_.end()) Erase(it->second);
  const int64_t size = Bytes(value);
  if (size > max_bytes_) return;
  lru_.emplace_front(key, std::move(value));
  index_[key] = lru_.begin();
  bytes_ += size;
  while (bytes_ > max_bytes_) Erase(std::prev(lru_.end()));
}

void FeatureCache::Erase(std::list<Entry>::iterator it) {
  bytes_ -= Bytes(it->second);
  index_.erase(it->first);
  lru_.erase(it);
}

}  // namespace tlserve
