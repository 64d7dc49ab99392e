#include "common/completion.h"

#include <thread>

#include "common/error.h"

namespace fastps {

void Completion::wait(Clock::time_point deadline, const std::string& what) {
  // Short spin first: shard work on a small step often finishes in microseconds.
  for (int i = 0; i < 64 && !finished(); ++i) cpu_relax();
  for (;;) {
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint32_t left = remaining_.load(std::memory_order_seq_cst);
    bool in_time = left == 0 || futex_wait_until(&remaining_, left, deadline);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    if (left == 0) break;
    if (!in_time && !finished()) {
      throw TimeoutError(detail::concat("fastps: timed out waiting for ", what,
                                        " (raise the timeout with FASTPS_TIMEOUT or timeout=)"));
    }
  }
  // A copy: wait() may be called again (a Future waited twice), and must throw
  // the same error again.
  if (failed_.load(std::memory_order_acquire)) {
    std::exception_ptr error = error_;
    std::rethrow_exception(error);
  }
}

}  // namespace fastps
