// A minimal HTTP GET for tests that scrape /metrics (no curl needed).
#ifndef TLSERVE_TESTS_INTEGRATION_HTTP_GET_H_
#define TLSERVE_TESTS_INTEGRATION_HTTP_GET_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

namespace tlserve::testing {

// The body of http://127.0.0.1:PORT/PATH, or "" when it cannot be fetched.
// `headers`: more request header lines, each ending in \r\n.
inline std::string HttpGet(int port, const std::string& path, const std::string& headers = "") {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n" + headers + "\r\n";
  (void)!::write(fd, req.data(), req.size());
  std::string response;
  char buf[8192];
  for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) > 0;) response.append(buf, n);
  ::close(fd);
  const auto body = response.find("\r\n\r\n");
  return body == std::string::npos ? "" : response.substr(body + 4);
}

}  // namespace tlserve::testing

#endif  // TLSERVE_TESTS_INTEGRATION_HTTP_GET_H_
