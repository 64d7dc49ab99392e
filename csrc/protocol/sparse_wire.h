// Payload codecs of the sparse table ops (SPARSE_CREATE ... SPARSE_LOAD) and
// the id -> server routing that workers and servers share. docs/protocol.md,
// "Sparse tables", is the specification; this file is its code. Like
// protocol/message.h, everything is encoded byte by byte (little-endian).
//
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/hash.h"
#include "protocol/message.h"
#include "table/sparse_optim.h"
#include "table/sparse_table.h"

namespace fastps {

constexpr size_t kSparseConfigSize = 80;  // SPARSE_CREATE / SPARSE_LOAD
constexpr size_t kSparseOptimSize = 80;   // SPARSE_PUSH
constexpr uint32_t kSparseStatsCount = 8;  // i64 values in a SPARSE_STATS reply (the 8th: the step)
// SPARSE_LOAD: the config block, then u64 step, u64 rows, u64 pending ids.
constexpr size_t kSparseLoadHeadSize = kSparseConfigSize + 24;
// SPARSE_CREATE `aux`: replace a table of another spec (any other value: do not).
constexpr uint32_t kSparseCreateReplace = 1;

// Op codes 32-63 belong to the sparse tables.
inline bool is_sparse_op(Op op) { return uint8_t(op) >= 32 && uint8_t(op) <= 63; }

// Note [Sparse id routing]
// Id i lives on server mix64(i ^ kSparseServerSalt) % S and, inside it, on
// shard mix64(i) % shards (as in the embedded ShardedSparseTable). The salt
// makes the two choices independent: with one hash, S = 2 servers of 2 shards
// each would put all of a server's ids on one shard. Rows start from a
// seeded value of (seed, id) alone, so results never depend on S or shards.
constexpr uint64_t kSparseServerSalt = 0x5bd1e9955bd1e995ULL;
inline int sparse_server_of(int64_t id, int num_servers) {
  return static_cast<int>(mix64(static_cast<uint64_t>(id) ^ kSparseServerSalt) %
                          static_cast<uint64_t>(num_servers));
}
inline int sparse_shard_of(int64_t id, int num_shards) {
  return static_cast<int>(mix64(static_cast<uint64_t>(id)) % static_cast<uint64_t>(num_shards));
}

// Per part (server or shard, by PartOf: sparse_server_of or sparse_shard_of),
// the positions k < n, in order, of the ids id_at(k) routed to it: the split
// of the embedded table's requests, PsClient's pulls and the network
// server's requests and loads.
template <int (*PartOf)(int64_t, int), typename IdAt>
std::vector<std::vector<int64_t>> sparse_route(int64_t n, int parts, IdAt&& id_at) {
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(parts));
  for (auto& v : out) v.reserve(static_cast<size_t>(n / parts + 16));
  for (int64_t k = 0; k < n; ++k) out[static_cast<size_t>(PartOf(id_at(k), parts))].push_back(k);
  return out;
}

void encode_sparse_config(const SparseTableConfig& c, const SparseSpread& spread, uint8_t out[kSparseConfigSize]);
// Throws ProtocolError for a short block, unknown enum values or a spread
// that does not hold the server, and InvalidArgument (via
// sparse_config_validate) for an unusable config.
SparseTableConfig decode_sparse_config(const uint8_t* in, size_t len, SparseSpread* spread);
// Every field that decides the table's rows and layout; for the idempotent
// SPARSE_CREATE (see docs/protocol.md).
bool same_sparse_config(const SparseTableConfig& a, const SparseTableConfig& b);
// "dim 16, rule SPARSE_ADAM, init uniform(-0.05, 0.05), seed 0, max_rows 0, ..." for errors.
std::string describe_sparse_config(const SparseTableConfig& c);

void encode_sparse_optim(const SparseOptim& o, uint8_t out[kSparseOptimSize]);
// Throws ProtocolError for a short block or an unknown rule, InvalidArgument
// for a hyperparameter the rule cannot use.
SparseOptim decode_sparse_optim(const uint8_t* in, size_t len);

// --- Request frames, decoded ---
// Views into the payload they were decoded from, valid while it lives. A
// decoder checks what the frame alone decides (sizes, enums, its config or
// optimizer block) and throws ProtocolError or InvalidArgument; what needs
// the table (its dim, the server's shards) is the server's to check.

// n int64 ids read in place (possibly unaligned: each is copied out).
struct SparseIds {
  const uint8_t* data = nullptr;
  int64_t n = 0;
  int64_t operator[](int64_t k) const {
    int64_t v;
    std::memcpy(&v, data + 8 * k, 8);
    return v;
  }
};

struct SparseCreateRequest {
  SparseTableConfig config;
  SparseSpread spread;
  bool replace = false;  // aux == kSparseCreateReplace
};
SparseCreateRequest decode_sparse_create(const MessageHeader& h, const uint8_t* p, size_t len);

struct SparsePullRequest {
  SparseIds ids;
  uint32_t step = 0;  // aux: the table step the rows must reflect
};
SparsePullRequest decode_sparse_pull(const MessageHeader& h, const uint8_t* p, size_t len);

struct SparsePushRequest {
  SparseOptim optim;
  SparseIds ids;
  const uint8_t* grads = nullptr;  // float32 rows after the ids (possibly unaligned)
  uint64_t grad_bytes = 0;         // n x dim x 4 for a table of dim `dim`: the server checks
  int64_t step = 0;                // aux: the step of this push
};
SparsePushRequest decode_sparse_push(const MessageHeader& h, const uint8_t* p, size_t len);

// SPARSE_STATS: aux, the table step to wait for.
uint32_t decode_sparse_stats(const MessageHeader& h, size_t len);
// A SPARSE_STATS reply: rows, admitted, evicted, expired, rejected, pending,
// memory_bytes, then the step, as i64. The decoder throws ProtocolError for
// a reply of another size (`server` names the sender).
void encode_sparse_stats_reply(const SparseStatsSum& s, uint8_t out[8 * kSparseStatsCount]);
SparseStatsSum decode_sparse_stats_reply(const uint8_t* in, size_t len, int server);
// SPARSE_EXPORT: aux, the index of the shard to export.
uint32_t decode_sparse_export(const MessageHeader& h, size_t len);

struct SparseLoadRequest {
  SparseTableConfig config;
  SparseSpread spread;
  int64_t step = 0;                  // the table step after the load
  int64_t record_bytes = 0;          // a RowHeader and the row's values
  const uint8_t* records = nullptr;  // `rows` records, each starting with its id
  uint64_t rows = 0;
  const uint8_t* pending = nullptr;  // `pending_ids` (id, count) pairs of 16 bytes
  uint64_t pending_ids = 0;
};
SparseLoadRequest decode_sparse_load(const MessageHeader& h, const uint8_t* p, size_t len);

}  // namespace fastps
