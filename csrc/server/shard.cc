#include "server/shard.h"

#include <exception>

#include "server/shard_state.h"

namespace fastps {

namespace {
constexpr int kSpinBeforeSleep = 200;  // short: spinning hurts on oversubscribed cores
}  // namespace

Shard::Shard(int index) : Shard(index, std::make_unique<ShardState>(0, 1, 0)) {}

Shard::Shard(int index, std::unique_ptr<ShardState> state) : index_(index), state_(std::move(state)) {
  thread_ = std::thread([this] { loop(); });
}

Shard::~Shard() {
  stop_.store(true, std::memory_order_seq_cst);
  wake();
  thread_.join();
}

void Shard::wake() {
  wake_seq_.fetch_add(1, std::memory_order_seq_cst);
  if (sleeping_.load(std::memory_order_seq_cst)) futex_wake_all(&wake_seq_);
}

void Shard::submit(std::unique_ptr<Task> task) {
  queue_.push(task.release());
  wake();
}

namespace {
void run_task(std::unique_ptr<Task> task, Shard& shard) {
  CompletionPtr completion = std::move(task->completion);
  std::exception_ptr error;
  try {
    task->run(shard);
  } catch (...) {
    error = std::current_exception();
  }
  task.reset();
  // Outside the handler, and moved into the completion, so that this thread
  // holds no reference to the exception once done() has released the waiter.
  if (completion) completion->done(std::move(error));
}
}  // namespace

bool Shard::run_inline(std::unique_ptr<Task>& task) {
  if (!sleeping_.load(std::memory_order_acquire)) return false;
  if (owner_.exchange(true, std::memory_order_acquire)) return false;
  if (!queue_.looks_empty()) {  // earlier tasks first: leave this one to the queue
    owner_.store(false, std::memory_order_release);
    return false;
  }
  run_task(std::move(task), *this);
  owner_.store(false, std::memory_order_release);
  return true;
}

void Shard::help(const Task* mine, const Completion& until) {
  if (until.finished() || queue_.looks_empty()) return;
  if (owner_.exchange(true, std::memory_order_acquire)) return;  // the shard thread is at it
  while (!until.finished()) {
    MpscNode* node = queue_.pop();
    if (node == nullptr) break;
    const bool last = node == mine;  // compared before it runs (and is freed)
    run_task(std::unique_ptr<Task>(static_cast<Task*>(node)), *this);
    if (last) break;
  }
  owner_.store(false, std::memory_order_release);
}

void Shard::loop() {
  int idle = 0;
  for (;;) {
    if (!queue_.looks_empty()) {
      // See Note [Inline tasks]: hold the data while draining the queue.
      if (owner_.exchange(true, std::memory_order_acquire)) {
        // An inline runner has the data (it may be sending its reply, or be
        // preempted): give it the core rather than spin against it.
        std::this_thread::yield();
        continue;
      }
      while (MpscNode* node = queue_.pop()) run_task(std::unique_ptr<Task>(static_cast<Task*>(node)), *this);
      owner_.store(false, std::memory_order_release);
      idle = 0;
      continue;
    }
    if (stop_.load(std::memory_order_acquire) && queue_.looks_empty()) return;
    if (++idle < kSpinBeforeSleep) {
      cpu_relax();
      continue;
    }
    // See Note [Shard wakeups].
    uint32_t seq = wake_seq_.load(std::memory_order_seq_cst);
    sleeping_.store(true, std::memory_order_seq_cst);
    if (queue_.looks_empty() && !stop_.load(std::memory_order_seq_cst)) futex_wait(&wake_seq_, seq);
    sleeping_.store(false, std::memory_order_relaxed);
    idle = 0;
  }
}

}  // namespace fastps
