#include "server/consistency.h"

#include <algorithm>

#include "common/error.h"

namespace fastps {

Consistency::Consistency(int server_id, int num_workers, int staleness)
    : server_id_(server_id),
      num_workers_(num_workers),
      staleness_(staleness),
      dead_(size_t(num_workers), false),
      dead_reason_(size_t(num_workers)) {}

void Consistency::check_worker(int worker, const char* what) const {
  FASTPS_CHECK(worker >= 0 && worker < num_workers_, what, " from rank ", worker, " but the job has ",
               num_workers_, " workers");
}

bool Consistency::ready(const Progress& p, uint32_t need) const {
  if (p.in_rounds) return p.done >= int64_t(need);
  if (staleness_ < 0) return true;
  uint32_t slowest = UINT32_MAX;
  for (int w = 0; w < num_workers_; ++w) slowest = std::min(slowest, (*p.clock)[size_t(w)]);
  return uint64_t(slowest) + uint64_t(staleness_) >= need;
}

bool Consistency::unreachable(const Progress& p, uint32_t need) const {
  if (!any_dead_) return false;
  if (p.in_rounds) return true;  // the round needs every worker's push
  for (int w = 0; w < num_workers_; ++w)
    if (dead_[size_t(w)] && uint64_t((*p.clock)[size_t(w)]) + uint64_t(std::max(staleness_, 0)) < need)
      return true;
  return false;
}

bool Consistency::worker_died(int worker, const std::string& reason) {
  if (worker < 0 || worker >= num_workers_) return false;
  dead_[size_t(worker)] = true;
  dead_reason_[size_t(worker)] = reason;
  any_dead_ = true;
  return true;
}

std::string Consistency::describe_dead(int worker) const {
  const std::string& why = dead_reason_[size_t(worker)];
  return why.empty() ? detail::concat("worker rank ", worker, " disconnected")
                     : detail::concat("worker rank ", worker, " disconnected (", why, ")");
}

std::string Consistency::dead_text() const {
  for (int w = 0; w < num_workers_; ++w)
    if (dead_[size_t(w)]) return detail::concat("server ", server_id_, ": ", describe_dead(w));
  return std::string();
}

std::string RoundMembers::list() const {
  std::string who;
  for (size_t w = 0; w < joined_.size(); ++w)
    if (joined_[w]) who += detail::concat(who.empty() ? "" : ", ", w);
  return who;
}

}  // namespace fastps
