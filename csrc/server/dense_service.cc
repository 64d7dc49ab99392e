#include "server/dense_service.h"

#include <algorithm>

#include "common/error.h"
#include "server/shard_state.h"
#include "protocol/keys.h"

namespace fastps {

DenseService::DenseService(const Responder& out, ShardState& shard)
    : out_(out), cons_(shard.consistency), chunks_(shard.owned) {}

namespace {

// A frame's payload: its own buffer, or (a local request, Note [Local
// requests] in protocol/local_endpoint.h) the worker's memory, valid until the
// request completes; a local request may keep its first in_place_offset bytes
// (a config block) in its own buffer and the rest in place
// (Message::in_place_offset).
const uint8_t* body(const Message& m) { return m.in_place && m.in_place_offset == 0 ? m.in_place : m.payload.data(); }

// Bytes of the payload readable at body(m).
size_t body_len(const Message& m) {
  return m.in_place && m.in_place_offset != 0 ? m.in_place_offset : m.header.payload_len;
}

// The `n` float32 values at byte `offset` of the payload, which must end there.
const float* floats(const Message& m, size_t offset, int64_t n) {
  FASTPS_CHECK(m.header.payload_len == offset + size_t(n) * 4, op_name(m.header.op), " payload of ",
               m.header.payload_len, " bytes, expected ", offset + size_t(n) * 4);
  if (m.in_place && m.in_place_offset != 0) {
    FASTPS_CHECK(offset == m.in_place_offset, op_name(m.header.op), ": values at byte ", offset,
                 " of a request split at byte ", m.in_place_offset);
    return reinterpret_cast<const float*>(m.in_place);
  }
  return reinterpret_cast<const float*>(body(m) + offset);
}

// The optimizer config block a frame with kFlagConfig starts with, into
// *hyper; returns its size (where the values start), 0 without the flag.
size_t read_config(const Message& m, OptimHyper* hyper) {
  if (!(m.header.flags & kFlagConfig)) return 0;
  size_t used = 0;
  *hyper = decode_optim_config(body(m), body_len(m), &used);
  return used;
}

void drop_deferred(PsChunk& c) {
  c.deferred = nullptr;
  c.deferred_owner = Payload();
}

}  // namespace

void DenseService::handle(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m) {
  try {
    switch (m.header.op) {
      case Op::kRegister: return do_register(conn, m);
      case Op::kPush:
      case Op::kPushPull: return do_push(conn, worker, budget, m);
      case Op::kPull: return do_pull(conn, worker, budget, m);
      case Op::kStateGet: return do_state_get(conn, m);
      case Op::kStateSet: return do_state_set(conn, m);
      case Op::kApply: return do_apply(conn, worker, budget, m);
      case Op::kPing:
        return out_.reply(conn, m.header, Op::kPong, body(m), m.header.payload_len, m.header.count);
      default:
        throw InvalidArgument(detail::concat("server cannot serve op ", op_name(m.header.op)));
    }
  } catch (const CapacityError& e) {
    out_.error(conn, m.header.request_id, m.header.key, Status::kLimit, e.what());
  } catch (const Error& e) {
    out_.error(conn, m.header.request_id, m.header.key, Status::kInvalidArgument, e.what());
  } catch (const std::exception& e) {  // bad_alloc and the like: the requester still gets an answer
    out_.error(conn, m.header.request_id, m.header.key, Status::kInternal, out_.internal_error_text(e));
  }
}

// Its peer is gone, and nothing may stay for it. A push it made stays in its round.
void DenseService::drop_connection(ConnId conn) {
  for (auto& kv : chunks_) take_waiting(kv.second.waiting, [&](const DenseWaiting& w) { return w.conn == conn; });
}

size_t DenseService::fail_unreachable() {
  size_t failed = 0;
  for (auto& kv : chunks_) failed += fail_unreachable(kv.second);
  return failed;
}

PsChunk& DenseService::chunk(uint64_t key) {
  auto it = chunks_.find(key);
  FASTPS_CHECK(it != chunks_.end(), "server ", out_.server_id(), " has no chunk with key ", key, " (tensor ",
               key >> kChunkIndexBits, " chunk ", key & ((uint64_t{1} << kChunkIndexBits) - 1),
               "); was it registered?");
  return it->second;
}

// A sum-only chunk goes in rounds whatever the staleness (Note [Consistency]).
Progress DenseService::progress(const PsChunk& c) const {
  return Progress{c.sum_only || cons_.bsp(), int64_t(c.version), &c.clock};
}

void DenseService::do_register(ConnId conn, Message& m) {
  // Everything is checked before the key is touched: a bad REGISTER must
  // leave no half-made chunk behind (its clock vector would be empty).
  OptimHyper hyper;
  size_t off = read_config(m, &hyper);
  const int64_t n = m.header.count;
  FASTPS_CHECK(n > 0, "REGISTER of an empty chunk");
  const float* init = floats(m, off, n);
  PsChunk& c = chunks_[m.header.key];
  // A registration replaces the chunk: requests still waiting on the old one
  // can never be answered by it (a worker re-registering while others wait).
  for (const DenseWaiting& w : c.waiting)
    out_.error(w.conn, w.request_id, w.key, Status::kInvalidArgument,
               detail::concat("server ", out_.server_id(), ": key ", w.key,
                              " was registered again while this request waited; re-register only "
                              "between rounds"));
  c = PsChunk();
  c.sum_only = (m.header.flags & kFlagSum) != 0;
  c.numel = n;
  c.hyper = hyper;
  c.param.assign(init, init + n);
  c.clock.assign(cons_.num_workers(), 0);
  if (!c.sum_only) c.ensure_state(c.hyper);
  out_.reply(conn, m.header, Op::kReply, nullptr, 0, 0);
}

void DenseService::do_push(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m) {
  cons_.check_worker(worker, "PUSH");
  PsChunk& c = chunk(m.header.key);
  OptimHyper hyper = c.hyper;
  size_t off = read_config(m, &hyper);
  const bool skip = (m.header.flags & kFlagSkip) != 0;
  const float* g = skip ? nullptr : floats(m, off, c.numel);
  const bool push_pull = m.header.op == Op::kPushPull;
  const bool deferred = (m.header.flags & kFlagDeferred) != 0;
  FASTPS_CHECK(!deferred || (push_pull && !c.sum_only && cons_.bsp()),
               "a deferred push must be a PUSH_PULL to an optimizer chunk under BSP (staleness 0)");
  if (!c.sum_only) c.hyper = hyper;
  if (progress(c).in_rounds) {
    join_round(c, worker, m, g, deferred);
    const uint32_t round = c.version + 1;
    if (push_pull) {  // counted, never refused: it is in the round already
      c.waiting.push_back(DenseWaiting{conn, m.header.request_id, m.header.key, round, worker,
                                       deferred ? DenseAnswer::kMean : DenseAnswer::kParam,
                                       park(budget, 0, false, out_.server_id())});
    } else {
      out_.reply(conn, m.header, Op::kReply, nullptr, 0, 0);
    }
    if (c.round.count() == cons_.num_workers()) {
      complete_round(c);
    } else {
      fail_unreachable(c);
    }
    return;
  }
  // SSP / ASP: apply at once.
  c.clock[worker] += 1;
  if (g) {
    std::vector<float> mean(g, g + c.numel);
    const float w = float(cons_.num_workers());
    for (float& x : mean) x /= w;
    c.apply(c.hyper, mean.data());
  }
  c.version += 1;
  out_.reply(conn, m.header, Op::kReply, nullptr, 0, 0);
  serve_waiting(c);
}

// Adds `worker`'s push (gradient `g`, or a skip when null) to the round being
// collected, opening it if this is its first push. One round at a time (Note
// [Consistency]).
void DenseService::join_round(PsChunk& c, int worker, Message& m, const float* g, bool deferred) {
  if (c.round.count() == 0) {
    if (c.mean_ready || c.apply_open) close_unapplied_round(c, worker);
    c.deferred_round = deferred;
    c.contributors = 0;
    c.round.start(cons_.num_workers());
  }
  FASTPS_CHECK(c.deferred_round == deferred, "worker rank ", worker, " mixed deferred and immediate ",
               "pushes of key ", m.header.key, " in one round (every rank must run the same mode)");
  FASTPS_CHECK(!c.round.has(worker), "worker rank ", worker, " pushed key ", m.header.key, " twice in round ",
               c.version + 1, " (accumulating gradients over several backward passes needs no_sync())");
  c.round.join(worker);
  if (g == nullptr) return;
  // Note [Deferred first gradient]
  // Copying the round's first gradient into the sum and adding the second to
  // it are two passes over memory; keeping the first where it is and writing
  // first + second into the sum is one (the same float32 additions in the
  // same order). The first stays valid: a frame's payload moves into the
  // chunk; a local request's tensor is the caller's until its PUSH_PULL is
  // answered at the end of the round (a local PUSH is answered at once, so it
  // is added now).
  const bool push_pull = m.header.op == Op::kPushPull;
  if (c.contributors == 0 && (m.in_place == nullptr || push_pull)) {
    if (m.in_place == nullptr) {
      c.deferred_owner = std::move(m.payload);  // the buffer moves, `g` stays valid
    }
    c.deferred = g;
  } else if (c.contributors == 0) {
    c.accum.assign(g, g + c.numel);
  } else if (c.deferred != nullptr) {
    c.accum.resize(c.numel);
    float* a = c.accum.data();
    const float* d = c.deferred;
    for (int64_t i = 0; i < c.numel; ++i) a[i] = d[i] + g[i];
    drop_deferred(c);
  } else {
    float* a = c.accum.data();
    for (int64_t i = 0; i < c.numel; ++i) a[i] += g[i];
  }
  ++c.contributors;
}

void DenseService::complete_round(PsChunk& c) {
  if (c.deferred != nullptr) {  // a single contributor
    c.accum.assign(c.deferred, c.deferred + c.numel);
    drop_deferred(c);
  }
  if (c.contributors == 0) c.accum.assign(c.numel, 0.0f);  // every worker skipped
  if (c.deferred_round) {  // Note [Deferred apply]: the mean goes back, the step waits
    if (c.contributors > 0) {
      const float w = float(cons_.num_workers());
      for (float& x : c.accum) x /= w;
    }
    c.round.close();
    c.mean_ready = true;
    serve_waiting(c);
    return;
  }
  if (c.sum_only) {
    c.param.swap(c.accum);
  } else if (c.contributors > 0) {
    const float w = float(cons_.num_workers());
    for (float& x : c.accum) x /= w;
    c.apply(c.hyper, c.accum.data());
  }
  c.round.close();
  c.version += 1;
  serve_waiting(c);
}

// Note [Deferred apply]
// Under BSP, fastps.optim pushes gradients during backward as deferred
// PUSH_PULLs: the round's mean (sum / W) is computed as for an immediate
// round but sent back to every worker instead of being applied, so that
// after backward each rank's .grad holds what DDP's all-reduce leaves there
// and a script may clip, unscale or log it. In optimizer.step() every worker
// sends one APPLY per chunk with its contribution: SKIP (none: no gradient,
// or another rank's turn), SCALE (the mean times one float32 factor, as
// clip_grad_norm_ or GradScaler.unscale_ leave it: 4 bytes instead of a
// gradient), or a full gradient (any other edit). When all W arrived, the
// step's gradient is the average of the contributions (exactly mean * s
// when every contribution is the same scale s; nothing is applied when all
// abstain), the optimizer runs once with the APPLYs' hyperparameters, and
// each APPLY is answered with the new parameters. An APPLY round may also
// open without a pushed mean (full or SKIP contributions only): a model
// kept in DistributedDataParallel has its gradients averaged already, and
// one rank per tensor sends them. A round whose mean nobody applied (every
// rank skipped step(), as GradScaler does on an overflow) is dropped when
// the next round's first push arrives; one that only some ranks applied is
// an error for all of them.
void DenseService::do_apply(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m) {
  cons_.check_worker(worker, "APPLY");
  PsChunk& c = chunk(m.header.key);
  FASTPS_CHECK(!c.sum_only && cons_.bsp(),
               "APPLY needs an optimizer chunk under BSP (staleness 0); key ", m.header.key, " is not one");
  FASTPS_CHECK(c.round.count() == 0, "APPLY of key ", m.header.key, " while its round still collects pushes (",
               c.round.count(), " of ", cons_.num_workers(), "): a round's pushes all come before its APPLYs");
  OptimHyper hyper = c.hyper;
  const size_t off = read_config(m, &hyper);
  const bool skip = (m.header.flags & kFlagSkip) != 0;
  const bool scaled = (m.header.flags & kFlagScale) != 0;
  FASTPS_CHECK(!(skip && scaled), "APPLY with both SKIP and SCALE");
  FASTPS_CHECK(!scaled || c.mean_ready, "APPLY with a SCALE of key ", m.header.key,
               " but no round mean to scale (push the round's gradients first)");
  const float* scale = scaled ? floats(m, off, 1) : nullptr;
  const float* g = skip || scaled ? nullptr : floats(m, off, c.numel);
  if (!c.apply_open) {
    c.apply_open = true;
    c.applied.start(cons_.num_workers());
    c.scales.clear();
    c.full = 0;
  }
  FASTPS_CHECK(!c.applied.has(worker), "worker rank ", worker, " sent APPLY twice for key ", m.header.key,
               " in one round");
  c.applied.join(worker);
  c.hyper = hyper;
  if (scale != nullptr) {
    c.scales.push_back(*scale);
  } else if (g != nullptr) {
    if (c.full == 0) {
      c.contrib.assign(g, g + c.numel);
    } else {
      float* a = c.contrib.data();
      for (int64_t i = 0; i < c.numel; ++i) a[i] += g[i];
    }
    ++c.full;
  }
  // Counted, never refused: its contribution is in the round already.
  c.waiting.push_back(DenseWaiting{conn, m.header.request_id, m.header.key, 0, worker, DenseAnswer::kApply,
                                   park(budget, 0, false, out_.server_id())});
  if (c.applied.count() == cons_.num_workers()) {
    finish_apply(c);
  } else {
    fail_unreachable(c);
  }
}

void DenseService::finish_apply(PsChunk& c) {
  const int k = c.full + int(c.scales.size());
  if (k > 0) {
    const bool uniform = c.full == 0 && std::all_of(c.scales.begin(), c.scales.end(),
                                                    [&](float s) { return s == c.scales[0]; });
    const float* grad;
    if (uniform) {  // exactly fl(mean * s), as the workers' .grad holds it
      const float s = c.scales[0];
      if (s != 1.0f)
        for (float& x : c.accum) x *= s;
      grad = c.accum.data();
    } else {
      if (c.full == 0) c.contrib.assign(c.numel, 0.0f);
      float* a = c.contrib.data();
      const float* mean = c.accum.data();
      for (float s : c.scales)
        for (int64_t i = 0; i < c.numel; ++i) a[i] += mean[i] * s;
      if (k > 1) {
        const float kf = float(k);
        for (int64_t i = 0; i < c.numel; ++i) a[i] /= kf;
      }
      grad = a;
    }
    c.apply(c.hyper, grad);
  }
  c.version += 1;
  c.apply_open = false;
  c.mean_ready = false;
  serve_waiting(c);
}

// A push opens a new round while the last deferred one was not applied:
// dropped if no rank applied it (all skipped step()); an error for every
// rank involved if only some did.
void DenseService::close_unapplied_round(PsChunk& c, int worker) {
  const bool partly_applied = c.apply_open && c.applied.count() > 0;
  c.apply_open = false;
  c.mean_ready = false;
  c.version += 1;  // the dropped round
  if (!partly_applied) return;
  const std::string msg = detail::concat(
      "server ", out_.server_id(), ": worker rank ", worker, " pushed the next round's gradient while rank(s) ",
      c.applied.list(),
      " ran optimizer.step() for the last one; every rank must call step() after the same "
      "backward passes, or every rank skip it (GradScaler skips on every rank alike)");
  for (const DenseWaiting& w :
       take_waiting(c.waiting, [](const DenseWaiting& w) { return w.answer == DenseAnswer::kApply; }))
    out_.error(w.conn, w.request_id, w.key, Status::kInvalidArgument, msg);
  throw InvalidArgument(msg);
}

void DenseService::do_pull(ConnId conn, int worker, const ParkBudgetPtr& budget, Message& m) {
  PsChunk& c = chunk(m.header.key);
  FASTPS_CHECK(m.header.count == 0 || int64_t(m.header.count) == c.numel, "PULL of ", m.header.count,
               " values from a chunk of ", c.numel);
  const uint32_t need = m.header.aux;  // the requester's clock (docs/protocol.md, PULL)
  if (ready(c, need)) {
    out_.reply(conn, m.header, Op::kReply, c.param.data(), c.numel * 4, uint32_t(c.numel));
    return;
  }
  c.waiting.push_back(DenseWaiting{conn, m.header.request_id, m.header.key, need, worker, DenseAnswer::kParam,
                                   park(budget, 0, true, out_.server_id())});
  fail_unreachable(c);
}

// Answers the waiting requests of `c` that are ready now, in their order.
void DenseService::serve_waiting(PsChunk& c) {
  auto is_ready = [&](const DenseWaiting& w) {
    switch (w.answer) {
      case DenseAnswer::kParam: return ready(c, w.need);
      case DenseAnswer::kMean: return c.mean_ready;
      case DenseAnswer::kApply: return !c.apply_open;
    }
    return false;
  };
  for (const DenseWaiting& w : take_waiting(c.waiting, is_ready)) {
    const float* values = w.answer == DenseAnswer::kMean ? c.accum.data() : c.param.data();
    MessageHeader h;
    h.request_id = w.request_id;
    h.key = w.key;
    out_.reply(w.conn, h, Op::kReply, values, c.numel * 4, uint32_t(c.numel));
  }
}

// Fails the waiting requests of `c` that can no longer be answered because a
// worker they depend on is dead. Returns how many it failed.
size_t DenseService::fail_unreachable(PsChunk& c) {
  if (!cons_.any_dead() || c.waiting.empty()) return 0;
  // A deferred first gradient may be a waiting local request's tensor, which
  // its owner may free once the request fails: into the sum with it first,
  // so later pushes of this (doomed) round still find a complete sum.
  if (c.deferred != nullptr) {
    c.accum.assign(c.deferred, c.deferred + c.numel);
    drop_deferred(c);
  }
  const Progress p = progress(c);
  const std::vector<DenseWaiting> failed =
      take_waiting(c.waiting, [&](const DenseWaiting& w) { return cons_.unreachable(p, w.need); });
  if (failed.empty()) return 0;
  const std::string why = detail::concat(cons_.dead_text(), "; this round can never complete");
  for (const DenseWaiting& w : failed) out_.error(w.conn, w.request_id, w.key, Status::kTimeout, why);
  return failed.size();
}

void DenseService::do_state_get(ConnId conn, Message& m) {
  PsChunk& c = chunk(m.header.key);
  const uint32_t buf = m.header.aux;
  if (buf == kStepCounterBuffer) {
    out_.reply(conn, m.header, Op::kReply, &c.step, 4, 1);
    return;
  }
  FASTPS_CHECK(buf <= kMaxStateBuffers, "state buffer ", buf, " does not exist");
  if (buf == 0 || c.state[buf - 1].size() == size_t(c.numel)) {
    const std::vector<float>& v = buf == 0 ? c.param : c.state[buf - 1];
    out_.reply(conn, m.header, Op::kReply, v.data(), v.size() * 4, uint32_t(v.size()));
    return;
  }
  // A buffer the chunk's optimizer does not use reads as zeros; a read does
  // not make it (that would keep numel floats per request's few bytes).
  const std::vector<float> zeros(size_t(c.numel), 0.0f);
  out_.reply(conn, m.header, Op::kReply, zeros.data(), zeros.size() * 4, uint32_t(zeros.size()));
}

void DenseService::do_state_set(ConnId conn, Message& m) {
  PsChunk& c = chunk(m.header.key);
  const uint32_t buf = m.header.aux;
  if (buf == kStepCounterBuffer) {
    c.step = *floats(m, 0, 1);
  } else {
    const float* v = floats(m, 0, c.numel);
    std::vector<float>& dst = c.buffer(buf);
    std::copy(v, v + c.numel, dst.begin());
    if (buf == 1 && c.hyper.kind == OptimKind::kSGD) c.fresh = false;
  }
  out_.reply(conn, m.header, Op::kReply, nullptr, 0, 0);
}

}  // namespace fastps
