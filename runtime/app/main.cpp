#include "runtime/app/commands.hpp"

int main(int argc, char** argv) {
  return hsm::run_cli(argc, argv);
}
