// One shard of a server: a thread that alone owns a slice of the tables.
//
// Note [Shard ownership]
// Every chunk and every sparse row belongs to exactly one shard, and only
// that shard's thread reads or writes it (all of it is the shard's
// ShardState, Note [One shard state] in server/shard_state.h). Other threads never touch the
// data: they push a Task into the shard's lock-free MPSC queue and wait on a
// Completion. So the update path takes no mutex and needs no atomics beyond
// the queue itself (the shared-nothing model of Seastar).
//
// Note [Shard wakeups]
// An idle shard spins briefly, then sleeps on a futex word. A producer pushes,
// then bumps the word and wakes the sleeper only if it announced sleep. The
// consumer reads the word before announcing and re-checks the queue after, so
// a push that races with falling asleep is never missed.
//
// Note [Inline tasks]
// Waking a sleeping shard costs a futex call and a context switch (5-10 us
// on a small machine), more than a small task itself. So a producer may run a
// task itself, on its own thread, when the shard is asleep with nothing
// queued (run_inline()). Ownership stays exclusive: the shard thread and an
// inline runner both hold `owner_` while they touch the shard's data, the
// shard thread from before it pops until its queue is drained, so the data
// still has one user at a time (with acquire/release between them), and a
// task queued earlier always runs before an inline one: the runner looks at
// the queue only after it holds `owner_`, and backs off if anything is there.
//
// Note [Helping a shard]
// A woken shard thread may wait for a core: on a small machine the other
// core is often held by a thread that spins after its own work (torch's
// OpenMP workers spin for a while after every parallel op), and the kernel
// gives the core to the shard only after a few hundred microseconds. A caller
// that waits for the shard would sleep through that; instead, help() lets it
// drain the shard's queue itself while the shard thread has not taken it up.
// It takes `owner_` exactly as the shard thread does (the queue's single
// consumer is whoever holds `owner_`), runs queued tasks in order, and stops
// once it ran the caller's own task, so that it moves on to the caller's next
// shard instead of serving other callers.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "common/completion.h"
#include "common/mpsc_queue.h"

namespace fastps {

class Shard;
struct ShardState;  // server/shard_state.h

// A unit of work for a shard. run() executes on the shard thread; exceptions it
// throws are reported to `completion`.
struct Task : MpscNode {
  CompletionPtr completion;
  virtual void run(Shard& shard) = 0;
};

class Shard {
 public:
  // An embedded server's shard (one worker, BSP), or one with `state`.
  explicit Shard(int index);
  Shard(int index, std::unique_ptr<ShardState> state);
  ~Shard();  // drains the queue, then joins the thread
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  // Any thread. Takes ownership of the task.
  void submit(std::unique_ptr<Task> task);
  // Any thread: runs `task` here and now if the shard is idle (Note [Inline
  // tasks]) and returns true, with `task` consumed; else returns false and
  // leaves `task` to the caller (who then submits it).
  bool run_inline(std::unique_ptr<Task>& task);
  // Any thread: runs tasks from the queue here, in order, until it ran
  // `mine` (a task this caller submitted), the queue is empty or `until` is
  // finished, if the shard thread is not draining it (Note [Helping a
  // shard]). Returns at once otherwise.
  void help(const Task* mine, const Completion& until);

  int index() const { return index_; }
  // Shard thread only (or a task's runner: Note [Inline tasks]).
  ShardState& state() { return *state_; }

 private:
  void loop();
  void wake();

  const int index_;
  MpscQueue queue_;
  alignas(64) std::atomic<uint32_t> wake_seq_{0};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> owner_{false};  // held while the shard's data is in use
  std::atomic<bool> stop_{false};
  std::unique_ptr<ShardState> state_;
  std::thread thread_;
};

}  // namespace fastps
