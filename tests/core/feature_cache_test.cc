#include "server/core/feature_cache.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

namespace tlserve {
namespace {

at::Tensor Vec(float v) { return at::full({4}, v); }  // 16 bytes

TEST(FeatureCacheTest, ReturnsWhatWasPut) {
  FeatureCache c(1024);
  EXPECT_FALSE(c.Get("a").defined());
  c.Put("a", Vec(1));
  ASSERT_TRUE(c.Get("a").defined());
  EXPECT_EQ(c.Get("a")[0].item<float>(), 1);
  c.Put("a", Vec(2));  // replaces, counted once
  EXPECT_EQ(c.Get("a")[0].item<float>(), 2);
  EXPECT_EQ(c.bytes(), 16);
  EXPECT_EQ(c.size(), 1u);
}

TEST(FeatureCacheTest, EvictsLeastRecentlyUsedWithinTheBound) {
  FeatureCache c(48);  // three vectors
  c.Put("a", Vec(1));
  c.Put("b", Vec(2));
  c.Put("c", Vec(3));
  EXPECT_TRUE(c.Get("a").defined());  // a is now the most recent; b the least
  c.Put("d", Vec(4));
  EXPECT_FALSE(c.Get("b").defined());
  EXPECT_TRUE(c.Get("a").defined());
  EXPECT_TRUE(c.Get("c").defined());
  EXPECT_TRUE(c.Get("d").defined());
  EXPECT_EQ(c.bytes(), 48);
  EXPECT_EQ(c.size(), 3u);
}

TEST(FeatureCacheTest, TooLargeOrDisabledStoresNothing) {
  FeatureCache c(8);
  c.Put("a", Vec(1));
  EXPECT_FALSE(c.Get("a").defined());
  EXPECT_EQ(c.bytes(), 0);
  FeatureCache off(0);
  off.Put("a", Vec(1));
  EXPECT_EQ(off.size(), 0u);
}

}  // namespace
}  // namespace tlserve
