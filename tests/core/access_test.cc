// The API keys and quotas files (server/core/catalog/access.h) and tenant
// keys (tenant_key.h): parsing, lookups, and the errors a user gets.
#include "server/core/catalog/access.h"

#include <gtest/gtest.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/core/catalog/tenant_key.h"
#include "server/core/datasets.h"
#include "server/core/sha256.h"

namespace tlserve {
namespace {

TEST(ApiKeys, ParsesKeysCommonNamesAndComments) {
  const std::string text =
      absl::StrCat("# keys\n\n", "acme write ", Sha256Hex("k1"), " ci   # the CI's key\n",
                   "acme\tread\t", Sha256Hex("k2"), "\n", "ops admin ", Sha256Hex("k3"),
                   " oncall\n", "acme write cn:trainer.acme cert\n");
  auto keys = ApiKeys::Parse(text);
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(keys->size(), 4u);
  auto p = keys->FindKey("k1");
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->tenant, "acme");
  EXPECT_EQ(p->role, Role::kWrite);
  EXPECT_EQ(p->label, "ci");
  p = keys->FindKey("k2");
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->role, Role::kRead);
  EXPECT_EQ(p->label, "acme-line4");  // no label: the tenant and the line
  EXPECT_EQ(keys->FindKey("k3")->role, Role::kAdmin);
  EXPECT_FALSE(keys->FindKey("k4").has_value());
  EXPECT_FALSE(keys->FindKey("").has_value());
  EXPECT_FALSE(keys->FindKey(Sha256Hex("k1")).has_value());  // the hash is not the key
  EXPECT_FALSE(keys->FindKey("cn:trainer.acme").has_value());
  auto cert = keys->FindCommonName("trainer.acme");
  ASSERT_TRUE(cert.has_value());
  EXPECT_EQ(cert->tenant, "acme");
  EXPECT_EQ(cert->label, "cert");
  EXPECT_FALSE(keys->FindCommonName("trainer").has_value());
}

TEST(ApiKeys, BadLinesAreNamed) {
  const std::string h = Sha256Hex("k");
  struct Case {
    std::string text, expect;
  };
  for (const Case& c : std::vector<Case>{
           {"acme write\n", "line 1: 2 fields"},
           {absl::StrCat("\nacme owner ", h, "\n"), "line 2: role \"owner\""},
           {"acme write ABCDEF\n", "64 lowercase hex"},
           {absl::StrCat("acme write ", absl::AsciiStrToUpper(h), "\n"), "64 lowercase hex"},
           {absl::StrCat("Acme write ", h, "\n"), "not a valid tenant"},
           {absl::StrCat("ac:me write ", h, "\n"), "not a valid tenant"},
           {absl::StrCat("a write ", h, "\nb read ", h, "\n"), "line 2: the same key"},
           {"a write cn:\n", "cn: needs a common name"},
           {absl::StrCat("a write ", h, " label extra\n"), "5 fields"},
       }) {
    auto keys = ApiKeys::Parse(c.text);
    ASSERT_FALSE(keys.ok()) << c.text;
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(keys.status().message(), c.expect)) << keys.status();
  }
  EXPECT_TRUE(ApiKeys::Parse("").ok());  // no keys: every call UNAUTHENTICATED
}

TEST(QuotaTable, OverridesOnTopOfDefaults) {
  QuotaLimits defaults;
  defaults.models = 10;
  defaults.inflight_images = 64;
  auto table = QuotaTable::Parse("acme models 3\nacme storage_mb 2\n# x\nbeta jobs 0\n", defaults);
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->For("acme").models, 3);
  EXPECT_EQ(table->For("acme").storage_bytes, int64_t{2} << 20);
  EXPECT_EQ(table->For("acme").inflight_images, 64);  // the default where not overridden
  EXPECT_EQ(table->For("beta").jobs, 0);
  EXPECT_EQ(table->For("other").models, 10);
  for (const char* bad : {"acme models\n", "acme widgets 3\n", "acme models -1\n",
                          "acme models many\n", "ACME models 1\n"}) {
    auto t = QuotaTable::Parse(bad, defaults);
    EXPECT_FALSE(t.ok()) << bad;
    EXPECT_TRUE(absl::StrContains(t.status().message(), "line 1")) << t.status();
  }
}

TEST(TenantKey, DefaultTenantKeysAreBareNames) {
  EXPECT_EQ(TenantKey("default", "shirts"), "shirts");
  EXPECT_EQ(TenantKey("acme", "shirts"), "acme:shirts");
  EXPECT_EQ(SplitTenantKey("shirts"),
            std::make_pair(std::string("default"), std::string("shirts")));
  EXPECT_EQ(SplitTenantKey("acme:shirts"),
            std::make_pair(std::string("acme"), std::string("shirts")));
  EXPECT_EQ(TenantOf("acme:shirts"), "acme");
  // Keys are names the catalogue accepts; a bad tenant part is not.
  EXPECT_TRUE(DatasetCatalog::ValidateName("acme:shirts", "name").ok());
  EXPECT_FALSE(DatasetCatalog::ValidateName("Acme:shirts", "name").ok());
  EXPECT_FALSE(DatasetCatalog::ValidateName("acme:", "name").ok());
  EXPECT_FALSE(DatasetCatalog::ValidateName("acme/shirts", "name").ok());
  EXPECT_TRUE(ValidateTenant("team-7.prod").ok());
  EXPECT_FALSE(ValidateTenant("").ok());
  EXPECT_FALSE(ValidateTenant(std::string(65, 'a')).ok());
}

}  // namespace
}  // namespace tlserve
