#include "server/sparse_service.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "server/shard_state.h"

namespace fastps {

SparseService::SparseService(const Responder& out, ShardState& shard)
    : out_(out), cons_(shard.consistency), tables_(shard.sparse) {}

namespace {

// Per shard, the indices k < count of the ids stored at base + k * stride
// (possibly unaligned).
std::vector<std::vector<int64_t>> route(const uint8_t* base, size_t stride, uint64_t count, int shards) {
  return sparse_route<sparse_shard_of>(int64_t(count), shards, [=](int64_t k) {
    int64_t id;
    std::memcpy(&id, base + size_t(k) * stride, 8);
    return id;
  });
}

// This shard's share of this server's share of the caps.
std::unique_ptr<SparseTable> make_shard_table(const SparseTableConfig& c, const SparseSpread& spread, int shard,
                                              int shards) {
  return std::make_unique<SparseTable>(sparse_shard_table(c, shard, shards, spread));
}

void reset_round(SparseSlice& t) {
  t.round.close();
  t.slot.clear();
  t.round_ids.clear();
  t.accum.clear();
}

}  // namespace

// ------------------------------------------------------------ SparseRouter

std::vector<int> SparseRouter::all_shards() const {
  std::vector<int> all;
  for (int s = 0; s < shards_; ++s) all.push_back(s);
  return all;
}

int64_t SparseRouter::dim_of(uint64_t key) const {
  auto it = dim_.find(key);
  FASTPS_CHECK(it != dim_.end(), "server ", server_id_, " has no sparse table ", key,
               "; create it first (SPARSE_CREATE)");
  return it->second;
}

// Every shard needs a row of the server's cap share (0: no cap).
void SparseRouter::check_cap_share(const SparseTableConfig& c, const SparseSpread& spread) const {
  sparse_check_cap_split(c, shards_, "shards", &spread);
}

std::vector<int> SparseRouter::split(SparseRequest& r) {
  const uint8_t* p = r.payload.data();
  const size_t len = r.payload.size();
  const MessageHeader& h = r.header;
  r.num_shards = shards_;
  switch (h.op) {
    case Op::kSparseCreate: return split_create(r);
    case Op::kSparsePull: {
      r.pull = decode_sparse_pull(h, p, len);
      r.dim = dim_of(h.key);
      const int64_t n = r.pull.ids.n;
      FASTPS_CHECK(uint64_t(n) * uint64_t(r.dim) * 4 <= max_payload_, "SPARSE_PULL of ", n, " rows of dim ",
                   r.dim, " exceeds the reply limit");
      // The reply's rows are made when a shard fills them (Note [Parked requests]).
      r.index = route(r.pull.ids.data, 8, uint64_t(n), shards_);
      std::vector<int> targets;
      for (int s = 0; s < shards_; ++s)
        if (!r.index[size_t(s)].empty()) targets.push_back(s);
      return targets;
    }
    case Op::kSparsePush: {
      r.push = decode_sparse_push(h, p, len);
      const int64_t n = r.push.ids.n;
      const int64_t dim = dim_of(h.key);
      FASTPS_CHECK(r.push.grad_bytes == uint64_t(n) * uint64_t(dim) * 4, "SPARSE_PUSH of ", n, " ids carries ",
                   r.push.grad_bytes, " bytes of gradients; the table's rows have dim ", dim);
      r.dim = dim;
      r.index = route(r.push.ids.data, 8, uint64_t(n), shards_);
      return all_shards();  // every shard counts every push (Note [Sparse tables on the network server])
    }
    case Op::kSparseStats:
      r.stats_step = decode_sparse_stats(h, len);
      r.stats.resize(size_t(shards_));
      r.steps.assign(size_t(shards_), 0);
      return all_shards();
    case Op::kSparseExport:
      r.export_shard = decode_sparse_export(h, len);
      FASTPS_CHECK(r.export_shard < uint32_t(shards_), "SPARSE_EXPORT of shard ", r.export_shard, "; server ",
                   server_id_, " has ", shards_);
      return {int(r.export_shard)};
    case Op::kSparseLoad: return split_load(r);
    default: throw InvalidArgument(detail::concat("server cannot serve op ", op_name(h.op)));
  }
}

std::vector<int> SparseRouter::split_create(SparseRequest& r) {
  const uint64_t key = r.header.key;
  r.create = decode_sparse_create(r.header, r.payload.data(), r.payload.size());
  check_cap_share(r.create.config, r.create.spread);
  auto it = dim_.find(key);
  FASTPS_CHECK_TYPED(CapacityError, it != dim_.end() || dim_.size() < kMaxSparseTables, "server ", server_id_,
                     " holds ", dim_.size(),
                     " sparse tables, the most one server may hold; use fewer embedding tables "
                     "(docs/protocol.md, Limits)");
  if (it == dim_.end() || r.create.replace) dim_[key] = r.create.config.dim;
  return all_shards();
}

std::vector<int> SparseRouter::split_load(SparseRequest& r) {
  const uint64_t key = r.header.key;
  r.load = decode_sparse_load(r.header, r.payload.data(), r.payload.size());
  const SparseTableConfig& c = r.load.config;
  check_cap_share(c, r.load.spread);
  // Checked here, not only by the shards: a load the shards refuse must
  // not change the dim this server accepts for the table's pulls and pushes.
  const int64_t table_dim = dim_of(key);
  FASTPS_CHECK(c.dim == table_dim, "SPARSE_LOAD of rows of dim ", c.dim, " into sparse table ", key, " of dim ",
               table_dim, " on server ", server_id_, "; load the file into a table of its dim");
  r.index = route(r.load.records, size_t(r.load.record_bytes), r.load.rows, shards_);  // a record starts with its id
  r.pending_index = route(r.load.pending, 16, r.load.pending_ids, shards_);           // (id, count) pairs
  // Every shard checks nothing it cannot undo: the caps are checked here,
  // before any shard replaces its rows.
  const int64_t server_cap = sparse_server_rows(c, r.load.spread);
  const std::string where = detail::concat(" on server ", server_id_);
  for (int s = 0; s < shards_; ++s)
    sparse_check_file_rows(c, int64_t(r.index[size_t(s)].size()), sparse_cap_share(server_cap, s, shards_), where);
  return all_shards();
}

// ------------------------------------------------------------ SparseService

void SparseService::run(const SparseRequestPtr& r, int shard) {
  try {
    switch (r->header.op) {
      case Op::kSparseCreate: create(*r, shard); break;
      case Op::kSparsePull: return pull(r, shard);    // may wait: finishes itself
      case Op::kSparsePush: return push(r, shard);    // likewise
      case Op::kSparseStats: return run_or_wait(table(r->header.key), r, shard, r->stats_step);  // likewise
      case Op::kSparseExport: table(r->header.key).table->append_section(r->bytes); break;
      case Op::kSparseLoad: load(*r, shard); break;
      default: FASTPS_ASSERT(false);
    }
    piece_done(r);
  } catch (const CapacityError& e) {
    piece_failed(r, Status::kLimit, e.what());
  } catch (const Error& e) {
    piece_failed(r, Status::kInvalidArgument, e.what());
  } catch (const std::exception& e) {  // bad_alloc and the like: the requester still gets an answer
    piece_failed(r, Status::kInternal, out_.internal_error_text(e));
  }
}

void SparseService::drop_connection(ConnId conn) {
  for (auto& kv : tables_) take_waiting(kv.second.waiting, [&](const SparseWait& w) { return w.req->conn == conn; });
}

size_t SparseService::fail_unreachable() {
  size_t failed = 0;
  for (auto& kv : tables_) failed += fail_unreachable(kv.second);
  return failed;
}

void SparseService::piece_failed(const SparseRequestPtr& r, Status status, const std::string& msg) {
  {
    std::lock_guard<std::mutex> lock(r->error_mu);
    if (r->status == Status::kOk) {
      r->status = status;
      r->error = msg;
    }
  }
  piece_done(r);
}

// The last piece of a request sends its reply.
void SparseService::piece_done(const SparseRequestPtr& r) {
  if (r->remaining.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  if (r->status != Status::kOk) {
    out_.error(r->conn, r->header.request_id, r->header.key, r->status, r->error);
    return;
  }
  switch (r->header.op) {
    case Op::kSparsePull:
      out_.reply(r->conn, r->header, Op::kReply, r->rows.data(), r->rows.size() * 4, uint32_t(r->pull.ids.n));
      return;
    case Op::kSparseExport:
      out_.reply(r->conn, r->header, Op::kReply, r->bytes.data(), r->bytes.size(), uint32_t(r->num_shards));
      return;
    case Op::kSparseStats: return reply_stats(*r);
    default: out_.reply(r->conn, r->header, Op::kReply, nullptr, 0, 0);
  }
}

// The shards' stats summed, and the largest step (docs/protocol.md, SPARSE_STATS).
void SparseService::reply_stats(const SparseRequest& r) {
  SparseStatsSum sum;
  for (size_t s = 0; s < r.stats.size(); ++s) sum.add(r.stats[s], r.steps[s]);
  uint8_t out[8 * kSparseStatsCount];
  encode_sparse_stats_reply(sum, out);
  out_.reply(r.conn, r.header, Op::kReply, out, sizeof(out), kSparseStatsCount);
}

SparseSlice& SparseService::table(uint64_t key) {
  auto it = tables_.find(key);
  FASTPS_CHECK(it != tables_.end(), "server ", out_.server_id(), " has no sparse table ", key,
               "; create it first (SPARSE_CREATE)");
  return it->second;
}

// park() for a sparse request, whose pieces may wait on several shards: the
// first that waits counts the whole request (its payload), once; the others
// share that decision.
void SparseService::park(SparseRequest& r, bool capped) {
  std::call_once(r.park_once, [&] {
    const int64_t bytes = int64_t(r.payload.size());
    const std::string why = r.budget->take(bytes, capped);
    if (why.empty()) {
      r.parked = Parked(r.budget, bytes);
    } else {
      r.park_refused = detail::concat("server ", out_.server_id(), ": ", why);
    }
  });
  FASTPS_CHECK_TYPED(CapacityError, r.park_refused.empty(), r.park_refused);
}

void SparseService::create(SparseRequest& r, int shard) {
  const SparseCreateRequest& c = r.create;
  auto it = tables_.find(r.header.key);
  if (it == tables_.end()) {
    SparseSlice t;
    t.table = make_shard_table(c.config, c.spread, shard, r.num_shards);
    t.config = c.config;
    t.spread = c.spread;
    t.clock.assign(cons_.num_workers(), 0);
    tables_.emplace(r.header.key, std::move(t));
    return;
  }
  SparseSlice& t = it->second;
  if (same_sparse_config(t.config, c.config) && t.spread == c.spread) return;  // every worker creates every table
  FASTPS_CHECK(c.replace, "sparse table ", r.header.key, " exists on server ", out_.server_id(),
               " with another spec (", describe_sparse_config(t.config), ") than this worker's (",
               describe_sparse_config(c.config),
               "); every worker must build its embeddings with the same arguments, in the same order");
  for (SparseWait& w : t.waiting)
    piece_failed(w.req, Status::kInvalidArgument,
                 detail::concat("sparse table ", r.header.key, " was replaced while this request waited"));
  t.waiting.clear();
  trim_waiting(t.waiting);
  t.table = make_shard_table(c.config, c.spread, shard, r.num_shards);
  t.config = c.config;
  t.spread = c.spread;
  t.step = 0;
  reset_round(t);
}

// Runs the piece's work once the table is ready for it, or parks it.
void SparseService::run_or_wait(SparseSlice& t, const SparseRequestPtr& r, int shard, uint32_t need) {
  if (cons_.ready(progress(t), need)) {
    fill(t, *r, shard);
    piece_done(r);
    return;
  }
  park(*r, true);  // throws CapacityError: refused, nothing waits
  t.waiting.push_back(SparseWait{r, need, shard, false});
  fail_unreachable(t);
}

// A pull's rows or a stats request's numbers, from this shard.
void SparseService::fill(SparseSlice& t, SparseRequest& r, int shard) {
  if (r.header.op == Op::kSparsePull) {
    // A pull's ids start the payload, whose buffer is heap-allocated (aligned).
    const std::vector<int64_t>& idx = r.index[shard];
    // The reply's rows are made now, by the first piece to fill them, not
    // when the request arrived or waited (Note [Parked requests]).
    std::call_once(r.rows_once, [&] { r.rows.resize(size_t(r.pull.ids.n) * size_t(r.dim)); });
    t.table->pull(reinterpret_cast<const int64_t*>(r.pull.ids.data), idx.data(), int64_t(idx.size()),
                  r.rows.data(), t.step);
  } else {  // stats
    r.stats[shard] = t.table->stats();
    r.steps[shard] = t.step;
  }
}

void SparseService::pull(const SparseRequestPtr& r, int shard) {
  SparseSlice& t = table(r->header.key);
  FASTPS_CHECK(t.config.dim == r->dim, "SPARSE_PULL for dim ", r->dim, " from a table of dim ", t.config.dim);
  run_or_wait(t, r, shard, r->pull.step);
}

// Adds this shard's rows of push `r` into the round sum (duplicates sum too).
void SparseService::accumulate(SparseSlice& t, const SparseRequest& r, int shard) {
  const int64_t dim = t.config.dim;
  for (int64_t k : r.index[shard]) {
    const int64_t id = r.push.ids[k];
    const uint8_t* g = r.push.grads + size_t(k) * size_t(dim) * 4;
    auto ins = t.slot.emplace(id, int64_t(t.round_ids.size()));
    if (ins.second) {
      t.round_ids.push_back(id);
      const size_t at = t.accum.size();
      t.accum.resize(at + size_t(dim));
      std::memcpy(t.accum.data() + at, g, size_t(dim) * 4);
    } else {
      float* a = t.accum.data() + size_t(ins.first->second) * size_t(dim);
      for (int64_t d = 0; d < dim; ++d) {
        float x;
        std::memcpy(&x, g + 4 * d, 4);
        a[d] += x;
      }
    }
  }
}

// Mean over the W workers, then one fused update per id. Returns the error
// text ("" if none); the table is unchanged on a CapacityError.
std::string SparseService::apply_round(SparseSlice& t, int64_t step) {
  std::string err;
  if (!t.round_ids.empty()) {
    const float w = float(cons_.num_workers());
    for (float& x : t.accum) x /= w;
    try {
      t.table->push(t.round_ids.data(), nullptr, int64_t(t.round_ids.size()), t.accum.data(), t.optim, step);
    } catch (const Error& e) {
      err = e.what();
    }
  }
  reset_round(t);
  return err;
}

void SparseService::push(const SparseRequestPtr& r, int shard) {
  SparseSlice& t = table(r->header.key);
  const int worker = r->worker;
  cons_.check_worker(worker, "SPARSE_PUSH");
  FASTPS_CHECK(r->push.ids.n == 0 || r->dim == t.config.dim, "SPARSE_PUSH of rows of dim ", r->dim,
               " to a table of dim ", t.config.dim);
  const int64_t step = r->push.step;
  sparse_check_push(t.config, r->push.optim, step, "sparse table", int64_t(r->header.key));
  if (cons_.bsp()) return push_round(t, r, shard);
  // SSP / ASP: apply at once.
  t.clock[worker] += 1;
  t.optim = r->push.optim;
  accumulate(t, *r, shard);
  const std::string err = apply_round(t, step);
  t.step = std::max(t.step, step);
  if (err.empty()) {
    piece_done(r);
  } else {
    piece_failed(r, Status::kLimit, err);
  }
  serve_waiting(t);
}

// BSP: the push joins the round of its step, answered once the round is applied.
void SparseService::push_round(SparseSlice& t, const SparseRequestPtr& r, int shard) {
  const int worker = r->worker;
  const int64_t step = r->push.step;
  FASTPS_CHECK(step == t.step + 1, "worker rank ", worker, " pushed step ", step, " to sparse table ",
               r->header.key, ", whose next step is ", t.step + 1,
               " (under BSP every worker steps every embedding once per optimizer step)");
  if (t.round.count() == 0) t.round.start(cons_.num_workers());
  FASTPS_CHECK(!t.round.has(worker), "worker rank ", worker, " pushed sparse table ", r->header.key,
               " twice in step ", step);
  park(*r, false);  // counted, never refused (Note [Parked requests])
  t.round.join(worker);
  t.optim = r->push.optim;
  accumulate(t, *r, shard);
  t.waiting.push_back(SparseWait{r, uint32_t(step), shard, true});
  if (t.round.count() < cons_.num_workers()) {
    fail_unreachable(t);
    return;
  }
  const std::string err = apply_round(t, step);
  t.step = step;  // a failed round still counts, so every worker stays in step
  if (!err.empty()) {
    for (SparseWait& w : take_waiting(t.waiting, [](const SparseWait& w) { return w.is_push; }))
      piece_failed(w.req, Status::kLimit, err + " (this step's rows were not applied on this shard)");
  }
  serve_waiting(t);
}

void SparseService::serve_waiting(SparseSlice& t) {
  const Progress p = progress(t);
  for (const SparseWait& w : take_waiting(t.waiting, [&](const SparseWait& w) { return cons_.ready(p, w.need); })) {
    if (!w.is_push) fill(t, *w.req, w.shard);
    piece_done(w.req);
  }
}

// See DenseService::fail_unreachable(): the same rule for a sparse table's waiters.
size_t SparseService::fail_unreachable(SparseSlice& t) {
  if (!cons_.any_dead() || t.waiting.empty()) return 0;
  const Progress p = progress(t);
  const auto failed = take_waiting(t.waiting, [&](const SparseWait& w) { return cons_.unreachable(p, w.need); });
  for (const SparseWait& w : failed)
    piece_failed(w.req, Status::kTimeout,
                 detail::concat(cons_.dead_text(), "; this step of sparse table ", w.req->header.key,
                                " can never complete"));
  return failed.size();
}

void SparseService::load(SparseRequest& r, int shard) {
  SparseSlice& t = table(r.header.key);
  const SparseLoadRequest& l = r.load;
  FASTPS_CHECK(l.config.dim == t.config.dim, "SPARSE_LOAD of rows of dim ", l.config.dim, " into a table of dim ",
               t.config.dim);
  std::unique_ptr<SparseTable> fresh = make_shard_table(l.config, l.spread, shard, r.num_shards);
  std::vector<float> values(size_t(l.record_bytes - int64_t(sizeof(RowHeader))) / 4);
  for (int64_t k : r.index[shard]) {
    const uint8_t* rec = l.records + size_t(k) * size_t(l.record_bytes);
    RowHeader h;
    std::memcpy(&h, rec, sizeof(h));
    std::memcpy(values.data(), rec + sizeof(h), values.size() * 4);
    fresh->load_row(h, values.data());
  }
  for (int64_t k : r.pending_index[shard]) {
    int64_t id;
    uint64_t count;
    std::memcpy(&id, l.pending + 16 * size_t(k), 8);
    std::memcpy(&count, l.pending + 16 * size_t(k) + 8, 8);
    fresh->load_pending(id, count);
  }
  // The round being accumulated stays: a worker that loaded first may
  // already have pushed the next step (See docs/protocol.md SPARSE_LOAD).
  t.table = std::move(fresh);
  t.config = l.config;
  t.spread = l.spread;
  t.step = l.step;
  serve_waiting(t);
}

}  // namespace fastps
