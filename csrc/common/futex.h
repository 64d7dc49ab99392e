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

}  // namespace fastps
