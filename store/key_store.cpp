#include "store/key_store.hpp"

#include <algorithm>

namespace hsm::store {

caf::error make_unavailable(std::string msg) {
  return caf::make_error(store_errc::unavailable, std::move(msg));
}

caf::error make_query_failed(std::string msg) {
  return caf::make_error(store_errc::query_failed, std::move(msg));
}

caf::error make_corrupt_row(std::string msg) {
  return caf::make_error(store_errc::corrupt_row, std::move(msg));
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

} // namespace hsm::store
