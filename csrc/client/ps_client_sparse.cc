// PsClient's sparse-table requests (docs/protocol.md "Sparse tables",
// docs/sparse.md): ids split over the servers, one frame per server, rows
// back in the caller's order. The dense requests, the reply path and the
// connection handling are in ps_client.cc.
#include <algorithm>
#include <cstring>
#include <memory>

#include "client/ps_client.h"
#include "common/error.h"
#include "protocol/sparse_wire.h"
#include "table/table_file.h"

namespace fastps {

// The config block carries the caps as the user set them; each server takes
// its share (SparseSpread), so a CapacityError names the user's max_rows.
SparseSpread PsClient::sparse_spread(int server) const {
  const int n = num_servers();
  FASTPS_CHECK(n <= 65535, "fastps: a sparse table spans at most 65535 parameter servers, the job has ", n);
  return SparseSpread{server, n};
}

FuturePtr PsClient::sparse_create(uint64_t table, const SparseTableConfig& config, bool replace) {
  sparse_config_validate(config);
  const int servers = num_servers();
  FASTPS_CHECK(servers > 0, "PsClient is not connected");
  sparse_check_cap_split(config, servers, "parameter servers");
  std::vector<std::array<uint8_t, kSparseConfigSize>> blocks(static_cast<size_t>(servers));
  std::vector<OutFrame> frames(static_cast<size_t>(servers));
  for (int s = 0; s < servers; ++s) {
    encode_sparse_config(config, sparse_spread(s), blocks[size_t(s)].data());
    OutFrame& f = frames[size_t(s)];
    f.server = s;
    f.header.op = Op::kSparseCreate;
    f.header.key = table;
    f.header.aux = replace ? kSparseCreateReplace : 0;
    f.segs.push_back({blocks[size_t(s)].data(), kSparseConfigSize});
  }
  return submit(frames, detail::concat("SPARSE_CREATE of sparse table ", table));
}

FuturePtr PsClient::sparse_pull(uint64_t table, const int64_t* ids, int64_t n, int64_t dim, float* out,
                                uint32_t min_step) {
  FASTPS_CHECK(n >= 0 && dim >= 1, "fastps: bad sparse pull of ", n, " ids of dim ", dim);
  FASTPS_CHECK(n == 0 || (ids != nullptr && out != nullptr), "fastps: sparse pull got a null buffer");
  const int servers = num_servers();
  FASTPS_CHECK(servers > 0, "PsClient is not connected");
  const uint64_t limit = transport_->options().max_payload;
  std::vector<OutFrame> frames;
  const std::string what = detail::concat("SPARSE_PULL of sparse table ", table);
  if (servers == 1) {  // the reply is already in the caller's order: receive it in place
    if (n == 0) return submit(frames, what);
    FASTPS_CHECK(uint64_t(n) * uint64_t(dim) * 4 <= limit, "fastps: a sparse pull of ", n, " rows of dim ",
                 dim, " exceeds the message limit of ", limit, " bytes; pull fewer ids at a time");
    OutFrame f;
    f.server = 0;
    f.header.op = Op::kSparsePull;
    f.header.key = table;
    f.header.count = uint32_t(n);
    f.header.aux = min_step;
    f.segs.push_back({ids, size_t(n) * 8});
    f.target.dst = out;
    f.target.count = n * dim;
    frames.push_back(std::move(f));
    return submit(frames, what);
  }
  // Positions of each server's ids in the caller's arrays; the reply rows of
  // server s are scattered back to them (ReplyTarget::rows).
  std::vector<std::vector<int64_t>> pos =
      sparse_route<sparse_server_of>(n, servers, [ids](int64_t i) { return ids[i]; });
  std::vector<std::vector<int64_t>> sids(static_cast<size_t>(servers));
  for (int s = 0; s < servers; ++s) {
    const int64_t m = int64_t(pos[size_t(s)].size());
    if (m == 0) continue;
    sids[size_t(s)].reserve(size_t(m));
    for (int64_t i : pos[size_t(s)]) sids[size_t(s)].push_back(ids[i]);
    FASTPS_CHECK(uint64_t(m) * uint64_t(dim) * 4 <= limit, "fastps: a sparse pull of ", m, " rows of dim ",
                 dim, " from one server exceeds the message limit of ", limit,
                 " bytes; pull fewer ids at a time");
    OutFrame f;
    f.server = s;
    f.header.op = Op::kSparsePull;
    f.header.key = table;
    f.header.count = uint32_t(m);
    f.header.aux = min_step;
    f.segs.push_back({sids[size_t(s)].data(), size_t(m) * 8});
    f.target.dst = out;
    f.target.rows = std::make_shared<const std::vector<int64_t>>(std::move(pos[size_t(s)]));
    f.target.dim = dim;
    frames.push_back(std::move(f));
  }
  return submit(frames, what);  // sends before returning: sids may go
}

FuturePtr PsClient::sparse_push(uint64_t table, const int64_t* ids, int64_t n, int64_t dim,
                                const float* grads, const SparseOptim& optim, uint32_t step) {
  FASTPS_CHECK(n >= 0 && dim >= 1, "fastps: bad sparse push of ", n, " ids of dim ", dim);
  FASTPS_CHECK(n == 0 || (ids != nullptr && grads != nullptr), "fastps: sparse push got a null buffer");
  FASTPS_CHECK(step >= 1, "fastps: the table step of a push must be >= 1, got ", step);
  sparse_optim_validate(optim);
  const int servers = num_servers();
  FASTPS_CHECK(servers > 0, "PsClient is not connected");
  const uint64_t limit = transport_->options().max_payload;
  uint8_t block[kSparseOptimSize];
  encode_sparse_optim(optim, block);
  std::vector<std::vector<int64_t>> sids(static_cast<size_t>(servers));
  std::vector<std::vector<float>> sgrads(static_cast<size_t>(servers));
  if (servers > 1) {
    for (int64_t i = 0; i < n; ++i) {
      const int s = sparse_server_of(ids[i], servers);
      sids[size_t(s)].push_back(ids[i]);
      sgrads[size_t(s)].insert(sgrads[size_t(s)].end(), grads + i * dim, grads + (i + 1) * dim);
    }
  }
  std::vector<OutFrame> frames(static_cast<size_t>(servers));
  for (int s = 0; s < servers; ++s) {
    const int64_t m = servers == 1 ? n : int64_t(sids[size_t(s)].size());
    const int64_t* sid = servers == 1 ? ids : sids[size_t(s)].data();
    const float* sg = servers == 1 ? grads : sgrads[size_t(s)].data();
    FASTPS_CHECK(kSparseOptimSize + uint64_t(m) * (8 + uint64_t(dim) * 4) <= limit, "fastps: a sparse push of ",
                 m, " rows of dim ", dim, " to one server exceeds the message limit of ", limit, " bytes");
    OutFrame& f = frames[size_t(s)];
    f.server = s;
    f.header.op = Op::kSparsePush;
    f.header.key = table;
    f.header.count = uint32_t(m);
    f.header.aux = step;
    f.segs.push_back({block, sizeof(block)});
    if (m > 0) {
      f.segs.push_back({sid, size_t(m) * 8});
      f.segs.push_back({sg, size_t(m) * size_t(dim) * 4});
    }
  }
  FuturePtr future = submit(frames, detail::concat("SPARSE_PUSH of sparse table ", table, " at step ", step));
  std::lock_guard<std::mutex> lock(mu_);
  sparse_steps_[table] = step;  // sent (Note [Round clocks])
  return future;
}

SparseStatsSum PsClient::sparse_stats(uint64_t table, uint32_t min_step) {
  const int servers = num_servers();
  FASTPS_CHECK(servers > 0, "PsClient is not connected");
  std::vector<OutFrame> frames(static_cast<size_t>(servers));
  for (int s = 0; s < servers; ++s) {
    OutFrame& f = frames[size_t(s)];
    f.server = s;
    f.header.op = Op::kSparseStats;
    f.header.key = table;
    f.header.aux = min_step;
    f.target.raw = std::make_shared<RawReply>();
  }
  std::vector<std::shared_ptr<RawReply>> replies;
  for (const OutFrame& f : frames) replies.push_back(f.target.raw);
  submit(frames, detail::concat("SPARSE_STATS of sparse table ", table))->wait();
  SparseStatsSum sum;
  for (int s = 0; s < servers; ++s) {
    const std::vector<uint8_t>& b = replies[size_t(s)]->bytes;
    const SparseStatsSum part = decode_sparse_stats_reply(b.data(), b.size(), s);
    sum.add(part.stats, part.step);
  }
  return sum;
}

void PsClient::sparse_save(uint64_t table, const SparseTableConfig& config, uint32_t min_step,
                           const std::string& path) {
  const int servers = num_servers();
  // Wait until every server applied min_step, and learn the step to record.
  const int64_t step = sparse_stats(table, min_step).step;
  // sections[s][k]: shard k of server s. Shard 0 first tells each server's shard count.
  std::vector<std::vector<std::vector<uint8_t>>> sections(static_cast<size_t>(servers));
  std::vector<uint32_t> shards(static_cast<size_t>(servers), 0);
  auto fetch = [&](const std::vector<std::pair<int, uint32_t>>& which) {
    std::vector<OutFrame> frames;
    std::vector<std::shared_ptr<RawReply>> replies;
    for (auto [s, k] : which) {
      OutFrame f;
      f.server = s;
      f.header.op = Op::kSparseExport;
      f.header.key = table;
      f.header.aux = k;
      f.target.raw = std::make_shared<RawReply>();
      replies.push_back(f.target.raw);
      frames.push_back(std::move(f));
    }
    submit(frames, detail::concat("SPARSE_EXPORT of sparse table ", table))->wait();
    for (size_t i = 0; i < which.size(); ++i) {
      const auto [s, k] = which[i];
      RawReply& r = *replies[i];
      FASTPS_CHECK_TYPED(ProtocolError, r.count >= 1 && k < r.count, "fastps: parameter server ", s, " reports ",
                         r.count, " shards");
      if (k == 0) {
        shards[size_t(s)] = r.count;
        sections[size_t(s)].resize(r.count);
      }
      sections[size_t(s)][k] = std::move(r.bytes);
    }
  };
  std::vector<std::pair<int, uint32_t>> first, rest;
  for (int s = 0; s < servers; ++s) first.push_back({s, 0});
  fetch(first);
  uint32_t total = 0;
  for (int s = 0; s < servers; ++s) {
    total += shards[size_t(s)];
    for (uint32_t k = 1; k < shards[size_t(s)]; ++k) rest.push_back({s, k});
  }
  if (!rest.empty()) fetch(rest);
  SparseFileWriter w(path);
  write_sparse_header(w, config, step, total);
  for (auto& server : sections)
    for (auto& sec : server) w.write(sec.data(), sec.size());
  w.commit();
}

int64_t PsClient::sparse_load(uint64_t table, const SparseTableConfig& config, const std::string& path) {
  sparse_config_validate(config);
  const int servers = num_servers();
  FASTPS_CHECK(servers > 0, "PsClient is not connected");
  SparseFileReader reader(path);
  const SparseFileHeader h = read_sparse_header(reader);
  check_file_fits(h, config, path, detail::concat("sparse table ", table), reader);
  const size_t record = size_t(h.record_bytes);
  std::vector<std::vector<uint8_t>> rows(static_cast<size_t>(servers)), pending(static_cast<size_t>(servers));
  std::vector<uint64_t> nrows(static_cast<size_t>(servers), 0), npending(static_cast<size_t>(servers), 0);
  read_sparse_sections(
      reader, h, path,
      [&](const uint8_t* rec) {
        int64_t id;
        std::memcpy(&id, rec, 8);
        const size_t s = size_t(sparse_server_of(id, servers));
        rows[s].insert(rows[s].end(), rec, rec + record);
        ++nrows[s];
      },
      [&](int64_t id, uint64_t count) {
        const size_t s = size_t(sparse_server_of(id, servers));
        uint8_t pair[16];
        store_le64(pair, uint64_t(id));
        store_le64(pair + 8, count);
        pending[s].insert(pending[s].end(), pair, pair + 16);
        ++npending[s];
      });
  reader.finish();  // checksum verified: only now does anything reach the servers
  const uint64_t limit = transport_->options().max_payload;
  std::vector<std::vector<uint8_t>> heads(static_cast<size_t>(servers), std::vector<uint8_t>(kSparseConfigSize + 24));
  std::vector<OutFrame> frames(static_cast<size_t>(servers));
  for (int s = 0; s < servers; ++s) {
    uint8_t* hd = heads[size_t(s)].data();
    encode_sparse_config(config, sparse_spread(s), hd);
    store_le64(hd + kSparseConfigSize, uint64_t(h.step));
    store_le64(hd + kSparseConfigSize + 8, nrows[size_t(s)]);
    store_le64(hd + kSparseConfigSize + 16, npending[size_t(s)]);
    const uint64_t bytes = heads[size_t(s)].size() + rows[size_t(s)].size() + pending[size_t(s)].size();
    FASTPS_CHECK(bytes <= limit, "fastps: ", path, " holds ", bytes, " bytes for parameter server ", s,
                 ", more than the message limit of ", limit, " bytes");
    OutFrame& fr = frames[size_t(s)];
    fr.server = s;
    fr.header.op = Op::kSparseLoad;
    fr.header.key = table;
    fr.header.count = uint32_t(std::min<uint64_t>(nrows[size_t(s)], UINT32_MAX / 4));
    fr.segs.push_back({hd, heads[size_t(s)].size()});
    if (!rows[size_t(s)].empty()) fr.segs.push_back({rows[size_t(s)].data(), rows[size_t(s)].size()});
    if (!pending[size_t(s)].empty()) fr.segs.push_back({pending[size_t(s)].data(), pending[size_t(s)].size()});
  }
  submit(frames, detail::concat("SPARSE_LOAD of sparse table ", table))->wait();
  std::lock_guard<std::mutex> lock(mu_);
  sparse_steps_[table] = h.step;  // Note [Round clocks]
  return h.step;
}

}  // namespace fastps
