// Named, labelled image datasets uploaded by clients, kept in the Database.
// Each example is checked on arrival (its label, its size, and that it
// decodes); bad ones are reported while the good ones are kept — or, in strict
// mode, nothing is kept. The train/validation split is a pure function of each
// example (a hash of its name and bytes), so appending never reshuffles it, and
// every class gets the same expected fraction: stratified in expectation.
//
// Thread-safe.
#ifndef TLSERVE_SERVER_CORE_DATASETS_H_
#define TLSERVE_SERVER_CORE_DATASETS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/core/preprocess.h"
#include "server/store/database.h"
#include "server/store/disk_budget.h"

namespace tlserve {

struct DatasetLimits {
  int64_t max_example_bytes = 20 << 20;
  int64_t max_images = 1'000'000;
  int64_t max_classes = 1000;
  int64_t max_image_pixels = 40'000'000;
  // The backbone's preprocessing: an image whose resized intermediate would
  // be over max_image_pixels is rejected at upload, not at training.
  PreprocessSpec preprocess;
};

struct UploadExample {
  std::string name;
  std::string label;
  std::string bytes;
};

struct RejectedExample {
  int64_t index = 0;
  std::string name;
  std::string reason;
};

struct UploadResult {
  DatasetInfo dataset;  // after the upload
  int64_t accepted = 0;
  std::vector<RejectedExample> rejected;  // the first kMaxReportedRejects
  int64_t rejected_total = 0;
};

class DatasetUpload;

class DatasetCatalog {
 public:
  // `disk` (may be null: no budget) is checked before every write.
  DatasetCatalog(Database* db, DatasetLimits limits, const DiskBudget* disk = nullptr)
      : db_(db), limits_(limits), disk_(disk) {}

  // Names of datasets (and models): 1-64 of [A-Za-z0-9._-], starting with a
  // letter or digit. INVALID_ARGUMENT naming `field` otherwise.
  static absl::Status ValidateName(const std::string& name, const std::string& field);
  static uint64_t ExampleHash(const std::string& name, const std::string& bytes);
  static bool IsValidation(uint64_t hash, double fraction);

  // The reason an example cannot be stored, or OK. Decodes the image.
  absl::Status CheckExample(const UploadExample& e) const;

  // Starts an upload to `dataset` (INVALID_ARGUMENT for a bad name): see
  // DatasetUpload. Nothing is visible until its Commit.
  absl::StatusOr<std::unique_ptr<DatasetUpload>> BeginUpload(const std::string& dataset,
                                                             bool strict);

  absl::StatusOr<DatasetInfo> Get(const std::string& name) const;
  absl::StatusOr<std::vector<DatasetInfo>> List() const;
  // FAILED_PRECONDITION while a job uses it.
  absl::Status Delete(const std::string& name);

  // Jobs (and evaluations) hold a dataset while they read it.
  void Acquire(const std::string& name);
  void Release(const std::string& name);
  // Holds `name` until the result goes (Acquire, then Release).
  std::shared_ptr<const void> Hold(const std::string& name);
  Database* database() const { return db_; }

 private:
  friend class DatasetUpload;
  Database* db_;
  const DatasetLimits limits_;
  const DiskBudget* disk_;
  absl::Mutex mu_;
  std::map<std::string, int> users_ ABSL_GUARDED_BY(mu_);
};

// One upload in progress. Each example is checked as it is added; accepted
// ones are staged in the database in chunks of at most kChunkBytes (so an
// upload of any size holds at most one chunk in memory), invisible to every
// reader until Commit moves them into the dataset in one transaction — where
// the dataset's image and class limits are checked against the dataset as it
// is then, so concurrent uploads cannot overshoot them. Destroyed without
// Commit (the client went away, the stream broke), it stores nothing.
//
// Not thread-safe: one caller at a time (the upload's stream).
class DatasetUpload {
 public:
  static constexpr int64_t kChunkBytes = 8 << 20;
  static constexpr size_t kMaxReportedRejects = 1000;

  ~DatasetUpload();
  DatasetUpload(const DatasetUpload&) = delete;
  DatasetUpload& operator=(const DatasetUpload&) = delete;

  // Checks and keeps (or rejects, with its reason) the next example. An
  // error fails the whole upload: with `strict`, INVALID_ARGUMENT for the
  // first bad example; RESOURCE_EXHAUSTED for the disk budget.
  absl::Status Add(UploadExample example);
  // Makes everything accepted part of the dataset, durably, and reports.
  // With nothing accepted and nothing rejected: INVALID_ARGUMENT.
  absl::StatusOr<UploadResult> Commit();

  // Accepted so far, and their bytes (images, names and labels): what a
  // tenant's quotas are checked against before Commit.
  int64_t accepted() const { return accepted_; }
  int64_t accepted_bytes() const { return staged_bytes_ + chunk_bytes_; }

 private:
  friend class DatasetCatalog;
  DatasetUpload(DatasetCatalog* catalog, std::string dataset, bool strict);
  absl::Status Flush();

  DatasetCatalog* catalog_;
  const std::string dataset_;
  const bool strict_;
  const int64_t upload_;
  bool committed_ = false;
  int64_t index_ = 0;
  int64_t accepted_ = 0;
  std::vector<StoredExample> chunk_;
  int64_t chunk_bytes_ = 0;
  int64_t staged_bytes_ = 0;
  std::vector<RejectedExample> rejected_;
  int64_t rejected_total_ = 0;
};

}  // namespace tlserve

#endif  // TLSERVE_SERVER_CORE_DATASETS_H_
