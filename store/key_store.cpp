#include "store/key_store.hpp"

#include <algorithm>
#include <string_view>
#include <unordered_map>

namespace hsm::store {

caf::expected<std::vector<put_result>>
key_store::put_many(const std::vector<key_record>& recs) {
  auto res = put_many_audited(recs, put_audit{});
  if (!res)
    return std::move(res.error());
  return std::move(res->results);
}

caf::expected<put_result> key_store::put(const key_record& rec) {
  auto res = put_many(std::vector<key_record>{rec});
  if (!res)
    return std::move(res.error());
  if (res->size() != 1)
    return make_query_failed(put_label({rec}) + ": "
                             + std::to_string(res->size())
                             + " results for one record");
  return std::move(res->front());
}

caf::error make_unavailable(std::string msg) {
  return caf::make_error(store_errc::unavailable, std::move(msg));
}

caf::error make_query_failed(std::string msg) {
  return caf::make_error(store_errc::query_failed, std::move(msg));
}

caf::error make_corrupt_row(std::string msg) {
  return caf::make_error(store_errc::corrupt_row, std::move(msg));
}

caf::error make_schema_too_new(const std::string& where, int current,
                               int newest) {
  return caf::make_error(store_errc::schema_too_new,
                         where + ": database schema version "
                           + std::to_string(current)
                           + " is newer than this build's newest migration "
                           + std::to_string(newest));
}

caf::error sort_migrations(std::vector<migration>& ms) {
  std::sort(ms.begin(), ms.end(), [](const migration& x, const migration& y) {
    return x.version < y.version;
  });
  auto bad = [](std::string why) {
    return caf::make_error(store_errc::query_failed,
                           "invalid migration list: " + std::move(why));
  };
  for (size_t i = 0; i < ms.size(); ++i) {
    if (ms[i].version <= 0 || ms[i].sql == nullptr || ms[i].name == nullptr)
      return bad("bad entry at version " + std::to_string(ms[i].version));
    if (i > 0 && ms[i - 1].version == ms[i].version)
      return bad("version " + std::to_string(ms[i].version) + " appears twice");
  }
  return caf::none;
}

std::vector<size_t> first_of_key_id(const std::vector<key_record>& recs) {
  std::vector<size_t> out;
  out.reserve(recs.size());
  std::unordered_map<std::string_view, size_t> first;
  for (size_t i = 0; i < recs.size(); ++i)
    out.push_back(first.try_emplace(recs[i].key_id, i).first->second);
  return out;
}

std::string put_label(const std::vector<key_record>& recs) {
  constexpr size_t max_named = 3;
  if (recs.size() == 1)
    return "put key '" + recs.front().key_id + "'";
  auto out = "put " + std::to_string(recs.size()) + " keys (";
  for (size_t i = 0; i < recs.size() && i < max_named; ++i) {
    if (i > 0)
      out += ", ";
    out += "'" + recs[i].key_id + "'";
  }
  if (recs.size() > max_named)
    out += ", ...";
  return out + ")";
}

} // namespace hsm::store
