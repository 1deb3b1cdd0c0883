// Serves the Prometheus text format on http://ADDRESS/metrics. It stands in
// for prometheus-cpp's civetweb Exposer, which cannot start in a process that
// links LibTorch: civetweb 1.15 (Debian) creates its threads with a fixed
// 100 KiB stack, and glibc refuses such a stack (pthread_create: EINVAL) once
// the static TLS of LibTorch's libraries (OpenBLAS, glog, ...) is loaded.
// One thread accepts; each connection gets a thread of its own and
// kRequestDeadlineMs to send its request. At most kMaxConnections at once:
// when full, a new connection evicts the oldest one that has still not sent
// its request, so clients that trickle bytes or send nothing cannot keep a
// scraper (which sends its request at once) out.
//
// Thread-safe. Collectables are held weakly, as prometheus-cpp does.
#ifndef TLSERVE_SERVER_CORE_METRICS_EXPOSER_H_
#define TLSERVE_SERVER_CORE_METRICS_EXPOSER_H_

#include <prometheus/collectable.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tlserve {

class MetricsExposer {
 public:
  // `address` is HOST:PORT; port 0 picks a free one. UNAVAILABLE when the
  // address cannot be bound, INVALID_ARGUMENT when it cannot be parsed.
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(const std::string& address);
  ~MetricsExposer();
  MetricsExposer(const MetricsExposer&) = delete;
  MetricsExposer& operator=(const MetricsExposer&) = delete;

  static constexpr int kMaxConnections = 8;
  static constexpr int kRequestDeadlineMs = 2000;

  int port() const { return port_; }
  void RegisterCollectable(const std::weak_ptr<prometheus::Collectable>& collectable);

 private:
  MetricsExposer(int fd, int port);
  void ServeLoop();
  void Handle(int connection);
  std::string Scrape();

  const int listen_fd_;
  const int port_;
  std::atomic<bool> stopping_{false};
  absl::Mutex mu_;
  std::vector<std::weak_ptr<prometheus::Collectable>> collectables_ ABSL_GUARDED_BY(mu_);
  int connections_ ABSL_GUARDED_BY(mu_) = 0;  // handler threads running
  // Connections still reading their request, by when they started.
  std::map<int, absl::Time> reading_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_METRICS_EXPOSER_H_
