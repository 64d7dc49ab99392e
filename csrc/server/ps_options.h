// What configures a network server (PsServer), and the names the parts of
// the server share (the responder, the services) without depending on the
// PsServer class itself.
#pragma once

#include <cstdint>
#include <string>

#include "protocol/message.h"
#include "transport/transport.h"

namespace fastps {

// Limits on what one connection may park (Note [Parked requests]; docs/protocol.md, "Limits").
constexpr int64_t kDefaultMaxParkedRequests = int64_t{1} << 16;
// The sparse tables one server holds (each costs memory on every shard however small its frame).
constexpr size_t kMaxSparseTables = 4096;

struct PsServerOptions {
  int server_id = 0;
  int num_workers = 1;
  int num_shards = 0;
  int staleness = 0;  // 0 BSP, k > 0 SSP, -1 ASP
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  // The transport by name (Transport::create(): "tcp", "shm", "auto") and its options.
  std::string transport_name = "tcp";
  TransportOptions transport;
  // Per connection: the most requests that may wait for a later round or
  // step, and the most payload bytes they may hold (0: twice
  // transport.max_payload). A read past either is answered ERROR(LIMIT).
  int64_t max_parked_requests = kDefaultMaxParkedRequests;
  int64_t max_parked_bytes = 0;
};

// Requests waiting for a later round or step on one server, over all its
// connections, and the payload bytes they hold.
struct ParkedStats {
  int64_t requests = 0;
  int64_t bytes = 0;
};

// The connection id under which in-process requests are served (Note [Local
// requests] in protocol/local_endpoint.h).
constexpr ConnId kLocalConn = ~ConnId{0};

}  // namespace fastps
