// ServerOptions for an in-process test server: a fixture backbone on the
// CPU with 2 threads, gRPC and metrics on free loopback ports.
#ifndef TLSERVE_TESTS_INTEGRATION_LOOPBACK_OPTIONS_H_
#define TLSERVE_TESTS_INTEGRATION_LOOPBACK_OPTIONS_H_

#include <string>

#include "server/api/server.h"
#include "tests/test_util.h"

namespace tlserve::testing {

inline ServerOptions LoopbackOptions(const std::string& backbone, const std::string& data_dir) {
  ServerOptions o;
  o.backbone.path = Fixture(backbone);
  o.backbone.device = "cpu";
  o.backbone.threads = 2;
  o.embedder.preprocess_threads = 2;
  o.data_dir = data_dir;
  o.grpc_address = "127.0.0.1:0";
  o.metrics_address = "127.0.0.1:0";
  o.min_free_disk_bytes = 32 << 20;  // CI machines have seen less than 512 MB free
  return o;
}

}  // namespace tlserve::testing

#endif  // TLSERVE_TESTS_INTEGRATION_LOOPBACK_OPTIONS_H_
