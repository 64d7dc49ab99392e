#include "server/responder.h"

#include "common/error.h"

namespace fastps {

uint64_t LocalReplies::add(ReplyTo to) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
  calls_.emplace(id, std::move(to));
  return id;
}

void LocalReplies::deliver(const MessageHeader& h, const void* data, size_t bytes) {
  ReplyTo to;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = calls_.find(h.request_id);
    if (it == calls_.end()) return;
    to = std::move(it->second);
    calls_.erase(it);
  }
  deliver_reply(to, false, h, data, bytes);
}

void Responder::reply(ConnId conn, const MessageHeader& req, Op op, const void* data, size_t bytes,
                      uint32_t count) const {
  MessageHeader h;
  h.op = op;
  h.request_id = req.request_id;
  h.key = req.key;
  h.count = count;
  if (conn == kLocalConn) {
    local_.deliver(h, data, bytes);
    return;
  }
  ConstBuffer seg{data, bytes};
  try {
    // A reply larger than the peer accepts would be refused by send(): the
    // requester gets an error instead of waiting for its deadline.
    uint64_t peer_max = 0;
    if (bytes > kMinMaxPayload && bytes > (peer_max = tr_.peer_info(conn).max_payload)) {
      tr_.send_error(conn, req.request_id, Status::kLimit,
                     detail::concat("server ", opt_.server_id, ": the reply of ", bytes,
                                    " bytes exceeds the largest payload this client accepts (", peer_max,
                                    "); ask for fewer ids or values per call, or spread the table over "
                                    "more shards or servers"),
                     req.key);
      return;
    }
    tr_.send(conn, h, bytes ? &seg : nullptr, bytes ? 1 : 0);
  } catch (const ConnectionError&) {
  } catch (const Error& e) {
    transport_log(detail::concat("server ", opt_.server_id, ": reply dropped: ", e.what()));
  }
}

void Responder::error(ConnId conn, uint64_t request_id, uint64_t key, Status status,
                      const std::string& msg) const {
  if (conn == kLocalConn) {
    MessageHeader h;
    h.op = Op::kError;
    h.status = uint32_t(status);
    h.request_id = request_id;
    h.key = key;
    local_.deliver(h, msg.data(), msg.size());
    return;
  }
  try {
    tr_.send_error(conn, request_id, status, msg, key);
  } catch (const ConnectionError&) {
  } catch (const Error& e) {
    transport_log(detail::concat("server ", opt_.server_id, ": error reply dropped: ", e.what()));
  }
}

std::string Responder::internal_error_text(const std::exception& e) const {
  return detail::concat("server ", opt_.server_id, ": internal error (", e.what(),
                        "); the request may be partly applied, restart the job from a checkpoint");
}

}  // namespace fastps
