// The in-process road to a server: what a client needs of a server that
// lives in its own process, without depending on the server's code.
//
// Note [Endpoints]
// A client reaches each server through one of two endpoints, and the
// server does not know which one a request came through:
//  - remote: frames over a Transport (tcp, or shm on one host); the reply
//    comes back on the transport's loop thread, which finds the request by
//    its id and delivers it (deliver_reply() in protocol/reply.h).
//  - local: the colocated server in this process, through LocalEndpoint
//    (Note [Local requests]). The request carries where its reply goes (a
//    ReplyTo: data, no code of the client's); the shard that answers writes
//    the reply there and completes the caller's Completion. The server holds
//    no pointer to the client; the client holds the endpoint, which must
//    outlive the client's requests.
// The embedded mode (no job, no frames) reaches its in-process Server's
// shards with typed tasks instead (Server::run_each): its chunks are the
// caller's own tensors, updated in place, so it has no reply to carry.
//
// Note [Local requests]
// A colocated worker and its server live in one process; sending their frames
// through the loopback socket would copy every byte twice through the kernel.
// The worker's client hands such frames to LocalEndpoint::submit() instead,
// and the shard writes the reply's values straight into the destination
// tensor the request carried. A pushed gradient is not copied either: the
// shard reads it in the worker's tensor (Message::in_place; a leading
// optimizer config block is the one part copied). Everything else (routing to
// the owning shard, rounds, errors) is the same code as for a remote worker.
#pragma once

#include "protocol/message.h"
#include "protocol/reply.h"

namespace fastps {

class LocalEndpoint {
 public:
  virtual ~LocalEndpoint() = default;
  // Any thread. Serves `message` (its request id is the endpoint's to set)
  // as if worker `worker` had sent it over a connection; the answering shard
  // delivers the reply to `reply` (deliver_reply()). Throws ConnectionError
  // when the server is stopping, InvalidArgument for a rank outside the job.
  virtual void submit(int worker, Message&& message, ReplyTo reply) = 0;
  // The workers of the job the server serves (ranks 0 .. num_workers() - 1).
  virtual int num_workers() const = 0;
};

}  // namespace fastps
