#include "server/park.h"

#include "common/error.h"

namespace fastps {

std::string ParkBudget::take(int64_t bytes, bool capped) {
  const int64_t n = mine_.requests.fetch_add(1, std::memory_order_relaxed) + 1;
  const int64_t b = mine_.bytes.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  if (capped && (n > max_requests_ || b > max_bytes_)) {
    mine_.requests.fetch_sub(1, std::memory_order_relaxed);
    mine_.bytes.fetch_sub(bytes, std::memory_order_relaxed);
    if (n > max_requests_)
      return detail::concat("this connection has ", n - 1, " requests waiting for a later round or step, and ",
                            max_requests_, " is the most one connection may park; wait for their replies "
                            "before asking for more (docs/protocol.md, Limits)");
    return detail::concat("the requests waiting on this connection for a later round or step hold ", b - bytes,
                          " bytes; this one (", bytes, " bytes) would pass the ", max_bytes_,
                          " bytes one connection may park; wait for their replies before asking for more "
                          "(docs/protocol.md, Limits)");
  }
  total_->requests.fetch_add(1, std::memory_order_relaxed);
  total_->bytes.fetch_add(bytes, std::memory_order_relaxed);
  return std::string();
}

void ParkBudget::give(int64_t bytes) {
  mine_.requests.fetch_sub(1, std::memory_order_relaxed);
  mine_.bytes.fetch_sub(bytes, std::memory_order_relaxed);
  total_->requests.fetch_sub(1, std::memory_order_relaxed);
  total_->bytes.fetch_sub(bytes, std::memory_order_relaxed);
}

Parked park(const ParkBudgetPtr& budget, int64_t bytes, bool capped, int server_id) {
  const std::string why = budget->take(bytes, capped);
  FASTPS_CHECK_TYPED(CapacityError, why.empty(), "server ", server_id, ": ", why);
  return Parked(budget, bytes);
}

}  // namespace fastps
