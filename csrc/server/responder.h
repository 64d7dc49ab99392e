// How the network server answers a request: a reply or an ERROR frame sent
// through the transport, or, for the colocated worker's requests, delivered
// where the request said its reply goes (Note [Local requests] in
// protocol/local_endpoint.h).
//
// Thread safety: any thread (a shard's, the transport's). Never waits for
// the requester to read (Note [Send queues] in transport/tcp.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <unordered_map>

#include "protocol/reply.h"
#include "server/ps_options.h"

namespace fastps {

// The replies owed to in-process requesters (kLocalConn), by the request id
// the local endpoint gave each request. Thread safety: any thread.
class LocalReplies {
 public:
  // Records where the reply of a request goes; returns the request's id.
  uint64_t add(ReplyTo to);
  // Delivers reply `h` to its request (deliver_reply()); a reply to no
  // recorded request is dropped.
  void deliver(const MessageHeader& h, const void* data, size_t bytes);

 private:
  std::mutex mu_;
  std::unordered_map<uint64_t, ReplyTo> calls_;
  uint64_t next_id_ = 1;
};

class Responder {
 public:
  Responder(const PsServerOptions& options, Transport& transport, LocalReplies& local)
      : opt_(options), tr_(transport), local_(local) {}

  int server_id() const { return opt_.server_id; }

  // Sends the reply to `req` (its request id and key). A reply to a
  // connection that closed is dropped quietly: the transport logged the
  // close, and the disconnect handler deals with the worker.
  void reply(ConnId conn, const MessageHeader& req, Op op, const void* data, size_t bytes,
             uint32_t count) const;
  void error(ConnId conn, uint64_t request_id, uint64_t key, Status status, const std::string& msg) const;

  // The ERROR text for an unexpected exception (bad_alloc and the like).
  std::string internal_error_text(const std::exception& e) const;

 private:
  const PsServerOptions& opt_;
  Transport& tr_;
  LocalReplies& local_;
};

}  // namespace fastps
