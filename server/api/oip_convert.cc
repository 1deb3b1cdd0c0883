#include "server/api/oip_convert.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/contain.h"

namespace tlserve {
namespace {

using inference::InferParameter;
using inference::ModelInferRequest;

std::string ShapeText(const google::protobuf::RepeatedField<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// a × b, or false when it does not fit an int64 (shapes come from clients).
bool Multiply(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

// A repeated field of `c` other than `field` that holds values ("" if none).
std::string OtherFilledField(const inference::InferTensorContents& c, const std::string& field) {
  const auto* d = c.GetDescriptor();
  const auto* r = c.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    if (d->field(i)->name() != field && r->FieldSize(c, d->field(i)) > 0)
      return d->field(i)->name();
  }
  return "";
}

absl::Status CountError(const std::string& where, const char* field, int64_t have, int64_t want) {
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": contents.", field, " has ", have, " values; the shape needs ", want));
}

bool HasContents(const inference::InferTensorContents& c) {
  return c.bool_contents_size() + c.int_contents_size() + c.int64_contents_size() +
             c.uint_contents_size() + c.uint64_contents_size() + c.fp32_contents_size() +
             c.fp64_contents_size() + c.bytes_contents_size() >
         0;
}

const InferParameter* Find(const OipParameters& params, const std::string& name) {
  auto it = params.find(name);
  return it == params.end() ? nullptr : &it->second;
}

absl::Status WrongType(const std::string& name, const char* want) {
  return absl::InvalidArgumentError(
      absl::StrCat("parameter \"", Bounded(name, 64), "\" must be ", want, " (", want, "_param)"));
}

}  // namespace

void AddOipInputs(inference::ModelMetadataResponse* out) {
  auto add = [out](const char* name, const char* type, std::vector<int64_t> shape) {
    auto* t = out->add_inputs();
    t->set_name(name);
    t->set_datatype(type);
    for (int64_t d : shape) t->add_shape(d);
  };
  add(kOipImagesInput, "BYTES", {-1});
  add(kOipPixelsInput, "UINT8", {-1, -1, -1, -1});
  add(kOipTensorInput, "FP32", {-1, 3, -1, -1});
}

absl::StatusOr<std::vector<absl::string_view>> SplitOipBytes(absl::string_view raw, int64_t count) {
  std::vector<absl::string_view> out;
  out.reserve(static_cast<size_t>(count));
  size_t at = 0;
  // At most `count` elements: a flood of empty ones costs nothing before it fails.
  while (at < raw.size() && static_cast<int64_t>(out.size()) < count) {
    if (raw.size() - at < 4) {
      return absl::InvalidArgumentError(absl::StrCat(
          "raw_input_contents[0]: BYTES element ", out.size(), " is cut off in its 4-byte length"));
    }
    uint32_t n = 0;
    for (int b = 3; b >= 0; --b) n = (n << 8) | static_cast<unsigned char>(raw[at + b]);
    at += 4;
    if (n > raw.size() - at) {
      return absl::InvalidArgumentError(absl::StrCat("raw_input_contents[0]: BYTES element ",
                                                     out.size(), " says ", n, " bytes but only ",
                                                     raw.size() - at,
                                                     " follow (each element is its length "
                                                     "as 4 bytes little-endian, then its bytes)"));
    }
    out.push_back(raw.substr(at, n));
    at += n;
  }
  if (at < raw.size()) {
    return absl::InvalidArgumentError(absl::StrCat("raw_input_contents[0] holds more than the ",
                                                   count, " BYTES elements the shape says"));
  }
  if (static_cast<int64_t>(out.size()) != count) {
    return absl::InvalidArgumentError(absl::StrCat("raw_input_contents[0] holds ", out.size(),
                                                   " BYTES elements; the shape says ", count));
  }
  return out;
}

std::string JoinOipBytes(const std::vector<std::string>& items) {
  std::string out;
  for (const std::string& s : items) {
    const uint32_t n = static_cast<uint32_t>(s.size());
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<char>((n >> (8 * b)) & 0xff));
    out += s;
  }
  return out;
}

absl::StatusOr<OipImages> ParseOipImages(const ModelInferRequest& request, int max_images) {
  if (request.inputs_size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "inputs: the request has ", request.inputs_size(), " inputs; send exactly one: \"",
        kOipImagesInput, "\" (BYTES, JPEG/PNG files), \"", kOipPixelsInput,
        "\" (UINT8 N×H×W×C) or \"", kOipTensorInput, "\" (FP32 N×3×H×W, preprocessed)"));
  }
  const ModelInferRequest::InferInputTensor& in = request.inputs(0);
  const bool raw = request.raw_input_contents_size() > 0;
  if (raw && request.raw_input_contents_size() != request.inputs_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("raw_input_contents has ", request.raw_input_contents_size(), " entries for ",
                     request.inputs_size(), " input; give one per input"));
  }
  if (raw && HasContents(in.contents())) {
    return absl::InvalidArgumentError(
        "inputs[0].contents is set and so is raw_input_contents: use one or the other");
  }
  const std::string where = absl::StrCat("inputs[0] (\"", Bounded(in.name(), 64), "\")");
  ImageInput::Kind kind;
  const char* want;
  if (in.name() == kOipImagesInput) {
    kind = ImageInput::Kind::kEncoded;
    want = "BYTES";
  } else if (in.name() == kOipPixelsInput) {
    kind = ImageInput::Kind::kUint8Hwc;
    want = "UINT8";
  } else if (in.name() == kOipTensorInput) {
    kind = ImageInput::Kind::kFloatChw;
    want = "FP32";
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": no such input; tlserve takes \"", kOipImagesInput, "\" (BYTES), \"",
        kOipPixelsInput, "\" (UINT8) or \"", kOipTensorInput, "\" (FP32): see ModelMetadata"));
  }
  if (in.datatype() != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, " has datatype \"", Bounded(in.datatype(), 32), "\"; it must be ", want));
  }
  const auto& shape = in.shape();
  for (int64_t d : shape) {
    if (d < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": shape ", ShapeText(shape), " has a dimension below 1"));
    }
  }
  // The shape each kind takes, and the elements of one image.
  int64_t per_image = 1;
  std::vector<int64_t> image_shape;
  if (kind == ImageInput::Kind::kEncoded) {
    if (!(shape.size() == 1 || (shape.size() == 2 && shape[1] == 1))) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": shape ", ShapeText(shape), "; a BYTES input is [N] or [N, 1], one file each"));
    }
  } else {
    const bool hwc = kind == ImageInput::Kind::kUint8Hwc;
    if (shape.size() != 4 || (hwc && shape[3] != 1 && shape[3] != 3 && shape[3] != 4) ||
        (!hwc && shape[1] != 3)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": shape ", ShapeText(shape), "; ",
                       hwc ? "a UINT8 input is [N, H, W, C] with C = 1, 3 or 4"
                           : "an FP32 input is [N, 3, H, W]"));
    }
    image_shape.assign(shape.begin() + 1, shape.end());
    for (int64_t d : image_shape) {
      if (!Multiply(per_image, d, &per_image)) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": shape ", ShapeText(shape), " is too large"));
      }
    }
  }
  const int64_t n = shape.empty() ? 0 : shape[0];
  if (n > max_images) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", n, " images, over the limit of ",
                                                   max_images,
                                                   " per request (--max_images_per_request)"));
  }
  const int64_t element_bytes = kind == ImageInput::Kind::kFloatChw ? 4 : 1;
  int64_t total = 0, total_bytes = 0;
  if (!Multiply(n, per_image, &total) || !Multiply(total, element_bytes, &total_bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": shape ", ShapeText(shape), " is too large"));
  }

  if (!raw) {
    const char* field = kind == ImageInput::Kind::kEncoded    ? "bytes_contents"
                        : kind == ImageInput::Kind::kUint8Hwc ? "uint_contents"
                                                              : "fp32_contents";
    if (const std::string other = OtherFilledField(in.contents(), field); !other.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": contents.", other, " holds values; ",
                                                     want,
                                                     " values go in "
                                                     "contents.",
                                                     field, " only"));
    }
  }
  OipImages out;
  out.raw = raw;
  out.images = std::make_shared<std::vector<ImageInput>>();
  std::vector<absl::string_view> views;
  if (kind == ImageInput::Kind::kEncoded) {
    if (raw) {
      auto split = SplitOipBytes(request.raw_input_contents(0), n);
      if (!split.ok()) return split.status();
      views = std::move(*split);
    } else {
      const auto& b = in.contents().bytes_contents();
      if (b.size() != n) return CountError(where, "bytes_contents", b.size(), n);
      for (const std::string& s : b) views.emplace_back(s);
    }
  } else {
    absl::string_view data;
    if (raw) {
      data = request.raw_input_contents(0);
      if (static_cast<int64_t>(data.size()) != total_bytes) {
        return absl::InvalidArgumentError(absl::StrCat("raw_input_contents[0] has ", data.size(),
                                                       " bytes; shape ", ShapeText(shape), " of ",
                                                       want, " needs ", total_bytes));
      }
    } else {
      auto storage = std::make_shared<std::string>();
      if (kind == ImageInput::Kind::kUint8Hwc) {
        const auto& u = in.contents().uint_contents();
        if (u.size() != total) return CountError(where, "uint_contents", u.size(), total);
        storage->resize(u.size());
        for (int i = 0; i < u.size(); ++i) {
          if (u[i] > 255) {
            return absl::InvalidArgumentError(absl::StrCat(
                where, ": contents.uint_contents[", i, "] = ", u[i], " is not a UINT8 (0-255)"));
          }
          (*storage)[i] = static_cast<char>(u[i]);
        }
      } else {
        const auto& f = in.contents().fp32_contents();
        if (f.size() != total) return CountError(where, "fp32_contents", f.size(), total);
        storage->resize(f.size() * sizeof(float));
        if (!f.empty()) std::memcpy(storage->data(), f.data(), storage->size());
      }
      data = *storage;
      out.storage = std::move(storage);
    }
    const size_t stride = static_cast<size_t>(per_image * element_bytes);
    for (int64_t i = 0; i < n; ++i) views.push_back(data.substr(i * stride, stride));
  }
  out.images->reserve(views.size());
  for (size_t i = 0; i < views.size(); ++i) {
    ImageInput image;
    image.index = static_cast<int64_t>(i);
    image.name = absl::StrCat(in.name(), "[", i, "]");
    image.kind = kind;
    image.data = views[i];
    image.shape = image_shape;
    out.images->push_back(std::move(image));
  }
  return out;
}

absl::StatusOr<int64_t> OipInt(const OipParameters& params, const std::string& name,
                               int64_t fallback) {
  const InferParameter* p = Find(params, name);
  if (p == nullptr) return fallback;
  if (p->has_int64_param()) return p->int64_param();
  if (p->has_uint64_param() && p->uint64_param() <= uint64_t{std::numeric_limits<int64_t>::max()}) {
    return static_cast<int64_t>(p->uint64_param());
  }
  return WrongType(name, "int64");
}

absl::StatusOr<std::string> OipString(const OipParameters& params, const std::string& name,
                                      const std::string& fallback) {
  const InferParameter* p = Find(params, name);
  if (p == nullptr) return fallback;
  if (p->has_string_param()) return p->string_param();
  return WrongType(name, "string");
}

absl::StatusOr<bool> OipBool(const OipParameters& params, const std::string& name, bool fallback) {
  const InferParameter* p = Find(params, name);
  if (p == nullptr) return fallback;
  if (p->has_bool_param()) return p->bool_param();
  return WrongType(name, "bool");
}

absl::Status CheckOipParameters(const OipParameters& params, const std::vector<std::string>& known,
                                const std::string& where) {
  for (const auto& [name, value] : params) {
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": unknown parameter \"", Bounded(name, 64), "\"",
                       known.empty() ? std::string("; it takes none")
                                     : absl::StrCat("; it takes ", absl::StrJoin(known, ", "))));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> RequestedOipOutputs(
    const ModelInferRequest& request, const std::vector<std::string>& available) {
  if (request.outputs_size() == 0) return available;
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (int i = 0; i < request.outputs_size(); ++i) {
    const std::string& name = request.outputs(i).name();
    if (std::find(available.begin(), available.end(), name) == available.end()) {
      return absl::InvalidArgumentError(absl::StrCat("outputs[", i, "]: no output \"",
                                                     Bounded(name, 64), "\"; this model has ",
                                                     absl::StrJoin(available, ", ")));
    }
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("outputs[", i, "]: \"", Bounded(name, 64), "\" is asked for twice"));
    }
    out.push_back(name);
  }
  return out;
}

void AddOipFp32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v,
                bool raw, inference::ModelInferResponse* out) {
  auto* t = out->add_outputs();
  t->set_name(name);
  t->set_datatype("FP32");
  for (int64_t d : shape) t->add_shape(d);
  if (raw) {
    out->add_raw_output_contents(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  } else {
    t->mutable_contents()->mutable_fp32_contents()->Add(v.begin(), v.end());
  }
}

void AddOipBytes(const std::string& name, std::vector<int64_t> shape,
                 const std::vector<std::string>& v, bool raw, inference::ModelInferResponse* out) {
  auto* t = out->add_outputs();
  t->set_name(name);
  t->set_datatype("BYTES");
  for (int64_t d : shape) t->add_shape(d);
  if (raw) {
    out->add_raw_output_contents(JoinOipBytes(v));
  } else {
    for (const std::string& s : v) t->mutable_contents()->add_bytes_contents(s);
  }
}

}  // namespace tlserve
