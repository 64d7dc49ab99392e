// SparseTable: one shard's slice of a sparse embedding table (int64 id ->
// float row of `dim` values plus optimizer state).
//
// Design note
// -----------
// * Ownership. One SparseTable per shard, touched only by that shard's thread
//   (see Note [Shard ownership] in server/shard.h). Nothing here locks or uses
//   atomics; the sharded front end (client/sparse_client.h) reaches a table
//   only through Tasks.
//
// * Ids. Any int64 is a valid id, INT64_MIN and INT64_MAX included, so no key
//   value can mark an empty slot. The index (IdMap) is an open-addressing
//   array of {id, value} slots where value == 0 means empty and the row index
//   is stored as row + 1. Probing is linear from mix64(id ^ salt) & mask (the
//   salt keeps the in-shard position independent of the shard choice, which
//   uses mix64(id) % num_shards). Deletion is backward-shift (Knuth 6.4,
//   Algorithm R): later members of the probe run are moved back into the hole,
//   so there are no tombstones and lookups never degrade. The array doubles
//   when it would pass 70% load.
//
// * Rows live in a row pool: one mapping of rows, each `row_bytes` long,
//   laid out as
//       [RowHeader (32 B) | embedding: dim floats | optimizer state | pad to 16 B]
//   Row r is at byte offset r * row_bytes; every index and offset is 64-bit.
//   The mapping doubles when full (mremap: page tables move, bytes do not;
//   Note [Mapped table memory] in common/mapped_buffer.h), so a push reserves
//   the rows it may create before it takes row pointers. Freed rows go on a
//   free list and are reused before the pool grows; memory is never returned
//   (it is reported, and capped through max_rows).
//
// * Lookahead. Once a table outgrows the caches every lookup is a cache miss
//   on its index slot and another on its row. Pull and push therefore look
//   ids up in a first pass that prefetches the slots of the ids kSlotAhead
//   positions ahead, then visit the rows prefetching kRowAhead rows ahead;
//   the optimizer prefetches the next rows it updates. Only under eviction
//   (where creating a row may free one found earlier) does push look each id
//   up in the same pass that uses it.
//
// * Rows are created on push, never on pull. An id without a row reads as its
//   initial value, a pure function of (seed, id, element index) (see
//   sparse_init_values), so results do not depend on arrival order, on which
//   shard holds the id, or on the number of shards.
//
// * Admission (admit_threshold k > 1): an id gets a row on its k-th push; the
//   earlier pushes only count (their gradients are dropped, counted as
//   `rejected`). Counts of not-yet-admitted ids live in a second IdMap bounded
//   by max_pending entries; when it is full, the entry with the lowest count
//   among 16 sampled ones is dropped (that id starts counting again).
//
// * Eviction. max_rows caps the rows of this shard (0 = no cap). With policy
//   kNone a push that would pass the cap throws CapacityError before it
//   changes anything. Otherwise a new row replaces a victim chosen among
//   `eviction_samples` sampled rows (Redis-style approximate LRU/LFU): kLru
//   takes the least recently accessed, kLfu the least often accessed (ties:
//   least recent; with ttl_steps > 0 a count halves for every ttl_steps steps
//   without an access, computed lazily as Redis does, so rows hot long ago
//   age out), kTtl the least recently accessed as well. Rows already
//   touched by the current push are avoided; if one must go, the pending
//   updates are applied first, so an update never lands on a reused row.
//   Under kTtl a row not accessed for more than ttl_steps table steps is
//   expired: a lookup that finds it frees it and treats the id as new, and
//   each push sweeps a bounded number of slots for expired rows.
//   An access is a pull or a push: it sets last_step, bumps access_count and
//   moves the row to the front of the LRU order (a shard-local clock).
//
// * Files: see docs/sparse.md "File format". The sharded front end writes one
//   section per shard with SparseFileWriter; rows are re-routed on load, so a
//   file loads into any number of shards.
#pragma once

#include <cstdint>
#include <vector>

#include "common/error.h"
#include "table/id_map.h"
#include "table/row_pool.h"
#include "table/sparse_config.h"
#include "table/sparse_optim.h"

namespace fastps {

class SparseFileWriter;

class SparseTable;
// Shard `shard` of `shards` of server `spread`'s part of a table configured by
// `c` (the embedded table: server 0 of 1): its share of the server's share of
// the caps, its own sampling stream; its config (and messages) keep the
// user's values. The one rule of the embedded table and the network server.
SparseTable sparse_shard_table(const SparseTableConfig& c, int shard, int shards, const SparseSpread& spread = {});

class SparseTable {
 public:
  // `max_rows` and `max_pending` are this shard's share; `salt` decorrelates
  // shards' sampling streams.
  SparseTable(const SparseTableConfig& config, int64_t max_rows, int64_t max_pending, uint64_t salt);
  SparseTable(SparseTable&&) noexcept = default;
  SparseTable& operator=(SparseTable&&) noexcept = default;

  const SparseTableConfig& config() const { return config_; }
  int64_t dim() const { return config_.dim; }
  int64_t state_floats() const { return state_floats_; }
  int64_t row_bytes() const { return row_bytes_; }
  int64_t max_rows() const { return max_rows_; }
  int64_t size() const { return map_.size(); }
  SparseTableStats stats() const;

  // Rows of ids[index[k]] for k < n (index null: k itself) into
  // out + index[k] * dim. Never creates a row. `step` is the table step.
  void pull(const int64_t* ids, const int64_t* index, int64_t n, float* out, int64_t step);
  // The same, but each row goes to every position of its chain in `out`:
  // rows out + p * dim for p = first[i], next[p], next[next[p]], ... until -1
  // (i = index[k]). fastps.nn's forward pulls a batch's unique ids straight
  // into the output this way (Note [Worker-side embedding ops]).
  void pull_scatter(const int64_t* ids, const int64_t* index, int64_t n, const int64_t* first,
                    const int64_t* next, float* out, int64_t step);

  // How many rows a push of these ids would create (ids unique). Read-only.
  int64_t rows_needed(const int64_t* ids, const int64_t* index, int64_t n) const;
  // Throws CapacityError if eviction is off and rows_needed() would pass the cap.
  void check_capacity(const int64_t* ids, const int64_t* index, int64_t n) const;

  // One optimizer step for each id (ids unique; the caller guarantees it),
  // gradient at grads + index[k] * dim. `o.rule` must be the table's rule and
  // `step` (>= 1) the table-wide step of this push. With eviction off, throws
  // CapacityError before changing anything if the rows would not fit.
  void push(const int64_t* ids, const int64_t* index, int64_t n, const float* grads,
            const SparseOptim& o, int64_t step);

  // Persistence, shard thread (or a table no shard owns yet).
  void write_section(SparseFileWriter& w) const;
  // The same bytes as write_section(), appended to `out` (a server's
  // SPARSE_EXPORT reply; the worker writes the file).
  void append_section(std::vector<uint8_t>& out) const;
  int64_t step() const { return step_; }
  // Adds a row read from a file (header, then dim + state floats). Throws
  // CheckpointError on a duplicate id and CapacityError past max_rows.
  void load_row(const RowHeader& h, const float* values);
  void load_pending(int64_t id, uint64_t count);

 private:
  // pull() with a destination policy: sink.slot(i) is where the values of
  // ids[i] go, sink.fan_out(i, values) copies them wherever else they go.
  template <typename Sink>
  void pull_into(const int64_t* ids, const int64_t* index, int64_t n, int64_t step, Sink& sink);
  float* weight(int64_t row) const { return reinterpret_cast<float*>(pool_.row(row) + sizeof(RowHeader)); }
  float* state(int64_t row) const { return weight(row) + config_.dim; }
  RowHeader* header(int64_t row) const { return reinterpret_cast<RowHeader*>(pool_.row(row)); }
  bool expired(const RowHeader& h, int64_t step) const {
    return config_.eviction == Eviction::kTtl && h.last_step < step - config_.ttl_steps;
  }
  // Row of `id`, or -1; frees it first if the TTL expired it.
  int64_t lookup_live(int64_t id);
  // rows_[k] = row of ids[index[k]] or -1 for k < n, prefetching ahead;
  // returns how many are -1. Only without eviction: no row expires, and none
  // is freed before it is used.
  int64_t locate(const int64_t* ids, const int64_t* index, int64_t n);
  void fill_state_template(const SparseOptim& o);
  void touch(RowHeader& h);
  // The row's access count as LFU sees it now: halved for every ttl_steps
  // table steps since its last access (kLfu with ttl_steps > 0), else as stored.
  uint32_t lfu_count(const RowHeader& h) const;
  void remove_slot(int64_t slot);
  bool admit(int64_t id);
  int64_t create_row(int64_t id, const SparseOptim& o);
  void evict_one(const SparseOptim& o);
  void flush_updates(const SparseOptim& o);
  void sweep_expired(int64_t budget);
  uint64_t next_random();

  SparseTableConfig config_;
  int64_t state_floats_;
  int64_t row_bytes_;
  int64_t max_rows_;
  int64_t max_pending_;
  IdMap map_;       // id -> row + 1
  IdMap pending_;   // id -> pushes counted (admission)
  RowPool pool_;
  int64_t step_ = 0;
  uint64_t clock_ = 0;       // LRU clock
  uint64_t call_start_ = 0;  // clock_ at the start of the current push
  uint64_t rng_;
  uint64_t sweep_cursor_ = 0;
  SparseTableStats counters_;
  std::vector<SparseRowRef> refs_;  // the current push's rows
  std::vector<int64_t> rows_;       // locate()'s result
  std::vector<float> state_init_;   // a new row's optimizer state under the current push's rule
};

}  // namespace fastps
