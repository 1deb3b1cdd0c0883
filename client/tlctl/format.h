// How tlctl prints: the torchsummary-style table, numbers with thousands
// separators, embeddings as CSV or .npy, and a progress bar for terminals.
#ifndef TLSERVE_CLIENT_TLCTL_FORMAT_H_
#define TLSERVE_CLIENT_TLCTL_FORMAT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tlserve/v1/inference.pb.h"

namespace tlserve {

std::string WithCommas(int64_t n);
std::string ShapeString(const google::protobuf::RepeatedField<int64_t>& shape);
std::string SummaryTable(const v1::DescribeBackboneResponse& d);

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
