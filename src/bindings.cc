// pybind11 bindings of the fastps core: type conversion, GIL release and error
// translation only. Tensors arrive as (address, numel) after the Python side
// checked dtype, device and contiguity (python/fastps/_tensor.py); the clients
// check each numel against what the request uses before touching the address
// (Note [Buffers with their counts] in csrc/client/ps_client.cc).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <vector>

#include "client/embedded_client.h"
#include "client/ps_client.h"
#include "table/grad_scale.h"
#include "server/ps_server.h"
#include "common/mapped_buffer.h"
#include "transport/shm.h"
#include "transport/ucx_transport.h"
#include "common/error.h"
#include "server/server.h"
#include "table/optimizer.h"

#include "bind_util.h"

namespace py = pybind11;
using namespace fastps;

namespace {

using bind::as_ptr;

std::vector<float*> as_ptrs(const std::vector<uintptr_t>& addresses) {
  std::vector<float*> out;
  out.reserve(addresses.size());
  for (uintptr_t a : addresses) out.push_back(as_ptr<float>(a));
  return out;
}

// Maps a C++ error onto the Python class of the same name in fastps.errors.
void raise_as(const char* name, const std::exception& e) {
  py::object cls = py::module_::import("fastps.errors").attr(name);
  PyErr_SetString(cls.ptr(), e.what());
}

}  // namespace

void bind_sparse(pybind11::module_& m);
void bind_sparse_client(pybind11::class_<PsClient>& cls);

namespace {

// The dense optimizer, the embedded server and its client.
void bind_embedded(py::module_& m) {
  py::enum_<OptimKind>(m, "OptimKind")
      .value("SGD", OptimKind::kSGD)
      .value("ADAM", OptimKind::kAdam)
      .value("ADAGRAD", OptimKind::kAdagrad);

  py::class_<OptimHyper>(m, "OptimHyper")
      .def(py::init<>())
      .def_readwrite("kind", &OptimHyper::kind)
      .def_readwrite("lr", &OptimHyper::lr)
      .def_readwrite("weight_decay", &OptimHyper::weight_decay)
      .def_readwrite("maximize", &OptimHyper::maximize)
      .def_readwrite("momentum", &OptimHyper::momentum)
      .def_readwrite("dampening", &OptimHyper::dampening)
      .def_readwrite("nesterov", &OptimHyper::nesterov)
      .def_readwrite("beta1", &OptimHyper::beta1)
      .def_readwrite("beta2", &OptimHyper::beta2)
      .def_readwrite("eps", &OptimHyper::eps)
      .def_readwrite("amsgrad", &OptimHyper::amsgrad)
      .def_readwrite("decoupled_weight_decay", &OptimHyper::decoupled_weight_decay)
      .def_readwrite("lr_decay", &OptimHyper::lr_decay)
      .def_readwrite("initial_accumulator_value", &OptimHyper::initial_accumulator_value)
      .def("state_count", [](const OptimHyper& h) { return optim_state_count(h); })
      .def("state_name", [](const OptimHyper& h, int i) { return optim_state_name(h, i); });

  m.def("optim_kernel_isa", &optim_kernel_isa, "Kernel variant chosen for this CPU.");

  m.def(
      "optim_update",
      [](const OptimHyper& h, double step, bool first_step, uintptr_t param, uintptr_t grad,
         const std::vector<uintptr_t>& state, int64_t n, bool reference) {
        FASTPS_CHECK(static_cast<int>(state.size()) >= optim_state_count(h),
                     "fastps: optimizer needs ", optim_state_count(h), " state buffers, got ",
                     state.size());
        std::vector<float*> st = as_ptrs(state);
        py::gil_scoped_release release;
        (reference ? optim_update_reference : optim_update)(h, step, first_step,
                                                            as_ptr<float>(param),
                                                            as_ptr<const float>(grad), st.data(), n);
      },
      py::arg("hyper"), py::arg("step"), py::arg("first_step"), py::arg("param"), py::arg("grad"),
      py::arg("state"), py::arg("numel"), py::arg("reference") = false,
      "One fused optimizer update on raw float32 buffers (testing and benchmarks).");

  py::class_<Server>(m, "Server")
      .def(py::init([](int num_shards) {
             ServerOptions o;
             o.num_shards = num_shards;
             return std::make_unique<Server>(o);
           }),
           py::arg("num_shards") = 0)
      .def_property_readonly("num_shards", &Server::num_shards);

  py::class_<EmbeddedClient>(m, "EmbeddedClient")
      .def(py::init([](Server& server, int64_t chunk_bytes, double timeout_s) {
             FASTPS_CHECK(timeout_s > 0, "fastps: timeout must be positive, got ", timeout_s);
             ClientOptions o;
             o.chunk_bytes = chunk_bytes;
             o.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000.0));
             return std::make_unique<EmbeddedClient>(server, o);
           }),
           py::arg("server"), py::arg("chunk_bytes"), py::arg("timeout_s"),
           py::keep_alive<1, 2>())
      .def_property_readonly("chunk_elems", &EmbeddedClient::chunk_elems)
      .def("num_chunks", &EmbeddedClient::num_chunks)
      .def(
          "register_dense",
          [](EmbeddedClient& c, uint32_t tensor_id, uintptr_t param, int64_t numel,
             const std::vector<uintptr_t>& state, const std::vector<int64_t>& state_numel, uintptr_t step,
             int64_t step_numel, bool fresh_state) {
            std::vector<float*> st = as_ptrs(state);
            py::gil_scoped_release release;
            c.register_dense(tensor_id, as_ptr<float>(param), numel, st, state_numel, as_ptr<float>(step),
                             step_numel, fresh_state);
          },
          py::arg("tensor_id"), py::arg("param"), py::arg("numel"), py::arg("state"),
          py::arg("state_numel"), py::arg("step"), py::arg("step_numel"), py::arg("fresh_state"),
          "Bind a float32 tensor, its state buffers (each with its numel, which must be the tensor's) "
          "and its float32 step counter (step_numel 1; or 0 and 0: none).")
      .def(
          "unregister_dense",
          [](EmbeddedClient& c, uint32_t tensor_id) {
            py::gil_scoped_release release;
            c.unregister_dense(tensor_id);
          },
          py::arg("tensor_id"))
      .def("is_registered", &EmbeddedClient::is_registered, py::arg("tensor_id"))
      .def(
          "update",
          [](EmbeddedClient& c, const std::vector<uint32_t>& ids, const std::vector<uintptr_t>& grads,
             const std::vector<int64_t>& grad_numel, const std::vector<int>& hyper_index,
             const std::vector<OptimHyper>& hypers) {
            const size_t n = ids.size();
            FASTPS_CHECK(grads.size() == n && grad_numel.size() == n && hyper_index.size() == n,
                         "fastps: update() argument lists differ in length");
            std::vector<UpdateItem> items(n);
            for (size_t i = 0; i < n; ++i)
              items[i] = UpdateItem{ids[i], as_ptr<const float>(grads[i]), grad_numel[i], hyper_index[i]};
            py::gil_scoped_release release;
            c.update(items, hypers);
          },
          py::arg("tensor_ids"), py::arg("grads"), py::arg("grad_numel"), py::arg("hyper_index"),
          py::arg("hypers"),
          "One optimizer step for each (tensor id, gradient address, gradient numel, group index).");

  m.def(
      "uniform_scale",
      [](uintptr_t edited, int64_t edited_numel, uintptr_t mean, int64_t mean_numel) {
        FASTPS_CHECK(edited_numel >= 0 && edited_numel == mean_numel, "fastps: uniform_scale of ", edited_numel,
                     " floats against a mean of ", mean_numel);
        FASTPS_CHECK(edited_numel == 0 || (edited != 0 && mean != 0), "fastps: uniform_scale got a null pointer");
        py::gil_scoped_release release;
        return uniform_scale(as_ptr<const float>(edited), as_ptr<const float>(mean), edited_numel);
      },
      py::arg("edited"), py::arg("edited_numel"), py::arg("mean"), py::arg("mean_numel"),
      "The float32 factor s with edited == mean * s (exactly, else within 2 ulps), or NaN.");
}

// Futures and the network server.
void bind_network(py::module_& m) {
  py::class_<Future, std::shared_ptr<Future>>(m, "Future")
      .def("done", &Future::done, "True once every chunk of the request completed (or failed).")
      .def(
          "wait",
          [](const Future& f, double timeout_s) {
            py::gil_scoped_release release;
            // Between slices of the wait: Python's signal handlers (Ctrl-C) run
            // within Future::kWaitSlice rather than at the deadline.
            f.wait(timeout_s, [] {
              py::gil_scoped_acquire acquire;
              if (PyErr_CheckSignals() != 0) throw py::error_already_set();
            });
          },
          py::arg("timeout") = 0.0,
          "Block until done (timeout <= 0: the client's deadline); raises the request's error. "
          "Signal handlers (Ctrl-C) run while it waits; an exception they raise abandons the request.");

  py::class_<PsServer>(m, "PsServer")
      .def(py::init([](int server_id, int num_workers, int num_shards, int staleness,
                       const std::string& host, int port, const std::string& secret,
                       double timeout_s, int64_t max_payload, const std::string& transport,
                       int64_t shm_ring_bytes, int64_t max_parked_requests, int64_t max_parked_bytes,
                       double liveness_timeout_s, int64_t send_queue_bytes, int64_t shm_spin_us,
                       int64_t shm_yield_us) {
             PsServerOptions o;
             o.server_id = server_id;
             o.num_workers = num_workers;
             o.num_shards = num_shards;
             o.staleness = staleness;
             o.host = host;
             FASTPS_CHECK(port >= 0 && port < 65536, "port out of range: ", port);
             o.port = static_cast<uint16_t>(port);
             o.transport.secret = secret;
             o.transport.timeout = std::chrono::milliseconds(int64_t(timeout_s * 1000));
             o.transport.max_payload = static_cast<size_t>(max_payload);
             o.transport_name = transport;
             o.transport.shm_ring_bytes = static_cast<uint64_t>(shm_ring_bytes);
             o.max_parked_requests = max_parked_requests;
             o.max_parked_bytes = max_parked_bytes;
             o.transport.liveness_timeout = bind::liveness(liveness_timeout_s);
             FASTPS_CHECK(send_queue_bytes > 0, "fastps: send_queue_bytes must be positive, got ", send_queue_bytes);
             o.transport.send_queue_limit = static_cast<uint64_t>(send_queue_bytes);
             o.transport.shm_spin_us = shm_spin_us;
             o.transport.shm_yield_us = shm_yield_us;
             py::gil_scoped_release release;
             return std::make_unique<PsServer>(o);
           }),
           py::arg("server_id"), py::arg("num_workers"), py::arg("num_shards") = 0,
           py::arg("staleness") = 0, py::arg("host") = "127.0.0.1", py::arg("port") = 0,
           py::arg("secret") = "", py::arg("timeout_s") = 30.0,
           py::arg("max_payload") = int64_t(kDefaultMaxPayload), py::arg("transport") = "auto",
           py::arg("shm_ring_bytes") = int64_t(kShmDefaultRingBytes),
           py::arg("max_parked_requests") = kDefaultMaxParkedRequests, py::arg("max_parked_bytes") = int64_t(0),
           py::arg("liveness_timeout_s") = 30.0, py::arg("send_queue_bytes") = int64_t(kDefaultSendQueueLimit),
           py::arg("shm_spin_us") = int64_t(-1), py::arg("shm_yield_us") = int64_t(-1),
           "A network parameter server. transport: 'auto' accepts shared-memory offers from "
           "clients on this host, 'tcp' declines them ('shm' behaves as 'auto' on a server), 'ucx' "
           "accepts UCX offers too. "
           "max_parked_requests / max_parked_bytes: per connection, the requests that may wait for "
           "a later round or step and the payload bytes they may hold (0: twice max_payload). "
           "liveness_timeout_s: a worker silent this long is dropped (0: never); send_queue_bytes: "
           "replies held for a worker that does not read them before it is dropped. shm_spin_us / "
           "shm_yield_us: how long a shared-memory waiter spins, then yields, before it sleeps (-1: default).")
      .def_property_readonly("port", &PsServer::port)
      .def_property_readonly("server_id", &PsServer::server_id)
      .def("stats", [](const PsServer& s) { return bind::stats_dict(s.stats()); },
           "Bytes and messages this server's transport sent and received.")
      .def(
          "parked",
          [](const PsServer& s) {
            const ParkedStats p = s.parked();
            return py::dict(py::arg("requests") = p.requests, py::arg("bytes") = p.bytes);
          },
          "Requests waiting for a later round or step, over all connections, and the payload bytes they hold.");

}

// The network client (its sparse-table methods: bindings_sparse.cc).
py::class_<PsClient> bind_client(py::module_& m) {
  py::class_<PsClient> ps_client(m, "PsClient");
  ps_client
      .def(py::init([](int rank, const std::string& secret, double timeout_s, int64_t chunk_bytes,
                       int connections_per_peer, const std::string& transport,
                       int64_t shm_ring_bytes, double liveness_timeout_s, int64_t shm_spin_us,
                       int64_t shm_yield_us) {
             TransportOptions o;
             o.secret = secret;
             o.timeout = std::chrono::milliseconds(int64_t(timeout_s * 1000));
             o.connections_per_peer = connections_per_peer;
             o.shm_ring_bytes = static_cast<uint64_t>(shm_ring_bytes);
             o.liveness_timeout = bind::liveness(liveness_timeout_s);
             o.shm_spin_us = shm_spin_us;
             o.shm_yield_us = shm_yield_us;
             return std::make_unique<PsClient>(rank, o, chunk_bytes, transport);
           }),
           py::arg("rank"), py::arg("secret") = "", py::arg("timeout_s") = 30.0,
           py::arg("chunk_bytes") = int64_t(4 << 20), py::arg("connections_per_peer") = 1,
           py::arg("transport") = "auto", py::arg("shm_ring_bytes") = int64_t(kShmDefaultRingBytes),
           py::arg("liveness_timeout_s") = 30.0, py::arg("shm_spin_us") = int64_t(-1),
           py::arg("shm_yield_us") = int64_t(-1),
           "A worker's client. transport: 'auto' uses shared memory with servers on this host "
           "and TCP with the others (UCX where this host has an RDMA device), 'tcp' only TCP, 'shm' shared "
           "memory or a ConnectionError, 'ucx' UCX (docs/ucx.md) or a ConnectionError. "
           "liveness_timeout_s: a server silent this long is dropped (0: never). shm_spin_us / "
           "shm_yield_us: how long a shared-memory waiter spins, then yields, before it sleeps (-1: default).")
      .def(
          "connect",
          [](PsClient& c, const std::vector<std::pair<std::string, int>>& servers) {
            std::vector<ServerAddress> a;
            for (auto& s : servers) a.push_back(ServerAddress{s.first, static_cast<uint16_t>(s.second)});
            py::gil_scoped_release release;
            c.connect(a);
          },
          py::arg("servers"))
      .def_property_readonly("num_servers", &PsClient::num_servers)
      .def("server_paths", &PsClient::server_paths,
           "How each server is reached: 'local' (in-process), 'shm' or 'tcp'.")
      .def("attach_local", [](PsClient& c, PsServer& s, int index) { c.attach_local(&s, index); },
           py::arg("server"), py::arg("index"), py::keep_alive<1, 2>(),
           "Serve requests for server `index` in-process (the colocated server); this client "
           "keeps the server alive (the server holds nothing of the client's).")
      .def(
          "register_dense",
          [](PsClient& c, uint32_t tid, int64_t numel, bool sum_only, const OptimHyper& h,
             uintptr_t init, int64_t init_numel) {
            py::gil_scoped_release release;
            return c.register_dense(tid, numel, sum_only, h, as_ptr<const float>(init), init_numel);
          },
          py::arg("tensor_id"), py::arg("numel"), py::arg("sum_only"), py::arg("hyper"),
          py::arg("init"), py::arg("init_numel"),
          "Place a tensor of numel floats; init (0: none) holds init_numel == numel initial values.")
      .def(
          "push",
          [](PsClient& c, uint32_t tid, uintptr_t grad, int64_t grad_numel, const OptimHyper& h,
             uint32_t clock) {
            py::gil_scoped_release release;
            return c.push(tid, as_ptr<const float>(grad), grad_numel, h, clock);
          },
          py::arg("tensor_id"), py::arg("grad"), py::arg("grad_numel"), py::arg("hyper"), py::arg("clock"),
          "Push a gradient of the tensor's numel floats (grad 0 and grad_numel 0: a skip).")
      .def(
          "pull",
          [](PsClient& c, uint32_t tid, uintptr_t dst, int64_t dst_numel, uint32_t min_version) {
            py::gil_scoped_release release;
            return c.pull(tid, as_ptr<float>(dst), dst_numel, min_version);
          },
          py::arg("tensor_id"), py::arg("dst"), py::arg("dst_numel"), py::arg("min_version"),
          "Pull the tensor into dst (dst_numel: the tensor's numel).")
      .def(
          "push_pull",
          [](PsClient& c, uint32_t tid, uintptr_t src, int64_t src_numel, uintptr_t dst, int64_t dst_numel,
             uint32_t clock, bool deferred) {
            py::gil_scoped_release release;
            return c.push_pull(tid, as_ptr<const float>(src), src_numel, as_ptr<float>(dst), dst_numel, clock,
                               deferred);
          },
          py::arg("tensor_id"), py::arg("src"), py::arg("src_numel"), py::arg("dst"), py::arg("dst_numel"),
          py::arg("clock"), py::arg("deferred") = false,
          "Sum src over the workers into dst (both of the tensor's numel; src 0 and 0: a skip); with "
          "deferred=True, an optimizer key's round mean, applied only at apply() (dst may be 0 for a skip).")
      .def(
          "apply",
          [](PsClient& c, uint32_t tid, const OptimHyper& h, uintptr_t dst, int64_t dst_numel, uintptr_t grad,
             int64_t grad_numel, float scale, bool skip) {
            py::gil_scoped_release release;
            return c.apply(tid, h, as_ptr<float>(dst), dst_numel, as_ptr<const float>(grad), grad_numel, scale,
                           skip);
          },
          py::arg("tensor_id"), py::arg("hyper"), py::arg("dst"), py::arg("dst_numel"), py::arg("grad") = 0,
          py::arg("grad_numel") = 0, py::arg("scale") = 1.0f, py::arg("skip") = false,
          "This worker's contribution to a deferred round's step: a full gradient (grad), none "
          "(skip) or the round's mean times scale; the new parameters land in dst.")
      .def(
          "state_get",
          [](PsClient& c, uint32_t tid, int buffer, uintptr_t dst, int64_t dst_numel) {
            py::gil_scoped_release release;
            return c.state_get(tid, buffer, as_ptr<float>(dst), dst_numel);
          },
          py::arg("tensor_id"), py::arg("buffer"), py::arg("dst"), py::arg("dst_numel"),
          "Fetch buffer (0: parameter, 1..3: optimizer state, 255: the step counter, 1 float) into dst.")
      .def(
          "state_set",
          [](PsClient& c, uint32_t tid, int buffer, uintptr_t src, int64_t src_numel) {
            py::gil_scoped_release release;
            return c.state_set(tid, buffer, as_ptr<const float>(src), src_numel);
          },
          py::arg("tensor_id"), py::arg("buffer"), py::arg("src"), py::arg("src_numel"),
          "Replace buffer (as in state_get) with src's values.")
      .def("round", &PsClient::round, py::arg("tensor_id"),
           "Rounds the tensor was sent in since its registration, completed or failed (its next "
           "round's clock is this + 1).")
      .def("end_round", &PsClient::end_round, py::arg("tensor_ids"),
           "End a round of each tensor, whatever happened to it.")
      .def("advance_round", &PsClient::advance_round, py::arg("tensor_id"),
           "End a round of one tensor; returns its new count.")
      .def("stats", [](const PsClient& c) { return bind::stats_dict(c.stats()); },
           "Bytes and messages this client sent and received over the transport (local "
           "requests to the colocated server are not counted).");
  return ps_client;
}

}  // namespace

// A flat list of declarations, split by area into the functions above.
PYBIND11_MODULE(_C, m) {
  m.doc() = "fastps native core (private; use the fastps package)";
  // Bounds of FASTPS_SHM_RING_BYTES, checked in Python before the rendezvous.
  m.attr("SHM_MIN_RING_BYTES") = kShmMinRingBytes;
  m.attr("SHM_MAX_RING_BYTES") = kShmMaxRingBytes;
  m.attr("PROTOCOL_VERSION") = kProtocolVersion;
  m.def(
      "ucx_unavailable",
      [] {
        std::string why;
        return load_ucx_plugin(&why) != nullptr ? std::string() : why;
      },
      "Why FASTPS_TRANSPORT=ucx cannot work in this process (the UCX plugin or libucp cannot be loaded), "
      "or '' if it can.");  // docs/protocol.md (for tests that speak it by hand)
  m.attr("STEP_COUNTER_BUFFER") = kStepCounterBuffer;  // STATE_GET/STATE_SET's step-counter buffer
  // Process-wide settings of the sparse tables' memory (Note [Mapped table
  // memory], Note [Populating ahead]); the configuration resolver sets them.
  m.def("set_huge_pages", &set_huge_pages, py::arg("on"),
        "Whether sparse tables of 4 MiB and more ask for transparent huge pages (FASTPS_HUGE_PAGES).");
  m.def("huge_pages", &huge_pages, "The current set_huge_pages() setting.");
  m.def("set_populate_ahead", &set_populate_ahead, py::arg("on"),
        "Whether a background thread backs a sparse table's next rows with memory ahead (FASTPS_PREFAULT).");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastps::TimeoutError& e) {
      raise_as("TimeoutError", e);
    } catch (const fastps::TransportUnavailable& e) {
      raise_as("TransportUnavailableError", e);
    } catch (const fastps::ConnectionError& e) {
      raise_as("ConnectionError", e);
    } catch (const fastps::ProtocolError& e) {
      raise_as("ProtocolError", e);
    } catch (const fastps::InvalidArgument& e) {
      raise_as("InvalidArgumentError", e);
    } catch (const fastps::CapacityError& e) {
      raise_as("CapacityError", e);
    } catch (const fastps::CheckpointError& e) {
      raise_as("CheckpointError", e);
    } catch (const fastps::Error& e) {
      raise_as("FastPSError", e);
    }
  });

  bind_embedded(m);
  bind_network(m);
  py::class_<PsClient> ps_client = bind_client(m);
  bind_sparse(m);
  bind_sparse_client(ps_client);
}

