#include "server/core/metrics_exposer.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <prometheus/counter.h>
#include <prometheus/registry.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace tlserve {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

constexpr char kCounterLine[] = "test_scrapes_total 3";
constexpr char kOk[] = "HTTP/1.1 200 OK";
constexpr char kUnauthorized[] = "HTTP/1.1 401 Unauthorized";

using ClientContext = std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)>;

// What a GET /metrics got back.
struct Reply {
  std::string text;     // the whole response; empty when connecting or the handshake failed
  std::string peer_cn;  // TLS: the common name of the certificate the server showed
};

bool Contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

int Connect(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  timeval timeout{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// GET /metrics with `headers` (each ending in \r\n); HTTPS when `tls` is set.
Reply Get(int port, const std::string& headers = "", SSL_CTX* tls = nullptr) {
  Reply reply;
  const int fd = Connect(port);
  if (fd < 0) return reply;
  const std::string request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + "\r\n";
  char buf[4096];
  if (tls == nullptr) {
    if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) ==
        static_cast<ssize_t>(request.size())) {
      ssize_t n;
      while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) reply.text.append(buf, n);
    }
  } else {
    SSL* ssl = SSL_new(tls);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) == 1) {
      X509* cert = SSL_get1_peer_certificate(ssl);
      char cn[256] = {};
      X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof(cn));
      X509_free(cert);
      reply.peer_cn = cn;
      if (SSL_write(ssl, request.data(), static_cast<int>(request.size())) > 0) {
        int n;
        while ((n = SSL_read(ssl, buf, sizeof(buf))) > 0) reply.text.append(buf, n);
      }
    }
    SSL_free(ssl);
  }
  ::close(fd);
  return reply;
}

// Calls `done` until it returns true; false after 15 s.
bool Eventually(const std::function<bool()>& done) {
  const auto until = steady_clock::now() + std::chrono::seconds(15);
  while (steady_clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(milliseconds(50));
  }
  return false;
}

// Long enough for the exposer to look at its files again at the next connection.
void WaitForReloadCheck() {
  std::this_thread::sleep_for(milliseconds(MetricsExposer::kReloadCheckMs + 100));
}

// Each test gets a directory with a CA (made by the openssl CLI) and a
// registry holding one counter at 3.
class MetricsExposerTest : public testing::Test {
 protected:
  static void SetUpTestSuite() { ::signal(SIGPIPE, SIG_IGN); }

  void SetUp() override {
    std::string dir = (fs::temp_directory_path() / "metrics_exposer_test.XXXXXX").string();
    ASSERT_NE(::mkdtemp(dir.data()), nullptr);
    dir_ = dir;
    registry_ = std::make_shared<prometheus::Registry>();
    prometheus::BuildCounter()
        .Name("test_scrapes_total")
        .Help("scrapes")
        .Register(*registry_)
        .Add({})
        .Increment(3);
    Write(Path("san.ext"), "subjectAltName=IP:127.0.0.1\n");
    Openssl(
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 "
        "-subj /CN=tlserve-test-ca -keyout " +
        Path("ca.key") + " -out " + Path("ca.pem"));
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  static void Write(const std::string& path, const std::string& contents) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << contents;
  }
  static std::string Read(const std::string& path) {
    std::stringstream s;
    s << std::ifstream(path, std::ios::binary).rdbuf();
    return s.str();
  }

  void Openssl(const std::string& arguments) {
    const std::string log = Path("openssl.log");
    const std::string command = "openssl " + arguments + " >" + log + " 2>&1";
    ASSERT_EQ(std::system(command.c_str()), 0) << command << "\n" << Read(log);
  }

  // NAME.pem (for 127.0.0.1, signed by the CA) and NAME.key, a new key.
  void MakeCertificate(const std::string& name, const std::string& cn, int serial) {
    Openssl("req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=" + cn +
            " -keyout " + Path(name + ".key") + " -out " + Path(name + ".csr"));
    Openssl("x509 -req -days 2 -set_serial " + std::to_string(serial) + " -in " +
            Path(name + ".csr") + " -CA " + Path("ca.pem") + " -CAkey " + Path("ca.key") +
            " -extfile " + Path("san.ext") + " -out " + Path(name + ".pem"));
  }

  // TLS options serving server.pem/server.key, made as certificate "metrics-one".
  MetricsExposer::Options TlsOptions() {
    MakeCertificate("one", "metrics-one", 1);
    fs::copy_file(Path("one.pem"), Path("server.pem"));
    fs::copy_file(Path("one.key"), Path("server.key"));
    MetricsExposer::Options options;
    options.address = "127.0.0.1:0";
    options.tls_cert_file = Path("server.pem");
    options.tls_key_file = Path("server.key");
    return options;
  }

  // Trusts the test CA only and checks that the certificate is for 127.0.0.1.
  ClientContext TrustingClient() {
    ClientContext ctx(SSL_CTX_new(TLS_client_method()), SSL_CTX_free);
    EXPECT_EQ(SSL_CTX_load_verify_locations(ctx.get(), Path("ca.pem").c_str(), nullptr), 1);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(ctx.get()), "127.0.0.1");
    return ctx;
  }

  std::unique_ptr<MetricsExposer> StartOrDie(const MetricsExposer::Options& options) {
    auto exposer = MetricsExposer::Start(options);
    EXPECT_TRUE(exposer.ok()) << exposer.status();
    if (!exposer.ok()) return nullptr;
    (*exposer)->RegisterCollectable(registry_);
    return *std::move(exposer);
  }

  std::string dir_;
  std::shared_ptr<prometheus::Registry> registry_;
};

TEST_F(MetricsExposerTest, ServesPlainHttpWithoutTlsOrToken) {
  auto exposer = MetricsExposer::Start("127.0.0.1:0");
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  (*exposer)->RegisterCollectable(registry_);
  const Reply reply = Get((*exposer)->port());
  EXPECT_TRUE(Contains(reply.text, kOk)) << reply.text;
  EXPECT_TRUE(Contains(reply.text, kCounterLine)) << reply.text;
}

TEST_F(MetricsExposerTest, ServesHttpsToAClientThatVerifiesTheCertificate) {
  auto exposer = StartOrDie(TlsOptions());
  ASSERT_NE(exposer, nullptr);
  ClientContext client = TrustingClient();
  const Reply reply = Get(exposer->port(), "", client.get());
  EXPECT_EQ(reply.peer_cn, "metrics-one");
  EXPECT_TRUE(Contains(reply.text, kOk)) << reply.text;
  EXPECT_TRUE(Contains(reply.text, kCounterLine)) << reply.text;
}

TEST_F(MetricsExposerTest, PlaintextRequestToTheTlsPortGetsNoMetrics) {
  auto exposer = StartOrDie(TlsOptions());
  ASSERT_NE(exposer, nullptr);
  const Reply plain = Get(exposer->port());
  EXPECT_FALSE(Contains(plain.text, kOk)) << plain.text;
  EXPECT_FALSE(Contains(plain.text, "test_scrapes_total")) << plain.text;
  ClientContext client = TrustingClient();
  EXPECT_TRUE(Contains(Get(exposer->port(), "", client.get()).text, kCounterLine));
}

TEST_F(MetricsExposerTest, AnswersOnlyRequestsWithTheBearerToken) {
  Write(Path("token"), "  s3cret-token\n");
  MetricsExposer::Options options;
  options.address = "127.0.0.1:0";
  options.token_file = Path("token");
  auto exposer = StartOrDie(options);
  ASSERT_NE(exposer, nullptr);
  const int port = exposer->port();

  const Reply none = Get(port);
  EXPECT_TRUE(Contains(none.text, kUnauthorized)) << none.text;
  EXPECT_TRUE(Contains(none.text, "\r\nWWW-Authenticate: Bearer")) << none.text;
  EXPECT_FALSE(Contains(none.text, "test_scrapes_total")) << none.text;
  for (const std::string wrong : {"Bearer wrong", "Bearer s3cret-tokem", "Bearer s3cret-token2",
                                  "Bearer ", "Basic czNjcmV0LXRva2Vu", "s3cret-token"}) {
    const Reply reply = Get(port, "Authorization: " + wrong + "\r\n");
    EXPECT_TRUE(Contains(reply.text, kUnauthorized)) << wrong << ": " << reply.text;
    EXPECT_FALSE(Contains(reply.text, "test_scrapes_total")) << wrong;
  }
  const Reply right = Get(port, "Authorization: Bearer s3cret-token\r\n");
  EXPECT_TRUE(Contains(right.text, kOk)) << right.text;
  EXPECT_TRUE(Contains(right.text, kCounterLine)) << right.text;
  // Header names and the scheme are case-insensitive (RFC 9110).
  EXPECT_TRUE(Contains(Get(port, "authorization: bearer s3cret-token\r\n").text, kCounterLine));
}

TEST_F(MetricsExposerTest, RewrittenTokenFileReplacesTheTokenAndAnEmptyOneIsIgnored) {
  Write(Path("token"), "first-token\n");
  MetricsExposer::Options options;
  options.address = "127.0.0.1:0";
  options.token_file = Path("token");
  auto exposer = StartOrDie(options);
  ASSERT_NE(exposer, nullptr);
  const int port = exposer->port();
  const std::string first = "Authorization: Bearer first-token\r\n";
  const std::string second = "Authorization: Bearer second-token-longer\r\n";
  ASSERT_TRUE(Contains(Get(port, first).text, kOk));

  // Half-way through a rewrite: the file is empty. The last good token stays.
  Write(Path("token"), "");
  WaitForReloadCheck();
  EXPECT_TRUE(Contains(Get(port).text, kUnauthorized)) << "an empty file disabled the token";
  EXPECT_TRUE(Contains(Get(port, first).text, kOk));

  Write(Path("token"), "second-token-longer\n");
  EXPECT_TRUE(Eventually([&] { return Contains(Get(port, second).text, kOk); }))
      << "the new token was never accepted";
  EXPECT_TRUE(Contains(Get(port, first).text, kUnauthorized));
}

TEST_F(MetricsExposerTest, ReplacedCertificateIsServedToNewConnections) {
  auto exposer = StartOrDie(TlsOptions());
  ASSERT_NE(exposer, nullptr);
  ClientContext client = TrustingClient();
  ASSERT_EQ(Get(exposer->port(), "", client.get()).peer_cn, "metrics-one");

  MakeCertificate("two", "metrics-two-rotated", 2);
  Write(Path("server.pem"), Read(Path("two.pem")));
  Write(Path("server.key"), Read(Path("two.key")));
  Reply reply;
  EXPECT_TRUE(Eventually([&] {
    reply = Get(exposer->port(), "", client.get());
    return reply.peer_cn == "metrics-two-rotated";
  })) << "still served: "
      << reply.peer_cn;
  EXPECT_TRUE(Contains(reply.text, kCounterLine)) << reply.text;
}

TEST_F(MetricsExposerTest, BrokenReplacementKeepsTheCertificateInUse) {
  auto exposer = StartOrDie(TlsOptions());
  ASSERT_NE(exposer, nullptr);
  ClientContext client = TrustingClient();
  const int port = exposer->port();
  MakeCertificate("two", "metrics-two-rotated", 2);
  const std::string two = Read(Path("two.pem"));

  Write(Path("server.pem"), two.substr(0, two.size() / 2));  // half-written
  WaitForReloadCheck();
  Reply reply = Get(port, "", client.get());
  EXPECT_EQ(reply.peer_cn, "metrics-one");
  EXPECT_TRUE(Contains(reply.text, kCounterLine)) << reply.text;

  Write(Path("server.pem"), two);  // the key is still the old one: no pair yet
  WaitForReloadCheck();
  reply = Get(port, "", client.get());
  EXPECT_EQ(reply.peer_cn, "metrics-one");
  EXPECT_TRUE(Contains(reply.text, kCounterLine)) << reply.text;

  Write(Path("server.key"), Read(Path("two.key")));
  EXPECT_TRUE(
      Eventually([&] { return Get(port, "", client.get()).peer_cn == "metrics-two-rotated"; }));
}

TEST_F(MetricsExposerTest, SilentConnectionsDoNotHoldUpAScrape) {
  auto exposer = StartOrDie(TlsOptions());
  ASSERT_NE(exposer, nullptr);
  ClientContext client = TrustingClient();
  // More silent TCP connections than slots: neither their handshakes nor
  // their requests ever come.
  std::vector<int> silent;
  for (int i = 0; i < MetricsExposer::kMaxConnections + 2; ++i) {
    const int fd = Connect(exposer->port());
    ASSERT_GE(fd, 0);
    silent.push_back(fd);
  }
  const auto start = steady_clock::now();
  const Reply reply = Get(exposer->port(), "", client.get());
  const auto took = std::chrono::duration_cast<milliseconds>(steady_clock::now() - start);
  EXPECT_TRUE(Contains(reply.text, kCounterLine)) << reply.text;
  // Had a silent connection's handshake held the accept thread, the scrape
  // would have waited out at least one request deadline.
  EXPECT_LT(took.count(), MetricsExposer::kRequestDeadlineMs);
  for (int fd : silent) ::close(fd);
}

TEST_F(MetricsExposerTest, StartFailsOnFilesItCannotUse) {
  MetricsExposer::Options options = TlsOptions();
  MakeCertificate("two", "metrics-two-rotated", 2);

  MetricsExposer::Options missing = options;
  missing.tls_cert_file = Path("missing.pem");
  auto started = MetricsExposer::Start(missing);
  EXPECT_EQ(started.status().code(), absl::StatusCode::kFailedPrecondition) << started.status();
  EXPECT_TRUE(Contains(std::string(started.status().message()), Path("missing.pem")));

  MetricsExposer::Options mismatched = options;
  mismatched.tls_key_file = Path("two.key");
  started = MetricsExposer::Start(mismatched);
  EXPECT_EQ(started.status().code(), absl::StatusCode::kInvalidArgument) << started.status();
  EXPECT_TRUE(Contains(std::string(started.status().message()), Path("two.key")));

  Write(Path("garbage.pem"), "not a certificate\n");
  MetricsExposer::Options garbage = options;
  garbage.tls_cert_file = Path("garbage.pem");
  started = MetricsExposer::Start(garbage);
  EXPECT_EQ(started.status().code(), absl::StatusCode::kInvalidArgument) << started.status();
  EXPECT_TRUE(Contains(std::string(started.status().message()), Path("garbage.pem")));

  MetricsExposer::Options cert_only = options;
  cert_only.tls_key_file.clear();
  EXPECT_EQ(MetricsExposer::Start(cert_only).status().code(), absl::StatusCode::kInvalidArgument);

  MetricsExposer::Options token;
  token.address = "127.0.0.1:0";
  token.token_file = Path("missing-token");
  started = MetricsExposer::Start(token);
  EXPECT_EQ(started.status().code(), absl::StatusCode::kFailedPrecondition) << started.status();
  EXPECT_TRUE(Contains(std::string(started.status().message()), Path("missing-token")));
  Write(Path("empty-token"), " \n");
  token.token_file = Path("empty-token");
  started = MetricsExposer::Start(token);
  EXPECT_EQ(started.status().code(), absl::StatusCode::kInvalidArgument) << started.status();
  EXPECT_TRUE(Contains(std::string(started.status().message()), Path("empty-token")));

  EXPECT_TRUE(MetricsExposer::Start(options).ok());
}

}  // namespace
}  // namespace tlserve
