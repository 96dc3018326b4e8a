// Declarations only: see README.md beside this file. ProcessGroupGloo::setTimeout, an inline
// virtual that libtorch_cpu itself compiles (selfplay never calls it), names this member.
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
