// Serves the Prometheus text format on http(s)://ADDRESS/metrics. It stands
// in for prometheus-cpp's civetweb Exposer, which cannot start in a process
// that links LibTorch: civetweb 1.15 (Debian) creates its threads with a fixed
// 100 KiB stack, and glibc refuses such a stack (pthread_create: EINVAL) once
// the static TLS of LibTorch's libraries (OpenBLAS, glog, ...) is loaded.
//
// Connections. One thread accepts; each connection gets a thread of its own
// and kRequestDeadlineMs to finish its TLS handshake (if any) and send its
// request. At most kMaxConnections at once: when full, a new connection
// evicts the oldest one that has still not sent its request, so clients that
// trickle bytes or send nothing cannot keep a scraper (which sends its request
// at once) out. The response gets kSendDeadlineMs.
//
// TLS (Options::tls_cert_file and tls_key_file both set): HTTPS only, TLS 1.2
// or later; a plaintext request is dropped after a failed handshake. The
// certificate file may hold a chain (leaf first); the key must not be
// encrypted. Both files are re-read when their stat (inode, size, mtime)
// changes, looked at by the first connection at most once every
// kReloadCheckMs, so that certificates rotated on disk (cert-manager) are
// served to new connections without a restart. A new pair that does not load
// (half-written, key and certificate not matching yet) is logged as a warning
// and the previous one stays in use until the files change again.
//
// Bearer token (Options::token_file set): every request needs
// `Authorization: Bearer <token>`, else `401 Unauthorized` with
// `WWW-Authenticate: Bearer`. The file holds the token; surrounding whitespace
// is ignored. Tokens are compared by their SHA-256 in constant time. The file
// is re-read like the certificates; an empty or unreadable new version is
// logged as a warning and the last good token stays in use.
//
// Start fails with INVALID_ARGUMENT for an address that is not HOST:PORT,
// only one of the TLS files, a certificate or key that does not parse or a
// pair that does not match, or an empty token file; FAILED_PRECONDITION when a
// file cannot be read; UNAVAILABLE when the address cannot be bound. Messages
// name the file.
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
  struct Options {
    std::string address;  // HOST:PORT; port 0 picks a free one
    // PEM files; both set: HTTPS only. Neither: plain HTTP.
    std::string tls_cert_file;
    std::string tls_key_file;
    // Set: every request needs `Authorization: Bearer <the file's token>`.
    std::string token_file;
  };
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(const Options& options);
  // Plain HTTP on `address`, no token.
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(const std::string& address);
  ~MetricsExposer();
  MetricsExposer(const MetricsExposer&) = delete;
  MetricsExposer& operator=(const MetricsExposer&) = delete;

  static constexpr int kMaxConnections = 8;
  static constexpr int kRequestDeadlineMs = 2000;
  static constexpr int kSendDeadlineMs = 5000;
  static constexpr int kReloadCheckMs = 1000;

  int port() const { return port_; }
  void RegisterCollectable(const std::weak_ptr<prometheus::Collectable>& collectable);

 private:
  class Credentials;  // the TLS context and the token, reloaded from their files

  MetricsExposer(int fd, int port, std::unique_ptr<Credentials> credentials);
  void ServeLoop();
  void Handle(int connection);
  std::string Respond(const std::string& request, const std::string& token_sha256);
  std::string Scrape();

  const int listen_fd_;
  const int port_;
  const std::unique_ptr<Credentials> credentials_;
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
