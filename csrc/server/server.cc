#include "server/server.h"

#include <algorithm>
#include <thread>

#include "common/error.h"
#include "server/shard_state.h"

namespace fastps {

Server::Server(const ServerOptions& options) {
  int n = options.num_shards;
  FASTPS_CHECK(n >= 0 && n <= 1024, "fastps: num_shards must be in [0, 1024], got ", n);
  if (n == 0) n = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8);
  shards_.reserve(n);
  for (int i = 0; i < n; ++i)
    shards_.push_back(std::make_unique<Shard>(
        i, std::make_unique<ShardState>(options.server_id, options.num_workers, options.staleness)));
}

Server::~Server() = default;

void Server::submit(int shard, std::unique_ptr<Task> task) {
  FASTPS_ASSERT(shard >= 0 && shard < num_shards());
  shards_[shard]->submit(std::move(task));
}

bool Server::run_inline(int shard, std::unique_ptr<Task>& task) {
  FASTPS_ASSERT(shard >= 0 && shard < num_shards());
  return shards_[shard]->run_inline(task);
}

void Server::run_each(std::vector<std::unique_ptr<Task>> per_shard, Clock::time_point deadline,
                      const char* what) {
  FASTPS_ASSERT(per_shard.size() <= shards_.size());
  uint32_t pieces = 0;
  int last = -1;
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (!per_shard[s]) continue;
    ++pieces;
    last = static_cast<int>(s);
  }
  if (pieces == 0) return;
  auto completion = std::make_shared<Completion>(pieces);
  std::vector<const Task*> mine(per_shard.size(), nullptr);  // identities only, once submitted
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (!per_shard[s]) continue;
    per_shard[s]->completion = completion;
    mine[s] = per_shard[s].get();
  }
  for (int s = 0; s < last; ++s)
    if (per_shard[s]) shards_[s]->submit(std::move(per_shard[s]));
  if (shards_[last]->run_inline(per_shard[last]))
    mine[last] = nullptr;
  else
    shards_[last]->submit(std::move(per_shard[last]));
  for (int s = 0; s <= last && !completion->finished(); ++s)
    if (mine[s] != nullptr) shards_[s]->help(mine[s], *completion);
  completion->wait(deadline, what);
}

}  // namespace fastps
