#include "common/futex.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>

namespace fastps {

namespace {
long futex(std::atomic<uint32_t>* word, int op, uint32_t val, const timespec* ts) {
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, val, ts, nullptr, 0);
}

bool wait_until(std::atomic<uint32_t>* word, int op, uint32_t expected, Clock::time_point deadline) {
  auto now = Clock::now();
  if (now >= deadline) return false;
  auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
  timespec ts{static_cast<time_t>(left / 1000000000), static_cast<long>(left % 1000000000)};
  futex(word, op, expected, &ts);
  return Clock::now() < deadline;
}
}  // namespace

bool futex_wait_until(std::atomic<uint32_t>* word, uint32_t expected, Clock::time_point deadline) {
  return wait_until(word, FUTEX_WAIT_PRIVATE, expected, deadline);
}

bool futex_wait_shared_until(std::atomic<uint32_t>* word, uint32_t expected, Clock::time_point deadline) {
  return wait_until(word, FUTEX_WAIT, expected, deadline);
}

void futex_wake_shared(std::atomic<uint32_t>* word) { futex(word, FUTEX_WAKE, INT32_MAX, nullptr); }

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
  futex(word, FUTEX_WAIT_PRIVATE, expected, nullptr);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  futex(word, FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr);
}

}  // namespace fastps
