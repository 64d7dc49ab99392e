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
//  * Payloads by reference (Note [Single copy]): where the kernel lets one
//    process read the other's memory (process_vm_readv; same user, no Yama
//    restriction, one pid namespace), a large frame carries only a descriptor
//    of the sender's buffers; the reader copies the bytes straight from them
//    into the destination and publishes the frame's number in `byref_done`,
//    which the sender waits for before its send() returns (its buffers must
//    stay valid until then). The reader claims a frame before copying it and
//    keeps the copy only if it then marks it copied; a sender that stops
//    waiting revokes the frame, claimed or not (one compare-and-swap on each
//    step decides who was first), so no torn copy is delivered and no sender
//    waits for a reader stopped in the middle of a copy. A revoked frame's
//    payload follows its descriptor in the ring as plain bytes: a server that
//    will not wait for a stopped reader copies the payload into the
//    connection's send queue instead (Note [Send queues] in transport/tcp.h). Each side finds out at setup whether it can read the
//    other by reading back the peer's copy of the segment header (a probe),
//    so a failure is never discovered on a real frame.
//  * Segments are unlinked from /dev/shm as soon as the server has mapped
//    them; the mapping lives on until both processes unmap it or exit, so
//    kill -9 leaves nothing behind. A client killed between creating and
//    offering a segment leaves a name with its pid in it, which the next
//    process to create a segment removes (sweep_stale_segments()).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <sys/uio.h>

#include "common/futex.h"

namespace fastps {

constexpr size_t kShmTokenSize = 32;
constexpr uint64_t kShmMinRingBytes = 64 << 10;
constexpr uint64_t kShmMaxRingBytes = uint64_t{1} << 30;
constexpr uint64_t kShmDefaultRingBytes = 4 << 20;
constexpr int64_t kShmMaxWaitUs = 1000000;  // bound of shm_spin_us / shm_yield_us

// How a waiting ring side spins, then yields its core, before it sleeps on
// the futex (Note [Shm rings]).
struct ShmWait {
  std::chrono::microseconds spin{0};
  std::chrono::microseconds yield{0};  // after the spin
};
// TransportOptions::shm_spin_us / shm_yield_us as a ShmWait; -1 picks the
// default: spin 20 us on machines with more than 4 hardware threads, else
// not at once; do not yield.
ShmWait shm_wait(int64_t spin_us, int64_t yield_us);

// The control words of one ring, each on its own cache line so that the
// reader and the writer do not false-share.
struct ShmRingCtl {
  alignas(64) std::atomic<uint64_t> tail;  // written by the producer
  alignas(64) std::atomic<uint64_t> head;  // written by the consumer
  alignas(64) std::atomic<uint32_t> reader_sleeping;
  alignas(64) std::atomic<uint32_t> writer_sleeping;
  // Payloads by reference (Note [Single copy]): the number of the last
  // frame the reader finished with, and the state of the last frame decided
  // or under way (Note [By-reference frame states] in transport/shm.cc).
  alignas(64) std::atomic<uint64_t> byref_done;
  std::atomic<uint64_t> byref_state;
  std::atomic<uint32_t> byref_sleeping;
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
  // Copies in as many of `len` bytes as there is space for now, never
  // waiting, and returns how many; the caller publishes them with flush()
  // (large writes are published piece by piece as they go in).
  size_t write_some(const void* src, size_t len);
  // Bytes that fit now.
  uint64_t space() const;
  // Waits until `want` bytes (at most the capacity) fit, `stop` is set or
  // `limit` passes; true if they fit.
  bool wait_space(uint64_t want, const std::atomic<bool>& stop, Clock::time_point limit);
  // Makes everything written so far visible and wakes a sleeping reader.
  void flush();
  // By-reference frames: the sequence number (1, 2, ...) of the frame whose
  // descriptor this writer just put in the ring, and the wait until the reader
  // has copied frame `seq` (false if `stop` was set or `deadline` passed).
  uint64_t next_byref_seq() { return ++byref_sent_; }
  bool wait_byref(uint64_t seq, const std::atomic<bool>& stop, Clock::time_point deadline);
  // A writer giving up on frame `seq` before the reader claimed it, or (with
  // `even_claimed`) also while the reader copies it: true if the frame is
  // revoked (the reader never keeps a copy of it: the payload must follow the
  // descriptor as plain bytes, or the connection close; the buffers are the
  // writer's again), false if the reader claimed it (or, even_claimed, had
  // already finished its copy).
  bool revoke_byref(uint64_t seq, bool even_claimed);
  // Reader: claims the next by-reference frame before copying it.
  enum class Claim { kClaimed, kRevoked, kBroken };
  Claim claim_byref();

  // --- Consumer side (one thread) ---

  // The readable bytes that are contiguous in memory (possibly 0).
  size_t readable(const uint8_t** data) const;
  // Marks n readable bytes as consumed (frees their space for the writer).
  void consume(size_t n);
  // Copies exactly n bytes out and consumes them, waiting while fewer are
  // there. False if `stop` was set first.
  bool read_exact(uint8_t* out, size_t n, const std::atomic<bool>& stop);
  // Reader: the by-reference frame it claimed last is copied (or failed);
  // frees the writer's buffers. False if the writer revoked the frame during
  // the copy: the copy must be dropped, the payload follows as plain bytes.
  bool byref_copied();
  // Waits until something is readable, `stop` is set, or the spin + sleep
  // budget of one call (at most `slice`) is used up. Returns true if data is
  // readable.
  bool wait_readable(const std::atomic<bool>& stop, std::chrono::microseconds slice);

  // Wakes both sides' sleepers (used on close so nobody waits out a slice).
  void wake_all();

  // How this side waits (before the ring is used).
  void set_wait(const ShmWait& wait) { wait_ = wait; }

 private:
  ShmRingCtl* ctl_ = nullptr;
  uint8_t* data_ = nullptr;
  uint64_t cap_ = 0;
  // Producer-local: bytes written but not yet published.
  uint64_t wtail_ = 0;
  bool wtail_init_ = false;
  uint64_t byref_sent_ = 0;  // writer side
  uint64_t byref_read_ = 0;  // reader side
  ShmWait wait_;
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
  // How this side's ring ends wait (before the rings are used).
  void set_wait(const ShmWait& wait);

  // The ring this side writes into, and the one it reads from.
  ShmRing& tx() { return tx_; }
  ShmRing& rx() { return rx_; }

  // Note [Single copy]. probe_peer() (the server in open(), the client once
  // the server accepted) tries to read the peer's view of the segment header
  // out of the peer process and records the outcome for both sides to see.
  void probe_peer();
  bool can_read_peer() const { return can_read_peer_; }
  bool peer_can_read_me() const;
  // Reads `total` bytes described by the peer's (address, length) pairs into
  // dst. False with the reason in *why if the kernel refuses.
  bool read_from_peer(uint8_t* dst, const iovec* remote, size_t nremote, uint64_t total,
                      std::string* why) const;

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
  int side_ = 0;        // 0 client, 1 server (index into the header's per-side fields)
  bool can_read_peer_ = false;
  int peer_pid_ = 0;
  ShmRing tx_;
  ShmRing rx_;
};

// Removes /dev/shm/fastps-<pid>-* segments whose creating process is gone.
void sweep_stale_segments();

}  // namespace fastps
