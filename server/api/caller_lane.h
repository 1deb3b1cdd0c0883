// The preprocessing pool's lane of a call: one per connection (the peer's
// address and port), so that the images of one connection wait for each
// other, not for another connection's (ThreadPool takes lanes in turns).
#ifndef TLSERVE_SERVER_API_CALLER_LANE_H_
#define TLSERVE_SERVER_API_CALLER_LANE_H_

#include <grpcpp/server_context.h>

#include <cstdint>
#include <functional>
#include <string>

namespace tlserve {

inline uint64_t CallerLane(const grpc::ServerContextBase& context) {
  return std::hash<std::string>{}(context.peer()) | 1;  // lane 0 is the server's own work
}

}  // namespace tlserve

#endif  // TLSERVE_SERVER_API_CALLER_LANE_H_
