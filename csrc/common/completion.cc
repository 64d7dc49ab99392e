#include "common/completion.h"

#include <thread>

#include "common/error.h"

namespace fastps {

void Completion::wait(Clock::time_point deadline, const std::string& what) {
  // Short spin first: shard work on a small step often finishes in microseconds.
  for (int i = 0; i < 64 && !finished(); ++i) cpu_relax();
  for (;;) {
    uint32_t left = remaining_.load(std::memory_order_acquire);
    if (left == 0) break;
    if (!futex_wait_until(&remaining_, left, deadline) && !finished()) {
      throw TimeoutError(detail::concat("fastps: timed out waiting for ", what,
                                        " (raise the timeout with FASTPS_TIMEOUT or timeout=)"));
    }
  }
  if (failed_.load(std::memory_order_acquire)) std::rethrow_exception(error_);
}

}  // namespace fastps
