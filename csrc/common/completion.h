// A countdown that one caller waits on, with a deadline, while shard threads
// finish the pieces of its request. The first error a piece reports is kept and
// re-thrown to the waiter (exceptions never die on a background thread).
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <utility>

#include "common/futex.h"

namespace fastps {

class Completion {
 public:
  explicit Completion(uint32_t pieces) : remaining_(pieces) {}

  // Any thread; called exactly once per piece. `error` may be null.
  void done(std::exception_ptr error = nullptr) {
    if (error) {
      bool expected = false;
      if (failed_.compare_exchange_strong(expected, true, std::memory_order_acq_rel)) error_ = std::move(error);
    }
    // Wake only a waiter that announced itself (a futex call costs a
    // syscall; most completions are seen by a spinning waiter, or before any
    // wait). seq_cst pairs with wait()'s announce-then-check.
    if (remaining_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        sleepers_.load(std::memory_order_seq_cst) != 0) {
      futex_wake_all(&remaining_);
    }
  }

  bool finished() const { return remaining_.load(std::memory_order_acquire) == 0; }

  // Blocks until every piece is done or `deadline` passes (throws TimeoutError
  // naming `what`). Re-throws the first error a piece reported, at every call.
  void wait(Clock::time_point deadline, const std::string& what);

 private:
  std::atomic<uint32_t> remaining_;
  std::atomic<uint32_t> sleepers_{0};  // threads inside futex_wait on remaining_
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

using CompletionPtr = std::shared_ptr<Completion>;

}  // namespace fastps
