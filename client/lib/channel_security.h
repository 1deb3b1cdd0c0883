// How a Client reaches a server that asks for TLS or API keys: the channel's
// credentials (plaintext, or TLS against given or system roots, with or
// without a client certificate) and the bearer token sent on every call.
//
// The token travels as metadata added by a channel interceptor, not as gRPC
// call credentials: gRPC refuses to send call credentials over plaintext, and
// a token over plaintext is what a loopback server (or one behind a proxy
// that terminates TLS) needs. Every call made on the channel carries it,
// including calls made with stubs of Client::channel().
#ifndef TLSERVE_CLIENT_LIB_CHANNEL_SECURITY_H_
#define TLSERVE_CLIENT_LIB_CHANNEL_SECURITY_H_

#include <grpcpp/channel.h>
#include <grpcpp/support/channel_arguments.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tlserve {

struct ChannelSecurity {
  // Sent as "authorization: Bearer TOKEN" on every call; empty: no header.
  // A call whose ClientContext already has an "authorization" entry keeps it.
  std::string token;
  // TLS instead of plaintext.
  bool tls = false;
  // PEM: the roots the server's certificate must chain to; empty: the
  // system's roots.
  std::string root_certificates;
  // PEM: the client's certificate chain and its private key, for servers
  // that require client certificates (mTLS); both or neither.
  std::string certificate_chain;
  std::string private_key;

  // Reads the PEM files (empty names: none); naming any file turns TLS on.
  // INVALID_ARGUMENT naming the file that cannot be read, and as Validate().
  static absl::StatusOr<ChannelSecurity> FromFiles(std::string token, bool tls,
                                                   const std::string& root_ca_file,
                                                   const std::string& cert_file,
                                                   const std::string& key_file);

  // INVALID_ARGUMENT if the token has characters a metadata value cannot
  // carry, or only one of certificate_chain and private_key is set.
  absl::Status Validate() const;
};

// A channel to `target` with `security`'s credentials and token. Call
// Validate() first: a token it would refuse makes every call fail.
std::shared_ptr<grpc::Channel> CreateChannel(const std::string& target,
                                             const ChannelSecurity& security,
                                             const grpc::ChannelArguments& args);

}  // namespace tlserve

#endif  // TLSERVE_CLIENT_LIB_CHANNEL_SECURITY_H_
