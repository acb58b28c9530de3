//! File-system durability helpers for on-disk state: reserving a file's blocks up front and
//! making a folder's entries (created, renamed, removed files) durable.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Reserves blocks so that `file` is at least `len` bytes long, the new bytes reading as
/// zeros (fallocate(2), mode 0). A full disk fails here, with ENOSPC, rather than at a later
/// write into the reserved range.
pub fn reserve(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length out of range"))?;
    if len == 0 {
        return Ok(());
    }
    nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        len,
    )?;
    Ok(())
}

/// fsync(2) on a folder: its entries as they are now survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
