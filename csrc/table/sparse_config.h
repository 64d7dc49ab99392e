// A sparse table's settings, statistics and row header, shared by the table,
// its file format, the wire codecs and the clients.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "table/sparse_optim.h"

namespace fastps {

enum class SparseInit : uint8_t { kZeros = 0, kUniform = 1, kNormal = 2 };
enum class Eviction : uint8_t { kNone = 0, kLru = 1, kLfu = 2, kTtl = 3 };

const char* sparse_init_name(SparseInit init);
const char* eviction_name(Eviction e);

// Whole-table settings; the sharded front end gives each shard its share of
// max_rows and max_pending.
struct SparseTableConfig {
  int64_t dim = 0;
  SparseRule rule = SparseRule::kSGD;  // fixes the optimizer state layout
  SparseInit init = SparseInit::kUniform;
  double init_a = -0.05;  // uniform: low;  normal: mean
  double init_b = 0.05;   // uniform: high; normal: std
  uint64_t seed = 0;
  int64_t max_rows = 0;   // 0: no cap
  Eviction eviction = Eviction::kNone;
  int64_t ttl_steps = 0;  // kTtl: idle steps before a row expires (>= 1); kLfu: half-life of access counts (0: none)
  int64_t admit_threshold = 0;  // 0 or 1: admit on the first push
  int64_t max_pending = int64_t{1} << 20;
  int eviction_samples = 16;
};

// Throws InvalidArgument for an unusable config.
void sparse_config_validate(const SparseTableConfig& c);

// The initial value of every element of row `id` (dim floats into out).
// uniform(a, b): a + (b - a) * u; normal(mean, std): Box-Muller from two
// uniforms; u = (h >> 11) * 2^-53 with h = splitmix64 of (seed, id, element).
void sparse_init_values(const SparseTableConfig& c, int64_t id, float* out);

struct SparseTableStats {
  int64_t rows = 0;          // live rows (under kTtl: including expired ones not yet swept)
  int64_t admitted = 0;      // rows created
  int64_t evicted = 0;       // rows removed to make room
  int64_t expired = 0;       // rows removed by the TTL
  int64_t rejected = 0;      // gradients dropped by admission
  int64_t pending = 0;       // ids counting towards admission
  int64_t memory_bytes = 0;  // touched row pages + index + admission counts

  // Adds another shard's counters (a table's totals over its shards).
  SparseTableStats& operator+=(const SparseTableStats& o) {
    rows += o.rows;
    admitted += o.admitted;
    evicted += o.evicted;
    expired += o.expired;
    rejected += o.rejected;
    pending += o.pending;
    memory_bytes += o.memory_bytes;
    return *this;
  }
};

// A table's totals over its parts (shards, servers): the counters summed, the
// step the largest (docs/protocol.md, SPARSE_STATS).
struct SparseStatsSum {
  SparseTableStats stats;
  int64_t step = 0;
  void add(const SparseTableStats& s, int64_t part_step) {
    stats += s;
    step = std::max(step, part_step);
  }
};

// Row metadata; also the first 32 bytes of a row record in a file.
struct RowHeader {
  int64_t id;
  int64_t last_step;      // table step of the last access (TTL)
  uint64_t touch;         // shard-local access clock (LRU)
  uint32_t access_count;  // accesses, saturating (LFU)
  uint32_t step_count;    // optimizer steps applied, saturating (kRowAdam)
};
static_assert(sizeof(RowHeader) == 32, "RowHeader is part of the file format");

// A table split into `parts` (servers, then each server's shards) gives part
// `part` an even share of max_rows (0: no cap), the first parts one row more,
// and of max_pending (at least 1).
inline int64_t sparse_cap_share(int64_t max_rows, int part, int parts) {
  return max_rows == 0 ? 0 : max_rows / parts + (part < max_rows % parts ? 1 : 0);
}
inline int64_t sparse_pending_share(int64_t max_pending, int parts) {
  return std::max<int64_t>(1, max_pending / parts);
}

// Where a server stands among the servers a table's ids are spread over (the
// embedded table: server 0 of 1). A table's config keeps its caps as the user
// set them (so that every message names those); each server takes its share
// of the caps, then splits that over its shards (sparse_shard_table()).
struct SparseSpread {
  int server = 0;   // this server's place in the job's server order
  int servers = 1;  // how many servers hold the table
};
inline bool operator==(const SparseSpread& a, const SparseSpread& b) {
  return a.server == b.server && a.servers == b.servers;
}
// A server's share of the table's max_rows (0: no cap).
inline int64_t sparse_server_rows(const SparseTableConfig& c, const SparseSpread& s) {
  return sparse_cap_share(c.max_rows, s.server, s.servers);
}

// Throws InvalidArgument unless `parts` parts (named `parts_name`: "shards",
// "parameter servers") can split c.max_rows, or with `server` set that
// server's share of it, with at least one row each (0: no cap), so that no
// part is left without a cap: "fastps: max_rows=3 over 2 server(s) gives
// server 1 a share of 1 row(s), below its number of shards (2); raise
// max_rows (0: no cap) or use fewer shards" (without `server`: "... gives
// the table a share of ..."). The one check of the embedded table, PsClient
// and the network server.
void sparse_check_cap_split(const SparseTableConfig& c, int parts, const char* parts_name,
                            const SparseSpread* server = nullptr);

// Throws InvalidArgument unless a push with rule `o` at table step `step` can
// go to the table configured by `c`, named `table` ("this table") or, with a
// `key` >= 0, `table` and the key ("sparse table 3"): the rule must be the
// table's (it fixes the optimizer state layout) and steps start at 1. The one
// check of the embedded table, its shards and the network server.
void sparse_check_push(const SparseTableConfig& c, const SparseOptim& o, int64_t step, const char* table,
                       int64_t key = -1);

// Throws CapacityError unless `rows` rows of a table file fit a part whose
// share of c.max_rows is `cap` (0: no cap); `where` ("", " on server 1") ends
// the message's cap. Used by SparseTable::load_row and the network server's
// SPARSE_LOAD check (before any shard replaces its rows).
void sparse_check_file_rows(const SparseTableConfig& c, int64_t rows, int64_t cap, const std::string& where);

}  // namespace fastps
