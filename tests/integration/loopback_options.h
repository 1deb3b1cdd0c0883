// ServerOptions for an in-process test server: a fixture backbone on
// TestDevice() ($TLSERVE_TEST_DEVICE, default cpu) with 2 threads, gRPC on a
// free loopback port (:0) and metrics on a concrete free one (FreePort()).
#ifndef TLSERVE_TESTS_INTEGRATION_LOOPBACK_OPTIONS_H_
#define TLSERVE_TESTS_INTEGRATION_LOOPBACK_OPTIONS_H_

#include <string>

#include "absl/strings/str_cat.h"
#include "server/api/server.h"
#include "tests/integration/test_env.h"
#include "tests/test_util.h"

namespace tlserve::testing {

inline ServerOptions LoopbackOptions(const std::string& backbone, const std::string& data_dir) {
  ServerOptions o;
  o.backbone.path = Fixture(backbone);
  o.backbone.device = TestDevice();
  o.backbone.threads = 2;
  o.embedder.preprocess_threads = 2;
  o.data_dir = data_dir;
  o.grpc_address = "127.0.0.1:0";
  o.metrics_address = absl::StrCat("127.0.0.1:", FreePort());
  o.min_free_disk_bytes = 32 << 20;  // CI machines have seen less than 512 MB free
  return o;
}

}  // namespace tlserve::testing

#endif  // TLSERVE_TESTS_INTEGRATION_LOOPBACK_OPTIONS_H_
