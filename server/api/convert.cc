#include "server/api/convert.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tlserve {

absl::StatusOr<std::shared_ptr<std::vector<ImageInput>>> ToImageInputs(
    const google::protobuf::RepeatedPtrField<v1::Image>& images, int64_t first_index) {
  auto out = std::make_shared<std::vector<ImageInput>>();
  out->reserve(images.size());
  for (int i = 0; i < images.size(); ++i) {
    const v1::Image& image = images[i];
    ImageInput in;
    in.index = first_index + i;
    in.name = image.name();
    switch (image.data_case()) {
      case v1::Image::kEncoded:
        in.kind = ImageInput::Kind::kEncoded;
        in.data = image.encoded();
        break;
      case v1::Image::kTensor: {
        const v1::RawTensor& t = image.tensor();
        if (t.layout() == v1::RawTensor::UINT8_HWC) {
          in.kind = ImageInput::Kind::kUint8Hwc;
        } else if (t.layout() == v1::RawTensor::FLOAT32_CHW) {
          in.kind = ImageInput::Kind::kFloatChw;
        } else {
          return absl::InvalidArgumentError(absl::StrCat(
              "images[", in.index, "].tensor.layout must be UINT8_HWC or FLOAT32_CHW"));
        }
        in.data = t.data();
        in.shape.assign(t.shape().begin(), t.shape().end());
        break;
      }
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("images[", in.index, "]", in.name.empty() ? "" : " (\"" + in.name + "\")",
                         " has no data: set encoded (JPEG/PNG bytes) or tensor"));
    }
    out->push_back(std::move(in));
  }
  return out;
}

Pool FromProto(v1::Pool pool) { return pool == v1::POOL_MAX ? Pool::kMax : Pool::kAvg; }

void ToProto(const Backbone& backbone, const BackboneSummary& summary,
             v1::DescribeBackboneResponse* out) {
  out->set_file_name(backbone.file_name());
  out->set_sha256(backbone.sha256());
  out->set_device(backbone.device());
  out->set_dtype(backbone.dtype());
  out->set_embedding_dim(backbone.embedding_dim());
  out->set_pretrained(backbone.pretrained());
  const PreprocessSpec& p = backbone.preprocess();
  out->mutable_preprocessing()->set_resize(p.resize);
  out->mutable_preprocessing()->set_crop(p.crop);
  for (int c = 0; c < 3; ++c) {
    out->mutable_preprocessing()->add_mean(p.mean[c]);
    out->mutable_preprocessing()->add_std(p.std[c]);
  }
  for (int64_t d : summary.input_shape) out->add_input_shape(d);
  for (const StageInfo& s : summary.stages) {
    v1::Stage* stage = out->add_stages();
    stage->set_name(s.name);
    stage->set_type(s.type);
    for (int64_t d : s.output_shape) stage->add_output_shape(d);
    stage->set_params(s.params);
    stage->set_trainable(s.trainable);
    stage->set_head(s.head);
  }
  out->set_total_params(summary.total_params);
  out->set_trainable_params(summary.trainable_params);
}

}  // namespace tlserve
