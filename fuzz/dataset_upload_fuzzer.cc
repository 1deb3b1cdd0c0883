// Fuzzes dataset upload as the Datasets service checks it: bytes from the
// wire parsed as an UploadDatasetRequest, the dataset name validated and each
// example checked by DatasetCatalog::CheckExample (label, size, decoding,
// preprocessing budget). The catalog has no Database: checking touches none.
// An example accepted at upload must preprocess at training time (the
// catalog's promise), so that is checked too.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "fuzz/fuzz_util.h"
#include "server/core/datasets.h"
#include "server/core/preprocess.h"
#include "tlserve/v1/datasets.pb.h"

namespace {

tlserve::DatasetLimits Limits() {
  tlserve::DatasetLimits limits;
  limits.max_image_pixels = int64_t{1} << 20;
  limits.preprocess.resize = 32;
  limits.preprocess.crop = 32;
  return limits;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tlserve::fuzz::InitTorch();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const tlserve::DatasetCatalog* catalog = new tlserve::DatasetCatalog(nullptr, Limits());
  tlserve::v1::UploadDatasetRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  absl::Status name = tlserve::DatasetCatalog::ValidateName(request.dataset(), "dataset");
  TLSERVE_FUZZ_CHECK(name.ok() || name.code() == absl::StatusCode::kInvalidArgument, "status %s",
                     name.ToString().c_str());
  for (const tlserve::v1::Example& example : request.examples()) {
    tlserve::UploadExample e{example.name(), example.label(), example.encoded()};
    absl::Status s = catalog->CheckExample(e);
    if (!s.ok()) {
      TLSERVE_FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument, "status %s",
                         s.ToString().c_str());
      continue;
    }
    auto t = tlserve::DecodeAndPreprocess(e.bytes, Limits().preprocess, Limits().max_image_pixels);
    TLSERVE_FUZZ_CHECK(t.ok(), "accepted at upload, refused at training: %s",
                       t.status().ToString().c_str());
  }
  return 0;
}
