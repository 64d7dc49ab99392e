// See Notes [Mapped table memory] and [Populating ahead] in mapped_buffer.h.

#include "common/mapped_buffer.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <utility>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL
#endif

namespace fastps {

namespace {
size_t page_size() {
  static const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return page;
}
size_t page_round(size_t bytes) { return (bytes + page_size() - 1) / page_size() * page_size(); }
// set_huge_pages() and set_populate_ahead(): on unless the configuration
// (FASTPS_HUGE_PAGES, FASTPS_PREFAULT, resolved in Python) turns them off.
std::atomic<bool> g_huge_pages{true};
std::atomic<bool> g_populate_ahead{true};
// Cleared for good when the kernel turns MADV_POPULATE_WRITE down.
std::atomic<bool> g_populate_supported{true};
}  // namespace

struct MappedBuffer::Shared {
  std::mutex mu;  // held while the mapping moves or goes, and while a piece is populated
  unsigned char* data = nullptr;
  size_t size = 0;
};

namespace {

using Shared = MappedBuffer::Shared;

std::unique_lock<std::mutex> lock_shared(const std::shared_ptr<Shared>& s) {
  return s ? std::unique_lock<std::mutex>(s->mu) : std::unique_lock<std::mutex>();
}

// The process-wide background thread of Note [Populating ahead]. Leaked on
// purpose: nothing joins it at exit. Fork: the prepare handler waits until the
// thread holds no mapping's mutex (a piece in progress) and keeps it from
// starting another, so the child inherits no locked mutex; the child starts
// its own thread when it first asks.
class Populator {
 public:
  static Populator& get() {
    static Populator* p = [] {
      auto* q = new Populator();
      ::pthread_atfork([] { get().before_fork(); }, [] { get().after_fork(false); },
                       [] { get().after_fork(true); });
      return q;
    }();
    return *p;
  }

  void request(std::shared_ptr<Shared> s, size_t from, size_t to) {
    std::lock_guard<std::mutex> g(mu_);
    if (jobs_.size() >= kMaxJobs) return;  // a hint: dropped
    if (!started_) {
      try {
        std::thread([this] { run(); }).detach();
      } catch (const std::system_error&) {  // no thread to be had (a pids limit): populate nothing
        g_populate_supported.store(false, std::memory_order_relaxed);
        return;
      }
      started_ = true;
    }
    jobs_.push_back(Job{std::move(s), from, to});
    work_cv_.notify_one();
  }

  void drain() {
    std::unique_lock<std::mutex> lk(mu_);
    idle_cv_.wait(lk, [&] { return jobs_.empty() && !busy_; });
  }

 private:
  struct Job {
    std::shared_ptr<Shared> shared;
    size_t from, to;
  };
  static constexpr size_t kMaxJobs = 1024;
  static constexpr size_t kPiece = size_t{2} << 20;

  void run() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        work_cv_.wait(lk, [&] { return !jobs_.empty(); });
        job = std::move(jobs_.front());
        jobs_.pop_front();
        busy_ = true;
      }
      for (size_t at = job.from; at < job.to; at += kPiece) {
        {
          std::unique_lock<std::mutex> lk(mu_);
          work_cv_.wait(lk, [&] { return !forking_; });
          in_piece_ = true;
        }
        const bool more = populate(*job.shared, at, std::min(job.to, at + kPiece));
        {
          std::lock_guard<std::mutex> g(mu_);
          in_piece_ = false;
        }
        idle_cv_.notify_all();
        if (!more) break;
      }
      job.shared.reset();  // the last reference may be ours: drop it outside mu_
      {
        std::lock_guard<std::mutex> g(mu_);
        busy_ = !jobs_.empty();
      }
      idle_cv_.notify_all();
    }
  }

  // Backs [from, to) of the mapping with pages; false when there is nothing
  // more to do for this job (mapping gone or shrunk below `from`, or an error).
  static bool populate(Shared& s, size_t from, size_t to) {
    std::lock_guard<std::mutex> g(s.mu);
    if (s.data == nullptr || from >= s.size) return false;
    from = from / page_size() * page_size();
    to = page_round(std::min(to, s.size));
    if (::madvise(s.data + from, to - from, MADV_POPULATE_WRITE) == 0) return true;
    if (errno == EINVAL) g_populate_supported.store(false, std::memory_order_relaxed);
    return false;  // EINVAL: kernel without it; ENOMEM/EFAULT/...: leave it to the faults
  }

  void before_fork() {
    std::unique_lock<std::mutex> lk(mu_);
    forking_ = true;
    idle_cv_.wait(lk, [&] { return !in_piece_; });
    lk.release();  // mu_ stays locked across fork()
  }
  void after_fork(bool child) {
    forking_ = false;
    if (child) {
      // No thread here: forget it and the parent's queue. The condition
      // variables may still count waiters that were parent threads (an idle
      // populator, a drain()); glibc would wait for them on the next notify,
      // forever. So the child gets new ones (nothing of this process waits on
      // the old ones: it has only the forking thread).
      started_ = false;
      busy_ = false;
      in_piece_ = false;
      jobs_.clear();
      new (&work_cv_) std::condition_variable();
      new (&idle_cv_) std::condition_variable();
      mu_.unlock();
      return;
    }
    mu_.unlock();
    work_cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable work_cv_;  // jobs queued, or forking_ cleared
  std::condition_variable idle_cv_;  // in_piece_ or busy_ cleared
  std::deque<Job> jobs_;
  bool started_ = false;
  bool busy_ = false;      // a job taken and not finished
  bool in_piece_ = false;  // inside populate(): holds a mapping's mutex
  bool forking_ = false;
};

}  // namespace

void set_huge_pages(bool on) { g_huge_pages.store(on, std::memory_order_relaxed); }
bool huge_pages() { return g_huge_pages.load(std::memory_order_relaxed); }
void set_populate_ahead(bool on) { g_populate_ahead.store(on, std::memory_order_relaxed); }

bool populate_ahead_enabled() {
  return g_populate_ahead.load(std::memory_order_relaxed) && g_populate_supported.load(std::memory_order_relaxed);
}

void populate_ahead_drain() { Populator::get().drain(); }

MappedBuffer::MappedBuffer(size_t bytes) {
  if (bytes == 0) return;
  const size_t n = page_round(bytes);
  // MAP_NORESERVE: the pages are charged as they are touched, not the whole
  // capacity up front (a doubled table must not fail the overcommit
  // heuristic for memory it has not used yet).
  void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<unsigned char*>(p);
  size_ = n;
  advise();
}

MappedBuffer::~MappedBuffer() { release(); }

void MappedBuffer::release() {
  auto lk = lock_shared(shared_);
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  publish();
}

MappedBuffer::MappedBuffer(MappedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      shared_(std::move(other.shared_)) {}

MappedBuffer& MappedBuffer::operator=(MappedBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    shared_ = std::move(other.shared_);
  }
  return *this;
}

void MappedBuffer::grow(size_t bytes) {
  if (bytes <= size_) return;
  if (data_ == nullptr) {
    *this = MappedBuffer(bytes);
    return;
  }
  const size_t n = page_round(bytes);
  {
    auto lk = lock_shared(shared_);  // the populator must not use the old address meanwhile
    void* p = ::mremap(data_, size_, n, MREMAP_MAYMOVE);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = static_cast<unsigned char*>(p);
    size_ = n;
    publish();
  }
  advise();
}

void MappedBuffer::populate_async(size_t from, size_t to) {
  if (data_ == nullptr || from >= to || !populate_ahead_enabled()) return;
  try {
    if (!shared_) {
      shared_ = std::make_shared<Shared>();
      std::lock_guard<std::mutex> g(shared_->mu);
      publish();
    }
    Populator::get().request(shared_, from, to);
  } catch (const std::bad_alloc&) {
    // A hint: without memory for the request the pages fault in as before.
  }
}

void MappedBuffer::publish() {
  if (!shared_) return;
  shared_->data = data_;
  shared_->size = size_;
}

void MappedBuffer::advise() {
#ifdef MADV_HUGEPAGE
  if (huge_pages() && size_ >= kHugePageFrom) ::madvise(data_, size_, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
}

}  // namespace fastps
