// Blocking primitives built on the Linux futex: a wait/notify word with a
// deadline, used by shard threads to sleep when idle and by callers to wait for
// their requests. See Note [Shard wakeups] in server/shard.h.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace fastps {

using Clock = std::chrono::steady_clock;

// Blocks while *word == expected, until woken or until `deadline`.
// Returns false if the deadline passed. Spurious returns are possible; callers loop.
bool futex_wait_until(std::atomic<uint32_t>* word, uint32_t expected, Clock::time_point deadline);
// Blocks while *word == expected, without a deadline (only for threads that are
// always woken on shutdown, such as shard threads).
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected);
void futex_wake_all(std::atomic<uint32_t>* word);

// The same on a word in memory shared between processes (a MAP_SHARED
// mapping): the kernel keys these waits by the physical page, not by the
// address space, so they must not use the *_PRIVATE futex operations.
bool futex_wait_shared_until(std::atomic<uint32_t>* word, uint32_t expected, Clock::time_point deadline);
void futex_wake_shared(std::atomic<uint32_t>* word);

// One spin-wait hint to the CPU (PAUSE on x86).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace fastps
