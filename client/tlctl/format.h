// How tlctl prints: the torchsummary-style table, numbers with thousands
// separators, embeddings as CSV or .npy, and a progress bar for terminals.
#ifndef TLSERVE_CLIENT_TLCTL_FORMAT_H_
#define TLSERVE_CLIENT_TLCTL_FORMAT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "google/protobuf/message.h"
#include "tlserve/v1/inference.pb.h"

namespace tlserve {

std::string WithCommas(int64_t n);
std::string ShapeString(const google::protobuf::RepeatedField<int64_t>& shape);
std::string SummaryTable(const v1::DescribeBackboneResponse& d);

// The `tenant` field of a Dataset, Model or Job; "" where it is empty or
// the message has none. Read by reflection so that tlctl builds against
// protos from before the field too.
std::string TenantOf(const google::protobuf::Message& m);

// Whether the rows of a list belong to more than one tenant (an admin's
// view): only then do lists show each row's tenant, as their first column.
template <typename Rows>
bool SeveralTenants(const Rows& rows) {
  for (const auto& r : rows) {
    if (TenantOf(r) != TenantOf(*rows.begin())) return true;
  }
  return false;
}

// The first column of a row when `several`: "TENANT\t" ("-" for none).
std::string TenantCell(const google::protobuf::Message& m, bool several);

struct NamedVector {
  std::string name;
  std::vector<float> values;
};
// FILE.csv: name,v0,v1,...; FILE.npy: a float32 N×D array (names in order of
// the rows, as printed). INVALID_ARGUMENT for another extension.
absl::Status WriteEmbeddings(const std::string& path, const std::vector<NamedVector>& rows);

// Draws "label [#####.....] 12/100" on stderr, only when it is a terminal.
class ProgressBar {
 public:
  ProgressBar(std::string label, size_t total);
  void Update(size_t done);
  void Finish();

 private:
  std::string label_;
  size_t total_;
  bool enabled_;
};

}  // namespace tlserve

#endif  // TLSERVE_CLIENT_TLCTL_FORMAT_H_
