#include "transport/shm_transport.h"

#include <sys/uio.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <new>

#include "common/error.h"
#include "transport/shm.h"
#include "transport/socket.h"
#include "transport/tcp_conn.h"

namespace fastps {

using detail::concat;

namespace {

constexpr size_t kShmReadPiece = 256 << 10;  // ring bytes parsed before the space is freed
// Note [Single copy] (transport/shm.h): payloads from this size on travel by
// reference when the receiver can read the sender's memory. In the ring such
// a frame is its header with `reserved` = kRingByRef, then u32 n, u32 0 and n
// pairs (u64 address, u64 length) of the sender's buffers; payload_len is the
// total. Never on a socket: a header with a non-zero `reserved` is invalid there.
constexpr uint64_t kByRefMinPayload = 64 << 10;
constexpr uint32_t kRingByRef = 1;
constexpr size_t kByRefMaxSegments = 16;
constexpr size_t kByRefDescMax = kHeaderSize + 8 + kByRefMaxSegments * 16;
constexpr size_t kHeaderReservedOffset = 44;
constexpr auto kShmReaderSlice = std::chrono::milliseconds(100);
// Note [Send queues]: how long a send on an accepted connection waits for a
// reader to claim a by-reference frame, and for a claimed copy to end (plus
// 1 ms per MiB), before it revokes the frame and queues the payload.
constexpr auto kByRefGrace = std::chrono::milliseconds(10);
constexpr auto kByRefCopyGrace = std::chrono::milliseconds(50);

// Note [Single copy]: the ring form of a by-reference frame (the header,
// marked, and where the payload's bytes are) in `out`; returns its length, or
// 0 if the frame has more non-empty segments than a descriptor holds.
size_t byref_descriptor(const uint8_t* header, const ConstBuffer* segments, size_t nsegments,
                        uint8_t (&out)[kByRefDescMax]) {
  size_t used = 0;
  for (size_t i = 0; i < nsegments; ++i) used += segments[i].size > 0;
  if (used > kByRefMaxSegments) return 0;
  std::memcpy(out, header, kHeaderSize);
  store_le32(out + kHeaderReservedOffset, kRingByRef);
  store_le32(out + kHeaderSize, static_cast<uint32_t>(used));
  store_le32(out + kHeaderSize + 4, 0);
  size_t at = kHeaderSize + 8;
  for (size_t i = 0; i < nsegments; ++i) {
    if (segments[i].size == 0) continue;
    store_le64(out + at, reinterpret_cast<uintptr_t>(segments[i].data));
    store_le64(out + at + 8, segments[i].size);
    at += 16;
  }
  return at;
}

// Client side of docs/protocol.md "Shared memory": creates a segment, offers
// it and returns it if the server mapped it; null (with the reason in *why)
// if the server declined or no segment could be made.
std::unique_ptr<ShmSegment> offer_shm(BlockingStream& stream, const TransportOptions& o, std::string* why) {
  const std::string& where = stream.where();
  std::unique_ptr<ShmSegment> seg;
  try {
    seg = ShmSegment::create(o.shm_ring_bytes);
  } catch (const Error& e) {
    *why = e.what();
    return nullptr;
  }
  std::vector<uint8_t> offer(kShmOfferFixedSize + seg->name().size());
  store_le64(offer.data(), seg->ring_bytes());
  std::memcpy(offer.data() + 8, seg->token(), kShmTokenSize);
  std::memcpy(offer.data() + kShmOfferFixedSize, seg->name().data(), seg->name().size());
  const OfferAnswer a = exchange_offer(stream, Op::kShmOffer, offer, Op::kShmAccept, Op::kShmDecline,
                                      kMaxHandshakePayload, "shared-memory");
  if (!a.accepted) {
    *why = concat(where, " declined: ", a.reason);
    return nullptr;
  }
  seg->unlink();  // the server did already; nothing may remain in /dev/shm
  seg->probe_peer();
  return seg;
}

}  // namespace

// The shared-memory side of one connection (Conn::shm).
struct ShmChannel {
  std::unique_ptr<ShmSegment> seg;
  // The reader thread's parse state (a Socket with fd -1).
  std::shared_ptr<TcpTransport::Socket> rx;
  std::timed_mutex send_mu;  // one writer of the outgoing ring at a time
  // Note [Send queues]: bytes waiting for the ring (send_mu), written by the
  // writer thread of an accepted connection.
  std::deque<OutBytes> queue;
  std::condition_variable_any queue_cv;
};

ShmTransport::ShmTransport(std::string kind, const TransportOptions& options, bool require)
    : TcpTransport(std::move(kind), options),
      require_(require),
      wait_(shm_wait(options.shm_spin_us, options.shm_yield_us)) {}

ShmTransport::~ShmTransport() {
  close_all();  // the loop stops: no hook runs on it from now on
  std::unordered_map<ConnId, Threads> threads;
  std::vector<Threads> retired;
  {
    std::lock_guard<std::mutex> lock(threads_mu_);
    threads.swap(threads_);
    retired.swap(retired_);
  }
  for (auto& kv : threads) retired.push_back(std::move(kv.second));
  for (Threads& t : retired) {
    t.reader.join();
    if (t.writer.joinable()) t.writer.join();
  }
}

PeerInfo ShmTransport::do_peer_info(ConnId id) const {
  PeerInfo info = TcpTransport::do_peer_info(id);
  if (!info.shared_memory) return info;
  ConnPtr conn = find_established(id);
  FASTPS_CHECK_TYPED(ConnectionError, conn != nullptr, "fastps: unknown or closed connection ", id);
  const ShmSegment& seg = *conn->shm->seg;
  info.single_copy = seg.can_read_peer() && seg.peer_can_read_me();
  return info;
}

// From now on the connection's frames go through `seg`'s rings.
void ShmTransport::use_segment(Conn& conn, std::unique_ptr<ShmSegment> seg) {
  auto channel = std::make_shared<ShmChannel>();
  channel->seg = std::move(seg);
  channel->seg->set_wait(wait_);
  channel->rx = std::make_shared<Socket>(-1);
  conn.shm = std::move(channel);
  conn.use_shm.store(true, std::memory_order_release);
}

bool ShmTransport::upgrade_outgoing(const ConnPtr& conn, BlockingStream& stream) {
  std::string why;
  std::unique_ptr<ShmSegment> seg = offer_shm(stream, options(), &why);
  if (!seg) {
    if (!require_) return false;
    throw ConnectionError(concat("fastps: cannot use shared memory with ", stream.where(), ": ", why,
                                 " (FASTPS_TRANSPORT=shm needs every server on this host; use auto "
                                 "or tcp otherwise)"));
  }
  use_segment(*conn, std::move(seg));
  return true;
}

bool ShmTransport::accept_offer(const ConnPtr& conn, Op op, const Payload& p, std::vector<uint8_t>* reply,
                                std::string* why) {
  if (op != Op::kShmOffer) return TcpTransport::accept_offer(conn, op, p, reply, why);
  std::string name(reinterpret_cast<const char*>(p.data() + kShmOfferFixedSize), p.size() - kShmOfferFixedSize);
  std::unique_ptr<ShmSegment> seg = ShmSegment::open(name, p.data() + 8, load_le64(p.data()), why);
  if (!seg) return false;
  use_segment(*conn, std::move(seg));
  return true;
}

void ShmTransport::start_channel(const ConnPtr& conn) {
  Entry e{conn->shm->rx, conn};
  std::lock_guard<std::mutex> lock(threads_mu_);
  auto finished = std::make_shared<std::atomic<bool>>(false);
  Threads t{std::thread([this, e, finished] {
              reader(e);
              finished->store(true, std::memory_order_release);
            }),
            finished, std::thread()};
  // Note [Send queues]: replies the ring cannot take at once are written by
  // a thread of this connection's own.
  if (!conn->outgoing) t.writer = std::thread([this, conn] { writer(conn); });
  threads_[conn->id] = std::move(t);
}

void ShmTransport::wake_channel(Conn& conn) {
  if (!conn.use_shm.load(std::memory_order_acquire)) return;
  conn.shm->seg->rx().wake_all();
  conn.shm->seg->tx().wake_all();
  // No lock here: a sender that holds send_mu may be the one closing.
  conn.shm->queue_cv.notify_all();
}

// Joins this connection's reader and writer, and readers that tore their
// own connections down earlier (they cannot join themselves; they have
// returned, or are about to, once their teardown finished).
void ShmTransport::release_channel(const ConnPtr& conn) {
  if (conn->use_shm.load(std::memory_order_acquire)) {
    // The queue's writer sleeps on this condition under send_mu; notified
    // under the lock it cannot miss it (a try: a sender holding the lock
    // right now must not hold this up, the writer's 100 ms slice covers it).
    std::unique_lock<std::timed_mutex> lock(conn->shm->send_mu, std::try_to_lock);
    conn->shm->queue_cv.notify_all();
  }
  std::vector<std::thread> done;
  {
    std::lock_guard<std::mutex> lock(threads_mu_);
    auto it = threads_.find(conn->id);
    if (it != threads_.end()) {
      if (it->second.writer.joinable()) done.push_back(std::move(it->second.writer));
      if (it->second.reader.get_id() == std::this_thread::get_id())
        retired_.push_back(std::move(it->second));
      else
        done.push_back(std::move(it->second.reader));
      threads_.erase(it);
    }
    // Only those that have returned: one still in its teardown (say, in a
    // disconnect handler) must not hold this thread up.
    for (auto r = retired_.begin(); r != retired_.end();) {
      if (!r->finished->load(std::memory_order_acquire)) {
        ++r;
        continue;
      }
      done.push_back(std::move(r->reader));
      r = retired_.erase(r);
    }
  }
  for (std::thread& t : done) t.join();
}

void ShmTransport::send_frame(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                              size_t nsegments, uint64_t payload_len, Clock::time_point deadline) {
  if (!conn->use_shm.load(std::memory_order_acquire)) {
    TcpTransport::send_frame(conn, header, segments, nsegments, payload_len, deadline);
  } else if (conn->outgoing) {  // Note [Send queues]: only a connection this side opened makes its caller wait
    ring_send(conn, header, segments, nsegments, payload_len, deadline);
  } else {
    ring_post(conn, header, segments, nsegments, payload_len);
  }
}

// on_readable() for sockets. It takes each header out of the ring itself (a
// by-reference frame is copied straight from the sender, Note [Single copy]),
// then feeds the payload bytes to the socket parser (start_payload(),
// consume()) so a payload is copied once from the ring to its destination.
void ShmTransport::reader(const Entry& e) {
  Conn& conn = *e.conn;
  Socket& s = *e.socket;
  ShmRing& rx = conn.shm->seg->rx();
  while (!conn.closing.load(std::memory_order_acquire) && !stopping()) {
    const uint8_t* data = nullptr;
    size_t n = rx.readable(&data);
    if (n == 0) {
      rx.wait_readable(conn.closing, kShmReaderSlice);
      continue;
    }
    if (s.in_payload) {
      // Only this frame's bytes: the next header is taken above, not by consume().
      n = static_cast<size_t>(std::min<uint64_t>({n, kShmReadPiece, s.frame.header.payload_len - s.payload_got}));
      const bool ok = consume(e, data, n);
      rx.consume(n);
      if (!ok) return;
      continue;
    }
    const size_t take = std::min(n, kHeaderSize - s.header_got);
    std::memcpy(s.header_bytes + s.header_got, data, take);
    rx.consume(take);
    s.header_got += take;
    if (s.header_got < kHeaderSize) continue;
    if (load_le32(s.header_bytes + kHeaderReservedOffset) == kRingByRef) {
      s.header_got = 0;
      if (!take_byref(e)) return;
      continue;
    }
    if (!start_payload(e) || !finish_frame_if_complete(e)) return;
  }
}

// A by-reference frame's header is in s.header_bytes: read its descriptor,

// copy the payload out of the sender, tell the sender, deliver.
bool ShmTransport::take_byref(const Entry& e) {
  Conn& conn = *e.conn;
  Socket& s = *e.socket;
  ShmRing& rx = conn.shm->seg->rx();
  MessageHeader h = decode_header(s.header_bytes);
  uint8_t count[8];
  if (!rx.read_exact(count, sizeof(count), conn.closing)) return false;
  const uint32_t nseg = load_le32(count);
  // On a malformed frame the connection closes without acknowledging it:
  // the sender learns from the close, never from a false "copied".
  if (!conn.shm->seg->can_read_peer() || nseg == 0 || nseg > kByRefMaxSegments) {
    fail(e, Status::kProtocol, concat("by-reference frame with ", nseg, " segments (limit ", kByRefMaxSegments,
                                      ")", conn.shm->seg->can_read_peer() ? "" : " but this side cannot read the peer"));
    return false;
  }
  uint8_t desc[kByRefMaxSegments * 16];
  if (!rx.read_exact(desc, nseg * 16, conn.closing)) return false;
  iovec remote[kByRefMaxSegments];
  uint64_t total = 0;
  for (uint32_t i = 0; i < nseg; ++i) {
    remote[i].iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(load_le64(desc + 16 * i)));
    remote[i].iov_len = static_cast<size_t>(load_le64(desc + 16 * i + 8));
    total += remote[i].iov_len;
  }
  h.reserved = 0;
  std::string problem = header_problem(h, options().max_payload);
  if (problem.empty() && total != h.payload_len)
    problem = concat("by-reference frame describes ", total, " bytes but announces ", h.payload_len);
  if (!problem.empty()) {
    fail(e, Status::kProtocol, problem);
    return false;
  }
  // Note [Send queues]: a sender that did not wait for us revokes the frame;
  // its payload then follows in the ring as plain bytes, parsed like any
  // frame's.
  auto take_plain_payload = [&] {
    encode_header(h, s.header_bytes);
    return start_payload(e) && finish_frame_if_complete(e);
  };
  const ShmRing::Claim claim = rx.claim_byref();
  if (claim == ShmRing::Claim::kRevoked) return take_plain_payload();
  if (claim == ShmRing::Claim::kBroken) {
    fail(e, Status::kProtocol, "by-reference frames out of step with the peer's");
    return false;
  }
  Message frame;
  frame.header = h;
  std::string why;
  bool copied;
  try {
    uint8_t* dst = is_transport_op(h.op) ? nullptr : payload_target(conn.id, h);
    if (dst != nullptr) {
      frame.in_place = dst;
    } else {
      frame.payload = Payload(h.payload_len);
      dst = frame.payload.data();
    }
    copied = conn.shm->seg->read_from_peer(dst, remote, nseg, total, &why);
  } catch (const std::bad_alloc&) {
    copied = false;
    why = concat("cannot allocate a ", h.payload_len, "-byte payload");
  }
  // The sender's buffers are free again, whatever happened. Revoked during
  // the copy (we were too slow: stopped, say): the copy may be torn and is
  // dropped (bytes landed in place are overwritten by the plain payload).
  if (!rx.byref_copied()) return take_plain_payload();
  if (!copied) {
    fail(e, Status::kInternal, why);
    return false;
  }
  return on_frame(e, std::move(frame));
}


void ShmTransport::ring_send(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                            size_t nsegments, uint64_t payload_len, Clock::time_point deadline) {
  std::unique_lock<std::timed_mutex> lock(conn->shm->send_mu, std::try_to_lock);
  if (!lock.owns_lock()) lock = std::unique_lock<std::timed_mutex>(conn->shm->send_mu, deadline);
  FASTPS_CHECK_TYPED(TimeoutError, lock.owns_lock(), "fastps: timed out after ", options().timeout.count(),
                     " ms waiting to send to ", conn->peer, " (earlier frames are still being written)");
  ShmRing& tx = conn->shm->seg->tx();
  uint64_t written = 0;
  bool ok;
  uint64_t seq = 0;
  uint8_t desc[kByRefDescMax];
  const size_t at = payload_len >= kByRefMinPayload && conn->shm->seg->peer_can_read_me()
                        ? byref_descriptor(header, segments, nsegments, desc) : 0;
  if (at > 0) {
    ok = tx.write(desc, at, conn->closing, deadline, &written);
    if (ok) {
      // Numbered once its descriptor is in the ring (a descriptor that never
      // got in is not a frame the reader will count).
      seq = tx.next_byref_seq();
      tx.flush();
      // The reader copies from our buffers: they must outlive this wait.
      if (tx.wait_byref(seq, conn->closing, deadline)) return;
      // Giving up revokes the frame, claimed or not (the reader then drops
      // any copy it made: Note [By-reference frame states] in shm.cc), so
      // the buffers are the caller's again at once. The payload would then
      // have to follow as plain bytes: the connection closes instead. Only a
      // copy the reader finished just now is a frame sent.
      if (!tx.revoke_byref(seq, true) && !conn->closing.load(std::memory_order_acquire)) return;
      written = 1;  // the frame is half sent: the connection must close
    }
  } else {
    ok = tx.write(header, kHeaderSize, conn->closing, deadline, &written);
    for (size_t i = 0; ok && i < nsegments; ++i) {
      if (segments[i].size > 0) ok = tx.write(segments[i].data, segments[i].size, conn->closing, deadline, &written);
    }
    if (ok) {
      tx.flush();
      return;
    }
  }
  const uint64_t total = kHeaderSize + payload_len;
  if (conn->closing.load(std::memory_order_acquire)) {
    throw ConnectionError(concat("fastps: connection to ", conn->peer, " was closed while sending (",
                                 seq ? std::string("by reference") : concat(written, " of ", total, " bytes written"),
                                 ")"));
  }
  std::string what = concat("fastps: timed out after ", options().timeout.count(), " ms sending to ",
                            conn->peer, " over shared memory (", seq ? "the peer did not copy the payload"
                            : concat(written, " of ", total, " bytes written"), "; is the peer alive and reading?)");
  if (written > 0) {
    request_close(conn, "a send timed out in the middle of a frame");
    what += "; the connection was closed";
  }
  throw TimeoutError(what);
}

// Note [Send queues], the accepted side of a shared-memory connection: what
// the ring takes within kSendGrace goes in; a by-reference frame waits at most
// kByRefGrace for its reader, then is revoked; the rest waits in the queue.
void ShmTransport::ring_post(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                            size_t nsegments, uint64_t payload_len) {
  std::unique_lock<std::timed_mutex> lock(conn->shm->send_mu);  // held by bounded senders only
  ShmRing& tx = conn->shm->seg->tx();
  std::vector<iovec> iov = frame_iov(header, segments, nsegments);
  const uint64_t total = kHeaderSize + payload_len;
  FASTPS_CHECK_TYPED(ConnectionError, !conn->closing.load(std::memory_order_acquire), "fastps: connection to ",
                     conn->peer, " was closed while sending");
  if (!conn->shm->queue.empty()) {
    queue_rest(conn, iov, total);
    return;
  }
  const Clock::time_point grace = Clock::now() + kSendGrace;
  uint8_t desc[kByRefDescMax];
  const size_t at = payload_len >= kByRefMinPayload && conn->shm->seg->peer_can_read_me()
                        ? byref_descriptor(header, segments, nsegments, desc) : 0;
  if (at > 0 && post_byref(conn, desc, at, payload_len, iov, grace)) return;
  // Small, or not even room for a descriptor: the frame goes as plain bytes.
  uint64_t written = 0;
  size_t first = 0;
  while (first < iov.size()) {
    const size_t n = tx.write_some(iov[first].iov_base, iov[first].iov_len);
    written += n;
    advance_iov(iov, first, n);
    if (first == iov.size()) break;
    if (n > 0) continue;
    tx.flush();  // what is in, the reader may take, making room
    if (!tx.wait_space(1, conn->closing, grace)) break;
  }
  tx.flush();
  FASTPS_CHECK_TYPED(ConnectionError, !conn->closing.load(std::memory_order_acquire), "fastps: connection to ",
                     conn->peer, " was closed while sending");
  if (written == total) return;
  iov.erase(iov.begin(), iov.begin() + static_cast<std::ptrdiff_t>(first));
  queue_rest(conn, iov, total - written);
}

// Note [Single copy] on the accepted side: puts the descriptor `desc` in the
// ring if it fits within `grace` and waits for the reader to copy the payload
// (kByRefGrace to claim it, kByRefCopyGrace and 1 ms per MiB to copy it); past
// that, revokes the frame and queues a copy of the payload (iov: the frame's
// header and segments). False, having done
// nothing, if the descriptor did not fit. send_mu is held.
bool ShmTransport::post_byref(const ConnPtr& conn, const uint8_t* desc, size_t at, uint64_t payload_len,
                              std::vector<iovec>& iov, Clock::time_point grace) {
  ShmRing& tx = conn->shm->seg->tx();
  if (tx.space() < at && !tx.wait_space(at, conn->closing, grace)) return false;
  const size_t put = tx.write_some(desc, at);  // it fits: this side is the only writer
  FASTPS_ASSERT(put == at);
  tx.flush();
  const uint64_t seq = tx.next_byref_seq();
  // The reader has kByRefGrace to claim the frame, and once it copies, the
  // time a live reader needs for the copy; past either, the frame is revoked
  // (a claimed one too: the reader drops its copy) and a copy of the payload
  // follows the descriptor. So a reader stopped in the middle of a copy holds
  // this shard up no longer than a slow one.
  bool done = tx.wait_byref(seq, conn->closing, Clock::now() + kByRefGrace);
  if (!done && !tx.revoke_byref(seq, false)) {
    const auto copy_time = kByRefCopyGrace + std::chrono::microseconds(payload_len >> 10);  // 1 ms per MiB
    done = tx.wait_byref(seq, conn->closing, Clock::now() + copy_time) || !tx.revoke_byref(seq, true);
  }
  FASTPS_CHECK_TYPED(ConnectionError, !conn->closing.load(std::memory_order_acquire), "fastps: connection to ",
                     conn->peer, " was closed while sending");
  if (done) return true;
  iov.erase(iov.begin());  // our buffers are ours again: their bytes follow as plain ones
  queue_rest(conn, iov, payload_len);
  return true;
}

// Note [Send queues]: a copy of the `rest` bytes of iov joins the
// connection's queue, for its writer thread. send_mu is held.
void ShmTransport::queue_rest(const ConnPtr& conn, const std::vector<iovec>& iov, uint64_t rest) {
  conn->shm->queue.push_back(copy_out(conn, iov, 0, rest));
  conn->shm->queue_cv.notify_all();
}

// Writes an accepted shared-memory connection's queue into its ring as the
// reader frees space: the only thread that waits for this peer to read.
void ShmTransport::writer(const ConnPtr& conn) {
  ShmRing& tx = conn->shm->seg->tx();
  std::unique_lock<std::timed_mutex> lock(conn->shm->send_mu);
  while (!conn->closing.load(std::memory_order_acquire) && !stopping()) {
    if (conn->shm->queue.empty()) {
      conn->shm->queue_cv.wait_for(lock, std::chrono::milliseconds(100));
      continue;
    }
    OutBytes& q = conn->shm->queue.front();
    const size_t n = tx.write_some(q.data.get() + q.off, q.size - q.off);
    tx.flush();
    if (n > 0) {
      q.off += n;
      if (q.off == q.size) conn->shm->queue.pop_front();
      conn->queue_moved.store(now_ns(), std::memory_order_relaxed);
      conn->queued.fetch_sub(n, std::memory_order_relaxed);
      note_unqueued(n);
      continue;
    }
    lock.unlock();  // senders queue behind us meanwhile, without waiting
    tx.wait_space(1, conn->closing, Clock::now() + std::chrono::milliseconds(50));
    lock.lock();
  }
}

}  // namespace fastps
