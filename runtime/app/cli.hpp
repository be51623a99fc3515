#pragma once

// The `hsm-driver` command line (README, "Command line" and
// "Configuration"): the CLI11 tree, every option declared once, and the
// dispatch to one subcommand (commands.hpp). `main` only calls `run_cli`.

namespace hsm {

/// Parses argv, runs the subcommand, prints its JSON result on stdout and
/// logs on stderr. Returns the process exit code (output.hpp): 0 success,
/// 1 the operation failed, 2 bad usage or configuration.
int run_cli(int argc, char** argv);

} // namespace hsm
