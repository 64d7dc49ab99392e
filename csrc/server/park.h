// Parking: what the server holds for requests that wait for a later round or
// step, and the per-connection budget that bounds it.
//
// Note [Parked requests]
// A request that waits for a later round or step (a PULL, a PUSH_PULL, a
// SPARSE_PULL, a SPARSE_STATS, a BSP SPARSE_PUSH) is parked on its shard. What
// the server holds for it is bounded by what its peer sent: the payload as
// received (a sparse request's ids, which its per-shard index lists double),
// and a small fixed record. Nothing is sized by a number in the request until
// the reply is produced: a sparse pull's rows are made by the first shard that
// can fill them, a dense pull is answered from the chunk itself. So a pull of
// one id of a wide table for a step no one will reach costs its 56 bytes, not
// the 64 MiB of its eventual reply.
// Per connection, a ParkBudget counts the parked requests and their payload
// bytes across shards (atomics: the shard that parks a request takes from it,
// a Parked ticket gives back when the request is answered or dropped). A
// request that only reads (PULL, SPARSE_PULL, SPARSE_STATS) and would take
// the connection past max_parked_requests or max_parked_bytes is answered
// ERROR(LIMIT) at once and changes nothing. A push that joins a round is
// counted but never refused: its gradient is already part of the round (on
// some shards, for a sparse push), and a worker has at most one waiting per
// chunk or table and round, so the job's size bounds them.
// When a connection closes, every shard drops the requests it parked for it
// (on_disconnect), whatever the rank's other connections do; a rank whose last
// connection closed is, in addition, dead (Note [Consistency] in
// server/consistency.h).
//
// Thread safety: ParkBudget and ParkCounters are atomics, any thread; a
// Parked ticket and a waiting list belong to one shard thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fastps {

// Parked requests and the payload bytes they hold.
struct ParkCounters {
  std::atomic<int64_t> requests{0};
  std::atomic<int64_t> bytes{0};
};

// One connection's parked requests, counted into the whole server's `total`.
class ParkBudget {
 public:
  ParkBudget(int64_t max_requests, int64_t max_bytes, std::shared_ptr<ParkCounters> total)
      : max_requests_(max_requests), max_bytes_(max_bytes), total_(std::move(total)) {}

  // Any thread. Counts one more parked request holding `bytes`. With
  // `capped`, refuses instead (counting nothing) when that would take the
  // connection past a limit, and returns why; "" when counted.
  std::string take(int64_t bytes, bool capped);
  void give(int64_t bytes);

 private:
  const int64_t max_requests_;
  const int64_t max_bytes_;
  const std::shared_ptr<ParkCounters> total_;
  ParkCounters mine_;
};

using ParkBudgetPtr = std::shared_ptr<ParkBudget>;

// One request's share of its connection's ParkBudget, given back when the
// ticket goes. Move-only.
class Parked {
 public:
  Parked() = default;
  Parked(ParkBudgetPtr budget, int64_t bytes) : budget_(std::move(budget)), bytes_(bytes) {}
  Parked(Parked&& other) noexcept : budget_(std::move(other.budget_)), bytes_(other.bytes_) {}
  Parked& operator=(Parked&& other) noexcept {
    if (this != &other) {
      release();
      budget_ = std::move(other.budget_);
      bytes_ = other.bytes_;
    }
    return *this;
  }
  Parked(const Parked&) = delete;
  Parked& operator=(const Parked&) = delete;
  ~Parked() { release(); }

 private:
  void release() {
    if (budget_) budget_->give(bytes_);
    budget_.reset();
  }
  ParkBudgetPtr budget_;
  int64_t bytes_ = 0;
};

// A ticket for a request that is about to wait, holding `bytes` of payload;
// throws CapacityError (naming server `server_id`) instead when `capped` and
// the connection's budget is spent.
Parked park(const ParkBudgetPtr& budget, int64_t bytes, bool capped, int server_id);

// Gives a waiting list's memory back once most of it is unused: a burst of
// parked requests must not stay allocated after they went. The slack of 4x
// keeps the cost amortised O(1) per request.
template <typename T>
void trim_waiting(std::vector<T>& v) {
  if (v.capacity() > 64 && v.size() < v.capacity() / 4) v.shrink_to_fit();
}

// Takes the waiters `pred` selects out of `waiting`, both parts in their order.
template <typename T, typename Pred>
std::vector<T> take_waiting(std::vector<T>& waiting, Pred pred) {
  std::vector<T> taken;
  auto keep = waiting.begin();
  for (auto it = waiting.begin(); it != waiting.end(); ++it) {
    if (pred(*it)) {
      taken.push_back(std::move(*it));
    } else {
      if (keep != it) *keep = std::move(*it);
      ++keep;
    }
  }
  waiting.erase(keep, waiting.end());
  trim_waiting(waiting);
  return taken;
}

}  // namespace fastps
