#include "server/core/datasets.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "server/core/catalog/tenant_key.h"
#include "server/core/contain.h"
#include "server/core/image_decoder.h"

namespace tlserve {

absl::Status DatasetCatalog::ValidateName(const std::string& key, const std::string& field) {
  // A key is NAME or TENANT:NAME (server/core/catalog/tenant_key.h).
  const auto [tenant, name] = SplitTenantKey(key);
  bool ok = (key.find(':') == std::string::npos || ValidateTenant(tenant).ok()) && !name.empty() &&
            name.size() <= 64 && absl::ascii_isalnum(name[0]);
  for (char c : name) ok = ok && (absl::ascii_isalnum(c) || c == '.' || c == '_' || c == '-');
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " \"", Bounded(name),
                   "\" is not a valid name: use 1-64 letters, digits, '.', '_' or '-', "
                   "starting with a letter or digit"));
}

uint64_t DatasetCatalog::ExampleHash(const std::string& name, const std::string& bytes) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a, 64 bits: stable across platforms
  auto mix = [&h](const std::string& s) {
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    h = (h ^ 0xff) * 1099511628211ull;
  };
  mix(name);
  mix(bytes);
  return h;
}

bool DatasetCatalog::IsValidation(uint64_t hash, double fraction) {
  return static_cast<double>(hash % 1'000'000) < fraction * 1'000'000;
}

absl::Status DatasetCatalog::CheckExample(const UploadExample& e) const {
  // An empty label is an unlabelled image (a pool for SuggestLabels).
  if (e.label.size() > 128) {
    return absl::InvalidArgumentError("label must be at most 128 characters");
  }
  for (unsigned char c : e.label) {
    if (c < 0x20 || c == 0x7f) return absl::InvalidArgumentError("label has control characters");
  }
  if (static_cast<int64_t>(e.bytes.size()) > limits_.max_example_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "image has ", e.bytes.size(), " bytes, over the limit of ", limits_.max_example_bytes));
  }
  auto rgb = DecodeImage(e.bytes, limits_.max_image_pixels);
  if (!rgb.ok()) return rgb.status();
  return CheckPreprocessBudget(rgb->size(0), rgb->size(1), limits_.preprocess,
                               limits_.max_image_pixels);
}

absl::StatusOr<std::unique_ptr<DatasetUpload>> DatasetCatalog::BeginUpload(
    const std::string& dataset, bool strict) {
  if (absl::Status s = ValidateName(dataset, "dataset"); !s.ok()) return s;
  return std::unique_ptr<DatasetUpload>(new DatasetUpload(this, dataset, strict));
}

DatasetUpload::DatasetUpload(DatasetCatalog* catalog, std::string dataset, bool strict)
    : catalog_(catalog),
      dataset_(std::move(dataset)),
      strict_(strict),
      upload_(catalog->db_->BeginUpload()) {}

DatasetUpload::~DatasetUpload() {
  if (!committed_) catalog_->db_->AbortUpload(upload_);
}

absl::Status DatasetUpload::Add(UploadExample e) {
  const int64_t index = index_++;
  if (absl::Status s = catalog_->CheckExample(e); !s.ok()) {
    ++rejected_total_;
    if (strict_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "examples[", index, "]", e.name.empty() ? "" : " (\"" + Bounded(e.name) + "\")", ": ",
          s.message(), "; nothing was stored (strict)"));
    }
    if (rejected_.size() < kMaxReportedRejects) {
      rejected_.push_back({index, Bounded(e.name, 256), std::string(s.message())});
    }
    return absl::OkStatus();
  }
  const uint64_t h = DatasetCatalog::ExampleHash(e.name, e.bytes);
  chunk_bytes_ += static_cast<int64_t>(e.bytes.size() + e.name.size() + e.label.size());
  chunk_.push_back({0, std::move(e.name), std::move(e.label), std::move(e.bytes), h});
  ++accepted_;
  if (chunk_bytes_ >= kChunkBytes) return Flush();
  return absl::OkStatus();
}

absl::Status DatasetUpload::Flush() {
  if (chunk_.empty()) return absl::OkStatus();
  if (catalog_->disk_ != nullptr) {
    // Staged, then copied into the dataset at commit: twice the bytes.
    if (absl::Status s = catalog_->disk_->Check(2 * chunk_bytes_, "this upload"); !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = catalog_->db_->StageExamples(upload_, chunk_); !s.ok()) return s;
  staged_bytes_ += chunk_bytes_;
  chunk_.clear();
  chunk_bytes_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<UploadResult> DatasetUpload::Commit() {
  if (accepted_ == 0 && rejected_total_ == 0) {
    return absl::InvalidArgumentError("examples: the upload has no examples");
  }
  if (absl::Status s = Flush(); !s.ok()) return s;
  if (catalog_->disk_ != nullptr && staged_bytes_ > 0) {
    // The commit copies the staged rows into the dataset, through the
    // write-ahead log: twice what was staged, before the staging is freed.
    if (absl::Status s = catalog_->disk_->Check(2 * staged_bytes_, "committing this upload");
        !s.ok()) {
      return s;
    }
  }
  UploadQuota quota;
  quota.max_images = catalog_->limits_.max_images;
  quota.max_classes = catalog_->limits_.max_classes;
  auto added = catalog_->db_->CommitUpload(upload_, dataset_, quota);
  if (!added.ok()) return added.status();
  committed_ = true;
  UploadResult result;
  result.accepted = *added;
  result.rejected = std::move(rejected_);
  result.rejected_total = rejected_total_;
  auto after = catalog_->db_->GetDataset(dataset_);
  if (after.ok()) {
    result.dataset = *after;
  } else if (*added == 0) {
    result.dataset.name = dataset_;  // nothing was stored: no dataset was made
  } else {
    return after.status();
  }
  return result;
}

absl::StatusOr<DatasetInfo> DatasetCatalog::Get(const std::string& name) const {
  if (absl::Status s = ValidateName(name, "dataset"); !s.ok()) return s;
  return db_->GetDataset(name);
}

absl::StatusOr<std::vector<DatasetInfo>> DatasetCatalog::List() const {
  return db_->ListDatasets();
}

absl::Status DatasetCatalog::Delete(const std::string& name) {
  if (absl::Status s = ValidateName(name, "dataset"); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    if (users_[name] > 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("dataset \"", name,
                       "\" is in use by a training job or an evaluation; cancel it or wait"));
    }
  }
  return db_->DeleteDataset(name);
}

void DatasetCatalog::Acquire(const std::string& name) {
  absl::MutexLock lock(&mu_);
  ++users_[name];
}

std::shared_ptr<const void> DatasetCatalog::Hold(const std::string& name) {
  Acquire(name);
  return std::shared_ptr<const void>(nullptr, [this, name](const void*) { Release(name); });
}

void DatasetCatalog::Release(const std::string& name) {
  absl::MutexLock lock(&mu_);
  if (--users_[name] <= 0) users_.erase(name);
}

}  // namespace tlserve
