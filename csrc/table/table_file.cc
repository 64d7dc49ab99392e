// Table files: see table/table_file.h and docs/sparse.md "File format".

#include "table/table_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the table file format is little-endian and written natively");

namespace fastps {

namespace {

constexpr char kFileMagic[8] = {'F', 'A', 'S', 'T', 'P', 'S', 'S', 'P'};
constexpr char kEndMagic[8] = {'F', 'P', 'S', 'S', 'P', 'E', 'N', 'D'};
constexpr uint32_t kFileVersion = 1;
constexpr uint32_t kHeaderBytes = 128;
constexpr size_t kWriteBuffer = 1 << 20;

}  // namespace

namespace {
std::string dir_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::atomic<uint64_t> g_tmp_counter{0};
}  // namespace

SparseFileWriter::SparseFileWriter(const std::string& path) : path_(path) {
  FASTPS_CHECK(!path.empty(), "fastps: empty file name");
  tmp_ = path + ".tmp." + std::to_string(::getpid()) + "." +
         std::to_string(g_tmp_counter.fetch_add(1, std::memory_order_relaxed));
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  FASTPS_CHECK_TYPED(CheckpointError, fd_ >= 0, "fastps: cannot create ", tmp_, ": ", errno_text(errno));
  buf_.reserve(kWriteBuffer);
}

SparseFileWriter::~SparseFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void SparseFileWriter::flush() {
  const unsigned char* p = buf_.data();
  size_t left = buf_.size();
  while (left > 0) {
    const ssize_t w = ::write(fd_, p, left);
    if (w < 0 && errno == EINTR) continue;
    FASTPS_CHECK_TYPED(CheckpointError, w > 0, "fastps: writing ", tmp_, " failed: ", errno_text(errno));
    p += w;
    left -= static_cast<size_t>(w);
  }
  buf_.clear();
}

void SparseFileWriter::write(const void* data, size_t n) {
  sha_.update(data, n);
  const unsigned char* p = static_cast<const unsigned char*>(data);
  while (n > 0) {
    if (buf_.size() == kWriteBuffer) flush();
    const size_t take = std::min(n, kWriteBuffer - buf_.size());
    buf_.insert(buf_.end(), p, p + take);
    p += take;
    n -= take;
  }
}

void SparseFileWriter::commit() {
  FASTPS_ASSERT(!committed_ && fd_ >= 0);
  write(kEndMagic, sizeof(kEndMagic));
  const Sha256Digest digest = sha_.finish();
  buf_.insert(buf_.end(), digest.begin(), digest.end());  // the digest is not hashed
  flush();
  FASTPS_CHECK_TYPED(CheckpointError, ::fsync(fd_) == 0, "fastps: fsync of ", tmp_, " failed: ", errno_text(errno));
  const int fd = fd_;
  fd_ = -1;
  FASTPS_CHECK_TYPED(CheckpointError, ::close(fd) == 0, "fastps: closing ", tmp_, " failed: ", errno_text(errno));
  FASTPS_CHECK_TYPED(CheckpointError, ::rename(tmp_.c_str(), path_.c_str()) == 0, "fastps: renaming ", tmp_,
                     " to ", path_, " failed: ", errno_text(errno));
  committed_ = true;
  const std::string dir = dir_of(path_);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  FASTPS_CHECK_TYPED(CheckpointError, dfd >= 0, "fastps: cannot open directory ", dir, ": ", errno_text(errno));
  const int rc = ::fsync(dfd);
  const int saved = errno;
  ::close(dfd);
  errno = saved;
  FASTPS_CHECK_TYPED(CheckpointError, rc == 0, "fastps: fsync of directory ", dir, " failed: ", errno_text(errno));
}

SparseFileReader::SparseFileReader(const std::string& path) : path_(path) {
  f_ = std::fopen(path.c_str(), "rb");
  FASTPS_CHECK_TYPED(CheckpointError, f_ != nullptr, "fastps: cannot open ", path, ": ", errno_text(errno));
  struct stat st;
  FASTPS_CHECK_TYPED(CheckpointError, ::fstat(::fileno(f_), &st) == 0, "fastps: cannot stat ", path, ": ",
                     errno_text(errno));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint64_t trailer = sizeof(kEndMagic) + kSha256DigestSize;
  FASTPS_CHECK_TYPED(CheckpointError, size >= kHeaderBytes + trailer, "fastps: ", path,
                     " is truncated or not a fastps sparse table file (", size, " bytes)");
  data_end_ = size - trailer;
}

SparseFileReader::~SparseFileReader() {
  if (f_ != nullptr) std::fclose(f_);
}

void SparseFileReader::read(void* data, size_t n) {
  FASTPS_CHECK_TYPED(CheckpointError, n <= remaining(), "fastps: ", path_,
                     " is truncated or corrupt (a record runs past the end of the data)");
  FASTPS_CHECK_TYPED(CheckpointError, std::fread(data, 1, n, f_) == n, "fastps: reading ", path_,
                     " failed: ", errno_text(errno));
  sha_.update(data, n);
  pos_ += n;
}

bool SparseFileReader::digest_ok() {
  unsigned char chunk[1 << 14];
  uint64_t left = data_end_ - pos_ + sizeof(kEndMagic);
  while (left > 0) {
    const size_t take = static_cast<size_t>(std::min<uint64_t>(left, sizeof(chunk)));
    if (std::fread(chunk, 1, take, f_) != take) return false;
    sha_.update(chunk, take);
    left -= take;
  }
  Sha256Digest stored;
  if (std::fread(stored.data(), 1, stored.size(), f_) != stored.size()) return false;
  const Sha256Digest actual = sha_.finish();
  return constant_time_equal(stored.data(), actual.data(), stored.size());
}

void SparseFileReader::finish() {
  FASTPS_CHECK_TYPED(CheckpointError, remaining() == 0, "fastps: ", path_,
                     " is corrupt: ", remaining(), " unexpected bytes before the end marker");
  char end[sizeof(kEndMagic)];
  FASTPS_CHECK_TYPED(CheckpointError, std::fread(end, 1, sizeof(end), f_) == sizeof(end), "fastps: reading ",
                     path_, " failed");
  sha_.update(end, sizeof(end));
  Sha256Digest stored;
  FASTPS_CHECK_TYPED(CheckpointError, std::fread(stored.data(), 1, stored.size(), f_) == stored.size(),
                     "fastps: reading ", path_, " failed");
  const Sha256Digest actual = sha_.finish();
  FASTPS_CHECK_TYPED(CheckpointError,
                     std::memcmp(end, kEndMagic, sizeof(end)) == 0 &&
                         constant_time_equal(stored.data(), actual.data(), stored.size()),
                     "fastps: ", path_, " is corrupt (SHA-256 checksum mismatch)");
  FASTPS_CHECK_TYPED(CheckpointError, std::fgetc(f_) == EOF, "fastps: ", path_,
                     " is corrupt (data after the checksum)");
}

void write_sparse_header(SparseFileWriter& w, const SparseTableConfig& c, int64_t step,
                         uint32_t num_sections) {
  const int64_t state = sparse_state_floats(c.rule, c.dim);
  w.write(kFileMagic, sizeof(kFileMagic));
  w.put<uint32_t>(kFileVersion);
  w.put<uint32_t>(kHeaderBytes);
  w.put<int64_t>(c.dim);
  w.put<int64_t>(state);
  w.put<uint32_t>(static_cast<uint32_t>(c.rule));
  w.put<uint32_t>(static_cast<uint32_t>(c.init));
  w.put<double>(c.init_a);
  w.put<double>(c.init_b);
  w.put<uint64_t>(c.seed);
  w.put<uint32_t>(static_cast<uint32_t>(c.eviction));
  w.put<uint32_t>(static_cast<uint32_t>(c.eviction_samples));
  w.put<int64_t>(c.max_rows);
  w.put<int64_t>(c.ttl_steps);
  w.put<int64_t>(c.admit_threshold);
  w.put<int64_t>(c.max_pending);
  w.put<int64_t>(step);
  w.put<int64_t>(static_cast<int64_t>(sizeof(RowHeader)) + 4 * (c.dim + state));
  w.put<uint32_t>(num_sections);
  w.put<uint32_t>(0);
}

SparseFileHeader read_sparse_header(SparseFileReader& r) {
  char magic[sizeof(kFileMagic)];
  r.read(magic, sizeof(magic));
  FASTPS_CHECK_TYPED(CheckpointError, std::memcmp(magic, kFileMagic, sizeof(magic)) == 0,
                     "fastps: not a fastps sparse table file (bad magic)");
  const uint32_t version = r.get<uint32_t>();
  FASTPS_CHECK_TYPED(CheckpointError, version == kFileVersion, "fastps: sparse table file version ", version,
                     " is not supported (this build reads version ", kFileVersion, ")");
  FASTPS_CHECK_TYPED(CheckpointError, r.get<uint32_t>() == kHeaderBytes,
                     "fastps: corrupt sparse table file (header size)");
  SparseFileHeader h;
  SparseTableConfig& c = h.config;
  c.dim = r.get<int64_t>();
  h.state_floats = r.get<int64_t>();
  const uint32_t rule = r.get<uint32_t>();
  const uint32_t init = r.get<uint32_t>();
  c.init_a = r.get<double>();
  c.init_b = r.get<double>();
  c.seed = r.get<uint64_t>();
  const uint32_t eviction = r.get<uint32_t>();
  c.eviction_samples = static_cast<int>(r.get<uint32_t>());
  c.max_rows = r.get<int64_t>();
  c.ttl_steps = r.get<int64_t>();
  c.admit_threshold = r.get<int64_t>();
  c.max_pending = r.get<int64_t>();
  h.step = r.get<int64_t>();
  h.record_bytes = r.get<int64_t>();
  h.num_sections = r.get<uint32_t>();
  r.get<uint32_t>();
  FASTPS_CHECK_TYPED(CheckpointError,
                     rule < kNumSparseRules && init <= 2 && eviction <= 3 && c.dim >= 1 &&
                         c.dim <= (int64_t{1} << 24) && h.step >= 0,
                     "fastps: corrupt sparse table file (header fields out of range)");
  c.rule = static_cast<SparseRule>(rule);
  c.init = static_cast<SparseInit>(init);
  c.eviction = static_cast<Eviction>(eviction);
  FASTPS_CHECK_TYPED(CheckpointError,
                     h.state_floats == sparse_state_floats(c.rule, c.dim) &&
                         h.record_bytes == static_cast<int64_t>(sizeof(RowHeader)) + 4 * (c.dim + h.state_floats),
                     "fastps: corrupt sparse table file (row layout)");
  return h;
}

namespace {
void check_same(bool same, const std::string& path, const std::string& what, const char* field,
                const std::string& file, const std::string& live, SparseFileReader& reader) {
  if (same) return;
  FASTPS_CHECK_TYPED(CheckpointError, reader.digest_ok(), "fastps: ", path, " is corrupt (SHA-256 checksum mismatch)");
  throw InvalidArgument(detail::concat("fastps: cannot load ", path, " into ", what, ": the file has ", field, " = ",
                                       file, ", the table has ", live));
}
}  // namespace

void check_file_fits(const SparseFileHeader& h, const SparseTableConfig& live, const std::string& path,
                     const std::string& what, SparseFileReader& reader) {
  const SparseTableConfig& f = h.config;
  auto str = [](auto v) { return detail::concat(v); };
  check_same(f.dim == live.dim, path, what, "dim", str(f.dim), str(live.dim), reader);
  check_same(f.rule == live.rule, path, what, "rule", sparse_rule_name(f.rule), sparse_rule_name(live.rule), reader);
  check_same(f.init == live.init, path, what, "init", sparse_init_name(f.init), sparse_init_name(live.init), reader);
  check_same(f.init == SparseInit::kZeros || (f.init_a == live.init_a && f.init_b == live.init_b), path, what,
             "init parameters", str(f.init_a) + ", " + str(f.init_b), str(live.init_a) + ", " + str(live.init_b),
             reader);
  check_same(f.seed == live.seed, path, what, "seed", str(f.seed), str(live.seed), reader);
}

}  // namespace fastps
