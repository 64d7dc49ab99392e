// Note [Endpoints] and Note [Local requests] (csrc/protocol/local_endpoint.h):
// requests submitted to a PsServer through its LocalEndpoint, with no client
// at all. Each carries where its reply goes (a ReplyTo); the answering shard
// writes the values there and completes the Completion the caller waits on.
// Checks a parked request answered from another request's shard, the typed
// error of an ERROR reply, a closed delivery gate, and the endpoint refusing
// a rank outside the job.
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "protocol/keys.h"
#include "protocol/local_endpoint.h"
#include "report.h"
#include "server/ps_server.h"

using namespace fastps;
using fastps_test::report;

namespace {

constexpr int64_t kN = 4;

// A frame with `segs` (copied into its payload), as the client builds one.
Message frame(Op op, uint64_t key, uint32_t count, uint32_t aux, uint32_t flags,
              const std::vector<std::vector<uint8_t>>& segs) {
  Message m;
  m.header.op = op;
  m.header.key = key;
  m.header.count = count;
  m.header.aux = aux;
  m.header.flags = flags;
  for (const auto& s : segs) m.payload.insert(m.payload.end(), s.begin(), s.end());
  m.header.payload_len = m.payload.size();
  return m;
}

std::vector<uint8_t> bytes_of(const float* v, size_t n) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(v);
  return std::vector<uint8_t>(p, p + n * 4);
}

std::vector<uint8_t> config_block(const OptimHyper& h) {
  std::vector<uint8_t> b(kOptimConfigSize);
  encode_optim_config(h, b.data());
  return b;
}

ReplyTo reply_to(float* dst, int64_t count) {
  ReplyTo to;
  to.completion = std::make_shared<Completion>(1);
  to.gate = std::make_shared<DeliveryGate>();
  to.target.dst = dst;
  to.target.count = count;
  to.server = 0;
  to.peer = std::make_shared<const std::string>("parameter server 0 (local)");
  return to;
}

// Waits for `to`; returns "" or the error's text.
std::string wait(const ReplyTo& to) {
  try {
    to.completion->wait(Clock::now() + std::chrono::seconds(30), "a local request");
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

int main() {
  PsServerOptions o;
  o.num_workers = 1;
  o.num_shards = 2;
  PsServer server(o);
  LocalEndpoint& ep = server;
  OptimHyper sgd;
  sgd.lr = 0.5;
  const uint64_t key = chunk_key(7, 0);
  const float init[kN] = {1, 2, 3, 4};

  ReplyTo reg = reply_to(nullptr, 0);
  ep.submit(0, frame(Op::kRegister, key, kN, 0, kFlagConfig, {config_block(sgd), bytes_of(init, kN)}), reg);
  report(wait(reg).empty(), "register_completes");

  // A pull for version 1 waits for the round; the push that completes it
  // answers the pull, which lands in its destination.
  float pulled[kN] = {0, 0, 0, 0};
  ReplyTo pull = reply_to(pulled, kN);
  ep.submit(0, frame(Op::kPull, key, kN, 1, 0, {}), pull);
  const bool parked = !pull.completion->finished();
  const float grad[kN] = {2, 2, 2, 2};
  ReplyTo push = reply_to(nullptr, 0);
  ep.submit(0, frame(Op::kPush, key, kN, 0, kFlagConfig, {config_block(sgd), bytes_of(grad, kN)}), push);
  const std::string pushed = wait(push), got = wait(pull);
  report(parked && pushed.empty() && got.empty() && pulled[0] == 0 && pulled[3] == 3,
         "parked_pull_lands_in_its_destination", got + pushed);

  // An ERROR reply fails the request with the typed error naming the server.
  float none[kN];
  ReplyTo unknown = reply_to(none, kN);
  ep.submit(0, frame(Op::kPull, chunk_key(8, 0), kN, 0, 0, {}), unknown);
  bool typed = false;
  try {
    unknown.completion->wait(Clock::now() + std::chrono::seconds(30), "a pull");
  } catch (const InvalidArgument& e) {
    typed = std::string(e.what()).find("parameter server 0 (local): ") != std::string::npos;
  }
  report(typed, "error_reply_is_typed_and_names_the_server");

  // A caller that gave up (closed gate): the reply does not touch its buffer.
  float kept[kN] = {-1, -1, -1, -1};
  ReplyTo late = reply_to(kept, kN);
  late.gate->close();
  ep.submit(0, frame(Op::kPull, key, kN, 0, 0, {}), late);
  bool timed_out = false;
  try {
    late.completion->wait(Clock::now() + std::chrono::seconds(30), "a pull");
  } catch (const TimeoutError&) {
    timed_out = true;
  }
  report(timed_out && kept[0] == -1 && kept[3] == -1, "closed_gate_keeps_the_buffer");

  bool refused = false;
  try {
    ep.submit(1, frame(Op::kPull, key, kN, 0, 0, {}), reply_to(pulled, kN));
  } catch (const InvalidArgument&) {
    refused = true;
  }
  report(refused, "rank_outside_the_job_is_refused");
  return fastps_test::summary();
}
