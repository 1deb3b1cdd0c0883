#include "server/core/pil_resize.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace tlserve {
namespace {

double Bilinear(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Keys' cubic convolution with a = -0.5.
double Bicubic(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// 8 bits of result, 2 for the sums of coefficients that leave [0, 1] (a
// filter with negative lobes), the rest fraction.
constexpr int kPrecisionBits = 32 - 8 - 2;

// For each output position: the first input position it reads, how many,
// and their fixed-point weights (`size` of them in every row).
struct Weights {
  int size = 0;
  std::vector<int> first, count;
  std::vector<int32_t> w;
};

Weights Precompute(int64_t in_size, int64_t out_size, PilFilter filter) {
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double filter_scale = std::max(scale, 1.0);
  const double support = (filter == PilFilter::kBilinear ? 1.0 : 2.0) * filter_scale;
  Weights k;
  k.size = static_cast<int>(std::ceil(support)) * 2 + 1;
  k.first.resize(out_size);
  k.count.resize(out_size);
  k.w.assign(static_cast<size_t>(out_size) * k.size, 0);
  std::vector<double> row(k.size);
  const double inverse_scale = 1.0 / filter_scale;  // multiplied by, as Pillow does
  for (int64_t o = 0; o < out_size; ++o) {
    const double center = (static_cast<double>(o) + 0.5) * scale;
    // As C's (int) conversion: toward zero, then clamped into the image.
    const int lo = std::max(0, static_cast<int>(center - support + 0.5));
    const int hi = std::min(static_cast<int>(in_size), static_cast<int>(center + support + 0.5));
    const int n = std::max(0, hi - lo);
    double total = 0;
    for (int i = 0; i < n; ++i) {
      const double x = (i + lo - center + 0.5) * inverse_scale;
      row[i] = filter == PilFilter::kBilinear ? Bilinear(x) : Bicubic(x);
      total += row[i];
    }
    for (int i = 0; i < n; ++i) {
      const double v = total != 0.0 ? row[i] / total : row[i];
      const double fixed = v * static_cast<double>(1 << kPrecisionBits);
      // Rounded half away from zero, truncated as C does.
      k.w[o * k.size + i] = static_cast<int32_t>(v < 0 ? fixed - 0.5 : fixed + 0.5);
    }
    k.first[o] = lo;
    k.count[o] = n;
  }
  return k;
}

uint8_t Clip8(int64_t v) {
  v >>= kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

}  // namespace

at::Tensor PilResize(const at::Tensor& hwc, int64_t out_h, int64_t out_w, PilFilter filter) {
  at::Tensor in = hwc.contiguous();
  const int64_t in_h = in.size(0), in_w = in.size(1), c = in.size(2);
  const Weights horizontal = Precompute(in_w, out_w, filter);
  Weights vertical = Precompute(in_h, out_h, filter);
  const bool need_horizontal = out_w != in_w;
  const bool need_vertical = out_h != in_h;
  // Only the input rows the vertical pass reads go through the horizontal one.
  const int row_first = vertical.first[0];
  const int row_last = vertical.first[out_h - 1] + vertical.count[out_h - 1];
  if (need_horizontal) {
    for (int64_t o = 0; o < out_h; ++o) vertical.first[o] -= row_first;
    at::Tensor temp = at::empty({row_last - row_first, out_w, c}, in.options());
    const uint8_t* src = in.data_ptr<uint8_t>();
    uint8_t* dst = temp.data_ptr<uint8_t>();
    for (int64_t y = row_first; y < row_last; ++y) {
      const uint8_t* line = src + y * in_w * c;
      uint8_t* out = dst + (y - row_first) * out_w * c;
      for (int64_t x = 0; x < out_w; ++x) {
        const int32_t* w = &horizontal.w[x * horizontal.size];
        const int first = horizontal.first[x], n = horizontal.count[x];
        for (int64_t ch = 0; ch < c; ++ch) {
          int64_t sum = int64_t{1} << (kPrecisionBits - 1);
          for (int i = 0; i < n; ++i) sum += int64_t{line[(first + i) * c + ch]} * w[i];
          out[x * c + ch] = Clip8(sum);
        }
      }
    }
    in = temp;
  }
  if (!need_vertical) return in;
  const int64_t width = in.size(1);
  at::Tensor result = at::empty({out_h, width, c}, in.options());
  const uint8_t* src = in.data_ptr<uint8_t>();
  uint8_t* dst = result.data_ptr<uint8_t>();
  for (int64_t y = 0; y < out_h; ++y) {
    const int32_t* w = &vertical.w[y * vertical.size];
    const int first = vertical.first[y], n = vertical.count[y];
    for (int64_t x = 0; x < width * c; ++x) {
      int64_t sum = int64_t{1} << (kPrecisionBits - 1);
      for (int i = 0; i < n; ++i) sum += int64_t{src[(first + i) * width * c + x]} * w[i];
      dst[y * width * c + x] = Clip8(sum);
    }
  }
  return result;
}

}  // namespace tlserve
