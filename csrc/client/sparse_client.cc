#include "client/sparse_client.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "common/completion.h"
#include "common/error.h"
#include "protocol/sparse_wire.h"
#include "server/shard_state.h"
#include "table/table_file.h"

namespace fastps {

namespace {

// Runs `fn` on table `id`'s slice in the shard's state.
struct SparseTask : Task {
  uint64_t id = 0;
  std::function<void(SparseTable&)> fn;
  void run(Shard& shard) override { fn(*shard.state().sparse.at(id).table); }
};

// Installs (or, with a null table, erases) table `id`'s slice in the shard's state.
struct InstallTask : Task {
  uint64_t id = 0;
  std::unique_ptr<SparseTable> table;
  void run(Shard& shard) override {
    if (table) {
      shard.state().sparse[id].table = std::move(table);
    } else {
      shard.state().sparse.erase(id);
    }
  }
};

}  // namespace

ShardedSparseTable::ShardedSparseTable(Server& server, const SparseTableConfig& config,
                                       std::chrono::milliseconds timeout)
    : server_(server), id_(server.new_table_id()), shards_(server.num_shards()), config_(config), timeout_(timeout) {
  sparse_config_validate(config_);
  FASTPS_CHECK(timeout.count() > 0, "fastps: timeout must be positive");
  FASTPS_CHECK(shards_ >= 1, "fastps: the server has no shards");
  sparse_check_cap_split(config_, shards_, "shards");
  std::vector<std::unique_ptr<SparseTable>> fresh;
  for (int s = 0; s < shards_; ++s) fresh.push_back(std::make_unique<SparseTable>(make_table(s)));
  try {
    install(std::move(fresh), "creating a sparse table on the embedded server");
  } catch (...) {
    drop_slices();  // the shards that took theirs (no destructor runs for this table)
    throw;
  }
}

ShardedSparseTable::~ShardedSparseTable() { drop_slices(); }

void ShardedSparseTable::drop_slices() {
  // Each shard drops its slice once it has run every task queued before;
  // nothing waits (a destructor does not throw).
  for (int s = 0; s < shards_; ++s) {
    auto task = std::make_unique<InstallTask>();
    task->id = id_;
    server_.submit(s, std::move(task));
  }
}

void ShardedSparseTable::install(std::vector<std::unique_ptr<SparseTable>> per_shard, const char* what) {
  std::vector<std::unique_ptr<Task>> tasks(per_shard.size());
  for (size_t s = 0; s < per_shard.size(); ++s) {
    auto task = std::make_unique<InstallTask>();
    task->id = id_;
    task->table = std::move(per_shard[s]);
    tasks[s] = std::move(task);
  }
  server_.run_each(std::move(tasks), Clock::now() + timeout_, what);
}

int ShardedSparseTable::shard_of(int64_t id) const { return sparse_shard_of(id, shards_); }

SparseTable ShardedSparseTable::make_table(int shard) const {
  return sparse_shard_table(config_, shard, server_.num_shards());
}

void ShardedSparseTable::run(std::vector<ShardFn> per_shard, const char* what) {
  std::vector<std::unique_ptr<Task>> tasks(per_shard.size());
  for (size_t s = 0; s < per_shard.size(); ++s) {
    if (!per_shard[s]) continue;
    auto task = std::make_unique<SparseTask>();
    task->id = id_;
    task->fn = std::move(per_shard[s]);
    tasks[s] = std::move(task);
  }
  server_.run_each(std::move(tasks), Clock::now() + timeout_, what);
}

std::shared_ptr<std::vector<std::vector<int64_t>>> ShardedSparseTable::route(const int64_t* ids,
                                                                            int64_t n) const {
  return std::make_shared<std::vector<std::vector<int64_t>>>(
      sparse_route<sparse_shard_of>(n, shards_, [ids](int64_t i) { return ids[i]; }));
}

template <typename F>
void ShardedSparseTable::each_shard(const int64_t* ids, int64_t n, const char* what, F body) {
  FASTPS_CHECK(n >= 0, "fastps: negative id count ", n);
  if (n == 0) return;
  FASTPS_CHECK(ids != nullptr, "fastps: a sparse call got a null id buffer");
  const int64_t step = step_.load(std::memory_order_acquire);
  std::vector<ShardFn> fns(static_cast<size_t>(shards_));
  if (shards_ == 1) {
    fns[0] = [=](SparseTable& t) { body(t, nullptr, n, step); };
  } else {
    auto index = route(ids, n);
    for (size_t s = 0; s < fns.size(); ++s) {
      if ((*index)[s].empty()) continue;
      fns[s] = [=](SparseTable& t) {
        const std::vector<int64_t>& idx = (*index)[s];
        body(t, idx.data(), static_cast<int64_t>(idx.size()), step);
      };
    }
  }
  run(std::move(fns), what);
}

void ShardedSparseTable::pull(const int64_t* ids, int64_t n, float* out) {
  FASTPS_CHECK(out != nullptr || n <= 0, "fastps: pull() got a null buffer");
  each_shard(ids, n, "sparse pull on the embedded server",
             [=](SparseTable& t, const int64_t* index, int64_t m, int64_t step) {
               t.pull(ids, index, m, out, step);
             });
}

void ShardedSparseTable::pull_scatter(const int64_t* ids, int64_t n, const int64_t* first, const int64_t* next,
                                      float* out) {
  FASTPS_CHECK((out != nullptr && first != nullptr && next != nullptr) || n <= 0,
               "fastps: pull_scatter() got a null buffer");
  each_shard(ids, n, "sparse pull on the embedded server",
             [=](SparseTable& t, const int64_t* index, int64_t m, int64_t step) {
               t.pull_scatter(ids, index, m, first, next, out, step);
             });
}

void ShardedSparseTable::push(const int64_t* ids, int64_t n, const float* grads, const SparseOptim& rule,
                              int64_t step) {
  FASTPS_CHECK(n >= 0, "fastps: negative id count ", n);
  sparse_optim_validate(rule);
  sparse_check_push(config_, rule, step, "this table");
  FASTPS_CHECK(n == 0 || (ids != nullptr && grads != nullptr), "fastps: push() got a null buffer");
  std::lock_guard<std::mutex> lock(write_mu_);
  if (n > 0) {
    std::shared_ptr<std::vector<std::vector<int64_t>>> index;
    if (shards_ > 1) index = route(ids, n);
    auto for_each_shard = [&](auto&& body) {
      std::vector<ShardFn> fns(static_cast<size_t>(shards_));
      for (size_t s = 0; s < fns.size(); ++s) {
        if (index && (*index)[s].empty()) continue;
        fns[s] = [=](SparseTable& t) {
          const int64_t* idx = index ? (*index)[s].data() : nullptr;
          const int64_t m = index ? static_cast<int64_t>((*index)[s].size()) : n;
          body(t, idx, m);
        };
      }
      return fns;
    };
    if (config_.eviction == Eviction::kNone && config_.max_rows > 0) {
      // Phase 1: every shard checks that its new rows fit, so that a full
      // shard rejects the whole push before any shard changes.
      run(for_each_shard([ids](SparseTable& t, const int64_t* idx, int64_t m) {
            t.check_capacity(ids, idx, m);
          }),
          "sparse capacity check on the embedded server");
    }
    run(for_each_shard([ids, grads, rule, step](SparseTable& t, const int64_t* idx, int64_t m) {
          t.push(ids, idx, m, grads, rule, step);
        }),
        "sparse push on the embedded server");
  }
  step_.store(step, std::memory_order_release);
}

int64_t ShardedSparseTable::size() {
  auto sizes = std::make_shared<std::vector<int64_t>>(size_t(shards_), 0);
  std::vector<ShardFn> fns(static_cast<size_t>(shards_));
  for (size_t s = 0; s < fns.size(); ++s)
    fns[s] = [sizes, s](SparseTable& t) { (*sizes)[s] = t.size(); };
  run(std::move(fns), "sparse size on the embedded server");
  int64_t total = 0;
  for (int64_t v : *sizes) total += v;
  return total;
}

SparseTableStats ShardedSparseTable::stats() {
  auto per = std::make_shared<std::vector<SparseTableStats>>(static_cast<size_t>(shards_));
  std::vector<ShardFn> fns(static_cast<size_t>(shards_));
  for (size_t s = 0; s < fns.size(); ++s)
    fns[s] = [per, s](SparseTable& t) { (*per)[s] = t.stats(); };
  run(std::move(fns), "sparse stats on the embedded server");
  SparseTableStats total;
  for (const SparseTableStats& p : *per) total += p;
  return total;
}

void ShardedSparseTable::set_step(int64_t step) {
  FASTPS_CHECK(step >= 0, "fastps: the table step must be >= 0, got ", step);
  step_.store(step, std::memory_order_release);
}

void ShardedSparseTable::save(const std::string& path) {
  std::lock_guard<std::mutex> lock(write_mu_);
  auto writer = std::make_shared<SparseFileWriter>(path);
  write_sparse_header(*writer, config_, step(), static_cast<uint32_t>(static_cast<size_t>(shards_)));
  // One section per shard, written by the shard's own thread, one at a time
  // (the writer is used by one thread at a time; no copy of the rows is made).
  for (size_t s = 0; s < size_t(shards_); ++s) {
    std::vector<ShardFn> fns(static_cast<size_t>(shards_));
    fns[s] = [writer](SparseTable& t) { t.write_section(*writer); };
    run(std::move(fns), "saving a sparse table");
  }
  writer->commit();
}

void ShardedSparseTable::load(const std::string& path) {
  std::lock_guard<std::mutex> lock(write_mu_);
  SparseFileReader reader(path);
  const SparseFileHeader h = read_sparse_header(reader);
  check_file_fits(h, config_, path, "this sparse table", reader);

  const size_t shards = size_t(shards_);
  std::vector<std::unique_ptr<SparseTable>> fresh;
  fresh.reserve(shards);
  for (size_t s = 0; s < shards; ++s) fresh.push_back(std::make_unique<SparseTable>(make_table(static_cast<int>(s))));
  std::vector<float> values(static_cast<size_t>(h.record_bytes - sizeof(RowHeader)) / 4);
  read_sparse_sections(
      reader, h, path,
      [&](const uint8_t* rec) {
        RowHeader rh;
        std::memcpy(&rh, rec, sizeof(rh));
        std::memcpy(values.data(), rec + sizeof(rh), values.size() * sizeof(float));
        fresh[size_t(sparse_shard_of(rh.id, shards_))]->load_row(rh, values.data());
      },
      [&](int64_t id, uint64_t count) { fresh[size_t(sparse_shard_of(id, shards_))]->load_pending(id, count); });
  reader.finish();

  // Everything checked: swap the new tables in, each on its shard's thread.
  install(std::move(fresh), "installing a loaded sparse table");
  step_.store(h.step, std::memory_order_release);
}

}  // namespace fastps
