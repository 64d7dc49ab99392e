// Lock-free multi-producer single-consumer queue of intrusive nodes.
//
// Design note: this is the classic linked MPSC queue (one atomic exchange per
// push, wait-free for producers; pop is lock-free for the single consumer). A
// node is owned by the queue between push() and the pop() that returns it.
// There is one transient state: a producer has swapped `head_` but not yet
// linked its node; pop() then returns nullptr although the queue is not empty.
// Consumers must therefore not treat nullptr as "empty forever": shard threads
// re-check after the producer's wakeup (see Note [Shard wakeups]).
//
// "The consumer" is one thread at a time, not always the same one: a shard
// hands its queue between its thread and helpers (Note [Helping a shard] in
// server/shard.h) with an acquire/release flag. `tail_` is atomic (relaxed:
// that flag orders the real accesses) only so that looks_empty() may be asked
// by any thread, as a hint, while another consumes.
#pragma once

#include <atomic>

namespace fastps {

struct MpscNode {
  std::atomic<MpscNode*> next_{nullptr};
  virtual ~MpscNode() = default;
};

class MpscQueue {
 public:
  MpscQueue() : head_(&stub_), tail_(&stub_) {}
  MpscQueue(const MpscQueue&) = delete;
  MpscQueue& operator=(const MpscQueue&) = delete;

  // Any thread. Takes ownership of `node`.
  void push(MpscNode* node) {
    node->next_.store(nullptr, std::memory_order_relaxed);
    MpscNode* prev = head_.exchange(node, std::memory_order_acq_rel);
    prev->next_.store(node, std::memory_order_release);
  }

  // The consumer only. Returns nullptr when empty (or transiently mid-push).
  MpscNode* pop() {
    MpscNode* tail = tail_.load(std::memory_order_relaxed);
    MpscNode* next = tail->next_.load(std::memory_order_acquire);
    if (tail == &stub_) {
      if (next == nullptr) return nullptr;
      tail_.store(next, std::memory_order_relaxed);
      tail = next;
      next = next->next_.load(std::memory_order_acquire);
    }
    if (next != nullptr) {
      tail_.store(next, std::memory_order_relaxed);
      return tail;
    }
    if (tail != head_.load(std::memory_order_acquire)) return nullptr;  // mid-push
    push(&stub_);
    next = tail->next_.load(std::memory_order_acquire);
    if (next != nullptr) {
      tail_.store(next, std::memory_order_relaxed);
      return tail;
    }
    return nullptr;
  }

  // Any thread, a hint: true if no node is linked (may miss one mid-push, and
  // be stale while another thread consumes).
  bool looks_empty() const {
    return tail_.load(std::memory_order_relaxed) == &stub_ &&
           stub_.next_.load(std::memory_order_acquire) == nullptr &&
           head_.load(std::memory_order_acquire) == &stub_;
  }

 private:
  struct Stub : MpscNode {};
  alignas(64) std::atomic<MpscNode*> head_;
  alignas(64) std::atomic<MpscNode*> tail_;
  Stub stub_;
};

}  // namespace fastps
