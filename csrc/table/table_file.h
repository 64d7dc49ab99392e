// Table files (docs/sparse.md "File format"): a writer that hashes and
// commits atomically, a reader that checks, the header, and the section
// reader shared by every loader.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/sha256.h"
#include "table/sparse_config.h"

namespace fastps {

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

// Throws unless a file with header `h` can load into a table configured as
// `live`: the values of ids the file does not hold must come out the same, so
// dim, rule, initialiser (and its parameters) and seed must match. A mismatch
// is first told apart from corruption (the rest of the file is hashed:
// CheckpointError if the digest is wrong), then reported as InvalidArgument
// naming the field ("cannot load <path> into <what>: the file has dim = 8,
// the table has 16"). Caps, eviction and admission may differ. Used by every
// loader (the embedded table and the network client).
void check_file_fits(const SparseFileHeader& h, const SparseTableConfig& live, const std::string& path,
                     const std::string& what, SparseFileReader& reader);

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
