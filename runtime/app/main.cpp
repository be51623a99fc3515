#include "runtime/app/cli.hpp"

int main(int argc, char** argv) {
  return hsm::run_cli(argc, argv);
}
