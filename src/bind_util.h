// Helpers shared by the binding files (src/*.cc). Bindings only: no logic.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/error.h"

#include "transport/transport.h"

namespace fastps {
namespace bind {

// A tensor's address as passed from Python (after python/fastps/_tensor.py checked it).
template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Throws InvalidArgument unless a caller's buffer of `count` elements is what
// the call reads or writes (`expected`). The bindings' share of Note [Buffers
// with their counts] (csrc/client/ps_client.cc): for the calls whose core
// function trusts its pointers.
inline void check_count(const char* call, const char* buffer, int64_t count, int64_t expected) {
  FASTPS_CHECK(count == expected, "fastps: ", call, ": ", buffer, " holds ", count, " elements where the call uses ",
               expected);
}

// Throws InvalidArgument unless every v[i] (i < n) is in [lo, hi): indices the
// core function uses to address another buffer.
inline void check_indices(const char* call, const char* what, const int64_t* v, int64_t n, int64_t lo,
                          int64_t hi) {
  for (int64_t i = 0; i < n; ++i)
    FASTPS_CHECK(v[i] >= lo && v[i] < hi, "fastps: ", call, ": ", what, "[", i, "] is ", v[i],
                 ", outside [", lo, ", ", hi, ")");
}

inline pybind11::dict stats_dict(const TransportStats& t) {
  namespace py = pybind11;
  return py::dict(py::arg("bytes_sent") = t.bytes_sent, py::arg("bytes_received") = t.bytes_received,
                  py::arg("messages_sent") = t.messages_sent,
                  py::arg("messages_received") = t.messages_received,
                  py::arg("queued_bytes") = t.queued_bytes, py::arg("queued_peak") = t.queued_peak,
                  py::arg("frames_queued") = t.frames_queued, py::arg("ucx_connections") = t.ucx_connections,
                  py::arg("ucx") = t.ucx, py::arg("connections_opened") = t.connections_opened,
                  py::arg("connections_closed") = t.connections_closed,
                  py::arg("connections_open") = t.connections_opened - t.connections_closed,
                  py::arg("handshakes_failed") = t.handshakes_failed);
}

// FASTPS_LIVENESS_TIMEOUT's seconds (0: off) as TransportOptions::liveness_timeout
// (whose range Transport::create() checks).
inline std::chrono::milliseconds liveness(double seconds) {
  FASTPS_CHECK(seconds >= 0 && seconds <= 1e9, "fastps: the liveness timeout must be 0 (off) or positive "
               "seconds, got ", seconds);
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

}  // namespace bind
}  // namespace fastps
