// Stress test of Note [Inline tasks] (csrc/server/shard.h): producers mix
// Shard::submit() and Shard::run_inline(); every task appends to one
// non-atomic log. Checks that every task ran exactly once and that each
// producer's tasks ran in the order it issued them (an inline task never
// overtakes a queued one). Meant to run under -fsanitize=thread as well, which
// reports any overlap of two users of the shard's data.
//
// Prints "N passed, M failed" like test_transport and exits non-zero on failure.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "server/shard.h"

using namespace fastps;

namespace {

struct Log {
  std::vector<std::pair<int, int>> entries;  // (producer, sequence number)
};

struct LogTask : Task {
  Log* log = nullptr;
  int producer = 0;
  int seq = 0;
  void run(Shard&) override { log->entries.push_back({producer, seq}); }
};

// Returns the number of tasks that ran inline, or -1 on a failed check.
int stress(int producers, int tasks, int pause_every) {
  Log log;
  std::atomic<int> inline_runs{0};
  {
    Shard shard(0);
    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        for (int i = 0; i < tasks; ++i) {
          auto t = std::make_unique<LogTask>();
          t->log = &log;
          t->producer = p;
          t->seq = i;
          std::unique_ptr<Task> task = std::move(t);
          if (i % 3 != 0 && shard.run_inline(task)) {
            inline_runs.fetch_add(1);
          } else {
            shard.submit(std::move(task));
          }
          // Pauses let the shard fall asleep, so that inline runs happen.
          if (pause_every > 0 && i % pause_every == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
      });
    }
    for (auto& t : threads) t.join();
  }  // ~Shard drains the queue
  if (log.entries.size() != size_t(producers) * size_t(tasks)) {
    std::printf("  %zu tasks ran, expected %d\n", log.entries.size(), producers * tasks);
    return -1;
  }
  std::vector<int> last(producers, -1);
  for (auto& e : log.entries) {
    if (e.second != last[e.first] + 1) {
      std::printf("  producer %d: task %d ran after task %d\n", e.first, e.second, last[e.first]);
      return -1;
    }
    last[e.first] = e.second;
  }
  return inline_runs.load();
}

}  // namespace

int main() {
  int passed = 0, failed = 0;
  struct Case {
    const char* name;
    int producers, tasks, pause_every;
  } cases[] = {{"busy_shard_mostly_queued", 4, 20000, 0}, {"idle_shard_mostly_inline", 4, 4000, 7}};
  for (const Case& c : cases) {
    std::printf("[ RUN  ] %s\n", c.name);
    int inl = stress(c.producers, c.tasks, c.pause_every);
    if (inl < 0) {
      std::printf("[ FAIL ] %s\n", c.name);
      ++failed;
    } else {
      std::printf("  info: %d of %d tasks ran inline\n[  OK  ] %s\n", inl, c.producers * c.tasks, c.name);
      ++passed;
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
