// Helpers shared by the tests: where the fixtures are and how to compare
// vectors with PyTorch's references.
#ifndef TLSERVE_TESTS_TEST_UTIL_H_
#define TLSERVE_TESTS_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace tlserve::testing {

// Made by tests/fixtures/make_fixtures.py (the CTest fixture "fixtures").
inline std::string Fixture(const std::string& name) {
  const char* dir = std::getenv("TLSERVE_FIXTURES");
  return std::string(dir ? dir : "fixtures") + "/" + name;
}

inline std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline std::vector<float> ReadF32(const std::string& path) {
  const std::string b = ReadBytes(path);
  std::vector<float> v(b.size() / sizeof(float));
  std::copy(b.data(), b.data() + v.size() * sizeof(float), reinterpret_cast<char*>(v.data()));
  return v;
}

inline double Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

inline double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

inline double MaxAbs(const std::vector<float>& a) {
  double m = 0;
  for (float x : a) m = std::max(m, double(std::fabs(x)));
  return m;
}

}  // namespace tlserve::testing

#endif  // TLSERVE_TESTS_TEST_UTIL_H_
