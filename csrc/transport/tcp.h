// TCP transport: non-blocking sockets driven by one epoll event-loop thread
// per TcpTransport. Use it through Transport::create("tcp", options); the
// contract (handlers, blocking, thread safety) is in transport/transport.h and
// the wire format in docs/protocol.md.
//
// Design note:
//  * The loop thread owns all reading: accept, the server side of the
//    handshake, frame reassembly (partial reads, several frames per read),
//    delivery to the handler, peer close and errors. Sockets are
//    level-triggered; each wakeup reads at most kReadBudget bytes from one
//    socket, so one busy peer cannot starve the others.
//  * Writing happens on the caller's thread: send() takes the socket's send
//    mutex and writes the header and the caller's payload segments with
//    sendmsg (scatter/gather, no copy). On a connection this side opened it
//    polls for POLLOUT when the socket buffer is full, until the frame is out
//    or the deadline passes; on an accepted one it never waits for the peer
//    beyond a grace of milliseconds (Note [Send queues]).
//  * connect() runs the client side of the handshake on the caller's thread
//    with blocking reads/writes bounded by the deadline, and only then hands
//    the sockets to the loop; it never reads past AUTH_OK, so frames the
//    server sends right after the handshake wait in the kernel for the loop.
//  * Received frames are small-read into a loop-owned staging buffer; large
//    payloads are received directly into the frame's vector, allocated once
//    after the header passed the limits. Before authentication no frame may
//    announce more than kMaxHandshakePayload bytes.
//  * Closing: a connection that must close (local close(), failed send,
//    protocol violation, peer gone) is shut down with shutdown(SHUT_RDWR),
//    which fails any blocked sender at once (ConnectionError), and is then
//    torn down on the loop thread, which calls the disconnect handler once.
//    File descriptors are closed when the last reference to the socket goes
//    away, so a sender never writes to a reused descriptor.
//  * Shared memory is a subclass (ShmTransport, transport/shm_transport.h):
//    this class offers it the hooks below (upgrade an outgoing connection
//    after its handshake, answer an SHM_OFFER, send over the connection's
//    rings, wake and stop its threads), and keeps the sockets, the handshake,
//    liveness and closing for both.
//  * Files: tcp.cc (setup, listen/accept, connect, sending, closing),
//    tcp_loop.cc (the event loop: reading, framing, handshake frames,
//    liveness, teardown), tcp_conn.h (the Socket and Conn records),
//    socket.h (descriptor helpers), handshake.h (HELLO/AUTH, shared by
//    every transport).
//
// Note [Send queues]
// A server's shard threads (and the loop thread, which may run small
// requests inline) serve every peer; none of them may wait for one peer to
// read, or a peer that stops reading (SIGSTOP, a bug, a hostile client)
// stalls everyone. So send() on an accepted connection writes what the
// socket or ring takes at once, waits at most kSendGrace (2 ms) for more
// room, and copies the rest of the frame into the connection's send queue;
// frames never interleave: while a queue holds anything, a later frame goes
// out only after it. Live peers read fast, so the common case stays
// zero-copy: a TCP send to a peer whose queue moved in the last 20 ms first
// writes the queue itself (within the same grace), then its own frame in
// place; one whose queue stands still joins it at once, without waiting.
//  * TCP: one queue per socket, guarded by its send mutex. A non-empty queue
//    arms EPOLLOUT and the loop thread writes it out as the peer reads,
//    without waiting (it only try-locks a send mutex; a socket it could not
//    lock is retried on the next millisecond tick).
//  * Shared memory: one queue per connection, guarded by the ring's send
//    mutex, written into the ring by a writer thread of the connection's own
//    (it may wait for space; nobody else waits for it).
//  * Single copy (Note [Single copy] in transport/shm.h): a shard thread puts
//    the by-reference descriptor into the ring and waits at most
//    kByRefGrace (10 ms) for the reader to copy the payload. If the reader
//    has not claimed it by then, the sender revokes the frame (one
//    compare-and-swap against the reader's claim) and queues a copy of the
//    payload, which then follows the descriptor in the ring as plain bytes.
//    If the reader claimed it first, its copy is already under way and the
//    sender waits for that copy to end (the time of one process_vm_readv;
//    a reader frozen in exactly that window holds the sender until it
//    resumes or for at most 5 s, after which the connection is closed).
//  * Bounds: a connection whose queued bytes would pass
//    TransportOptions::send_queue_limit is closed ("peer is not reading its
//    replies"), as is one whose queue made no progress for the liveness
//    window (options().timeout when liveness is off; the loop's tick checks).
//    A stopped peer thus costs each shard thread a few grace periods at most
//    (until its queue stands still for 20 ms), then nothing. Either fails that
//    peer only: its requests get a ConnectionError, the server a
//    disconnect. Memory held for a peer is its queue, at most the limit.
//  * Connections this side opened (a worker's requests) keep blocking sends
//    with the deadline: the caller's buffers are read in place and the
//    caller is the only one who waits.
//
// Note [Liveness]
// A peer that is frozen (SIGSTOP, a debugger), hung or cut off by the network
// keeps its connections open and says nothing; without liveness the others
// notice only when a request's deadline passes (FASTPS_TIMEOUT, minutes).
// Every socket therefore carries a HEARTBEAT frame (48 bytes, op 11) when this
// side sent nothing on it for a quarter of TransportOptions::liveness_timeout
// (and at most a second, also with the check off here, so that a peer with a
// shorter window hears us), and a connection on which nothing at all arrived
// for the whole window is
// closed with a reason naming the peer (a frozen server: the worker's
// requests fail with ConnectionError naming it; a frozen worker: the server
// marks its rank dead and fails what waits for it). Heartbeats are sent and
// checked by the loop thread, never by Python, so a process that is only
// busy (a long step, a checkpoint, the GIL held) keeps answering; only a
// process whose threads do not run at all goes silent. For shared-memory
// connections the socket is the liveness channel: heartbeats go through it,
// the rings carry the frames. Before declaring a peer silent the loop checks
// that no unread bytes wait on the socket (after this process itself was
// stopped, the peers' heartbeats are there to read).
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <sys/uio.h>

#include "common/futex.h"
#include "transport/handshake.h"
#include "transport/transport.h"

namespace fastps {

struct OutBytes;
struct ShmChannel;
struct UcxChannel;

class TcpTransport : public Transport {
 public:
  // Creates the epoll instance and starts the loop thread. Throws Error if the
  // kernel refuses (out of file descriptors). `kind` is what kind() reports.
  TcpTransport(std::string kind, const TransportOptions& options);
  // Stops and joins the loop thread and closes every socket; no disconnect
  // handler calls. See the threading contract in transport.h.
  ~TcpTransport() override;

 protected:
  friend struct ShmChannel;  // holds a Socket: its ring's parse state
  friend class UcxTransport;  // a subclass of a subclass: reaches Conn and Entry
  struct Socket;
  struct Conn;
  using SocketPtr = std::shared_ptr<Socket>;
  using ConnPtr = std::shared_ptr<Conn>;
  struct Entry {
    SocketPtr socket;
    ConnPtr conn;
  };

  uint16_t do_listen(const std::string& host, uint16_t port) override;
  ConnId do_connect(const std::string& host, uint16_t port, int rank) override;
  void do_send(ConnId conn, const uint8_t* header, const ConstBuffer* segments, size_t nsegments,
               uint64_t payload_len) override;
  void do_close(ConnId conn, const std::string& reason) override;
  PeerInfo do_peer_info(ConnId conn) const override;

  // --- Hooks of the shared-memory subclass (no-ops here) ---
  // Client, caller's thread, after the handshake of an outgoing connection's
  // first socket: true if the connection's frames travel elsewhere from now
  // on (conn.shm and conn.use_shm, or conn.ucx and conn.use_ucx, set; no
  // more sockets are opened).
  virtual bool upgrade_outgoing(const ConnPtr& conn, BlockingStream& stream);
  // Server, loop thread: a well-formed SHM_OFFER or UCX_OFFER (`op`) arrived.
  // Returns true after setting the connection's channel (conn.shm/use_shm,
  // conn.ucx/use_ucx), with the payload of the ACCEPT frame in *reply; else
  // false with the reason to decline.
  virtual bool accept_offer(const ConnPtr& conn, Op op, const Payload& offer, std::vector<uint8_t>* reply,
                            std::string* why);
  // A connection with a channel (conn.use_shm or conn.use_ucx) is
  // registered: start its threads.
  virtual void start_channel(const ConnPtr& conn);
  // Sends one frame; this class writes to the connection's sockets.
  virtual void send_frame(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                          size_t nsegments, uint64_t payload_len, Clock::time_point deadline);
  // Any thread: the connection is closing; nobody may sleep on its channel.
  virtual void wake_channel(Conn& conn);
  // In teardown, before the disconnect handler: the channel's threads end.
  virtual void release_channel(const ConnPtr& conn);

  // --- For the subclass ---
  // Stops the loop and closes every connection (idempotent); a subclass's
  // destructor calls it first, then joins its own threads.
  void close_all();
  bool stopping() const { return stopping_.load(std::memory_order_acquire); }
  // Receive path, on the thread that owns the entry's parse state.
  bool consume(const Entry& e, const uint8_t* data, size_t len);
  bool start_payload(const Entry& e);
  bool finish_frame_if_complete(const Entry& e);
  bool on_frame(const Entry& e, Message&& frame);
  void fail(const Entry& e, Status status, const std::string& reason);
  void teardown(const ConnPtr& conn, const std::string& reason);
  // Note [Send queues]: a copy of the `rest` bytes of iov that follow its
  // first `skip`, counted as queued on `conn`. Closes the connection instead
  // (ConnectionError) if its queue would pass the limit.
  OutBytes copy_out(const ConnPtr& conn, const std::vector<iovec>& iov, uint64_t skip, uint64_t rest);
  void request_close(const ConnPtr& conn, const std::string& reason);
  ConnPtr find_established(ConnId id) const;
  std::string describe(const Conn& conn) const;

 private:
  // Loop thread.
  void run_loop();
  void accept_ready();
  void on_readable(const Entry& e);
  void on_writable(const Entry& e);
  void tick();
  void beat(const ConnPtr& conn, Socket& s, int64_t now);
  bool on_handshake_frame(const Entry& e, Message&& frame);
  void on_eof(const Entry& e);
  void expire_handshakes();
  void drain_close_queue();
  void resume_accept();
  bool on_transport_op(const Entry& e, Message&& frame);

  // Sending (Note [Send queues]).
  Socket* pick_socket(Conn& conn, std::unique_lock<std::timed_mutex>* lock, const Clock::time_point* deadline);
  void send_blocking(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments,
                     size_t nsegments, uint64_t payload_len, Clock::time_point deadline);
  void post(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments, size_t nsegments,
            uint64_t payload_len);
  bool flush_queue(const ConnPtr& conn, Socket& s, Clock::time_point grace);
  uint64_t write_until(const ConnPtr& conn, Socket& s, std::vector<iovec>& iov, size_t& first, uint64_t total,
                       Clock::time_point until);
  void enqueue(const ConnPtr& conn, Socket& s, const std::vector<iovec>& iov, uint64_t skip, uint64_t rest);
  void set_want_out(Socket& s, bool on);

  Entry find_entry(uint64_t token) const;

  int epoll_fd_ = -1;
  int wake_fd_ = -1;  // eventfd: wakes the loop for shutdown and close requests
  std::atomic<bool> stopping_{false};

  mutable std::mutex mu_;  // guards everything below up to the loop-only part
  int listen_fd_ = -1;
  std::unordered_map<ConnId, ConnPtr> conns_;
  std::unordered_map<uint64_t, Entry> sockets_;  // epoll token -> socket
  std::vector<ConnPtr> close_queue_;
  ConnId next_conn_ = 1;
  uint64_t next_token_ = 16;  // tokens below are reserved for the wake and listen fds
  std::unordered_map<ConnId, ConnPtr> closed_;  // close_all(): kept until the destructor ends

  // Loop thread only.
  std::vector<ConnPtr> pending_;  // accepted connections still in the handshake
  std::unique_ptr<uint8_t[]> stage_;
  std::vector<Entry> retry_out_;  // sockets whose queue the loop could not lock
  Clock::time_point next_tick_;
  bool accept_paused_ = false;
  std::chrono::steady_clock::time_point accept_resume_at_;

  std::thread loop_;  // last: started after everything above is initialised
};

}  // namespace fastps
