#include "server/core/catalog/access.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "server/core/catalog/tenant_key.h"

namespace tlserve {
namespace {

// Lines without comments and blanks: (line number, fields).
std::vector<std::pair<int, std::vector<std::string>>> Lines(const std::string& text) {
  std::vector<std::pair<int, std::vector<std::string>>> out;
  int n = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++n;
    if (auto hash = line.find('#'); hash != absl::string_view::npos) line = line.substr(0, hash);
    std::vector<std::string> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (!fields.empty()) out.emplace_back(n, std::move(fields));
  }
  return out;
}

bool ParseHex32(const std::string& hex, std::array<unsigned char, 32>* out) {
  if (hex.size() != 64) return false;
  for (size_t i = 0; i < 32; ++i) {
    int v = 0;
    for (int k = 0; k < 2; ++k) {
      const char c = hex[2 * i + k];
      const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
      if (d < 0) return false;
      v = v * 16 + d;
    }
    (*out)[i] = static_cast<unsigned char>(v);
  }
  return true;
}

}  // namespace

const char* RoleName(Role role) {
  switch (role) {
    case Role::kAdmin:
      return "admin";
    case Role::kWrite:
      return "write";
    case Role::kRead:
      break;
  }
  return "read";
}

absl::StatusOr<ApiKeys> ApiKeys::Parse(const std::string& text) {
  ApiKeys keys;
  for (auto& [n, f] : Lines(text)) {
    auto bad = [n = n](const std::string& why) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", n, ": ", why,
                       " (lines are TENANT ROLE SHA256HEX [LABEL] or TENANT ROLE "
                       "cn:COMMON_NAME [LABEL])"));
    };
    if (f.size() < 3 || f.size() > 4) return bad(absl::StrCat(f.size(), " fields"));
    Entry e;
    if (absl::Status s = ValidateTenant(f[0]); !s.ok()) return bad(std::string(s.message()));
    e.principal.tenant = f[0];
    if (f[1] == "admin") {
      e.principal.role = Role::kAdmin;
    } else if (f[1] == "write") {
      e.principal.role = Role::kWrite;
    } else if (f[1] == "read") {
      e.principal.role = Role::kRead;
    } else {
      return bad(absl::StrCat("role \"", f[1].substr(0, 32), "\" is not admin, write or read"));
    }
    if (absl::StartsWith(f[2], "cn:")) {
      e.common_name = f[2].substr(3);
      if (e.common_name.empty()) return bad("cn: needs a common name");
    } else if (!ParseHex32(f[2], &e.digest)) {
      return bad("the key's hash is not 64 lowercase hex digits (printf %s \"$KEY\" | sha256sum)");
    }
    e.principal.label = f.size() == 4 ? f[3] : absl::StrCat(f[0], "-line", n);
    for (const Entry& other : keys.entries_) {
      if (e.common_name.empty() ? (other.common_name.empty() && other.digest == e.digest)
                                : other.common_name == e.common_name) {
        return bad("the same key (or common name) is on an earlier line");
      }
    }
    keys.entries_.push_back(std::move(e));
  }
  return keys;
}

std::optional<Principal> ApiKeys::FindKey(absl::string_view key) const {
  std::array<unsigned char, 32> digest{};
  SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), digest.data());
  const Entry* found = nullptr;
  for (const Entry& e : entries_) {
    const bool match =
        CRYPTO_memcmp(e.digest.data(), digest.data(), digest.size()) == 0 && e.common_name.empty();
    if (match) found = &e;
  }
  if (found == nullptr) return std::nullopt;
  return found->principal;
}

std::optional<Principal> ApiKeys::FindCommonName(absl::string_view common_name) const {
  for (const Entry& e : entries_) {
    if (!e.common_name.empty() && e.common_name == common_name) return e.principal;
  }
  return std::nullopt;
}

absl::StatusOr<QuotaTable> QuotaTable::Parse(const std::string& text, QuotaLimits defaults) {
  QuotaTable table(defaults);
  for (auto& [n, f] : Lines(text)) {
    auto bad = [n = n](const std::string& why) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", n, ": ", why, " (lines are TENANT QUOTA VALUE)"));
    };
    if (f.size() != 3) return bad(absl::StrCat(f.size(), " fields"));
    if (absl::Status s = ValidateTenant(f[0]); !s.ok()) return bad(std::string(s.message()));
    int64_t v = 0;
    if (!absl::SimpleAtoi(f[2], &v) || v < 0) return bad("VALUE must be an integer >= 0");
    QuotaLimits& q = table.overrides_.try_emplace(f[0], defaults).first->second;
    if (f[1] == "storage_mb") {
      q.storage_bytes = v << 20;
    } else if (f[1] == "datasets") {
      q.datasets = v;
    } else if (f[1] == "images") {
      q.images = v;
    } else if (f[1] == "models") {
      q.models = v;
    } else if (f[1] == "private_params") {
      q.private_params = v;
    } else if (f[1] == "jobs") {
      q.jobs = v;
    } else if (f[1] == "inflight_images") {
      q.inflight_images = v;
    } else {
      return bad(absl::StrCat("unknown quota \"", f[1].substr(0, 32),
                              "\": use storage_mb, datasets, images, models, private_params, "
                              "jobs or inflight_images"));
    }
  }
  return table;
}

const QuotaLimits& QuotaTable::For(const std::string& tenant) const {
  auto it = overrides_.find(tenant);
  return it == overrides_.end() ? defaults_ : it->second;
}

}  // namespace tlserve
