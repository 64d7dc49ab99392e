// Shared-memory rings: the data path of same-host connections
// (docs/protocol.md, "Shared memory").
//
// A connection between two processes on one host first completes the normal
// TCP handshake; the client then creates a segment with two single-producer /
// single-consumer byte rings (client->server and server->client) and offers
// its name. If the server can map it (same host, same /dev/shm), both sides
// send every later frame through the rings instead of the socket; the socket
// stays open as the liveness channel (a peer that dies closes it, as with TCP).
//
// Note [Shm rings]
//  * A ring is a byte stream with the TCP framing (48-byte header, payload).
//    `tail` counts bytes ever written, `head` bytes ever read; both only grow,
//    so tail - head is the fill level without wrap-around ambiguity.
//  * One writer per ring (the connection's send mutex) and one reader (the
//    connection's reader thread): only release/acquire on head and tail.
//  * Sleeping: the reader spins briefly, then sets `reader_sleeping` and, if
//    the ring is still empty, waits on it as a futex; a writer that publishes
//    bytes clears the word and wakes it. The same pair of words lets a writer
//    sleep on a full ring. The store-then-load on each side is sequentially
//    consistent (the Dekker pattern), so a wakeup is never lost; every wait
//    is also bounded by a short slice, so flags are re-read regardless.
//  * Segments are unlinked from /dev/shm as soon as the server has mapped
//    them; the mapping lives on until both processes unmap it or exit, so
//    kill -9 leaves nothing behind. A client killed between creating and
//    offering a segment leaves a name with its pid in it, which the next
//    process to create a segment removes (sweep_stale_segments()).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/futex.h"

namespace fastps {

constexpr size_t kShmTokenSize = 32;
constexpr uint64_t kShmMinRingBytes = 64 << 10;
constexpr uint64_t kShmMaxRingBytes = uint64_t{1} << 30;
constexpr uint64_t kShmDefaultRingBytes = 4 << 20;

// The control words of one ring, each on its own cache line so that the
// reader and the writer do not false-share.
struct ShmRingCtl {
  alignas(64) std::atomic<uint64_t> tail;  // written by the producer
  alignas(64) std::atomic<uint64_t> head;  // written by the consumer
  alignas(64) std::atomic<uint32_t> reader_sleeping;
  alignas(64) std::atomic<uint32_t> writer_sleeping;
};

// One direction of a connection, as seen by this process.
class ShmRing {
 public:
  ShmRing() = default;
  ShmRing(ShmRingCtl* ctl, uint8_t* data, uint64_t capacity)
      : ctl_(ctl), data_(data), cap_(capacity) {}

  // --- Producer side (one thread at a time) ---

  // Copies `len` bytes in, waiting for space while the ring is full. Bytes
  // become visible to the reader in pieces (so it can copy out while this
  // copies in) and all of them by the time this returns if `publish` is set;
  // otherwise the caller publishes with flush(). Returns false if `stop`
  // became true or `deadline` passed while waiting for space; `written` then
  // says how much got in (the stream is broken: the caller closes).
  bool write(const void* src, size_t len, const std::atomic<bool>& stop, Clock::time_point deadline,
             uint64_t* written);
  // Makes everything written so far visible and wakes a sleeping reader.
  void flush();

  // --- Consumer side (one thread) ---

  // The readable bytes that are contiguous in memory (possibly 0).
  size_t readable(const uint8_t** data) const;
  // Marks n readable bytes as consumed (frees their space for the writer).
  void consume(size_t n);
  // Waits until something is readable, `stop` is set, or the spin + sleep
  // budget of one call (at most `slice`) is used up. Returns true if data is
  // readable.
  bool wait_readable(const std::atomic<bool>& stop, std::chrono::microseconds slice);

  // Wakes both sides' sleepers (used on close so nobody waits out a slice).
  void wake_all();

 private:
  ShmRingCtl* ctl_ = nullptr;
  uint8_t* data_ = nullptr;
  uint64_t cap_ = 0;
  // Producer-local: bytes written but not yet published.
  uint64_t wtail_ = 0;
  bool wtail_init_ = false;
};

// A mapped segment: a header, two ring control blocks and two data areas.
class ShmSegment {
 public:
  // Client: creates and maps a new segment with rings of `ring_bytes` each
  // (rounded up to a page). Throws Error if /dev/shm refuses.
  static std::unique_ptr<ShmSegment> create(uint64_t ring_bytes);
  // Server: maps the client's segment `name` and checks that its header
  // carries `token` and `ring_bytes`, then unlinks the name. Returns null and
  // sets *why if the segment cannot be used (another host, another /dev/shm).
  static std::unique_ptr<ShmSegment> open(const std::string& name, const uint8_t* token,
                                          uint64_t ring_bytes, std::string* why);
  ~ShmSegment();
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;

  const std::string& name() const { return name_; }
  const uint8_t* token() const { return token_; }
  uint64_t ring_bytes() const { return ring_bytes_; }
  // Removes the name from /dev/shm (idempotent; the mapping stays valid).
  void unlink();

  // The ring this side writes into, and the one it reads from.
  ShmRing& tx() { return tx_; }
  ShmRing& rx() { return rx_; }

 private:
  ShmSegment() = default;
  void map(int fd, bool client);

  std::string name_;
  uint8_t token_[kShmTokenSize] = {};
  uint64_t ring_bytes_ = 0;
  void* base_ = nullptr;
  size_t size_ = 0;
  bool unlinked_ = false;
  bool owner_ = false;  // created here: the name is removed at the latest on destruction
  ShmRing tx_;
  ShmRing rx_;
};

// Removes /dev/shm/fastps-<pid>-* segments whose creating process is gone.
void sweep_stale_segments();

}  // namespace fastps
