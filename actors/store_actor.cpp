#include "actors/store_actor.hpp"

#include "runtime/base/logging.hpp"
#include "runtime/crypto/hex.hpp"

#include <algorithm>
#include <deque>
#include <iterator>
#include <list>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hsm {

namespace {

/// Key records by key id, evicting the least recently used beyond
/// `capacity`.
class record_cache {
public:
  explicit record_cache(size_t capacity) : capacity_(capacity) {
    // nop
  }

  // The index holds views into the list's nodes: moving keeps the nodes,
  // copying would not.
  record_cache(const record_cache&) = delete;
  record_cache& operator=(const record_cache&) = delete;
  record_cache(record_cache&&) noexcept = default;
  record_cache& operator=(record_cache&&) noexcept = default;
  ~record_cache() = default;

  /// The record under `key_id`, now the most recently used; or null.
  const key_record* find(const std::string& key_id) {
    auto i = index_.find(key_id);
    if (i == index_.end())
      return nullptr;
    order_.splice(order_.begin(), order_, i->second);
    return &*i->second;
  }

  /// Remembers `rec` as the most recently used record.
  void insert(const key_record& rec) {
    if (capacity_ == 0)
      return;
    if (auto i = index_.find(rec.key_id); i != index_.end()) {
      // Records are immutable: the cached one is the same.
      order_.splice(order_.begin(), order_, i->second);
      return;
    }
    if (order_.size() >= capacity_) {
      index_.erase(order_.back().key_id);
      order_.pop_back();
    }
    order_.push_front(rec);
    // The view points into the list node, which never moves.
    index_.emplace(order_.front().key_id, order_.begin());
  }

  size_t size() const noexcept {
    return order_.size();
  }

  size_t capacity() const noexcept {
    return capacity_;
  }

private:
  size_t capacity_;
  /// Most recently used first.
  std::list<key_record> order_;
  std::unordered_map<std::string_view, std::list<key_record>::iterator> index_;
};

/// A put waiting for its group's commit.
struct pending_put {
  key_record rec;
  /// Appended with `rec` if it is inserted.
  std::optional<audit_entry> audit;
  caf::typed_response_promise<put_result> rp;
};

struct store_state {
  std::shared_ptr<store::key_store> st;
  std::string driver_id;
  size_t max_group = 1;
  record_cache cache{0};
  std::deque<pending_put> pending;
  /// A `flush_atom` is on its way to the actor.
  bool flush_scheduled = false;
  store_stats stats;
  std::shared_ptr<driver_metrics> metrics;
  store_role role = store_role::keys;
  /// When the database last answered (success or failure), on the actor
  /// clock.
  caf::actor_clock::time_point answered_at;
};

using store_ptr = storage_actor::stateful_pointer<store_state>;

/// The database answered an operation `op` at `now`: with success or an
/// error.
void answered(store_state& s, caf::actor_clock::time_point now, store_op op,
              bool ok) {
  s.answered_at = now;
  if (!s.metrics)
    return;
  s.metrics->store_answered(s.role, ok);
  if (!ok)
    s.metrics->count_store_error(op);
}

/// The info line of each audit row written: the trail in the log too.
void log_audit_rows(const std::vector<audit_row>& rows) {
  auto log = logger("audit");
  for (const auto& r : rows)
    log->info("[req={}] {} key={} {}{}{} outcome={} driver={} seq={} "
              "hash={}",
              r.entry.request_id, audit_kind_name(r.entry.kind), r.entry.key_id,
              r.entry.public_key_fingerprint,
              r.entry.payload_sha256.empty() ? "" : " payload_sha256=",
              crypto::to_hex(r.entry.payload_sha256), r.entry.outcome,
              r.driver_id, r.seq, crypto::to_hex(r.entry_hash));
}

/// Commits the oldest pending puts (at most `max_group`) with one
/// `put_many_audited`, then answers each of them: with its result after the
/// commit, or with the error.
void commit_group(store_ptr self) {
  auto& s = self->state;
  auto n = std::min(s.pending.size(), s.max_group);
  if (n == 0)
    return;
  std::vector<key_record> recs;
  store::put_audit audit;
  std::vector<caf::typed_response_promise<put_result>> promises;
  recs.reserve(n);
  promises.reserve(n);
  bool audited = false;
  for (size_t i = 0; i < n; ++i) {
    auto& p = s.pending.front();
    audited = audited || p.audit.has_value();
    recs.push_back(std::move(p.rec));
    audit.entries.push_back(std::move(p.audit));
    promises.push_back(std::move(p.rp));
    s.pending.pop_front();
  }
  if (audited)
    audit.driver_id = s.driver_id;
  else
    audit.entries.clear();
  auto res = s.st->put_many_audited(recs, audit);
  if (res && res->results.size() != n)
    res = store::make_query_failed(
      store::put_label(recs) + ": " + std::to_string(res->results.size())
      + " results for " + std::to_string(n) + " records");
  answered(s, self->clock().now(), store_op::put, static_cast<bool>(res));
  if (!res) {
    ++s.stats.failed_groups;
    logger("store")->warn("{}: {}", store::put_label(recs),
                          describe(res.error()));
    for (auto& rp : promises)
      rp.deliver(res.error());
    return;
  }
  ++s.stats.commits;
  s.stats.committed_puts += n;
  s.stats.audited += res->rows.size();
  log_audit_rows(res->rows);
  for (size_t i = 0; i < n; ++i) {
    s.cache.insert(res->results[i].record);
    promises[i].deliver(std::move(res->results[i]));
  }
}

/// Takes a put into the next group.
caf::typed_response_promise<put_result>
enqueue_put(store_ptr self, const key_record& rec,
            std::optional<audit_entry> audit) {
  auto& s = self->state;
  auto rp = self->make_response_promise<put_result>();
  s.pending.push_back(pending_put{rec, std::move(audit), rp});
  if (!s.flush_scheduled) {
    // Queued behind every put already in the mailbox: they all join this
    // group.
    s.flush_scheduled = true;
    self->send(self, flush_atom_v);
  }
  return rp;
}

storage_actor::behavior_type store_impl(store_ptr self,
                                        std::shared_ptr<store::key_store> st,
                                        store_actor_config cfg) {
  self->state.st = std::move(st);
  self->state.driver_id = cfg.driver_id;
  self->state.max_group = std::max(cfg.max_group, size_t{1});
  self->state.cache = record_cache{cfg.cache_capacity};
  self->state.metrics = cfg.metrics;
  self->state.role = cfg.role;
  self->state.answered_at = self->clock().now();
  auto health_interval = cfg.metrics ? cfg.health_interval
                                     : std::chrono::milliseconds{0};
  if (health_interval.count() > 0)
    self->delayed_send(self, health_interval, caf::ping_atom_v);
  // Puts already taken in were promised a commit: keep that promise on an
  // orderly stop. `kill` cannot be trapped; its requesters time out.
  self->set_exit_handler([self](caf::exit_msg& msg) {
    while (!self->state.pending.empty())
      commit_group(self);
    self->quit(std::move(msg.reason));
  });
  return {
    [self](caf::get_atom,
           const std::string& key_id) -> caf::result<key_lookup> {
      auto& s = self->state;
      if (const auto* hit = s.cache.find(key_id)) {
        ++s.stats.cache_hits;
        return key_lookup{true, *hit};
      }
      ++s.stats.cache_misses;
      auto rec = s.st->get(key_id);
      answered(s, self->clock().now(), store_op::get, static_cast<bool>(rec));
      if (!rec)
        return std::move(rec.error());
      if (!*rec)
        return key_lookup{};
      s.cache.insert(**rec);
      return key_lookup{true, std::move(**rec)};
    },
    [self](caf::put_atom, const key_record& rec) -> caf::result<put_result> {
      return enqueue_put(self, rec, std::nullopt);
    },
    [self](caf::put_atom, const key_record& rec, const audit_entry& entry)
      -> caf::result<put_result> { return enqueue_put(self, rec, entry); },
    [self](audit_atom, const audit_batch& batch) -> caf::result<bool> {
      auto& s = self->state;
      auto rows = s.st->append_audit(s.driver_id, batch.entries);
      answered(s, self->clock().now(), store_op::audit,
               static_cast<bool>(rows));
      auto log = logger("audit");
      if (!rows) {
        ++s.stats.failed_audits;
        log->warn("appending {} audit entr{} failed: {}", batch.entries.size(),
                  batch.entries.size() == 1 ? "y" : "ies",
                  describe(rows.error()));
        return std::move(rows.error());
      }
      s.stats.audited += rows->size();
      log_audit_rows(*rows);
      return true;
    },
    [self](flush_atom) {
      auto& s = self->state;
      commit_group(self);
      // A longer backlog goes on in another group, after the gets that
      // came in meanwhile.
      if (s.pending.empty())
        s.flush_scheduled = false;
      else
        self->send(self, flush_atom_v);
    },
    [self, health_interval](caf::ping_atom) {
      // The health check: ask the database only when it has been quiet.
      auto& s = self->state;
      auto now = self->clock().now();
      if (now - s.answered_at >= health_interval)
        answered(s, now, store_op::ping,
                 static_cast<bool>(s.st->schema_version()));
      self->delayed_send(self, health_interval, caf::ping_atom_v);
    },
    [self](stats_atom) {
      auto& s = self->state;
      auto out = s.stats;
      out.cache_size = s.cache.size();
      out.cache_capacity = s.cache.capacity();
      out.pending = s.pending.size();
      return out;
    },
  };
}

} // namespace

storage_actor spawn_store_actor(caf::actor_system& sys,
                                std::shared_ptr<store::key_store> st,
                                store_actor_config cfg) {
  return spawn_as(sys, cfg.mode, store_impl, std::move(st), cfg);
}

} // namespace hsm
