//! Small file-system helpers shared by the storage files: durable replace, directory sync,
//! vectored appends.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Makes a directory's entries (creations, renames, deletions) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| Error::io("open directory", dir, e))?;
    f.sync_all()
        .map_err(|e| Error::io("sync directory", dir, e))
}

/// Replaces `path` with `bytes` atomically and durably: write a temporary, sync, rename, sync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_data().map_err(|e| Error::io("sync", &tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Writes every slice to a file opened in append mode, retrying short writes.
pub(crate) fn append_all(mut file: &File, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `pos`, or fewer only at end of file.
pub(crate) fn read_at_most(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Checks the `u32 magic, u32 version` that open every file of ours (`bytes` holds at least 8).
pub(crate) fn check_file_header(
    bytes: &[u8],
    path: &Path,
    magic: u32,
    version: u32,
) -> crate::error::Result<()> {
    if le_u32(bytes, 0) != magic {
        let found = le_u32(bytes, 0);
        return Err(Error::corrupt(
            path,
            0,
            crate::error::Corruption::BadMagic { found },
        ));
    }
    if le_u32(bytes, 4) != version {
        return Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            found: le_u32(bytes, 4),
            supported: version,
        });
    }
    Ok(())
}

/// Little-endian readers over a slice the caller has already length-checked.
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
