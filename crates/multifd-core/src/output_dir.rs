//! Files whose names come from input (block names), created inside a directory the user named:
//! relative to a descriptor of that directory, never through a link, never over an existing
//! file. Each is written under a partial name and moved into place without replacing anything;
//! partial files not moved into place are removed when the [`OutputDir`] is dropped.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorCode, Result, fail};

/// A block name as a file name: bytes other than ASCII letters, digits, `.`, `_`, `-` and `@`
/// become `%XX`, and the names `.` and `..` become `%2E` and `%2E%2E`.
pub fn file_name_for(block: &str) -> String {
    if block == "." || block == ".." {
        return block.replace('.', "%2E");
    }
    let mut out = String::with_capacity(block.len());
    for &b in block.as_bytes() {
        if b.is_ascii_alphanumeric() || b"._@-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn cstr(name: &str) -> CString {
    // file_name_for never yields a NUL byte (it is escaped).
    CString::new(name).expect("escaped file names hold no NUL")
}

fn io_err(what: &str, path: &Path, e: io::Error) -> Error {
    let code = if e.raw_os_error() == Some(libc::ENOSPC) { ErrorCode::NoSpace } else { ErrorCode::Io };
    Error::new(code, format!("{what} {}: {e}", path.display()))
}

struct Partial {
    name: String,
    partial: String,
    committed: bool,
}

/// A directory receiving files named from input.
pub struct OutputDir {
    dir: OwnedFd,
    path: PathBuf,
    partials: Vec<Partial>,
}

impl OutputDir {
    /// Opens (creating it if needed) the directory the user named.
    pub fn open(path: &Path) -> Result<OutputDir> {
        std::fs::create_dir_all(path).map_err(|e| io_err("create directory", path, e))?;
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::new(ErrorCode::InvalidArgument, format!("{} holds a NUL byte", path.display())))?;
        // SAFETY: a valid C string; the returned descriptor is checked and then owned.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io_err("open directory", path, io::Error::last_os_error()));
        }
        // SAFETY: fd was just opened by us and is owned by nothing else.
        Ok(OutputDir { dir: unsafe { OwnedFd::from_raw_fd(fd) }, path: path.to_path_buf(), partials: Vec::new() })
    }

    fn exists(&self, name: &str) -> Result<Option<bool>> {
        let c = cstr(name);
        // SAFETY: stat is plain data; fstatat writes only into it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid directory descriptor and C string; AT_SYMLINK_NOFOLLOW stats a link itself.
        if unsafe { libc::fstatat(self.dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } == 0 {
            return Ok(Some(st.st_mode & libc::S_IFMT == libc::S_IFLNK));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(io_err("stat", &self.path.join(name), e)) }
    }

    /// Refuses a file name that already exists in the directory, a symbolic link included.
    pub fn check_free(&self, name: &str) -> Result<()> {
        match self.exists(name)? {
            None => Ok(()),
            Some(link) => fail!(OutputExists, "{} already exists{}; remove it or choose another directory", self.path.join(name).display(), if link { " as a symbolic link (not followed)" } else { "" }),
        }
    }

    /// Creates the partial file for output `name` (a new regular file, never through a link).
    pub fn create(&mut self, name: &str) -> Result<File> {
        self.check_free(name)?;
        let mut partial = format!(".{name}.multifd-partial-{}", std::process::id());
        if partial.len() > 255 {
            partial = format!(".multifd-partial-{}-{}", std::process::id(), self.partials.len());
        }
        let c = cstr(&partial);
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let open = || {
            // SAFETY: a valid directory descriptor and C string; the descriptor is checked below.
            let fd = unsafe { libc::openat(self.dir.as_raw_fd(), c.as_ptr(), flags, 0o644 as libc::c_uint) };
            // SAFETY: fd was just opened by us and is owned by nothing else.
            if fd < 0 { Err(io::Error::last_os_error()) } else { Ok(unsafe { File::from_raw_fd(fd) }) }
        };
        let file = match open() {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // Left by a process that had this pid: ours to replace (unlinking a link never
                // touches its target).
                // SAFETY: a valid directory descriptor and C string.
                unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) };
                open()
            }
            r => r,
        }
        .map_err(|e| io_err("create", &self.path.join(&partial), e))?;
        self.partials.push(Partial { name: name.to_string(), partial, committed: false });
        Ok(file)
    }

    /// Moves every partial file into place, replacing nothing (ERR_MULTIFD_OUTPUT_EXISTS when
    /// a name appeared meanwhile). Returns the final paths, in creation order.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        let dir = self.dir.as_raw_fd();
        let mut done = Vec::with_capacity(self.partials.len());
        for p in &mut self.partials {
            let (from, to) = (cstr(&p.partial), cstr(&p.name));
            // SAFETY: valid descriptors and C strings.
            let mut r = unsafe { libc::renameat2(dir, from.as_ptr(), dir, to.as_ptr(), libc::RENAME_NOREPLACE) };
            if r != 0 && matches!(io::Error::last_os_error().raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
                // A filesystem without RENAME_NOREPLACE: a hard link does not replace either.
                // SAFETY: valid descriptors and C strings.
                r = unsafe { libc::linkat(dir, from.as_ptr(), dir, to.as_ptr(), 0) };
                if r == 0 {
                    // SAFETY: valid descriptor and C string.
                    unsafe { libc::unlinkat(dir, from.as_ptr(), 0) };
                }
            }
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EEXIST) {
                    fail!(OutputExists, "{} appeared while it was being written; the result was not moved into place", self.path.join(&p.name).display());
                }
                return Err(io_err("rename into place", &self.path.join(&p.name), e));
            }
            p.committed = true;
            done.push(self.path.join(&p.name));
        }
        Ok(done)
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        for p in self.partials.iter().filter(|p| !p.committed) {
            let c = cstr(&p.partial);
            // SAFETY: valid descriptor and C string; a failure leaves nothing to do.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_escape_what_is_not_portable() {
        assert_eq!(file_name_for("pc.ram"), "pc.ram");
        assert_eq!(file_name_for("/rom@etc/acpi tables"), "%2From@etc%2Facpi%20tables");
        assert_eq!(file_name_for(".."), "%2E%2E");
        assert_eq!(file_name_for("é"), "%C3%A9");
    }
}
