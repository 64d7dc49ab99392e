// How the network server answers a request: a reply or an ERROR frame sent
// through the transport, or handed to the local sink for the colocated
// worker (Note [Local requests] in server/ps_server.h).
//
// Thread safety: any thread (a shard's, the transport's). Never waits for
// the requester to read (Note [Send queues] in transport/tcp.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include "server/ps_options.h"

namespace fastps {

class Responder {
 public:
  Responder(const PsServerOptions& options, Transport& transport, const LocalSink& local)
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
  const LocalSink& local_;
};

}  // namespace fastps
