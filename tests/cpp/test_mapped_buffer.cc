// Note [Populating ahead] (csrc/common/mapped_buffer.h): the background
// thread backs pages of a MappedBuffer while its owner writes, grows (mremap
// may move the mapping) and destroys buffers. Checks that population happens
// (mincore), that contents never change, that destroying or moving a buffer
// with requests in flight is safe, and that a forked child can use it (no
// mutex inherited locked, no wait for a thread it does not have). Meant to run
// under -fsanitize=thread as well (with TSAN_OPTIONS=die_after_fork=0: the
// fork test forks a multi-threaded process on purpose).
//
// Prints "N passed, M failed" like test_transport and exits non-zero on failure.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "common/mapped_buffer.h"

using namespace fastps;

namespace {

int passed = 0, failed = 0;

void check(bool ok, const char* what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED: %s\n", what);
  }
}

// Resident pages among the pages of [p, p + bytes).
size_t resident_pages(const unsigned char* p, size_t bytes) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> v((bytes + page - 1) / page);
  if (::mincore(const_cast<unsigned char*>(p), bytes, v.data()) != 0) return 0;
  size_t n = 0;
  for (unsigned char c : v) n += c & 1;
  return n;
}

void test_populates_without_changing_contents() {
  const size_t mib = size_t{1} << 20;
  MappedBuffer b(64 * mib);
  std::memset(b.data(), 0x5a, mib);  // the owner's bytes before the window
  check(resident_pages(b.data() + 8 * mib, 8 * mib) == 0, "fresh mapping has no pages");
  b.populate_async(8 * mib, 16 * mib);
  populate_ahead_drain();
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  if (populate_ahead_enabled()) {
    check(resident_pages(b.data() + 8 * mib, 8 * mib) == 8 * mib / page, "window populated");
  } else {
    std::printf("note: MADV_POPULATE_WRITE unsupported here; population not checked\n");
  }
  bool zero = true, kept = true;
  for (size_t i = 8 * mib; i < 16 * mib; ++i) zero &= b.data()[i] == 0;
  for (size_t i = 0; i < mib; ++i) kept &= b.data()[i] == 0x5a;
  check(zero && kept, "contents unchanged by population");
}

// The owner grows (mremap, often moving), writes and destroys buffers while
// requests for them are queued or running.
void test_owner_grows_and_destroys_during_population() {
  const size_t mib = size_t{1} << 20;
  bool ok = true;
  for (int round = 0; round < 20 && ok; ++round) {
    MappedBuffer b(4 * mib);
    size_t written = 0;
    for (int step = 0; step < 6; ++step) {
      b.populate_async(written, b.size());
      for (size_t i = written; i < written + mib; i += 512) b.data()[i] = static_cast<unsigned char>(i >> 9);
      written += mib;
      b.grow(b.size() * 2);  // the populator must follow the move, never use the old address
      for (size_t i = 0; i < written && ok; i += 512) ok = b.data()[i] == static_cast<unsigned char>(i >> 9);
    }
    MappedBuffer moved(std::move(b));
    moved.populate_async(0, moved.size());
    if (round % 2 == 0) MappedBuffer().operator=(std::move(moved));  // destroyed with a request in flight
  }
  populate_ahead_drain();
  check(ok, "contents survive grows with population in flight");
}

// A grow (maybe moving the mapping) then a request past the old end: the
// thread must populate the new address (it would fail on a stale one).
void test_populates_after_grow() {
  const size_t mib = size_t{1} << 20;
  MappedBuffer b(8 * mib);
  b.populate_async(0, 4 * mib);
  populate_ahead_drain();
  MappedBuffer spacer(2 * mib);  // occupies the address after b, so that growing b moves it
  spacer.data()[0] = 1;
  const unsigned char* before = b.data();
  b.grow(64 * mib);
  b.populate_async(32 * mib, 48 * mib);
  populate_ahead_drain();
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  if (populate_ahead_enabled())
    check(resident_pages(b.data() + 32 * mib, 16 * mib) == 16 * mib / page,
          b.data() != before ? "window populated at the moved address" : "window populated after grow");
}

// fork() with the thread idle (parked on its condition variable) or busy; the
// child asks several times and drains each time, then exits.
void test_forked_child_can_populate(bool busy) {
  const size_t mib = size_t{1} << 20;
  MappedBuffer parent(32 * mib);
  parent.populate_async(0, parent.size());
  if (!busy) populate_ahead_drain();
  const pid_t pid = ::fork();
  if (pid == 0) {
    MappedBuffer b(16 * mib);
    for (int i = 0; i < 8; ++i) {
      b.populate_async(i * mib, (i + 1) * mib);
      populate_ahead_drain();  // would hang on a parent's thread or a parent's waiter
    }
    b.grow(32 * mib);
    b.populate_async(16 * mib, 32 * mib);
    populate_ahead_drain();
    b.data()[b.size() - 1] = 1;
    ::_exit(0);
  }
  int status = 0;
  bool exited = false;
  for (int i = 0; i < 300 && !exited; ++i) {  // 30 s deadline
    exited = ::waitpid(pid, &status, WNOHANG) == pid;
    if (!exited) ::usleep(100000);
  }
  if (!exited) ::kill(pid, SIGKILL), ::waitpid(pid, &status, 0);
  check(exited && WIFEXITED(status) && WEXITSTATUS(status) == 0,
        busy ? "forked child populates (thread busy at fork)" : "forked child populates (thread idle at fork)");
  populate_ahead_drain();
}

// Whether the kernel recorded MADV_HUGEPAGE ("hg" in VmFlags of
// /proc/self/smaps) for the mapping that starts at p.
bool advised_huge(const unsigned char* p) {
  FILE* f = std::fopen("/proc/self/smaps", "r");
  if (f == nullptr) return false;
  char line[512];
  bool in = false, hg = false;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    unsigned long from = 0, to = 0;
    if (std::sscanf(line, "%lx-%lx ", &from, &to) == 2) {
      in = from == reinterpret_cast<unsigned long>(p);
    } else if (in && std::strncmp(line, "VmFlags:", 8) == 0) {
      hg = std::strstr(line, " hg") != nullptr;
      break;
    }
  }
  std::fclose(f);
  return hg;
}

// set_huge_pages() (FASTPS_HUGE_PAGES, resolved in Python) decides the advice
// of mappings made afterwards; on by default.
void test_huge_pages_setting() {
  const size_t bytes = MappedBuffer::kHugePageFrom;
  check(huge_pages(), "huge pages on by default");
  {
    MappedBuffer on(bytes);
    check(advised_huge(on.data()), "a 4 MiB mapping is advised MADV_HUGEPAGE");
  }
  set_huge_pages(false);
  {
    MappedBuffer off(bytes);
    check(!huge_pages() && !advised_huge(off.data()), "set_huge_pages(false): no advice");
  }
  set_huge_pages(true);
  check(huge_pages(), "set_huge_pages(true) restores the default");
}

}  // namespace

int main() {
  test_huge_pages_setting();
  test_populates_without_changing_contents();
  test_owner_grows_and_destroys_during_population();
  test_populates_after_grow();
  test_forked_child_can_populate(true);
  test_forked_child_can_populate(false);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
