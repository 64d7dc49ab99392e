// Stress test of Note [Inline tasks] and Note [Helping a shard]
// (csrc/server/shard.h): producers mix Shard::submit(), Shard::run_inline()
// and Shard::help(); every task appends to one non-atomic log. Checks that
// every task ran exactly once and that each producer's tasks ran in the order
// it issued them (an inline or helped task never overtakes a queued one).
// Then Server::run_each() from several threads at once, with a failing piece,
// and Note [One shard state]: an embedded sparse table lives in its shards'
// states, and leaves them when it goes.
// Meant to run under -fsanitize=thread as well, which reports any overlap of
// two users of a shard's data.
//
// Prints "N passed, M failed" like test_transport and exits non-zero on failure.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <mutex>
#include <memory>
#include <thread>
#include <utility>
#include <stdexcept>
#include <string>
#include <vector>

#include "client/sparse_client.h"
#include "server/server.h"
#include "server/shard.h"
#include "server/shard_state.h"

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
// help_every > 0: every help_every-th task is submitted with a completion
// that the producer then helps along and waits for.
int stress(int producers, int tasks, int pause_every, int help_every = 0) {
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
          if (help_every > 0 && i % help_every == 0) {
            auto done = std::make_shared<Completion>(1);
            task->completion = done;
            const Task* mine = task.get();
            shard.submit(std::move(task));
            shard.help(mine, *done);
            done->wait(Clock::now() + std::chrono::seconds(60), "a helped task");
          } else if (i % 3 != 0 && shard.run_inline(task)) {
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

struct PieceTask : Task {
  std::vector<int>* log = nullptr;  // this shard's log: only its current user touches it
  int value = 0;
  bool fail = false;
  void run(Shard&) override {
    if (fail) throw std::runtime_error("piece failed");
    log->push_back(value);
  }
};

// Threads call Server::run_each() on a 3-shard server at once; each call
// gives every shard one piece (the last thread's pieces sometimes skip a
// shard) and every 50th call has a failing piece, whose error must reach
// that caller only. Returns false on a failed check.
bool run_each_stress(int threads, int calls) {
  constexpr int kShards = 3;
  std::vector<std::vector<int>> logs(kShards);
  std::atomic<int> errors{0}, wrong{0};
  std::mutex kept_mu;
  std::vector<std::exception_ptr> kept;
  {
    Server server(ServerOptions{kShards});
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        for (int i = 0; i < calls; ++i) {
          std::vector<std::unique_ptr<Task>> pieces(kShards);
          const bool failing = i % 50 == 49;
          for (int s = 0; s < kShards; ++s) {
            if (t == threads - 1 && (i + s) % 4 == 0) continue;
            auto p = std::make_unique<PieceTask>();
            p->log = &logs[s];
            p->value = t * calls + i;
            p->fail = failing && s == 1;
            pieces[s] = std::move(p);
          }
          const bool expect_error = failing && pieces[1] != nullptr;
          try {
            server.run_each(std::move(pieces), Clock::now() + std::chrono::seconds(60), "a test fan-out");
            if (expect_error) wrong.fetch_add(1);
          } catch (const std::runtime_error& e) {
            if (!expect_error || std::string(e.what()) != "piece failed") wrong.fetch_add(1);
            errors.fetch_add(1);
            // Kept until the threads are joined: the exception's last release then
            // happens here, after the join, rather than on a shard thread dropping
            // the last reference to its Completion (libstdc++'s exception_ptr
            // reference count is not instrumented, so ThreadSanitizer would call
            // that release a race with this thread's reads).
            std::lock_guard<std::mutex> lock(kept_mu);
            kept.push_back(std::current_exception());
          }
        }
      });
    }
    for (auto& th : ts) th.join();
  }
  size_t expected = 0;
  for (int s = 0; s < kShards; ++s) {
    for (int t = 0; t < threads; ++t)
      for (int i = 0; i < calls; ++i) {
        const bool skipped = t == threads - 1 && (i + s) % 4 == 0;
        const bool failed = i % 50 == 49 && s == 1;
        expected += !skipped && !failed;
      }
  }
  size_t ran = 0;
  for (auto& l : logs) ran += l.size();
  if (wrong.load() != 0 || ran != expected) {
    std::printf("  %d wrong outcomes; %zu pieces ran, expected %zu\n", wrong.load(), ran, expected);
    return false;
  }
  std::printf("  info: %d calls raised their piece's error\n", errors.load());
  return true;
}

// Sparse slices per shard of `server`, counted on each shard's thread.
std::vector<size_t> sparse_slices(Server& server) {
  struct Count : Task {
    size_t* out = nullptr;
    void run(Shard& shard) override { *out = shard.state().sparse.size(); }
  };
  std::vector<size_t> n(size_t(server.num_shards()), 0);
  std::vector<std::unique_ptr<Task>> tasks;
  for (int s = 0; s < server.num_shards(); ++s) {
    auto t = std::make_unique<Count>();
    t->out = &n[size_t(s)];
    tasks.push_back(std::move(t));
  }
  server.run_each(std::move(tasks), Clock::now() + std::chrono::seconds(30), "counting slices");
  return n;
}

// Two embedded tables on one server: each shard holds one slice of each
// (rows pushed to one are not seen by the other), and none once both went.
bool sparse_tables_live_in_shard_state() {
  Server server(ServerOptions{3});
  SparseTableConfig config;
  config.dim = 4;
  bool ok = true;
  {
    ShardedSparseTable a(server, config), b(server, config);
    for (size_t n : sparse_slices(server)) ok &= n == 2;
    const int64_t ids[3] = {1, 2, 3};
    const float grads[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    SparseOptim rule;
    rule.rule = config.rule;
    a.push(ids, 3, grads, rule, 1);
    ok &= a.size() == 3 && b.size() == 0;
  }
  for (size_t n : sparse_slices(server)) ok &= n == 0;
  return ok;
}

}  // namespace

int main() {
  int passed = 0, failed = 0;
  struct Case {
    const char* name;
    int producers, tasks, pause_every, help_every;
  } cases[] = {{"busy_shard_mostly_queued", 4, 20000, 0, 0},
               {"idle_shard_mostly_inline", 4, 4000, 7, 0},
               {"helpers_drain_the_queue", 4, 20000, 0, 5},
               {"helpers_and_inline_on_idle_shard", 4, 4000, 7, 2}};
  for (const Case& c : cases) {
    std::printf("[ RUN  ] %s\n", c.name);
    int inl = stress(c.producers, c.tasks, c.pause_every, c.help_every);
    if (inl < 0) {
      std::printf("[ FAIL ] %s\n", c.name);
      ++failed;
    } else {
      std::printf("  info: %d of %d tasks ran inline\n[  OK  ] %s\n", inl, c.producers * c.tasks, c.name);
      ++passed;
    }
  }
  std::printf("[ RUN  ] failed_completion_throws_at_every_wait\n");
  {
    Completion c(1);
    c.done(std::make_exception_ptr(std::runtime_error("piece failed")));
    int thrown = 0;
    for (int i = 0; i < 3; ++i) {
      try {
        c.wait(Clock::now() + std::chrono::seconds(1), "a failed completion");
      } catch (const std::runtime_error& e) {
        thrown += std::string(e.what()) == "piece failed";
      }
    }
    std::printf(thrown == 3 ? "[  OK  ] failed_completion_throws_at_every_wait\n"
                            : "[ FAIL ] failed_completion_throws_at_every_wait\n");
    (thrown == 3 ? passed : failed) += 1;
  }
  std::printf("[ RUN  ] run_each_from_many_threads\n");
  if (run_each_stress(4, 3000)) {
    std::printf("[  OK  ] run_each_from_many_threads\n");
    ++passed;
  } else {
    std::printf("[ FAIL ] run_each_from_many_threads\n");
    ++failed;
  }
  const bool slices = sparse_tables_live_in_shard_state();
  std::printf(slices ? "[  OK  ] sparse_tables_live_in_shard_state\n" : "[ FAIL ] sparse_tables_live_in_shard_state\n");
  (slices ? passed : failed) += 1;
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
