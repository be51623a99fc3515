#include "runtime/base/secret_file.hpp"

#include <acl/libacl.h>
#include <fcntl.h>
#include <sys/acl.h>
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

/// Frees an ACL on scope exit.
struct acl_guard {
  acl_t acl;
  ~acl_guard() {
    if (acl != nullptr)
      acl_free(acl);
  }
};

/// Who besides the owner may read or write the open file `fd`: empty if
/// nobody, else the first such entry ("group", "others", "uid 1001 through
/// its ACL", ...). Without an extended ACL that is the mode's group and
/// other bits. With one (systemd's LoadCredential= hands a service its
/// credential as a root-owned 0400 file with an ACL entry granting the
/// service's user read access, which shows as group bits in the mode), the
/// effective entries count instead: a named user entry for this process's
/// user is allowed, any other entry granting access (after the mask) is
/// not.
std::string others_with_access(int fd, const struct stat& st, bool group_read) {
  const mode_t refused = S_IRWXO | S_IWGRP | S_IXGRP
                         | (group_read ? mode_t{0} : mode_t{S_IRGRP});
  int extended = acl_extended_fd(fd);
  if (extended <= 0) // none, or a filesystem without ACLs
    return (st.st_mode & refused) == 0 ? "" : "group or others";
  acl_guard a{acl_get_fd(fd)};
  if (a.acl == nullptr)
    return std::string{"an ACL that cannot be read: "} + std::strerror(errno);
  // The mask bounds every named entry and the owning group; without a mask
  // (not possible with named entries) nothing is bounded.
  int mask = ACL_READ | ACL_WRITE | ACL_EXECUTE;
  auto perms_of = [](acl_entry_t e) {
    acl_permset_t set = nullptr;
    if (acl_get_permset(e, &set) != 0)
      return ACL_READ | ACL_WRITE | ACL_EXECUTE; // assume the worst
    int out = 0;
    for (int p : {ACL_READ, ACL_WRITE, ACL_EXECUTE})
      if (acl_get_perm(set, static_cast<acl_perm_t>(p)) == 1)
        out |= p;
    return out;
  };
  acl_entry_t e = nullptr;
  for (int r = acl_get_entry(a.acl, ACL_FIRST_ENTRY, &e); r == 1;
       r = acl_get_entry(a.acl, ACL_NEXT_ENTRY, &e)) {
    acl_tag_t tag = ACL_UNDEFINED_TAG;
    if (acl_get_tag_type(e, &tag) == 0 && tag == ACL_MASK)
      mask = perms_of(e);
  }
  for (int r = acl_get_entry(a.acl, ACL_FIRST_ENTRY, &e); r == 1;
       r = acl_get_entry(a.acl, ACL_NEXT_ENTRY, &e)) {
    acl_tag_t tag = ACL_UNDEFINED_TAG;
    if (acl_get_tag_type(e, &tag) != 0)
      return "an ACL entry that cannot be read";
    int perms = perms_of(e);
    switch (tag) {
      case ACL_USER_OBJ:
      case ACL_MASK:
        break;
      case ACL_OTHER:
        if (perms != 0)
          return "others";
        break;
      case ACL_GROUP_OBJ:
        if ((perms & mask & ~(group_read ? ACL_READ : 0)) != 0)
          return "its group";
        break;
      case ACL_USER:
      case ACL_GROUP: {
        if ((perms & mask) == 0)
          break;
        auto* id = acl_get_qualifier(e);
        if (id == nullptr)
          return "an ACL entry that cannot be read";
        auto n = tag == ACL_USER ? *static_cast<uid_t*>(id)
                                 : *static_cast<gid_t*>(id);
        acl_free(id);
        if (tag == ACL_USER && n == ::geteuid())
          break;
        return (tag == ACL_USER ? "uid " : "gid ") + std::to_string(n)
               + " through its ACL";
      }
      default:
        return "an ACL entry of an unknown kind";
    }
  }
  return "";
}

} // namespace

caf::expected<std::string> read_secret_file(const std::filesystem::path& path,
                                            std::string_view what,
                                            const secret_file_rules& rules) {
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
  if (auto who = others_with_access(f.fd, st, rules.group_read); !who.empty())
    return bad_file(what, path,
                    (rules.group_read ? "open to " : "readable or writable by ")
                      + who + "; chmod 600 it (and remove other ACL entries)");
  if (st.st_size <= 0)
    return bad_file(what, path, "empty");
  if (static_cast<size_t>(st.st_size) > rules.max_bytes)
    return bad_file(
      what, path, "larger than " + std::to_string(rules.max_bytes) + " bytes");
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
  while (rules.strip_newlines && !out.empty()
         && (out.back() == '\n' || out.back() == '\r'))
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
    if (n <= 0) {
      ::unlink(path.c_str()); // no half-written secret left to be read
      return bad_file(what, path, "cannot write it whole");
    }
    put += static_cast<size_t>(n);
  }
  if (::fsync(f.fd) != 0) {
    auto err = errno;
    ::unlink(path.c_str());
    return bad_file(what, path, std::strerror(err));
  }
  return caf::none;
}

} // namespace hsm
