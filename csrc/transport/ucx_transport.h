// UcxTransport: TCP connections whose frames travel over UCX (RDMA on
// InfiniBand/RoCE, or whatever UCX selects: TCP, shared memory, CMA) once
// the handshake is done (docs/protocol.md, "UCX"). Use it through
// Transport::create("ucx") (every connection over UCX, or a ConnectionError
// at connect()) or Transport::create("auto") on a host with an RDMA device
// (shared memory with servers on this host, UCX with the others, TCP if a
// server declines). As a server it accepts UCX and shared-memory offers.
//
// Design note:
//  * A connection starts as a TCP one (TcpTransport: socket, the HMAC
//    handshake on the job secret, deadlines). The client then offers UCX on
//    its first socket: UCX_OFFER carries a random 64-bit token of its
//    connection and its UCP worker address; the server makes an endpoint to
//    it and answers UCX_ACCEPT with its own token and address; the client
//    makes its endpoint. Every later frame, both ways, is one UCP active
//    message naming the receiver's token (transport/ucx_plugin.h), so only
//    authenticated peers, which learnt the token over their socket, reach a
//    connection. Worker addresses (not UCX's sockaddr listener) keep the
//    rendezvous of addresses unchanged and work on fabrics without RDMA CM.
//  * The socket stays as the liveness channel, exactly as for shared memory
//    (Note [Liveness] in transport/tcp.h): heartbeats, the last ERROR frame,
//    and a peer that dies (kill -9) closes it; UCX's own error handler
//    (UCP_ERR_HANDLING_MODE_PEER) closes the connection too.
//  * Receiving: the plugin's progress thread calls frame_begin() with each
//    frame's header; the header is checked against the limits here, and the
//    payload lands where payload_target() says (or in a new buffer): copied
//    there from an eager message, or fetched straight into it by rendezvous
//    (zero-copy where the UCX transport can). Rendezvous frames complete out
//    of order with later eager ones, so each connection keeps its frames in
//    arrival order and delivers the completed prefix, on the progress
//    thread once UCX's progress call has returned (Note [No handlers under
//    UCX's lock] in ucx_transport.cc). The disconnect handler runs after the connection's last frame
//    (release_channel() waits for a delivery in progress, and the endpoint's
//    close waits until no receive writes into the core's memory any more).
//  * Sending, Note [Send queues] (transport/tcp.h): a connection this side
//    opened sends from the caller's memory and waits for UCX to finish with
//    it, until the deadline (then the endpoint is closed and the caller gets
//    TimeoutError). An accepted connection never waits for its peer: a frame
//    UCX can send at once (small, eager) goes from the caller's memory;
//    otherwise the payload is copied (counted as the connection's queued
//    bytes, bounded by send_queue_limit, a queue that does not move for the
//    liveness window closes the connection) and posted. The same applies to
//    any send made on the progress thread itself (a handler's reply).
//  * The UCP worker is made when the first connection needs it, so "auto"
//    servers cost nothing until a client offers UCX.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "transport/shm_transport.h"
#include "transport/ucx_plugin.h"

namespace fastps {

// The UCX plugin, loaded once per process: next to the module that holds
// the core (fastps/libfastps_ucx.so in a wheel), then by the dynamic
// loader's search path. Null with the reason (and what to do) in *why.
const ucx::Plugin* load_ucx_plugin(std::string* why);
// True if this host has an RDMA-capable device (/sys/class/infiniband:
// InfiniBand, RoCE or iWARP adapters): "auto" then prefers UCX between hosts.
bool host_has_rdma_device();

class UcxTransport final : public ShmTransport {
 public:
  // `require_ucx`: connect() always offers UCX and fails (ConnectionError)
  // unless the server accepts; otherwise ("auto") shared memory first, then
  // UCX, then TCP.
  UcxTransport(std::string kind, const TransportOptions& options, const ucx::Plugin* plugin, bool require_ucx);
  ~UcxTransport() override;

 protected:
  PeerInfo do_peer_info(ConnId conn) const override;
  void add_stats(TransportStats* stats) const override;
  bool upgrade_outgoing(const ConnPtr& conn, BlockingStream& stream) override;
  bool accept_offer(const ConnPtr& conn, Op op, const Payload& offer, std::vector<uint8_t>* reply,
                    std::string* why) override;
  void start_channel(const ConnPtr& conn) override;
  void send_frame(const ConnPtr& conn, const uint8_t* header, const ConstBuffer* segments, size_t nsegments,
                  uint64_t payload_len, Clock::time_point deadline) override;
  void wake_channel(Conn& conn) override;
  void release_channel(const ConnPtr& conn) override;

 private:
  class Events;
  friend class Events;

  // The worker, made on first use; null with *why if UCX refuses.
  ucx::Worker* worker(std::string* why);
  std::shared_ptr<UcxChannel> make_channel(const ConnPtr& conn);
  ConnPtr find_token(uint64_t token) const;
  void forget_token(uint64_t token);
  // From the progress thread: logs, tells the peer on the socket when it can
  // without waiting, and closes the connection on the loop thread.
  void fail_soon(const ConnPtr& conn, Status status, const std::string& reason);
  void deliver_ready(const ConnPtr& conn);
  void post_copy(const ConnPtr& conn, const uint8_t* am_header, const std::vector<iovec>& iov, uint64_t payload_len);
  // Closes the connection and throws ConnectionError: UCX failed a send (`why`).
  [[noreturn]] void lost_while_sending(const ConnPtr& conn, const std::string& why);
  static std::vector<uint8_t> offer_body(uint64_t token, const std::string& address);

  const ucx::Plugin* const plugin_;
  const bool require_ucx_;
  mutable std::mutex tokens_mu_;
  std::unordered_map<uint64_t, std::weak_ptr<Conn>> by_token_;
  std::unique_ptr<Events> events_;
  std::mutex worker_mu_;
  std::string worker_error_;  // why the worker could not be made (not retried)
  std::unique_ptr<ucx::Worker> worker_;  // last: stopped first, while the above still exist
};

}  // namespace fastps
