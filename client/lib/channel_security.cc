#include "client/lib/channel_security.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/client_interceptor.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace tlserve {
namespace {

namespace gx = grpc::experimental;

// Adds "authorization: Bearer TOKEN" to each call's initial metadata.
class BearerTokenInterceptor : public gx::Interceptor {
 public:
  explicit BearerTokenInterceptor(std::string header) : header_(std::move(header)) {}

  void Intercept(gx::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            gx::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      std::multimap<std::string, std::string>* metadata = methods->GetSendInitialMetadata();
      if (metadata->count("authorization") == 0) metadata->emplace("authorization", header_);
    }
    methods->Proceed();
  }

 private:
  const std::string header_;
};

class BearerTokenFactory : public gx::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenFactory(const std::string& token) : header_(absl::StrCat("Bearer ", token)) {}

  gx::Interceptor* CreateClientInterceptor(gx::ClientRpcInfo* /*info*/) override {
    return new BearerTokenInterceptor(header_);
  }

 private:
  const std::string header_;
};

// The file's bytes, which must be PEM; INVALID_ARGUMENT naming `flag` and
// the file otherwise.
absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read ", flag, " file ", path, ": ", std::strerror(errno)));
  }
  std::ostringstream out;
  out << in.rdbuf();
  if (!in && !in.eof()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read ", flag, " file ", path, ": ", std::strerror(errno)));
  }
  std::string pem = out.str();
  if (pem.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " file ", path, " is not PEM (no \"-----BEGIN\" line)"));
  }
  return pem;
}

}  // namespace

absl::StatusOr<ChannelSecurity> ChannelSecurity::FromFiles(std::string token, bool tls,
                                                           const std::string& root_ca_file,
                                                           const std::string& cert_file,
                                                           const std::string& key_file) {
  ChannelSecurity s;
  s.token = std::move(token);
  s.tls = tls || !root_ca_file.empty() || !cert_file.empty() || !key_file.empty();
  for (auto [flag, path, pem] :
       std::vector<std::tuple<const char*, const std::string*, std::string*>>{
           {"--tls_ca", &root_ca_file, &s.root_certificates},
           {"--tls_cert", &cert_file, &s.certificate_chain},
           {"--tls_key", &key_file, &s.private_key}}) {
    if (path->empty()) continue;
    auto bytes = ReadPem(flag, *path);
    if (!bytes.ok()) return bytes.status();
    *pem = std::move(*bytes);
  }
  if (auto v = s.Validate(); !v.ok()) return v;
  return s;
}

absl::Status ChannelSecurity::Validate() const {
  for (char c : token) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "the API key has a character other than printable ASCII (a stray newline?)");
    }
  }
  if (certificate_chain.empty() != private_key.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs its private key and a key its certificate "
        "(--tls_cert and --tls_key go together)");
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::Channel> CreateChannel(const std::string& target,
                                             const ChannelSecurity& security,
                                             const grpc::ChannelArguments& args) {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (security.tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = security.root_certificates;
    ssl.pem_cert_chain = security.certificate_chain;
    ssl.pem_private_key = security.private_key;
    credentials = grpc::SslCredentials(ssl);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  if (security.token.empty()) return grpc::CreateCustomChannel(target, credentials, args);
  std::vector<std::unique_ptr<gx::ClientInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<BearerTokenFactory>(security.token));
  return gx::CreateCustomChannelWithInterceptors(target, credentials, args,
                                                 std::move(interceptors));
}

}  // namespace tlserve
