#include "server/core/datasets.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "server/core/contain.h"
#include "server/core/image_decoder.h"

namespace tlserve {

absl::Status DatasetCatalog::ValidateName(const std::string& name, const std::string& field) {
  bool ok = !name.empty() && name.size() <= 64 && absl::ascii_isalnum(name[0]);
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
  if (e.label.empty() || e.label.size() > 128) {
    return absl::InvalidArgumentError("label must be 1-128 characters");
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

absl::StatusOr<UploadResult> DatasetCatalog::Commit(const std::string& dataset,
                                                    std::vector<UploadExample> accepted,
                                                    std::vector<RejectedExample> rejected,
                                                    bool strict) {
  if (absl::Status s = ValidateName(dataset, "dataset"); !s.ok()) return s;
  if (strict && !rejected.empty()) {
    std::string list;
    for (size_t i = 0; i < rejected.size() && i < 5; ++i) {
      absl::StrAppend(&list, i ? "; " : "", "examples[", rejected[i].index, "]",
                      rejected[i].name.empty() ? "" : " (\"" + rejected[i].name + "\")", ": ",
                      rejected[i].reason);
    }
    return absl::InvalidArgumentError(absl::StrCat(rejected.size(),
                                                   " example(s) rejected, so nothing was stored "
                                                   "(strict): ",
                                                   list));
  }
  if (accepted.empty() && rejected.empty()) {
    return absl::InvalidArgumentError("examples: the upload has no examples");
  }
  auto before = db_->GetDataset(dataset);
  DatasetInfo existing;
  if (before.ok()) {
    existing = *before;
  } else if (before.status().code() != absl::StatusCode::kNotFound) {
    return before.status();
  }
  std::map<std::string, int64_t> classes = existing.class_counts;
  for (const auto& e : accepted) ++classes[e.label];
  if (existing.images + static_cast<int64_t>(accepted.size()) > limits_.max_images) {
    return absl::InvalidArgumentError(
        absl::StrCat("dataset \"", dataset, "\" would hold ", existing.images + accepted.size(),
                     " images, over the limit of ", limits_.max_images, " (--max_dataset_images)"));
  }
  if (static_cast<int64_t>(classes.size()) > limits_.max_classes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dataset \"", dataset, "\" would have ", classes.size(), " classes, over the limit of ",
        limits_.max_classes, " (--max_dataset_classes)"));
  }
  UploadResult result;
  result.accepted = static_cast<int64_t>(accepted.size());
  result.rejected = std::move(rejected);
  if (!accepted.empty() && disk_ != nullptr) {
    int64_t bytes = 0;
    for (const auto& e : accepted) bytes += static_cast<int64_t>(e.bytes.size() + e.name.size());
    // Twice: the write-ahead log holds the rows before they reach the file.
    if (absl::Status s = disk_->Check(2 * bytes, "this upload"); !s.ok()) return s;
  }
  if (!accepted.empty()) {
    std::vector<StoredExample> rows;
    rows.reserve(accepted.size());
    for (auto& e : accepted) {
      const uint64_t h = ExampleHash(e.name, e.bytes);
      rows.push_back({0, std::move(e.name), std::move(e.label), std::move(e.bytes), h});
    }
    if (absl::Status s = db_->AppendExamples(dataset, rows); !s.ok()) return s;
  }
  auto after = db_->GetDataset(dataset);
  if (after.ok()) {
    result.dataset = *after;
  } else if (accepted.empty()) {
    result.dataset.name = dataset;  // nothing was stored: no dataset was made
  } else {
    return after.status();
  }
  return result;
}

absl::StatusOr<DatasetInfo> DatasetCatalog::Get(const std::string& name) const {
  return db_->GetDataset(name);
}

absl::StatusOr<std::vector<DatasetInfo>> DatasetCatalog::List() const {
  return db_->ListDatasets();
}

absl::Status DatasetCatalog::Delete(const std::string& name) {
  {
    absl::MutexLock lock(&mu_);
    if (users_[name] > 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "dataset \"", name, "\" is used by a running training job; cancel it or wait"));
    }
  }
  return db_->DeleteDataset(name);
}

void DatasetCatalog::Acquire(const std::string& name) {
  absl::MutexLock lock(&mu_);
  ++users_[name];
}

void DatasetCatalog::Release(const std::string& name) {
  absl::MutexLock lock(&mu_);
  if (--users_[name] <= 0) users_.erase(name);
}

}  // namespace tlserve
