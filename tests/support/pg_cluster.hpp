#pragma once

// Test support: the PostgreSQL server that PostgreSQL tests run against.
// Either the shared cluster that deploy/run-tests.sh started (its URL in
// HSM_TEST_POSTGRES_URL, its folder in HSM_TEST_PG_DIR), or a private one
// this process starts on first use with deploy/pg-test-cluster.sh and stops
// at exit. Each test takes a database of its own from `fresh_database`, so
// tests stay isolated on a shared cluster. If no server can be reached or
// started, the calls add a GoogleTest failure that says why (PostgreSQL
// tests never skip). Any thread may call these functions.

#include <string>

namespace hsm::test {

/// A URL of the test cluster's `postgres` database, or "" (after adding a
/// test failure) if there is no cluster. Starts the private cluster on
/// first use when HSM_TEST_POSTGRES_URL is not set.
std::string postgres_url();

/// Creates a database with a name no other test uses and returns a URL for
/// it (same host, port and user as `postgres_url()`), or "" after adding a
/// test failure. Waits a few seconds for a server that is restarting.
std::string fresh_database();

/// Drops the database that `url` (from `fresh_database`) names, closing its
/// connections; best effort, for clean-up.
void drop_database(const std::string& url);

/// Restarts the server (fast shutdown, then start on the same port); adds a
/// test failure if that fails. Returns once the server accepts connections.
void restart_postgres();

/// Stops the server at once, as a crash would (immediate shutdown).
void kill_postgres();

/// Starts the server again after `kill_postgres`, on the same port; returns
/// once it accepts connections.
void start_postgres_again();

} // namespace hsm::test
