// The calling convention of every entry point: tensors are tch's handles (`at::Tensor*`, what
// torch-sys calls C_tensor), and each function returns NULL on success or an error message
// the Rust side takes over and frees with sp_free_error. No C++ exception crosses into Rust.
#pragma once
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>
#include <ATen/ATen.h>

namespace sp {
inline char* error(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out) std::memcpy(out, msg.c_str(), msg.size() + 1);
  return out;
}
inline std::vector<at::Tensor> tensors(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; i++) out.push_back(*ts[i]);
  return out;
}
}  // namespace sp

#define SP_TRY try {
#define SP_CATCH                                              \
  }                                                           \
  catch (const c10::Error& e) {                               \
    return sp::error(e.what_without_backtrace());             \
  }                                                           \
  catch (const std::exception& e) {                           \
    return sp::error(e.what());                               \
  }                                                           \
  catch (...) {                                               \
    return sp::error("unknown C++ exception");                \
  }                                                           \
  return nullptr;
