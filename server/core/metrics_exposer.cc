#include "server/core/metrics_exposer.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/text_serializer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace tlserve {

absl::StatusOr<std::unique_ptr<MetricsExposer>> MetricsExposer::Start(const std::string& address) {
  const auto colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address \"", address, "\" is not HOST:PORT"));
  }
  std::string host = address.substr(0, colon);
  if (host.empty()) host = "0.0.0.0";
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0 ||
      found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resolve metrics host \"", host, "\""));
  }
  const int fd = ::socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  const bool bound =
      fd >= 0 && ::bind(fd, found->ai_addr, found->ai_addrlen) == 0 && ::listen(fd, 16) == 0;
  const int err = errno;
  freeaddrinfo(found);
  if (!bound) {
    if (fd >= 0) ::close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot listen for metrics on ", address, ": ", std::strerror(err)));
  }
  sockaddr_storage local{};
  socklen_t len = sizeof(local);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len);
  const int actual =
      ntohs(local.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&local)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&local)->sin_port);
  return std::unique_ptr<MetricsExposer>(new MetricsExposer(fd, actual));
}

MetricsExposer::MetricsExposer(int fd, int port) : listen_fd_(fd), port_(port) {
  thread_ = std::thread([this] { ServeLoop(); });
}

MetricsExposer::~MetricsExposer() {
  stopping_ = true;
  thread_.join();
  ::close(listen_fd_);
  // Handlers end within their deadlines; they use `this` until then.
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int* n) { return *n == 0; }, &connections_));
}

void MetricsExposer::RegisterCollectable(const std::weak_ptr<prometheus::Collectable>& c) {
  absl::MutexLock lock(&mu_);
  collectables_.push_back(c);
}

void MetricsExposer::ServeLoop() {
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;  // wake up to notice stopping_
    const int connection = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (connection < 0) continue;
    {
      absl::MutexLock lock(&mu_);
      if (connections_ >= kMaxConnections) {
        if (reading_.empty()) {
          ::close(connection);  // every slot is answering a request: retry
          continue;
        }
        // Make room: the oldest connection still sending its request goes
        // (its thread sees the shutdown and ends).
        auto oldest =
            std::min_element(reading_.begin(), reading_.end(),
                             [](const auto& a, const auto& b) { return a.second < b.second; });
        ::shutdown(oldest->first, SHUT_RDWR);
        reading_.erase(oldest);
      }
      ++connections_;
      reading_[connection] = absl::Now();
    }
    timeval timeout{5, 0};
    ::setsockopt(connection, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    std::thread([this, connection] {
      Handle(connection);
      absl::MutexLock lock(&mu_);
      reading_.erase(connection);  // before close: the number may be reused at once
      ::close(connection);
      --connections_;
    }).detach();
  }
}

void MetricsExposer::Handle(int connection) {
  std::string request;
  char buf[2048];
  const absl::Time deadline = absl::Now() + absl::Milliseconds(kRequestDeadlineMs);
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < 16384) {
    const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
    pollfd p{connection, POLLIN, 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) return;  // too slow: dropped
    const ssize_t n = ::recv(connection, buf, sizeof(buf), 0);
    if (n <= 0) return;
    request.append(buf, static_cast<size_t>(n));
  }
  {
    absl::MutexLock lock(&mu_);
    reading_.erase(connection);  // it has asked: no longer evictable
  }
  std::string status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8", body;
  const bool get = request.rfind("GET ", 0) == 0;
  const std::string path = get ? request.substr(4, request.find(' ', 4) - 4) : "";
  if (!get) {
    status = "405 Method Not Allowed";
    body = "only GET is supported\n";
  } else if (path == "/metrics" || path.rfind("/metrics?", 0) == 0) {
    body = Scrape();
  } else if (path == "/") {
    body = "tlserve metrics: GET /metrics\n";
  } else {
    status = "404 Not Found";
    body = "not found; metrics are at /metrics\n";
  }
  const std::string response =
      absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", type,
                   "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
  size_t sent = 0;
  while (sent < response.size()) {
    const ssize_t n =
        ::send(connection, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;
    sent += static_cast<size_t>(n);
  }
}

std::string MetricsExposer::Scrape() {
  std::vector<prometheus::MetricFamily> families;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& weak : collectables_) {
      if (auto c = weak.lock()) {
        auto more = c->Collect();
        families.insert(families.end(), std::make_move_iterator(more.begin()),
                        std::make_move_iterator(more.end()));
      }
    }
  }
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace tlserve
