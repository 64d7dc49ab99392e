// ShmTransport: TCP connections whose frames travel through shared-memory
// rings once both ends are on one host (docs/protocol.md, "Shared memory").
// Use it through Transport::create("shm") (shared memory or a
// ConnectionError at connect()) or Transport::create("auto") (shared memory
// with servers on this host, TCP with the others). As a server both accept a
// client's offer; a "tcp" server declines it.
//
// Design note:
//  * A connection starts as a TCP one (TcpTransport: socket, handshake). The
//    client then offers a segment on its first socket (transport/shm.h); if
//    the server maps it, every later frame, in both directions, goes through
//    its rings, and the connection keeps that one socket only as its
//    liveness channel (Note [Liveness] in transport/tcp.h): heartbeats, and
//    a peer that dies closes it.
//  * Each such connection has a reader thread of its own that parses the
//    ring with the socket parser of TcpTransport (a parse state with fd -1)
//    and delivers the frames; an accepted one also has a writer thread that
//    writes its send queue into the ring (Note [Send queues]).
//  * Large payloads travel by reference (Note [Single copy] in shm.h).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "transport/shm.h"
#include "transport/tcp.h"

namespace fastps {

class ShmTransport : public TcpTransport {
 public:
  // `require`: connect() fails (ConnectionError) unless the server maps the
  // rings; otherwise the connection stays on TCP.
  ShmTransport(std::string kind, const TransportOptions& options, bool require);
  ~ShmTransport() override;

 protected:
  PeerInfo do_peer_info(ConnId conn) const override;
  bool upgrade_outgoing(const ConnPtr& conn, BlockingStream& stream) override;
  bool accept_offer(const ConnPtr& conn, Op op, const Payload& offer, std::vector<uint8_t>* reply,
                    std::string* why) override;
  void start_channel(const ConnPtr& conn) override;
  void send_frame(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments, size_t nsegments,
                  uint64_t payload_len, Clock::time_point deadline) override;
  void wake_channel(Conn& conn) override;
  void release_channel(const ConnPtr& conn) override;

 private:
  void use_segment(Conn& conn, std::unique_ptr<ShmSegment> seg);
  void reader(const Entry& e);
  bool take_byref(const Entry& e);
  void ring_send(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments, size_t nsegments,
                 uint64_t payload_len, Clock::time_point deadline);
  void ring_post(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments, size_t nsegments,
                 uint64_t payload_len);
  bool post_byref(const ConnPtr& conn, const uint8_t* desc, size_t len, uint64_t payload_len,
                  std::vector<iovec>& iov, Clock::time_point grace);
  void queue_rest(const ConnPtr& conn, const std::vector<iovec>& iov, uint64_t rest);
  void writer(const ConnPtr& conn);

  const bool require_;
  const ShmWait wait_;  // of every connection's rings
  struct Threads {
    std::thread reader;
    std::shared_ptr<std::atomic<bool>> finished;  // set as the reader's last act
    std::thread writer;  // accepted connections: writes the send queue into the ring
  };
  std::mutex threads_mu_;
  std::unordered_map<ConnId, Threads> threads_;
  std::vector<Threads> retired_;  // readers that tore their own connection down, to join
};

}  // namespace fastps
