// Typed errors of the fastps core.
//
// FASTPS_CHECK(cond, ...) throws for anything a user or a peer can cause; the
// bindings translate each type to its Python counterpart (see src/bindings.cc).
// FASTPS_ASSERT(cond) aborts: it guards internal invariants only.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

namespace fastps {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad arguments from the caller (shape, dtype, unknown key, bad option).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A wait passed its deadline.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

// A peer could not be reached or went away.
class ConnectionError : public Error {
 public:
  using Error::Error;
};

// A transport that was asked for cannot work in this process: the "ucx"
// transport where the UCX plugin or the system's UCX cannot be loaded. The
// message says why and what to set instead.
class TransportUnavailable : public ConnectionError {
 public:
  using ConnectionError::ConnectionError;
};

// A peer sent something that breaks the wire protocol.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

// A push needs a row but the table is at max_rows and eviction is off.
class CapacityError : public Error {
 public:
  using Error::Error;
};

// A table file is corrupt, truncated or not a table file, or could not be
// read or written (the message names the file and the OS error).
class CheckpointError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
[[noreturn]] inline void assert_fail(const char* cond, const char* file, int line) {
  std::fprintf(stderr, "fastps internal assertion failed: %s at %s:%d\n", cond, file, line);
  std::abort();
}
}  // namespace detail

// The text of an errno value, e.g. for "...: Connection refused".
inline std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

}  // namespace fastps

#define FASTPS_CHECK_TYPED(type, cond, ...)                          \
  do {                                                               \
    if (!(cond)) throw type(::fastps::detail::concat(__VA_ARGS__));  \
  } while (0)

#define FASTPS_CHECK(cond, ...) FASTPS_CHECK_TYPED(::fastps::InvalidArgument, cond, __VA_ARGS__)

#define FASTPS_ASSERT(cond)                                                        \
  do {                                                                             \
    if (!(cond)) ::fastps::detail::assert_fail(#cond, __FILE__, __LINE__);         \
  } while (0)
