#include "runtime/base/secret_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace hsm {

namespace {

caf::error bad_file(std::string_view what, const std::filesystem::path& path,
                    const std::string& why) {
  return caf::make_error(config_errc::bad_file, std::string{what},
                         path.string() + ": " + why);
}

/// Closes a descriptor on scope exit.
struct fd_guard {
  int fd;
  ~fd_guard() {
    if (fd >= 0)
      ::close(fd);
  }
};

} // namespace

caf::expected<std::string> read_secret_file(const std::filesystem::path& path,
                                            std::string_view what) {
  fd_guard f{::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC)};
  if (f.fd < 0)
    return bad_file(what, path,
                    errno == ELOOP ? "a symbolic link; name the file itself"
                                   : std::strerror(errno));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0)
    return bad_file(what, path, std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    return bad_file(what, path, "not a regular file");
  if (st.st_uid != ::geteuid() && st.st_uid != 0)
    return bad_file(what, path,
                    "owned by uid " + std::to_string(st.st_uid)
                      + ", neither this user (uid "
                      + std::to_string(::geteuid()) + ") nor root");
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
    return bad_file(what, path,
                    "readable or writable by group or others; "
                    "chmod 600 it");
  if (st.st_size <= 0)
    return bad_file(what, path, "empty");
  if (static_cast<size_t>(st.st_size) > max_secret_file_bytes)
    return bad_file(what, path,
                    "larger than " + std::to_string(max_secret_file_bytes)
                      + " bytes");
  // One allocation, sized before reading: growing the string would leave
  // copies of the secret in freed memory.
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < out.size()) {
    auto n = ::read(f.fd, out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    got += static_cast<size_t>(n);
  }
  out.resize(got); // shrinking keeps the buffer
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r'))
    out.pop_back();
  if (out.empty())
    return bad_file(what, path, "empty");
  return out;
}

caf::error write_secret_file(const std::filesystem::path& path,
                             std::string_view data, std::string_view what) {
  fd_guard f{::open(
    path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600)};
  if (f.fd < 0)
    return bad_file(what, path, std::strerror(errno));
  size_t put = 0;
  while (put < data.size()) {
    auto n = ::write(f.fd, data.data() + put, data.size() - put);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return bad_file(what, path, "cannot write it whole");
    put += static_cast<size_t>(n);
  }
  if (::fsync(f.fd) != 0)
    return bad_file(what, path, std::strerror(errno));
  return caf::none;
}

} // namespace hsm
