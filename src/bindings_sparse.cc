// pybind11 bindings of the sparse embedding table (csrc/client/sparse_client.h):
// type conversion, GIL release and argument checks. Ids, gradients and outputs
// arrive as (address, count) after the Python side checked dtype (int64 ids,
// float32 values), device and contiguity; where the core function trusts its
// pointers, every count, and every index that addresses another buffer, is
// checked here before the pointers are used (bind::check_count, check_indices). Errors are translated by the
// translator registered in bindings.cc (CapacityError and CheckpointError
// surface as fastps.CapacityError and fastps.CheckpointError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "client/ps_client.h"
#include "client/sparse_client.h"
#include "common/error.h"
#include "server/server.h"
#include "table/embedding_ops.h"
#include "table/sparse_optim.h"
#include "table/sparse_table.h"

#include "bind_util.h"

namespace py = pybind11;
using namespace fastps;

namespace {

using bind::as_ptr;

py::dict stats_dict(const SparseTableStats& s) {
  return py::dict(py::arg("rows") = s.rows, py::arg("admitted") = s.admitted,
                  py::arg("evicted") = s.evicted, py::arg("expired") = s.expired,
                  py::arg("rejected") = s.rejected, py::arg("pending") = s.pending,
                  py::arg("memory_bytes") = s.memory_bytes);
}

SparseTableConfig make_config(int64_t dim, uint64_t seed, SparseInit init, double init_a, double init_b,
                              SparseRule rule, int64_t max_rows, Eviction eviction, int64_t ttl_steps,
                              int64_t admit_threshold, int64_t max_pending, int eviction_samples) {
  SparseTableConfig c;
  c.dim = dim;
  c.seed = seed;
  c.init = init;
  c.init_a = init_a;
  c.init_b = init_b;
  c.rule = rule;
  c.max_rows = max_rows;
  c.eviction = eviction;
  c.ttl_steps = ttl_steps;
  c.admit_threshold = admit_threshold;
  c.max_pending = max_pending;
  c.eviction_samples = eviction_samples;
  sparse_config_validate(c);
  return c;
}

}  // namespace

// The sparse calls of PsClient (the distributed mode's tables); PsClient
// itself is bound in bindings.cc.
void bind_sparse_client(py::class_<PsClient>& cls) {
  cls.def(
         "sparse_create",
         [](PsClient& c, uint64_t table, const SparseTableConfig& config, bool replace) {
           py::gil_scoped_release release;
           return c.sparse_create(table, config, replace);
         },
         py::arg("table"), py::arg("config"), py::arg("replace") = false,
         "Create sparse table `table` on every server (idempotent for the same config).")
      .def(
          "sparse_pull",
          [](PsClient& c, uint64_t table, uintptr_t ids, int64_t n, int64_t dim, uintptr_t out, int64_t out_numel,
             uint32_t min_step) {
            FASTPS_CHECK(n >= 0 && dim >= 1, "fastps: bad sparse pull of ", n, " ids of dim ", dim);
            bind::check_count("sparse pull", "out", out_numel, n * dim);
            py::gil_scoped_release release;
            return c.sparse_pull(table, as_ptr<const int64_t>(ids), n, dim, as_ptr<float>(out), min_step);
          },
          py::arg("table"), py::arg("ids"), py::arg("n"), py::arg("dim"), py::arg("out"), py::arg("out_numel"),
          py::arg("min_step"),
          "Rows of n int64 ids into out (n x dim float32, out_numel floats) once the table step is >= min_step. "
          "ids and out must stay alive until the future is done.")
      .def(
          "sparse_push",
          [](PsClient& c, uint64_t table, uintptr_t ids, int64_t n, int64_t dim, uintptr_t grads,
             int64_t grads_numel, const SparseOptim& optim, uint32_t step) {
            FASTPS_CHECK(n >= 0 && dim >= 1, "fastps: bad sparse push of ", n, " ids of dim ", dim);
            bind::check_count("sparse push", "grads", grads_numel, n * dim);
            py::gil_scoped_release release;
            return c.sparse_push(table, as_ptr<const int64_t>(ids), n, dim, as_ptr<const float>(grads), optim,
                                 step);
          },
          py::arg("table"), py::arg("ids"), py::arg("n"), py::arg("dim"), py::arg("grads"), py::arg("grads_numel"),
          py::arg("optim"), py::arg("step"),
          "This worker's gradient rows (n unique ids, n x dim float32 in grads_numel) for table step `step`.")
      .def(
          "sparse_stats",
          [](PsClient& c, uint64_t table, uint32_t min_step) {
            SparseStatsSum v;
            {
              py::gil_scoped_release release;
              v = c.sparse_stats(table, min_step);
            }
            py::dict d = stats_dict(v.stats);
            d["step"] = v.step;
            return d;
          },
          py::arg("table"), py::arg("min_step") = 0, "Counters summed over the servers, and the table step.")
      .def(
          "sparse_save",
          [](PsClient& c, uint64_t table, const SparseTableConfig& config, uint32_t min_step,
             const std::string& path) {
            py::gil_scoped_release release;
            c.sparse_save(table, config, min_step, path);
          },
          py::arg("table"), py::arg("config"), py::arg("min_step"), py::arg("path"),
          "Write the whole table (every server's rows) to the table file at `path`.")
      .def(
          "sparse_load",
          [](PsClient& c, uint64_t table, const SparseTableConfig& config, const std::string& path) {
            py::gil_scoped_release release;
            return c.sparse_load(table, config, path);
          },
          py::arg("table"), py::arg("config"), py::arg("path"),
          "Replace the table's rows on every server with the file's; returns the file's step.")
      .def("sparse_step", &PsClient::sparse_step, py::arg("table"),
           "The table's step on this worker: of its last push, or of the file it loaded (0 before).");
}

namespace {

// The sparse rules, initialisers, eviction policies and table settings.
void bind_sparse_types(py::module_& m) {
  py::enum_<SparseRule>(m, "SparseRule")
      .value("SGD", SparseRule::kSGD)
      .value("ADAGRAD", SparseRule::kAdagrad)
      .value("ROWWISE_ADAGRAD", SparseRule::kRowWiseAdagrad)
      .value("SPARSE_ADAM", SparseRule::kSparseAdam)
      .value("ROW_ADAM", SparseRule::kRowAdam)
      .value("FTRL", SparseRule::kFtrl);

  py::enum_<SparseInit>(m, "SparseInit")
      .value("ZEROS", SparseInit::kZeros)
      .value("UNIFORM", SparseInit::kUniform)
      .value("NORMAL", SparseInit::kNormal);

  py::enum_<Eviction>(m, "SparseEviction")
      .value("NONE", Eviction::kNone)
      .value("LRU", Eviction::kLru)
      .value("LFU", Eviction::kLfu)
      .value("TTL", Eviction::kTtl);

  py::class_<SparseOptim>(m, "SparseOptim")
      .def(py::init([](SparseRule rule, double lr, double eps, bool maximize, double lr_decay,
                       double initial_accumulator_value, double beta1, double beta2, double l1,
                       double l2, double ftrl_beta) {
             SparseOptim o;
             o.rule = rule;
             o.lr = lr;
             o.eps = eps;
             o.maximize = maximize;
             o.lr_decay = lr_decay;
             o.initial_accumulator_value = initial_accumulator_value;
             o.beta1 = beta1;
             o.beta2 = beta2;
             o.l1 = l1;
             o.l2 = l2;
             o.ftrl_beta = ftrl_beta;
             sparse_optim_validate(o);
             return o;
           }),
           py::arg("rule") = SparseRule::kSGD, py::kw_only(), py::arg("lr") = 0.01,
           py::arg("eps") = 1e-8, py::arg("maximize") = false, py::arg("lr_decay") = 0.0,
           py::arg("initial_accumulator_value") = 0.0, py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("l1") = 0.0, py::arg("l2") = 0.0,
           py::arg("ftrl_beta") = 0.0)
      .def_readwrite("rule", &SparseOptim::rule)
      .def_readwrite("lr", &SparseOptim::lr)
      .def_readwrite("eps", &SparseOptim::eps)
      .def_readwrite("maximize", &SparseOptim::maximize)
      .def_readwrite("lr_decay", &SparseOptim::lr_decay)
      .def_readwrite("initial_accumulator_value", &SparseOptim::initial_accumulator_value)
      .def_readwrite("beta1", &SparseOptim::beta1)
      .def_readwrite("beta2", &SparseOptim::beta2)
      .def_readwrite("l1", &SparseOptim::l1)
      .def_readwrite("l2", &SparseOptim::l2)
      .def_readwrite("ftrl_beta", &SparseOptim::ftrl_beta);

  py::class_<SparseTableConfig>(m, "SparseTableConfig")
      .def(py::init(&make_config), py::arg("dim"), py::kw_only(), py::arg("seed") = 0,
           py::arg("init") = SparseInit::kUniform, py::arg("init_a") = -0.05, py::arg("init_b") = 0.05,
           py::arg("rule") = SparseRule::kSGD, py::arg("max_rows") = 0, py::arg("eviction") = Eviction::kNone,
           py::arg("ttl_steps") = 0, py::arg("admit_threshold") = 0, py::arg("max_pending") = int64_t{1} << 20,
           py::arg("eviction_samples") = 16, "A whole sparse table's settings (validated).")
      .def_readonly("dim", &SparseTableConfig::dim)
      .def_readonly("rule", &SparseTableConfig::rule)
      .def_readonly("seed", &SparseTableConfig::seed)
      .def_readonly("max_rows", &SparseTableConfig::max_rows);
}

// fastps.nn's worker-side ops and the sparse kernels' entry points.
void bind_sparse_ops(py::module_& m) {
  // fastps.nn's worker-side ops (Note [Worker-side embedding ops]); the
  // Python side (fastps/nn/embedding.py) allocates and checks the tensors.
  m.def(
      "embedding_unique",
      [](uintptr_t ids, int64_t n, uintptr_t uids, int64_t uids_numel, uintptr_t inverse, int64_t inverse_numel,
         bool sorted) {
        FASTPS_CHECK(n >= 0, "fastps: embedding_unique of ", n, " ids");
        bind::check_count("embedding_unique", "uids", uids_numel, n);
        bind::check_count("embedding_unique", "inverse", inverse_numel, n);
        UniqueResult r;
        {
          py::gil_scoped_release release;
          r = unique_inverse(as_ptr<const int64_t>(ids), n, as_ptr<int64_t>(uids), as_ptr<int64_t>(inverse),
                             sorted);
        }
        return py::make_tuple(r.count, r.min, r.max);
      },
      py::arg("ids"), py::arg("n"), py::arg("uids"), py::arg("uids_numel"), py::arg("inverse"),
      py::arg("inverse_numel"), py::arg("sorted"),
      "Unique ids of ids[0, n) (ascending if sorted, else in order of first appearance) into uids (room "
      "for n) and each id's position there into inverse (n); returns (count, min id, max id).");
  m.def(
      "embedding_chains",
      [](uintptr_t inverse, int64_t n, int64_t n_unique, uintptr_t first, int64_t first_numel, uintptr_t next,
         int64_t next_numel) {
        FASTPS_CHECK(n >= 0 && n_unique >= 0, "fastps: embedding_chains of ", n, " ids, ", n_unique, " unique");
        bind::check_count("embedding_chains", "first", first_numel, n_unique);
        bind::check_count("embedding_chains", "next", next_numel, n);
        py::gil_scoped_release release;
        bind::check_indices("embedding_chains", "inverse", as_ptr<const int64_t>(inverse), n, 0, n_unique);
        embedding_chains(as_ptr<const int64_t>(inverse), n, n_unique, as_ptr<int64_t>(first),
                         as_ptr<int64_t>(next));
      },
      py::arg("inverse"), py::arg("n"), py::arg("n_unique"), py::arg("first"), py::arg("first_numel"),
      py::arg("next"), py::arg("next_numel"),
      "Each unique id's positions as a chain: first[u] (n_unique int64), next[i] (n int64), -1 ends.");
  m.def(
      "embedding_gather",
      [](uintptr_t rows, int64_t rows_numel, uintptr_t inverse, int64_t n, int64_t dim, uintptr_t out,
         int64_t out_numel) {
        FASTPS_CHECK(n >= 0 && dim >= 1 && rows_numel >= 0 && rows_numel % dim == 0, "fastps: embedding_gather of ",
                     n, " rows of dim ", dim, " from ", rows_numel, " floats");
        bind::check_count("embedding_gather", "out", out_numel, n * dim);
        py::gil_scoped_release release;
        bind::check_indices("embedding_gather", "inverse", as_ptr<const int64_t>(inverse), n, 0, rows_numel / dim);
        gather_rows(as_ptr<const float>(rows), as_ptr<const int64_t>(inverse), n, dim, as_ptr<float>(out));
      },
      py::arg("rows"), py::arg("rows_numel"), py::arg("inverse"), py::arg("n"), py::arg("dim"), py::arg("out"),
      py::arg("out_numel"), "out[i] = rows[inverse[i]] for i < n (float32 rows of dim).");
  m.def(
      "embedding_segment_sum",
      [](uintptr_t grads, int64_t grads_numel, uintptr_t inverse, int64_t n, int64_t dim, int64_t n_unique,
         uintptr_t out, int64_t out_numel) {
        FASTPS_CHECK(n >= 0 && dim >= 1 && n_unique >= 0, "fastps: embedding_segment_sum of ", n, " rows of dim ",
                     dim, " into ", n_unique);
        bind::check_count("embedding_segment_sum", "grads", grads_numel, n * dim);
        bind::check_count("embedding_segment_sum", "out", out_numel, n_unique * dim);
        py::gil_scoped_release release;
        bind::check_indices("embedding_segment_sum", "inverse", as_ptr<const int64_t>(inverse), n, 0, n_unique);
        segment_sum(as_ptr<const float>(grads), as_ptr<const int64_t>(inverse), n, dim, n_unique,
                    as_ptr<float>(out));
      },
      py::arg("grads"), py::arg("grads_numel"), py::arg("inverse"), py::arg("n"), py::arg("dim"),
      py::arg("n_unique"), py::arg("out"), py::arg("out_numel"),
      "out[u] = sum of grads[i] over inverse[i] == u, in order of i, from +0.0 (out: n_unique x dim).");

  m.def("sparse_optim_isa", &sparse_optim_isa, "Sparse kernel variant chosen for this CPU.");
  m.def("sparse_state_floats", &sparse_state_floats, py::arg("rule"), py::arg("dim"),
        "Optimizer state floats per row of `dim` floats under `rule`.");

  m.def(
      "sparse_optim_update",
      [](const SparseOptim& o, int64_t step, int64_t row_step, uintptr_t weight, uintptr_t state,
         uintptr_t grad, int64_t dim, bool generic) {
        sparse_optim_validate(o);
        FASTPS_CHECK(dim >= 1 && step >= 1 && row_step >= 1, "fastps: bad dim or step");
        SparseRowRef ref{as_ptr<float>(weight), as_ptr<float>(state), as_ptr<const float>(grad), row_step};
        py::gil_scoped_release release;
        (generic ? sparse_optim_apply_generic : sparse_optim_apply)(o, step, &ref, 1, dim);
      },
      py::arg("rule"), py::arg("step"), py::arg("row_step"), py::arg("weight"), py::arg("state"),
      py::arg("grad"), py::arg("dim"), py::arg("generic") = false,
      "One fused sparse update of one row on raw float32 buffers (tests and benchmarks).");
}

// The embedded sharded table.
void bind_sparse_table(py::module_& m) {
  py::class_<ShardedSparseTable>(m, "SparseTable")
      .def(py::init([](Server& server, int64_t dim, uint64_t seed, SparseInit init, double init_a,
                       double init_b, SparseRule rule, int64_t max_rows, Eviction eviction,
                       int64_t ttl_steps, int64_t admit_threshold, int64_t max_pending,
                       int eviction_samples, double timeout_s) {
             FASTPS_CHECK(timeout_s > 0, "fastps: timeout must be positive, got ", timeout_s);
             SparseTableConfig c = make_config(dim, seed, init, init_a, init_b, rule, max_rows, eviction,
                                               ttl_steps, admit_threshold, max_pending, eviction_samples);
             return std::make_unique<ShardedSparseTable>(
                 server, c, std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000.0)));
           }),
           py::arg("server"), py::arg("dim"), py::kw_only(), py::arg("seed") = 0,
           py::arg("init") = SparseInit::kUniform, py::arg("init_a") = -0.05,
           py::arg("init_b") = 0.05, py::arg("rule") = SparseRule::kSGD, py::arg("max_rows") = 0,
           py::arg("eviction") = Eviction::kNone, py::arg("ttl_steps") = 0,
           py::arg("admit_threshold") = 0, py::arg("max_pending") = int64_t{1} << 20,
           py::arg("eviction_samples") = 16, py::arg("timeout_s") = 300.0, py::keep_alive<1, 2>(),
           "A sparse embedding table on the shards of `server`. init_a/init_b: uniform low/high "
           "or normal mean/std.")
      .def_property_readonly("dim", &ShardedSparseTable::dim)
      .def_property_readonly("num_shards", &ShardedSparseTable::num_shards)
      .def_property_readonly("rule", [](const ShardedSparseTable& t) { return t.config().rule; })
      .def_property_readonly("max_rows", [](const ShardedSparseTable& t) { return t.config().max_rows; })
      .def_property_readonly("seed", [](const ShardedSparseTable& t) { return t.config().seed; })
      .def("shard_of", &ShardedSparseTable::shard_of, py::arg("id"))
      .def(
          "pull",
          [](ShardedSparseTable& t, uintptr_t ids, int64_t n, uintptr_t out, int64_t out_numel) {
            FASTPS_CHECK(n >= 0, "fastps: sparse pull of ", n, " ids");
            bind::check_count("sparse pull", "out", out_numel, n * t.dim());
            py::gil_scoped_release release;
            t.pull(as_ptr<const int64_t>(ids), n, as_ptr<float>(out));
          },
          py::arg("ids"), py::arg("n"), py::arg("out"), py::arg("out_numel"),
          "Rows of n int64 ids into out (n x dim float32, out_numel floats); never creates rows.")
      .def(
          "pull_scatter",
          [](ShardedSparseTable& t, uintptr_t ids, int64_t n, uintptr_t first, uintptr_t next, int64_t next_numel,
             uintptr_t out, int64_t out_numel) {
            FASTPS_CHECK(n >= 0 && next_numel >= 0, "fastps: sparse pull_scatter of ", n, " ids to ", next_numel,
                         " rows");
            bind::check_count("sparse pull_scatter", "out", out_numel, next_numel * t.dim());
            py::gil_scoped_release release;
            // Each chain starts in out and only moves forward in it: bounded, and it ends.
            const int64_t* nx = as_ptr<const int64_t>(next);
            bind::check_indices("sparse pull_scatter", "first", as_ptr<const int64_t>(first), n, 0, next_numel);
            for (int64_t i = 0; i < next_numel; ++i)
              FASTPS_CHECK(nx[i] == -1 || (nx[i] > i && nx[i] < next_numel), "fastps: sparse pull_scatter: next[",
                           i, "] is ", nx[i], "; a chain goes on to a later row of out, or ends with -1");
            t.pull_scatter(as_ptr<const int64_t>(ids), n, as_ptr<const int64_t>(first),
                           as_ptr<const int64_t>(next), as_ptr<float>(out));
          },
          py::arg("ids"), py::arg("n"), py::arg("first"), py::arg("next"), py::arg("next_numel"), py::arg("out"),
          py::arg("out_numel"),
          "pull() with the row of ids[i] written to rows first[i], next[first[i]], ... (-1 ends) of out "
          "(next_numel rows x dim, out_numel floats; first holds n entries).")
      .def(
          "push",
          [](ShardedSparseTable& t, uintptr_t ids, int64_t n, uintptr_t grads, int64_t grads_numel,
             const SparseOptim& rule, int64_t step) {
            FASTPS_CHECK(n >= 0, "fastps: sparse push of ", n, " ids");
            bind::check_count("sparse push", "grads", grads_numel, n * t.dim());
            py::gil_scoped_release release;
            t.push(as_ptr<const int64_t>(ids), n, as_ptr<const float>(grads), rule, step);
          },
          py::arg("ids"), py::arg("n"), py::arg("grads"), py::arg("grads_numel"), py::arg("rule"), py::arg("step"),
          "One optimizer step on n unique int64 ids with grads (n x dim float32) at table step `step`.")
      .def("size",
           [](ShardedSparseTable& t) {
             py::gil_scoped_release release;
             return t.size();
           })
      .def("__len__",
           [](ShardedSparseTable& t) {
             py::gil_scoped_release release;
             return t.size();
           })
      .def("stats",
           [](ShardedSparseTable& t) {
             SparseTableStats s;
             {
               py::gil_scoped_release release;
               s = t.stats();
             }
             return stats_dict(s);
           })
      .def(
          "save",
          [](ShardedSparseTable& t, const std::string& path) {
            py::gil_scoped_release release;
            t.save(path);
          },
          py::arg("path"))
      .def(
          "load",
          [](ShardedSparseTable& t, const std::string& path) {
            py::gil_scoped_release release;
            t.load(path);
          },
          py::arg("path"))
      .def_property_readonly("step", &ShardedSparseTable::step)
      .def("set_step", &ShardedSparseTable::set_step, py::arg("step"));
}

}  // namespace

void bind_sparse(py::module_& m) {
  bind_sparse_types(m);
  bind_sparse_ops(m);
  bind_sparse_table(m);
}
