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

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/hash.h"
#include "common/mapped_buffer.h"
#include "common/sha256.h"
#include "table/sparse_optim.h"

namespace fastps {

// A push needs a row but the table is at max_rows and eviction is off.
class CapacityError : public Error {
 public:
  using Error::Error;
};

// A table file is corrupt, truncated or not a table file, or could not be
// read or written (the message names the file and the OS error).
class CheckpointError : public Error {
 public:
  using Error::Error;
};

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

// Row metadata; also the first 32 bytes of a row record in a file.
struct RowHeader {
  int64_t id;
  int64_t last_step;      // table step of the last access (TTL)
  uint64_t touch;         // shard-local access clock (LRU)
  uint32_t access_count;  // accesses, saturating (LFU)
  uint32_t step_count;    // optimizer steps applied, saturating (kRowAdam)
};
static_assert(sizeof(RowHeader) == 32, "RowHeader is part of the file format");

// Open-addressing map from any int64 to a nonzero uint64. See the design note.
class IdMap {
 public:
  explicit IdMap(int64_t min_capacity = 16);

  int64_t size() const { return size_; }
  int64_t capacity() const { return static_cast<int64_t>(mask_ + 1); }
  int64_t memory_bytes() const { return capacity() * static_cast<int64_t>(sizeof(Slot)); }

  // Slot holding `id`, or -1.
  int64_t find(int64_t id) const {
    uint64_t i = home(id);
    while (true) {
      const Slot& s = slots()[i];
      if (s.value == 0) return -1;
      if (s.id == id) return static_cast<int64_t>(i);
      i = (i + 1) & mask_;
    }
  }
  // Asks the cache for the slot where a lookup of `id` starts (a hint).
  void prefetch(int64_t id) const { __builtin_prefetch(&slots()[home(id)]); }
  int64_t slot_id(int64_t slot) const { return slots()[slot].id; }
  uint64_t slot_value(int64_t slot) const { return slots()[slot].value; }
  void set_slot_value(int64_t slot, uint64_t value) { slots()[slot].value = value; }

  // `id` must be absent and `value` nonzero. May grow (invalidates slots).
  void insert(int64_t id, uint64_t value);
  // Backward-shift deletion (invalidates slots after `slot` in its run).
  void erase_slot(int64_t slot);
  // The first occupied slot at or after `start` (mod capacity); -1 if empty.
  int64_t occupied_from(uint64_t start) const;

  template <typename F>
  void for_each(F&& f) const {
    for (int64_t i = 0; i < capacity(); ++i)
      if (slots()[i].value != 0) f(slots()[i].id, slots()[i].value);
  }

 private:
  struct Slot {
    int64_t id;
    uint64_t value;  // 0: empty
  };
  Slot* slots() const { return reinterpret_cast<Slot*>(buf_.data()); }
  uint64_t home(int64_t id) const { return mix64(static_cast<uint64_t>(id) ^ kSalt) & mask_; }
  void grow();

  static constexpr uint64_t kSalt = 0x2545F4914F6CDD1DULL;
  MappedBuffer buf_;  // capacity() zero-initialised (= empty) slots; Note [Mapped table memory]
  uint64_t mask_ = 0;
  int64_t size_ = 0;
};

// Fixed-size rows in one growing mapping (Note [Mapped table memory]), with a
// free list. Row r is at data + r * row_bytes; the mapping is page-aligned.
class RowPool {
 public:
  // `max_rows` > 0: the pool never needs more rows than that.
  RowPool(int64_t row_bytes, int64_t max_rows);

  // Room for `n` more allocate() calls without growing, so row pointers taken
  // now stay valid over them. Growing may move every row.
  void reserve(int64_t n);
  int64_t allocate();
  void release(int64_t row) { free_.push_back(row); }
  unsigned char* row(int64_t r) const { return buf_.data() + r * row_bytes_; }
  // Bytes of rows handed out so far, in whole pages (what the table has
  // touched; the rest of the mapping is address space only).
  int64_t memory_bytes() const;

 private:
  void populate_ahead(int64_t fresh);

  int64_t row_bytes_;
  int64_t max_rows_;
  int64_t capacity_ = 0;    // rows the mapping holds
  int64_t high_water_ = 0;  // rows ever handed out
  size_t populated_ = 0;    // bytes asked to be populated (Note [Populating ahead])
  MappedBuffer buf_;
  std::vector<int64_t> free_;
};

class SparseFileWriter;

// A table split into `parts` (servers, then each server's shards) gives part
// `part` an even share of max_rows (0: no cap), the first parts one row more,
// and of max_pending (at least 1).
inline int64_t sparse_cap_share(int64_t max_rows, int part, int parts) {
  return max_rows == 0 ? 0 : max_rows / parts + (part < max_rows % parts ? 1 : 0);
}
inline int64_t sparse_pending_share(int64_t max_pending, int parts) {
  return std::max<int64_t>(1, max_pending / parts);
}

class SparseTable;
// Shard `shard` of `shards` of a table configured by `c`: its shares of the
// caps, its own sampling stream.
SparseTable sparse_shard_table(const SparseTableConfig& c, int shard, int shards);

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

// Buffered file writer for table files: hashes every byte (SHA-256) and
// commits atomically (temp file, fsync, rename, fsync of the directory).
// Dropped without commit(), it removes the temp file. One thread at a time.
class SparseFileWriter {
 public:
  explicit SparseFileWriter(const std::string& path);
  ~SparseFileWriter();
  SparseFileWriter(const SparseFileWriter&) = delete;
  SparseFileWriter& operator=(const SparseFileWriter&) = delete;

  void write(const void* data, size_t n);
  template <typename T>
  void put(const T& v) { write(&v, sizeof(T)); }
  // Appends the end marker and the digest, then makes the file durable under
  // its final name.
  void commit();

 private:
  void flush();
  std::string path_;
  std::string tmp_;
  int fd_ = -1;
  Sha256 sha_;
  std::vector<unsigned char> buf_;
  bool committed_ = false;
};

// Reader of table files: read() throws CheckpointError past the data; finish()
// checks the end marker, the digest and that nothing follows.
class SparseFileReader {
 public:
  explicit SparseFileReader(const std::string& path);
  ~SparseFileReader();
  SparseFileReader(const SparseFileReader&) = delete;
  SparseFileReader& operator=(const SparseFileReader&) = delete;

  void read(void* data, size_t n);
  template <typename T>
  T get() {
    T v;
    read(&v, sizeof(T));
    return v;
  }
  // Data bytes left before the end marker.
  uint64_t remaining() const { return data_end_ - pos_; }
  void finish();
  // Hashes the rest and returns whether the digest matches (no exception):
  // used to tell a corrupt file from a mismatched one.
  bool digest_ok();

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
  Sha256 sha_;
  uint64_t pos_ = 0;
  uint64_t data_end_ = 0;  // file size minus end marker and digest
};

// The file header (see docs/sparse.md "File format").
struct SparseFileHeader {
  SparseTableConfig config;
  int64_t state_floats = 0;
  int64_t step = 0;
  int64_t record_bytes = 0;
  uint32_t num_sections = 0;
};
void write_sparse_header(SparseFileWriter& w, const SparseTableConfig& c, int64_t step,
                         uint32_t num_sections);
SparseFileHeader read_sparse_header(SparseFileReader& r);

// Reads the sections that follow the header: on_row(const uint8_t* record)
// for each row record (h.record_bytes bytes, RowHeader first) and
// on_pending(int64_t id, uint64_t count) for each admission count. Throws
// CheckpointError when a section claims more than the file holds. The caller
// calls r.finish() (checksum) before it lets anything loaded take effect.
template <typename OnRow, typename OnPending>
void read_sparse_sections(SparseFileReader& r, const SparseFileHeader& h, const std::string& path,
                          OnRow&& on_row, OnPending&& on_pending) {
  const uint64_t record = static_cast<uint64_t>(h.record_bytes);
  std::vector<uint8_t> rec(static_cast<size_t>(record));
  for (uint32_t sec = 0; sec < h.num_sections; ++sec) {
    const uint64_t rows = r.get<uint64_t>();
    const uint64_t pending = r.get<uint64_t>();
    FASTPS_CHECK_TYPED(CheckpointError, rows <= r.remaining() / record && pending <= r.remaining() / 16,
                       "fastps: ", path, " is truncated or corrupt (section ", sec, " claims ", rows,
                       " rows and ", pending, " pending ids)");
    for (uint64_t k = 0; k < rows; ++k) {
      r.read(rec.data(), rec.size());
      on_row(static_cast<const uint8_t*>(rec.data()));
    }
    for (uint64_t k = 0; k < pending; ++k) {
      const int64_t id = r.get<int64_t>();
      on_pending(id, r.get<uint64_t>());
    }
  }
}

}  // namespace fastps
