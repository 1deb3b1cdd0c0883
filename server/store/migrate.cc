#include "server/store/migrate.h"

#include <algorithm>
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/sha256.h"
#include "server/store/job_queue.h"

namespace tlserve {
namespace {

// Images are read and staged this many at a time (bounded memory: at most
// --max_example_bytes × this, twice over).
constexpr size_t kChunk = 32;

absl::Status Differs(const std::string& what) {
  return absl::DataLossError(
      absl::StrCat("verification failed: ", what,
                   " differs between the source and the copy; the copy "
                   "must not be used (drop the database and migrate again)"));
}

// The SHA-256 of each example's bytes, `ids` in order, read kChunk at a time.
absl::StatusOr<std::vector<std::string>> ImageHashes(Database& db,
                                                     const std::vector<StoredExample>& examples) {
  std::vector<std::string> out;
  out.reserve(examples.size());
  for (size_t i = 0; i < examples.size(); i += kChunk) {
    std::vector<int64_t> ids;
    for (size_t j = i; j < std::min(examples.size(), i + kChunk); ++j) {
      ids.push_back(examples[j].id);
    }
    auto bytes = db.ReadExampleBytes(ids);
    if (!bytes.ok()) return bytes.status();
    for (const std::string& b : *bytes) out.push_back(Sha256Hex(b));
  }
  return out;
}

absl::Status CheckEmpty(Database& to) {
  auto datasets = to.ListDatasets();
  if (!datasets.ok()) return datasets.status();
  auto kinds = to.ListRecordKinds();
  if (!kinds.ok()) return kinds.status();
  int64_t blobs = 0;
  for (const char* folder : kBlobFolders) {
    auto names = to.ListBlobs(folder);
    if (!names.ok()) return names.status();
    blobs += static_cast<int64_t>(names->size());
  }
  if (datasets->empty() && kinds->empty() && blobs == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "the destination is not empty (", datasets->size(), " datasets, ", kinds->size(),
      " kinds of records, ", blobs,
      " blobs): migrate into a new, empty database (a failed migration leaves a partial copy: "
      "drop the database, create it again and migrate again)"));
}

absl::Status CopyDataset(Database& from, Database& to, const DatasetInfo& info,
                         std::vector<std::string>* hashes, MigrationReport* report) {
  auto examples = from.ListExamples(info.name);
  if (!examples.ok()) return examples.status();
  const int64_t upload = to.BeginUpload();
  for (size_t i = 0; i < examples->size(); i += kChunk) {
    std::vector<int64_t> ids;
    std::vector<StoredExample> chunk;
    for (size_t j = i; j < std::min(examples->size(), i + kChunk); ++j) {
      ids.push_back((*examples)[j].id);
      chunk.push_back((*examples)[j]);
    }
    auto bytes = from.ReadExampleBytes(ids);
    if (!bytes.ok()) {
      to.AbortUpload(upload);
      return bytes.status();
    }
    for (size_t k = 0; k < chunk.size(); ++k) {
      chunk[k].bytes = std::move((*bytes)[k]);
      hashes->push_back(Sha256Hex(chunk[k].bytes));
      report->example_bytes += static_cast<int64_t>(chunk[k].bytes.size());
    }
    if (absl::Status s = to.StageExamples(upload, chunk); !s.ok()) {
      to.AbortUpload(upload);
      return s;
    }
  }
  // The source's own limits held when it was uploaded; the copy keeps it whole.
  UploadQuota unlimited;
  unlimited.max_images = std::numeric_limits<int64_t>::max();
  unlimited.max_classes = std::numeric_limits<int64_t>::max();
  auto added = to.CommitUpload(upload, info.name, unlimited);
  if (!added.ok()) return added.status();
  if (*added != static_cast<int64_t>(examples->size())) {
    return Differs(absl::StrCat("the number of images of dataset \"", info.name, "\""));
  }
  ++report->datasets;
  report->examples += *added;
  return absl::OkStatus();
}

absl::Status VerifyDataset(Database& from, Database& to, const DatasetInfo& info,
                           const std::vector<std::string>& hashes) {
  auto copied_info = to.GetDataset(info.name);
  if (!copied_info.ok()) return copied_info.status();
  if (copied_info->images != info.images || copied_info->bytes != info.bytes ||
      copied_info->class_counts != info.class_counts ||
      copied_info->unlabelled != info.unlabelled) {
    return Differs(absl::StrCat("the counts of dataset \"", info.name, "\""));
  }
  auto source = from.ListExamples(info.name);
  if (!source.ok()) return source.status();
  auto copy = to.ListExamples(info.name);
  if (!copy.ok()) return copy.status();
  if (copy->size() != source->size() || hashes.size() != source->size()) {
    return Differs(absl::StrCat("the number of images of dataset \"", info.name, "\""));
  }
  for (size_t i = 0; i < source->size(); ++i) {
    const StoredExample &a = (*source)[i], &b = (*copy)[i];
    if (a.name != b.name || a.label != b.label || a.hash != b.hash) {
      return Differs(
          absl::StrCat("image ", i, " (\"", a.name, "\") of dataset \"", info.name, "\""));
    }
  }
  auto copied = ImageHashes(to, *copy);
  if (!copied.ok()) return copied.status();
  for (size_t i = 0; i < hashes.size(); ++i) {
    if ((*copied)[i] != hashes[i]) {
      return Differs(absl::StrCat("the SHA-256 of image \"", (*source)[i].name, "\" of dataset \"",
                                  info.name, "\""));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<MigrationReport> CopyStore(Database& from, Database& to,
                                          const std::function<void(const std::string&)>& progress) {
  // No replica may start on the copy while it is made (it would resume
  // half-copied jobs): the lock is held until the copy goes.
  auto locked = to.LockForCopy();
  if (!locked.ok()) return locked.status();
  if (!*locked) {
    return absl::FailedPreconditionError(
        "a tlserve replica is running on the destination: migrate into a new, empty database "
        "that no replica uses yet");
  }
  if (absl::Status s = CheckEmpty(to); !s.ok()) return s;
  MigrationReport report;

  // Datasets, each in one upload (invisible until it commits).
  auto datasets = from.ListDatasets();
  if (!datasets.ok()) return datasets.status();
  for (const DatasetInfo& d : *datasets) {
    progress(absl::StrCat("dataset \"", d.name, "\": ", d.images, " images, ", d.bytes, " bytes"));
    // Verified at once (the images' hashes are not kept for the whole copy).
    std::vector<std::string> hashes;
    if (absl::Status s = CopyDataset(from, to, d, &hashes, &report); !s.ok()) return s;
    if (absl::Status s = VerifyDataset(from, to, d, hashes); !s.ok()) return s;
  }

  // Blobs before the records that point at them.
  std::map<std::string, std::string> blob_hashes;
  for (const char* folder : kBlobFolders) {
    auto names = from.ListBlobs(folder);
    if (!names.ok()) return names.status();
    for (const std::string& name : *names) {
      auto bytes = from.GetBlob(name);
      if (!bytes.ok()) return bytes.status();
      progress(absl::StrCat("blob ", name, ": ", bytes->size(), " bytes"));
      blob_hashes[name] = Sha256Hex(*bytes);
      if (absl::Status s = to.PutBlob(name, *bytes); !s.ok()) return s;
      ++report.blobs;
      report.blob_bytes += static_cast<int64_t>(bytes->size());
    }
  }

  auto kinds = from.ListRecordKinds();
  if (!kinds.ok()) return kinds.status();
  std::map<std::string, std::vector<std::pair<std::string, std::string>>> records;
  for (const std::string& kind : *kinds) {
    auto all = from.ListRecords(kind);
    if (!all.ok()) return all.status();
    progress(absl::StrCat(all->size(), " records of kind \"", kind, "\""));
    for (const auto& [key, json] : *all) {
      if (absl::Status s = to.CreateRecord(kind, key, json); !s.ok()) return s;
      ++report.records;
    }
    records[kind] = std::move(*all);
  }
  // The jobs left unfinished (paused by the source's last stop, or cut off
  // by its crash): in the copy's queue, so that a replica claims and resumes
  // them.
  auto queued = QueueUnfinishedJobs(to);
  if (!queued.ok()) return queued.status();
  report.queued_jobs = *queued;
  if (*queued > 0) progress(absl::StrCat(*queued, " unfinished jobs queued to resume"));

  // Read back from the copy.
  progress("verifying the copy");
  auto copied = to.ListDatasets();
  if (!copied.ok()) return copied.status();
  if (copied->size() != datasets->size()) return Differs("the number of datasets");
  int64_t blobs = 0;
  for (const char* folder : kBlobFolders) {
    auto names = to.ListBlobs(folder);
    if (!names.ok()) return names.status();
    blobs += static_cast<int64_t>(names->size());
    for (const std::string& name : *names) {
      auto bytes = to.GetBlob(name);
      if (!bytes.ok()) return bytes.status();
      auto it = blob_hashes.find(name);
      if (it == blob_hashes.end() || it->second != Sha256Hex(*bytes)) {
        return Differs(absl::StrCat("the SHA-256 of blob ", name));
      }
    }
  }
  if (blobs != report.blobs) return Differs("the number of blobs");
  auto copied_kinds = to.ListRecordKinds();
  if (!copied_kinds.ok()) return copied_kinds.status();
  if (*copied_kinds != *kinds) return Differs("the kinds of records");
  for (const auto& [kind, all] : records) {
    auto again = to.ListRecords(kind);
    if (!again.ok()) return again.status();
    if (*again != all) return Differs(absl::StrCat("the records of kind \"", kind, "\""));
  }
  return report;
}

}  // namespace tlserve
