#include "transport/shm.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstddef>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "common/error.h"

namespace fastps {

namespace {

using detail::concat;

constexpr uint64_t kSegmentMagic = 0x314d485353504621ULL;  // "!FPSSHM1"
constexpr uint32_t kSegmentVersion = 3;  // 2: revocable by-reference frames; 3: also once claimed
constexpr size_t kPage = 4096;
constexpr size_t kCtlOffset = kPage;       // two ShmRingCtl blocks
constexpr size_t kDataOffset = 2 * kPage;  // ring 0 data, then ring 1 data
// Bytes a writer copies before it publishes them, so that a large frame is
// copied out by the reader while the rest is still being copied in.
constexpr size_t kPublishChunk = 256 << 10;
// Waiting: spin (each probe is a few ns), then yield the core to other
// runnable threads (on a machine with few cores the peer we wait for may need
// this one), then sleep on the futex. ShmWait (TransportOptions::shm_spin_us,
// shm_yield_us) sets the first two phases. Spinning only pays when a core is
// free for the thread being waited for: measured on 2 cores
// (bench/README.md), a 1 KiB round trip took 21 us with neither phase, 38 us
// spinning 5 us and 68 us with 20 + 180 us, so by default small machines go
// to sleep at once and larger ones spin a little.
constexpr auto kWriterSlice = std::chrono::milliseconds(50);

struct SegmentHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t reserved;
  uint64_t ring_bytes;
  uint8_t token[kShmTokenSize];
  // Per side (0 client, 1 server): its pid, where it mapped the segment, and
  // whether it can read the other process's memory (Note [Single copy]).
  int32_t pid[2];
  uint64_t base[2];
  std::atomic<uint32_t> can_read[2];
};
// The probe reads back this prefix of the header from the peer's mapping.
constexpr size_t kProbeBytes = offsetof(SegmentHeader, token) + kShmTokenSize;
static_assert(sizeof(SegmentHeader) <= kPage, "segment header must fit its page");
static_assert(2 * sizeof(ShmRingCtl) <= kPage, "ring control blocks must fit their page");

uint64_t round_to_page(uint64_t n) { return (n + kPage - 1) / kPage * kPage; }

size_t segment_size(uint64_t ring_bytes) { return kDataOffset + 2 * ring_bytes; }

// Waits in the escalating way described above until ready() holds, stop is
// set, or `limit` passes; `sleep_word` is the futex this side sleeps on.
template <typename Ready>
bool spin_yield_sleep(Ready ready, const ShmWait& wait, const std::atomic<bool>& stop,
                      std::atomic<uint32_t>* sleep_word, Clock::time_point limit) {
  const std::chrono::microseconds spin_for = wait.spin;
  const std::chrono::microseconds yield_for = wait.spin + wait.yield;
  const Clock::time_point start = Clock::now();
  for (uint32_t i = 0;; ++i) {
    if (ready()) return true;
    if (stop.load(std::memory_order_acquire)) return false;
    if ((i & 63) != 63) {
      cpu_relax();
      continue;
    }
    const Clock::time_point now = Clock::now();
    if (now >= limit) return ready();
    if (now - start < spin_for) continue;
    if (now - start < yield_for) {
      sched_yield();
      continue;
    }
    // Announce the sleep, then re-check: the other side either sees the flag
    // and wakes us, or we see its update here (both accesses are seq_cst).
    sleep_word->store(1, std::memory_order_seq_cst);
    if (ready() || stop.load(std::memory_order_seq_cst)) {
      sleep_word->store(0, std::memory_order_relaxed);
      return ready();
    }
    futex_wait_shared_until(sleep_word, 1, limit);
    sleep_word->store(0, std::memory_order_relaxed);
    return ready();
  }
}

void wake(std::atomic<uint32_t>* word) {
  if (word->load(std::memory_order_seq_cst) != 0 && word->exchange(0, std::memory_order_seq_cst) != 0) {
    futex_wake_shared(word);
  }
}

}  // namespace

// --- ShmRing ------------------------------------------------------------------

bool ShmRing::write(const void* src, size_t len, const std::atomic<bool>& stop,
                    Clock::time_point deadline, uint64_t* written) {
  if (!wtail_init_) {
    wtail_ = ctl_->tail.load(std::memory_order_relaxed);
    wtail_init_ = true;
  }
  const uint8_t* p = static_cast<const uint8_t*>(src);
  uint64_t unpublished = wtail_ - ctl_->tail.load(std::memory_order_relaxed);
  while (len > 0) {
    uint64_t used = wtail_ - ctl_->head.load(std::memory_order_acquire);
    if (used == cap_) {
      flush();
      unpublished = 0;
      const Clock::time_point limit = std::min(deadline, Clock::now() + kWriterSlice);
      bool space = spin_yield_sleep(
          [&] { return wtail_ - ctl_->head.load(std::memory_order_seq_cst) < cap_; }, wait_, stop,
          &ctl_->writer_sleeping, limit);
      if (!space && (stop.load(std::memory_order_acquire) || Clock::now() >= deadline)) return false;
      continue;
    }
    const uint64_t off = wtail_ % cap_;
    const size_t n = static_cast<size_t>(std::min<uint64_t>({len, cap_ - used, cap_ - off, kPublishChunk}));
    std::memcpy(data_ + off, p, n);
    p += n;
    len -= n;
    wtail_ += n;
    *written += n;
    unpublished += n;
    if (unpublished >= kPublishChunk) {
      flush();
      unpublished = 0;
    }
  }
  return true;
}

uint64_t ShmRing::space() const {
  const uint64_t tail = wtail_init_ ? wtail_ : ctl_->tail.load(std::memory_order_relaxed);
  return cap_ - (tail - ctl_->head.load(std::memory_order_acquire));
}

size_t ShmRing::write_some(const void* src, size_t len) {
  if (!wtail_init_) {
    wtail_ = ctl_->tail.load(std::memory_order_relaxed);
    wtail_init_ = true;
  }
  const uint8_t* p = static_cast<const uint8_t*>(src);
  size_t done = 0;
  while (done < len) {
    const uint64_t used = wtail_ - ctl_->head.load(std::memory_order_acquire);
    if (used == cap_) break;
    const uint64_t off = wtail_ % cap_;
    const size_t n = static_cast<size_t>(std::min<uint64_t>({len - done, cap_ - used, cap_ - off, kPublishChunk}));
    std::memcpy(data_ + off, p + done, n);
    done += n;
    wtail_ += n;
    if (done < len) flush();  // the reader copies out while this copies in
  }
  return done;
}

bool ShmRing::wait_space(uint64_t want, const std::atomic<bool>& stop, Clock::time_point limit) {
  want = std::min(want, cap_);
  return spin_yield_sleep(
      [&] {
        const uint64_t tail = wtail_init_ ? wtail_ : ctl_->tail.load(std::memory_order_relaxed);
        return cap_ - (tail - ctl_->head.load(std::memory_order_seq_cst)) >= want;
      },
      wait_, stop, &ctl_->writer_sleeping, limit);
}

bool ShmRing::wait_byref(uint64_t seq, const std::atomic<bool>& stop, Clock::time_point deadline) {
  for (;;) {
    const Clock::time_point limit = std::min(deadline, Clock::now() + kWriterSlice);
    if (spin_yield_sleep([&] { return ctl_->byref_done.load(std::memory_order_seq_cst) >= seq; }, wait_, stop,
                         &ctl_->byref_sleeping, limit)) {
      return true;
    }
    if (stop.load(std::memory_order_acquire) || Clock::now() >= deadline) return false;
  }
}

// Note [By-reference frame states]
// byref_state holds 4 * n + k for the last frame n whose fate is decided or
// under way: k = 0 copied (the reader finished and keeps the copy), 1 revoked
// (the writer gave up on it; its payload follows the descriptor as plain
// bytes), 2 claimed (the reader is copying it). 0 (frame 0 copied) is the
// start. Frames are decided in order: frame n is claimed or revoked only
// from frame n - 1's final value (k 0 or 1), and a claimed frame ends as
// copied (the reader, once its copy is complete) or revoked (the writer,
// which stopped waiting for a copy under way: the reader then drops its copy,
// which may be torn, and parses the plain payload). Whichever side moves the
// state first wins; the other sees it moved. The writer may decide several
// frames before the reader reaches the first of them (a reader stalled in a
// handler while revoked payloads drain into a roomy ring and the next
// descriptors follow): a state past frame n therefore means n was revoked.
namespace {
constexpr uint64_t kByRefCopied = 0, kByRefRevoked = 1, kByRefClaimed = 2;
uint64_t byref_value(uint64_t seq, uint64_t k) { return 4 * seq + k; }
bool byref_final(uint64_t v, uint64_t seq) { return v >> 2 == seq && (v & 3) != kByRefClaimed; }
}  // namespace

bool ShmRing::revoke_byref(uint64_t seq, bool even_claimed) {
  uint64_t v = ctl_->byref_state.load(std::memory_order_seq_cst);
  while (byref_final(v, seq - 1) || (even_claimed && v == byref_value(seq, kByRefClaimed))) {
    if (ctl_->byref_state.compare_exchange_weak(v, byref_value(seq, kByRefRevoked), std::memory_order_seq_cst))
      return true;
  }
  return false;  // the reader claimed it (and, if even_claimed, copied it)
}

ShmRing::Claim ShmRing::claim_byref() {
  const uint64_t seq = ++byref_read_;
  uint64_t v = ctl_->byref_state.load(std::memory_order_seq_cst);
  while (byref_final(v, seq - 1)) {
    if (ctl_->byref_state.compare_exchange_weak(v, byref_value(seq, kByRefClaimed), std::memory_order_seq_cst))
      return Claim::kClaimed;
  }
  // Decided without us: only the writer decides a frame the reader has not
  // reached, and only by revoking it. Anything else is a peer out of step.
  if (v == byref_value(seq, kByRefRevoked) || v >> 2 > seq) return Claim::kRevoked;
  return Claim::kBroken;
}

bool ShmRing::byref_copied() {
  uint64_t v = byref_value(byref_read_, kByRefClaimed);
  const bool kept =
      ctl_->byref_state.compare_exchange_strong(v, byref_value(byref_read_, kByRefCopied), std::memory_order_seq_cst);
  ctl_->byref_done.store(byref_read_, std::memory_order_seq_cst);
  wake(&ctl_->byref_sleeping);
  return kept;
}

bool ShmRing::read_exact(uint8_t* out, size_t n, const std::atomic<bool>& stop) {
  while (n > 0) {
    const uint8_t* data = nullptr;
    size_t got = std::min(readable(&data), n);
    if (got == 0) {
      if (stop.load(std::memory_order_acquire)) return false;
      wait_readable(stop, std::chrono::milliseconds(100));
      continue;
    }
    std::memcpy(out, data, got);
    consume(got);
    out += got;
    n -= got;
  }
  return true;
}

void ShmRing::flush() {
  if (!wtail_init_) return;
  ctl_->tail.store(wtail_, std::memory_order_seq_cst);
  wake(&ctl_->reader_sleeping);
}

size_t ShmRing::readable(const uint8_t** data) const {
  const uint64_t head = ctl_->head.load(std::memory_order_relaxed);  // only this thread writes it
  const uint64_t avail = ctl_->tail.load(std::memory_order_acquire) - head;
  const uint64_t off = head % cap_;
  *data = data_ + off;
  return static_cast<size_t>(std::min<uint64_t>(avail, cap_ - off));
}

void ShmRing::consume(size_t n) {
  ctl_->head.store(ctl_->head.load(std::memory_order_relaxed) + n, std::memory_order_seq_cst);
  wake(&ctl_->writer_sleeping);
}

bool ShmRing::wait_readable(const std::atomic<bool>& stop, std::chrono::microseconds slice) {
  return spin_yield_sleep(
      [&] {
        return ctl_->tail.load(std::memory_order_seq_cst) != ctl_->head.load(std::memory_order_relaxed);
      },
      wait_, stop, &ctl_->reader_sleeping, Clock::now() + slice);
}

void ShmRing::wake_all() {
  ctl_->reader_sleeping.store(0, std::memory_order_seq_cst);
  futex_wake_shared(&ctl_->reader_sleeping);
  ctl_->writer_sleeping.store(0, std::memory_order_seq_cst);
  futex_wake_shared(&ctl_->writer_sleeping);
  ctl_->byref_sleeping.store(0, std::memory_order_seq_cst);
  futex_wake_shared(&ctl_->byref_sleeping);
}

// --- ShmSegment -----------------------------------------------------------------

void sweep_stale_segments() {
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return;
  while (dirent* ent = readdir(dir)) {
    long pid = 0;
    char rest[64];
    if (std::sscanf(ent->d_name, "fastps-%ld-%63s", &pid, rest) != 2 || pid <= 0) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to judge
    ::shm_unlink(concat("/", ent->d_name).c_str());
  }
  closedir(dir);
}

ShmWait shm_wait(int64_t spin_us, int64_t yield_us) {
  ShmWait w;
  w.spin = std::chrono::microseconds(spin_us >= 0 ? spin_us : std::thread::hardware_concurrency() > 4 ? 20 : 0);
  w.yield = std::chrono::microseconds(yield_us >= 0 ? yield_us : 0);
  return w;
}

void ShmSegment::set_wait(const ShmWait& wait) {
  tx_.set_wait(wait);
  rx_.set_wait(wait);
}

std::unique_ptr<ShmSegment> ShmSegment::create(uint64_t ring_bytes) {
  FASTPS_CHECK(ring_bytes >= kShmMinRingBytes && ring_bytes <= kShmMaxRingBytes,
               "fastps: shared-memory ring size must be in [", kShmMinRingBytes, ", ", kShmMaxRingBytes,
               "] bytes, got ", ring_bytes);
  static std::once_flag swept;
  std::call_once(swept, sweep_stale_segments);
  std::unique_ptr<ShmSegment> seg(new ShmSegment());
  seg->ring_bytes_ = round_to_page(ring_bytes);
  seg->owner_ = true;
  uint8_t rnd[8];
  if (getrandom(seg->token_, kShmTokenSize, 0) != static_cast<ssize_t>(kShmTokenSize) ||
      getrandom(rnd, sizeof(rnd), 0) != static_cast<ssize_t>(sizeof(rnd))) {
    throw Error("fastps: getrandom failed while creating a shared-memory segment");
  }
  char hex[17];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
  seg->name_ = concat("/fastps-", static_cast<long>(::getpid()), "-", hex);
  int fd = ::shm_open(seg->name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  FASTPS_CHECK_TYPED(Error, fd >= 0, "fastps: cannot create shared memory ", seg->name_, ": ",
                     errno_text(errno));
  seg->size_ = segment_size(seg->ring_bytes_);
  if (::ftruncate(fd, static_cast<off_t>(seg->size_)) != 0) {
    int err = errno;
    ::close(fd);
    ::shm_unlink(seg->name_.c_str());
    throw Error(concat("fastps: cannot size shared memory ", seg->name_, " to ", seg->size_,
                       " bytes: ", errno_text(err), " (is /dev/shm full?)"));
  }
  try {
    seg->map(fd, true);
  } catch (...) {
    ::close(fd);
    ::shm_unlink(seg->name_.c_str());
    throw;
  }
  ::close(fd);
  auto* h = static_cast<SegmentHeader*>(seg->base_);
  h->magic = kSegmentMagic;
  h->version = kSegmentVersion;
  h->reserved = 0;
  h->ring_bytes = seg->ring_bytes_;
  std::memcpy(h->token, seg->token_, kShmTokenSize);
  h->pid[0] = static_cast<int32_t>(::getpid());
  h->base[0] = reinterpret_cast<uintptr_t>(seg->base_);
  return seg;
}

std::unique_ptr<ShmSegment> ShmSegment::open(const std::string& name, const uint8_t* token,
                                             uint64_t ring_bytes, std::string* why) {
  if (name.size() < 9 || name.size() > 255 || name.compare(0, 8, "/fastps-") != 0 ||
      name.find('/', 1) != std::string::npos) {
    *why = "not a fastps segment name";
    return nullptr;
  }
  if (ring_bytes < kShmMinRingBytes || ring_bytes > kShmMaxRingBytes || ring_bytes % kPage != 0) {
    *why = concat("ring size ", ring_bytes, " out of range");
    return nullptr;
  }
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) {
    *why = concat("cannot open ", name, ": ", errno_text(errno), " (the peer is on another host or "
                  "another /dev/shm)");
    return nullptr;
  }
  struct stat st {};
  std::unique_ptr<ShmSegment> seg(new ShmSegment());
  seg->name_ = name;
  seg->ring_bytes_ = ring_bytes;
  seg->size_ = segment_size(ring_bytes);
  if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != seg->size_) {
    *why = concat(name, " has the wrong size");
    ::close(fd);
    return nullptr;
  }
  try {
    seg->map(fd, false);
  } catch (const std::exception& e) {
    *why = e.what();
    ::close(fd);
    return nullptr;
  }
  ::close(fd);
  const auto* h = static_cast<const SegmentHeader*>(seg->base_);
  if (h->magic != kSegmentMagic || h->version != kSegmentVersion || h->ring_bytes != ring_bytes ||
      std::memcmp(h->token, token, kShmTokenSize) != 0) {
    *why = concat(name, " does not hold the offered segment");
    return nullptr;  // not ours: leave the name alone
  }
  std::memcpy(seg->token_, token, kShmTokenSize);
  seg->side_ = 1;
  auto* hw = static_cast<SegmentHeader*>(seg->base_);
  hw->pid[1] = static_cast<int32_t>(::getpid());
  hw->base[1] = reinterpret_cast<uintptr_t>(seg->base_);
  seg->unlink();
  seg->probe_peer();
  return seg;
}

void ShmSegment::map(int fd, bool client) {
  // MAP_POPULATE: fault the rings in now, not on the first large frame.
  base_ = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    throw Error(concat("fastps: cannot map shared memory ", name_, " (", size_, " bytes): ",
                       errno_text(errno)));
  }
  auto* base = static_cast<uint8_t*>(base_);
  auto* ctl = reinterpret_cast<ShmRingCtl*>(base + kCtlOffset);
  ShmRing ring0(&ctl[0], base + kDataOffset, ring_bytes_);               // client -> server
  ShmRing ring1(&ctl[1], base + kDataOffset + ring_bytes_, ring_bytes_);  // server -> client
  tx_ = client ? ring0 : ring1;
  rx_ = client ? ring1 : ring0;
}

// Note [Single copy]
// Two copies per payload (into the ring, out of it) cost as much as the sum
// itself on a 2-core machine. process_vm_readv copies from another process's
// memory into ours in one pass. Whether the kernel allows it (same user, Yama
// ptrace_scope 0 or absent, the same pid namespace: pids in the header must
// mean the same processes) is found out here, once: each side reads the
// peer's mapping of this very header and compares it with its own.
void ShmSegment::probe_peer() {
  auto* h = static_cast<SegmentHeader*>(base_);
  const int peer = 1 - side_;
  peer_pid_ = h->pid[peer];
  uint8_t theirs[kProbeBytes];
  iovec local{theirs, kProbeBytes};
  iovec remote{reinterpret_cast<void*>(static_cast<uintptr_t>(h->base[peer])), kProbeBytes};
  can_read_peer_ = peer_pid_ > 0 && h->base[peer] != 0 &&
                   ::process_vm_readv(peer_pid_, &local, 1, &remote, 1, 0) == static_cast<ssize_t>(kProbeBytes) &&
                   std::memcmp(theirs, h, kProbeBytes) == 0;
  h->can_read[side_].store(can_read_peer_ ? 1 : 0, std::memory_order_seq_cst);
}

bool ShmSegment::peer_can_read_me() const {
  const auto* h = static_cast<const SegmentHeader*>(base_);
  return h->can_read[1 - side_].load(std::memory_order_acquire) == 1;
}

bool ShmSegment::read_from_peer(uint8_t* dst, const iovec* remote, size_t nremote, uint64_t total,
                                std::string* why) const {
  // The kernel may copy less than asked (a fault part way): continue from
  // where it stopped. (At most kByRefMaxSegments pieces: far below IOV_MAX.)
  std::vector<iovec> rem(remote, remote + nremote);
  size_t first = 0;
  uint64_t done = 0;
  while (done < total) {
    iovec local{dst + done, static_cast<size_t>(total - done)};
    ssize_t r = ::process_vm_readv(peer_pid_, &local, 1, rem.data() + first, rem.size() - first, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      *why = concat("process_vm_readv from pid ", peer_pid_, " failed after ", done, " of ", total,
                    " bytes: ", r < 0 ? errno_text(errno) : std::string("no progress"));
      return false;
    }
    done += static_cast<uint64_t>(r);
    size_t left = static_cast<size_t>(r);
    while (left > 0 && first < rem.size() && left >= rem[first].iov_len) left -= rem[first++].iov_len;
    if (left > 0) {
      rem[first].iov_base = static_cast<uint8_t*>(rem[first].iov_base) + left;
      rem[first].iov_len -= left;
    }
  }
  return true;
}

void ShmSegment::unlink() {
  if (unlinked_ || name_.empty()) return;
  unlinked_ = true;
  ::shm_unlink(name_.c_str());  // ENOENT: the other side was first
}

ShmSegment::~ShmSegment() {
  if (owner_) unlink();
  if (base_ != nullptr) ::munmap(base_, size_);
}

}  // namespace fastps
