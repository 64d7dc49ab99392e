#include "server/server.h"

#include <algorithm>
#include <thread>

#include "common/error.h"

namespace fastps {

Server::Server(const ServerOptions& options) {
  int n = options.num_shards;
  FASTPS_CHECK(n >= 0 && n <= 1024, "fastps: num_shards must be in [0, 1024], got ", n);
  if (n == 0) n = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8);
  shards_.reserve(n);
  for (int i = 0; i < n; ++i) shards_.push_back(std::make_unique<Shard>(i));
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

}  // namespace fastps
