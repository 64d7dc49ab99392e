// The boundary between the core and the UCX plugin (libfastps_ucx.so, built
// from transport/ucx_plugin.cc only where the UCX headers were found, and
// linked against the system's libucp). The core never links UCX: the "ucx"
// transport (transport/ucx_transport.h) dlopen()s the plugin the first time
// it is asked for, so a wheel installs and runs on hosts without UCX, and
// says why and what to set where the plugin or libucp cannot be loaded.
//
// Design note:
//  * Nothing of UCX crosses this header: the plugin is mechanical (a UCP
//    context and worker, a progress thread, endpoints, active messages); the
//    core keeps everything fastps (the handshake, frame checks, payload
//    targets, ordering, liveness, closing). The plugin is built by the same
//    build as the core (the same compiler and C++ library), so the interface
//    is a C++ one: abstract classes, std::string; no exception crosses it.
//    kPluginAbi is checked at load time.
//  * One frame is one UCP active message (ucp_am_send_nbx): the AM header is
//    the receiver's connection token (u64, little-endian) followed by the
//    48-byte frame header, the AM data is the payload (scatter/gather, in
//    place). UCX picks eager (small) or rendezvous (large, zero-copy where
//    the transport can: RDMA get or put, CMA, ...) by size.
//  * Threading: the worker is shared (UCS_THREAD_MODE_MULTI); only the
//    plugin's progress thread calls ucp_worker_progress(), so every Sink
//    call is on that thread, one at a time. Senders post from their own
//    threads and, for send(), sleep until the progress thread completes their
//    request. Idle, the progress thread sleeps on the worker's event file
//    descriptor (ucp_worker_arm), so it does not spin a core.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace fastps {
namespace ucx {

constexpr uint32_t kPluginAbi = 1;
constexpr const char* kPluginFile = "libfastps_ucx.so";
constexpr const char* kPluginEntry = "fastps_ucx_plugin_v1";
// AM header: u64 receiver's token, then the 48-byte frame header (kHeaderSize).
constexpr size_t kTokenSize = 8;

// The core's side; every call comes from the progress thread. All but
// after_progress() run inside ucp_worker_progress(), holding UCX's worker
// lock, which every other thread's UCX call waits for: they must not wait for
// anything such a thread may hold (Note [No handlers under UCX's lock] in
// transport/ucx_transport.cc).
class Sink {
 public:
  virtual ~Sink() = default;
  // A frame for the receiver's connection `token` arrived: `header` is its
  // kHeaderSize bytes, `len` the payload length UCX announces. Returns true
  // with *dst (where the len bytes go; may be null only when len is 0) and
  // *frame (the core's cookie for frame_done), or false to drop the frame
  // (the core closes that connection itself).
  virtual bool frame_begin(uint64_t token, const uint8_t* header, uint64_t len, uint8_t** dst, void** frame) = 0;
  // The payload of frame_begin()'s frame is in place (error null) or could
  // not be received (the reason). Called once per accepted frame, in the
  // order frame_begin() saw them per token only for eager frames: the core
  // restores the order.
  virtual void frame_done(uint64_t token, void* frame, const char* error) = 0;
  // A post()ed frame has left (error null) or failed; its data may be freed.
  virtual void post_done(uint64_t token, void* cookie, const char* error) = 0;
  // UCX reports the endpoint of `token` broken (the peer died, the network).
  virtual void endpoint_failed(uint64_t token, const char* why) = 0;
  // After each ucp_worker_progress() burst, outside UCX's lock: the core
  // delivers the frames completed meanwhile. May call Endpoint methods.
  virtual void after_progress() = 0;
};

enum class SendStatus : int { kOk = 0, kTimeout = 1, kFailed = 2, kWouldWait = 3 };

// One UCP endpoint. Any thread except the progress thread may call its
// methods, concurrently; frames of concurrent senders never interleave.
class Endpoint {
 public:
  // Closes (as close()).
  virtual ~Endpoint() = default;
  // Sends one frame from the caller's memory and waits until UCX is done with
  // it (the caller may reuse the memory after any return) or until
  // `deadline_ns` (steady clock) passes: then the endpoint is force-closed
  // and kTimeout returned once the request finished. kFailed: *why says.
  virtual SendStatus send(const uint8_t* am_header, size_t header_len, const iovec* iov, size_t niov,
                          int64_t deadline_ns, std::string* why) = 0;
  // Sends one frame only if UCX can complete it at once (no reference to the
  // memory remains): kOk, kWouldWait (nothing was sent) or kFailed.
  virtual SendStatus send_now(const uint8_t* am_header, size_t header_len, const iovec* iov, size_t niov,
                              std::string* why) = 0;
  // Sends `len` bytes at `data` that stay valid, as does `am_header`, until
  // Sink::post_done(token, cookie) says UCX is done with them; never waits.
  // Any thread, including the progress thread (in Sink::after_progress()).
  // kOk (post_done follows) or kFailed (it does not).
  virtual SendStatus post(const uint8_t* am_header, size_t header_len, const uint8_t* data, size_t len,
                          void* cookie, std::string* why) = 0;
  // The UCX transports this endpoint's lanes use, e.g. "tcp/lo" or
  // "rc_mlx5/mlx5_0:1, sysv/memory"; empty if UCX does not say yet.
  virtual std::string transports() = 0;
  // Force-closes the endpoint and waits (at most a few seconds) until no
  // request of it (sends, and receives into the core's memory for its token)
  // is outstanding. Idempotent: once it returned, neither it nor the
  // destructor touches the worker again (an endpoint may be destroyed after
  // its worker only so). Not on the progress thread.
  virtual void close() = 0;
};

// One UCP context and worker with its progress thread.
class Worker {
 public:
  // Stops the progress thread; every endpoint must have been close()d.
  virtual ~Worker() = default;
  // The worker's address (ucp_worker_get_address), for the peer's connect().
  virtual std::string address() const = 0;
  // An endpoint to the worker at `address`; frames that arrive from it name
  // `local_token` (the peer puts it in each AM header). Null with *why.
  virtual std::unique_ptr<Endpoint> connect(const uint8_t* address, size_t len, uint64_t local_token,
                                            std::string* why) = 0;
  virtual bool on_progress_thread() const = 0;
  // For logs: the UCX version and the UCX_* settings in effect.
  virtual std::string describe() const = 0;
};

// What the plugin exports, under kPluginEntry, as `const Plugin* (*)()`.
struct Plugin {
  uint32_t abi;
  // Creates a worker; null with *why if UCX refuses (no usable transport).
  Worker* (*create_worker)(Sink* sink, std::string* why);
  // The version of the libucp in use, "1.13.1".
  const char* (*ucx_version)();
};

}  // namespace ucx
}  // namespace fastps
