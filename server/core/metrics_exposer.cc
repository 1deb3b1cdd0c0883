#include "server/core/metrics_exposer.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <prometheus/text_serializer.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "server/core/log.h"

namespace tlserve {
namespace {

// What stat(2) says of a file; rewriting or replacing the file changes it. A
// missing file has the default stamp.
struct FileStamp {
  dev_t device = 0;
  ino_t inode = 0;
  off_t size = 0;
  int64_t mtime_ns = 0;
  bool operator==(const FileStamp& o) const {
    return device == o.device && inode == o.inode && size == o.size && mtime_ns == o.mtime_ns;
  }
  bool operator!=(const FileStamp& o) const { return !(*this == o); }
};

FileStamp Stamp(const std::string& path) {
  struct stat s {};
  if (::stat(path.c_str(), &s) != 0) return {};
  return {s.st_dev, s.st_ino, s.st_size,
          int64_t{s.st_mtim.tv_sec} * 1000000000 + s.st_mtim.tv_nsec};
}

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  std::string contents;
  char buf[4096];
  ssize_t n = fd < 0 ? -1 : 0;
  while (fd >= 0 && (n = ::read(fd, buf, sizeof(buf))) > 0) contents.append(buf, n);
  const int err = errno;
  if (fd >= 0) ::close(fd);
  if (n < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot read ", what, " \"", path, "\": ", std::strerror(err)));
  }
  return contents;
}

// The reason of OpenSSL's latest error on this thread; clears them all.
std::string OpenSslError() {
  const char* reason = ERR_reason_error_string(ERR_peek_last_error());
  ERR_clear_error();
  return reason != nullptr ? reason : "no further detail";
}

// Encrypted keys are refused instead of asking for a passphrase on the tty.
int NoPassphrase(char*, int, int, void*) { return -1; }

template <typename T, void (*Free)(T*)>
using OpenSslPtr = std::unique_ptr<T, std::integral_constant<decltype(Free), Free>>;

absl::StatusOr<std::shared_ptr<SSL_CTX>> LoadTlsContext(const std::string& cert_file,
                                                        const std::string& key_file) {
  auto cert_pem = ReadFile(cert_file, "metrics TLS certificate");
  if (!cert_pem.ok()) return cert_pem.status();
  auto key_pem = ReadFile(key_file, "metrics TLS key");
  if (!key_pem.ok()) return key_pem.status();
  ERR_clear_error();
  std::shared_ptr<SSL_CTX> ctx(SSL_CTX_new(TLS_server_method()), SSL_CTX_free);
  if (ctx == nullptr) return absl::InternalError("SSL_CTX_new: " + OpenSslError());
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_RENEGOTIATION);

  const auto bad_cert = [&](absl::string_view problem) {
    return absl::InvalidArgumentError(absl::StrCat("metrics TLS certificate \"", cert_file, "\" ",
                                                   problem, ": ", OpenSslError()));
  };
  OpenSslPtr<BIO, BIO_free_all> cert_bio(BIO_new_mem_buf(cert_pem->data(), cert_pem->size()));
  OpenSslPtr<X509, X509_free> leaf(
      PEM_read_bio_X509_AUX(cert_bio.get(), nullptr, NoPassphrase, nullptr));
  if (leaf == nullptr) return bad_cert("holds no PEM certificate");
  if (SSL_CTX_use_certificate(ctx.get(), leaf.get()) != 1) return bad_cert("is not usable");
  // The rest of the file is the chain; it ends where no PEM block starts, and
  // a block that starts but does not parse (a half-written file) is an error.
  while (X509* more = PEM_read_bio_X509(cert_bio.get(), nullptr, NoPassphrase, nullptr)) {
    if (SSL_CTX_add0_chain_cert(ctx.get(), more) != 1) {
      X509_free(more);
      return bad_cert("has an unusable chain certificate");
    }
  }
  const unsigned long end = ERR_peek_last_error();
  if (ERR_GET_LIB(end) != ERR_LIB_PEM || ERR_GET_REASON(end) != PEM_R_NO_START_LINE) {
    return bad_cert("has a chain certificate that does not parse");
  }
  ERR_clear_error();

  OpenSslPtr<BIO, BIO_free_all> key_bio(BIO_new_mem_buf(key_pem->data(), key_pem->size()));
  OpenSslPtr<EVP_PKEY, EVP_PKEY_free> key(
      PEM_read_bio_PrivateKey(key_bio.get(), nullptr, NoPassphrase, nullptr));
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics TLS key \"", key_file,
                     "\" holds no unencrypted PEM private key: ", OpenSslError()));
  }
  if (X509_check_private_key(leaf.get(), key.get()) != 1 ||
      SSL_CTX_use_PrivateKey(ctx.get(), key.get()) != 1 ||
      SSL_CTX_check_private_key(ctx.get()) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("metrics TLS key \"", key_file,
                                                   "\" does not match the certificate \"",
                                                   cert_file, "\": ", OpenSslError()));
  }
  return ctx;
}

std::string Sha256(absl::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(data.data(), data.size(), digest, &size, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(digest), size);
}

absl::StatusOr<std::string> LoadTokenSha256(const std::string& path) {
  auto contents = ReadFile(path, "metrics token file");
  if (!contents.ok()) return contents.status();
  const absl::string_view token = absl::StripAsciiWhitespace(*contents);
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("metrics token file \"", path, "\" is empty"));
  }
  return Sha256(token);
}

// Whether the request's Authorization header carries the bearer token whose
// SHA-256 is `token_sha256`. Equal-length digests, compared in constant time,
// say nothing of the token's length or of where a guess goes wrong.
bool HasBearerToken(absl::string_view request, const std::string& token_sha256) {
  std::vector<absl::string_view> lines =
      absl::StrSplit(request.substr(0, request.find("\r\n\r\n")), "\r\n");
  for (size_t i = 1; i < lines.size(); ++i) {  // lines[0] is the request line
    const size_t colon = lines[i].find(':');
    if (colon == absl::string_view::npos ||
        !absl::EqualsIgnoreCase(lines[i].substr(0, colon), "authorization")) {
      continue;
    }
    const absl::string_view value = absl::StripAsciiWhitespace(lines[i].substr(colon + 1));
    const size_t space = std::min(value.find_first_of(" \t"), value.size());
    if (!absl::EqualsIgnoreCase(value.substr(0, space), "bearer")) return false;
    const std::string presented = Sha256(absl::StripAsciiWhitespace(value.substr(space)));
    return presented.size() == token_sha256.size() &&
           CRYPTO_memcmp(presented.data(), token_sha256.data(), presented.size()) == 0;
  }
  return false;
}

// One accepted connection, plain or TLS, on a non-blocking socket: every
// operation ends by its deadline, so neither a silent client nor one that
// trickles its handshake holds the connection's thread longer.
class Connection {
 public:
  explicit Connection(int fd) : fd_(fd) {}
  ~Connection() { SSL_free(ssl_); }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // The server side of a TLS handshake; from then on reads and writes are TLS.
  bool StartTls(SSL_CTX* ctx, absl::Time deadline) {
    ERR_clear_error();
    ssl_ = SSL_new(ctx);
    if (ssl_ == nullptr || SSL_set_fd(ssl_, fd_) != 1) return false;
    for (;;) {
      ERR_clear_error();
      const int r = SSL_accept(ssl_);
      if (r == 1) return true;
      if (!WaitForTls(r, deadline)) return false;
    }
  }

  // Reads some bytes into `buf`; 0 at the end of the stream, on an error or at
  // the deadline.
  size_t Read(char* buf, size_t size, absl::Time deadline) {
    for (;;) {
      if (ssl_ != nullptr) {
        ERR_clear_error();
        size_t n = 0;
        const int r = SSL_read_ex(ssl_, buf, size, &n);
        if (r == 1) return n;
        if (!WaitForTls(r, deadline)) return 0;
      } else {
        const ssize_t n = ::recv(fd_, buf, size, 0);
        if (n >= 0) return static_cast<size_t>(n);
        if (!Retryable() || !WaitFor(POLLIN, deadline)) return 0;
      }
    }
  }

  bool WriteAll(absl::string_view data, absl::Time deadline) {
    while (!data.empty()) {
      if (ssl_ != nullptr) {
        ERR_clear_error();
        size_t n = 0;
        const int r = SSL_write_ex(ssl_, data.data(), data.size(), &n);
        if (r == 1) {
          data.remove_prefix(n);
        } else if (!WaitForTls(r, deadline)) {
          return false;
        }
      } else {
        const ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
        if (n >= 0) {
          data.remove_prefix(static_cast<size_t>(n));
        } else if (!Retryable() || !WaitFor(POLLOUT, deadline)) {
          return false;
        }
      }
    }
    return true;
  }

  // Sends TLS's close_notify (without waiting for the client's).
  void Finish() {
    if (ssl_ == nullptr) return;
    ERR_clear_error();
    SSL_shutdown(ssl_);
  }

 private:
  static bool Retryable() { return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR; }

  // After an SSL_* call returned `result`: waits for what it needs.
  bool WaitForTls(int result, absl::Time deadline) {
    switch (SSL_get_error(ssl_, result)) {
      case SSL_ERROR_WANT_READ:
        return WaitFor(POLLIN, deadline);
      case SSL_ERROR_WANT_WRITE:
        return WaitFor(POLLOUT, deadline);
      default:
        ERR_clear_error();
        return false;
    }
  }

  bool WaitFor(short events, absl::Time deadline) {
    for (;;) {
      const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (left <= 0) return false;
      pollfd p{fd_, events, 0};
      const int n = ::poll(&p, 1, static_cast<int>(left));
      if (n > 0) return true;
      if (n == 0 || errno != EINTR) return false;
    }
  }

  const int fd_;
  SSL* ssl_ = nullptr;
};

}  // namespace

// The TLS context and the token's digest, as their files last said.
class MetricsExposer::Credentials {
 public:
  static absl::StatusOr<std::unique_ptr<Credentials>> Load(const Options& options) {
    if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
      return absl::InvalidArgumentError(
          "metrics TLS needs both a certificate file and a key file, or neither");
    }
    std::unique_ptr<Credentials> c(new Credentials(options));
    absl::MutexLock lock(&c->mu_);
    if (!options.tls_cert_file.empty()) {
      // Stamped before reading: a change while reading is seen at the next check.
      c->tls_stamps_ = {Stamp(options.tls_cert_file), Stamp(options.tls_key_file)};
      auto tls = LoadTlsContext(options.tls_cert_file, options.tls_key_file);
      if (!tls.ok()) return tls.status();
      c->tls_ = *std::move(tls);
    }
    if (!options.token_file.empty()) {
      c->token_stamp_ = Stamp(options.token_file);
      auto token = LoadTokenSha256(options.token_file);
      if (!token.ok()) return token.status();
      c->token_sha256_ = *std::move(token);
    }
    c->next_check_ = absl::Now() + absl::Milliseconds(kReloadCheckMs);
    return c;
  }

  struct Current {
    std::shared_ptr<SSL_CTX> tls;  // null: plain HTTP
    std::string token_sha256;      // empty: no token needed
  };
  // What a new connection uses. Re-reads files that changed, looking at most
  // once every kReloadCheckMs; connections arriving meanwhile wait (a reload
  // reads two small files).
  Current Get() {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    if (now >= next_check_) {
      next_check_ = now + absl::Milliseconds(kReloadCheckMs);
      ReloadChangedFiles();
    }
    return {tls_, token_sha256_};
  }

 private:
  explicit Credentials(const Options& options) : options_(options) {}

  // A pair or token that fails to load is tried again once its files change.
  void ReloadChangedFiles() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (tls_ != nullptr) {
      const std::pair<FileStamp, FileStamp> stamps = {Stamp(options_.tls_cert_file),
                                                      Stamp(options_.tls_key_file)};
      if (stamps != tls_stamps_) {
        tls_stamps_ = stamps;
        auto tls = LoadTlsContext(options_.tls_cert_file, options_.tls_key_file);
        if (tls.ok()) {
          tls_ = *std::move(tls);
          LogInfo("metrics: TLS certificate reloaded from %s", options_.tls_cert_file);
        } else {
          LogWarning("metrics: still serving the previous TLS certificate: %s",
                     tls.status().message());
        }
      }
    }
    if (!token_sha256_.empty()) {
      const FileStamp stamp = Stamp(options_.token_file);
      if (stamp != token_stamp_) {
        token_stamp_ = stamp;
        auto token = LoadTokenSha256(options_.token_file);
        if (token.ok()) {
          token_sha256_ = *std::move(token);
          LogInfo("metrics: bearer token reloaded from %s", options_.token_file);
        } else {
          LogWarning("metrics: still using the previous bearer token: %s",
                     token.status().message());
        }
      }
    }
  }

  const Options options_;
  absl::Mutex mu_;
  absl::Time next_check_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<SSL_CTX> tls_ ABSL_GUARDED_BY(mu_);
  std::pair<FileStamp, FileStamp> tls_stamps_ ABSL_GUARDED_BY(mu_);  // of the last pair tried
  std::string token_sha256_ ABSL_GUARDED_BY(mu_);
  FileStamp token_stamp_ ABSL_GUARDED_BY(mu_);  // of the last token tried
};

absl::StatusOr<std::unique_ptr<MetricsExposer>> MetricsExposer::Start(const std::string& address) {
  Options options;
  options.address = address;
  return Start(options);
}

absl::StatusOr<std::unique_ptr<MetricsExposer>> MetricsExposer::Start(const Options& options) {
  const std::string& address = options.address;
  const auto colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address \"", address, "\" is not HOST:PORT"));
  }
  auto credentials = Credentials::Load(options);
  if (!credentials.ok()) return credentials.status();
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
  return std::unique_ptr<MetricsExposer>(new MetricsExposer(fd, actual, *std::move(credentials)));
}

MetricsExposer::MetricsExposer(int fd, int port, std::unique_ptr<Credentials> credentials)
    : listen_fd_(fd), port_(port), credentials_(std::move(credentials)) {
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
  // OpenSSL writes with write(2): a client gone away must not raise SIGPIPE.
  // Handler threads inherit the mask; a SIGPIPE kept pending in one is
  // discarded when it ends.
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;  // wake up to notice stopping_
    const int connection = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (connection < 0) continue;
    {
      absl::MutexLock lock(&mu_);
      if (connections_ >= kMaxConnections) {
        if (reading_.empty()) {
          ::close(connection);  // every slot is answering a request: retry
          continue;
        }
        // Make room: the oldest connection still sending its request (or its
        // TLS handshake) goes (its thread sees the shutdown and ends).
        auto oldest =
            std::min_element(reading_.begin(), reading_.end(),
                             [](const auto& a, const auto& b) { return a.second < b.second; });
        ::shutdown(oldest->first, SHUT_RDWR);
        reading_.erase(oldest);
      }
      ++connections_;
      reading_[connection] = absl::Now();
    }
    std::thread([this, connection] {
      Handle(connection);
      absl::MutexLock lock(&mu_);
      reading_.erase(connection);  // before close: the number may be reused at once
      ::close(connection);
      --connections_;
    }).detach();
  }
}

void MetricsExposer::Handle(int fd) {
  const absl::Time deadline = absl::Now() + absl::Milliseconds(kRequestDeadlineMs);
  const Credentials::Current credentials = credentials_->Get();
  Connection connection(fd);
  if (credentials.tls != nullptr && !connection.StartTls(credentials.tls.get(), deadline)) return;
  std::string request;
  char buf[2048];
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < 16384) {
    const size_t n = connection.Read(buf, sizeof(buf), deadline);
    if (n == 0) return;  // closed, broken, too slow or evicted: dropped
    request.append(buf, n);
  }
  {
    absl::MutexLock lock(&mu_);
    reading_.erase(fd);  // it has asked: no longer evictable
  }
  const std::string response = Respond(request, credentials.token_sha256);
  if (connection.WriteAll(response, absl::Now() + absl::Milliseconds(kSendDeadlineMs))) {
    connection.Finish();
  }
}

std::string MetricsExposer::Respond(const std::string& request, const std::string& token_sha256) {
  std::string status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8", headers, body;
  const bool get = request.rfind("GET ", 0) == 0;
  const std::string path = get ? request.substr(4, request.find(' ', 4) - 4) : "";
  if (!token_sha256.empty() && !HasBearerToken(request, token_sha256)) {
    status = "401 Unauthorized";
    headers = "WWW-Authenticate: Bearer\r\n";
    body = "a bearer token is required\n";
  } else if (!get) {
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
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", type, "\r\n", headers,
                      "Content-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
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
