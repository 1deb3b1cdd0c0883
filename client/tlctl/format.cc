#include "client/tlctl/format.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/descriptor.h"

namespace tlserve {

std::string WithCommas(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

std::string TenantOf(const google::protobuf::Message& m) {
  const auto* field = m.GetDescriptor()->FindFieldByName("tenant");
  if (field == nullptr || field->type() != google::protobuf::FieldDescriptor::TYPE_STRING ||
      field->is_repeated()) {
    return "";
  }
  return m.GetReflection()->GetString(m, field);
}

std::string TenantCell(const google::protobuf::Message& m, bool several) {
  if (!several) return "";
  const std::string t = TenantOf(m);
  return absl::StrCat(t.empty() ? "-" : t, "\t");
}

std::string ShapeString(const google::protobuf::RepeatedField<int64_t>& shape) {
  return absl::StrCat("[-1, ", absl::StrJoin(shape, ", "), "]");
}

std::string SummaryTable(const v1::DescribeBackboneResponse& d) {
  const std::string rule(72, '-'), heavy(72, '=');
  std::string out = absl::StrCat(rule, "\n");
  absl::StrAppendFormat(&out, "%28s %25s %17s\n", "Layer (type)", "Output Shape", "Param #");
  absl::StrAppend(&out, heavy, "\n");
  for (const auto& s : d.stages()) {
    absl::StrAppendFormat(&out, "%28s %25s %17s%s\n", absl::StrCat(s.name(), " (", s.type(), ")"),
                          ShapeString(s.output_shape()), WithCommas(s.params()),
                          s.head() ? "  (head, dropped)" : "");
  }
  absl::StrAppend(&out, heavy, "\n");
  absl::StrAppend(&out, "Total params: ", WithCommas(d.total_params()), "\n");
  absl::StrAppend(&out, "Trainable params: ", WithCommas(d.trainable_params()),
                  " (the shared backbone is frozen)\n");
  absl::StrAppend(
      &out, "Non-trainable params: ", WithCommas(d.total_params() - d.trainable_params()), "\n");
  absl::StrAppend(&out, rule, "\n");
  absl::StrAppend(&out, "Input: ", absl::StrJoin(d.input_shape(), "x"),
                  "; embedding dim: ", d.embedding_dim(), "; ", d.device(), " ", d.dtype(), "; ",
                  d.file_name(), d.pretrained() ? "" : " (random weights)", "\n");
  return out;
}

absl::Status WriteEmbeddings(const std::string& path, const std::vector<NamedVector>& rows) {
  const size_t dim = rows.empty() ? 0 : rows.front().values.size();
  const bool csv = path.size() > 4 && path.substr(path.size() - 4) == ".csv";
  const bool npy = path.size() > 4 && path.substr(path.size() - 4) == ".npy";
  if (!csv && !npy) return absl::InvalidArgumentError("--out must end in .csv or .npy");
  std::ofstream out(path, std::ios::binary);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot write"));
  if (csv) {
    for (const auto& r : rows) {
      out << r.name;
      for (float v : r.values) out << ',' << absl::StrFormat("%.9g", v);
      out << '\n';
    }
  } else {
    std::string header = absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (",
                                      rows.size(), ", ", dim, "), }");
    // Magic, version 1.0, header length; the header pads to 64 bytes with '\n'.
    const size_t total = 10 + header.size() + 1;
    header.append((64 - total % 64) % 64, ' ');
    header += '\n';
    const uint16_t len = static_cast<uint16_t>(header.size());
    out.write("\x93NUMPY\x01\x00", 8);
    out.put(static_cast<char>(len & 0xff));
    out.put(static_cast<char>(len >> 8));
    out << header;
    for (const auto& r : rows) {
      out.write(reinterpret_cast<const char*>(r.values.data()),
                static_cast<std::streamsize>(r.values.size() * sizeof(float)));
    }
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

ProgressBar::ProgressBar(std::string label, size_t total)
    : label_(std::move(label)), total_(total), enabled_(isatty(STDERR_FILENO) && total > 1) {}

void ProgressBar::Update(size_t done) {
  if (!enabled_) return;
  const int width = 30;
  const int filled = total_ == 0 ? width : static_cast<int>(width * done / total_);
  std::fprintf(stderr, "\r%s [%s%s] %zu/%zu", label_.c_str(), std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), done, total_);
  std::fflush(stderr);
}

void ProgressBar::Finish() {
  if (enabled_) std::fprintf(stderr, "\n");
}

}  // namespace tlserve
