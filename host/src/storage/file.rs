//! The log's file: redb's own file backend, plus a thread that writes zeros into the space the
//! file grows by, ahead of redb.
//!
//! redb grows its file with `set_len`, which leaves a hole. A commit writing pages into the
//! hole makes ext4 allocate their blocks, and its `fdatasync` then writes that metadata (the
//! inode, the block bitmaps) and waits for it, besides the data and the cache flush: two more
//! device round trips and context switches on every commit while the log grows, which is
//! always. Pages already written (with zeros) are plain overwrites. redb doubles its file, so
//! the zeros are written by a thread of their own rather than in the commit that grows it.
//!
//! The zeros bypass the page cache (`O_DIRECT`): written through it, they cost enough CPU per
//! byte to lose more than the commits gained when the log grows fast (the batch endpoint).
//!
//! The filler never writes where redb has written: the space is split in chunks, and a chunk
//! redb writes to before the filler reaches it is skipped (left to be allocated the old way).
//! Both sides decide under one lock; redb's writes below the filled mark take no lock.

use std::collections::BTreeSet;
use std::fs::File;
use std::ops::Bound;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::Context;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// The filler's unit: zeros are written a chunk at a time, straight to the disk (or written back
/// at once), so a commit's `fdatasync` never finds more than one chunk of them dirty; a chunk
/// redb wrote into first is skipped whole.
const CHUNK: u64 = 1 << 20;
/// The filler makes its work durable (the blocks' allocation, with one `fdatasync`) every this
/// many bytes, and when it has caught up: a commit in between may write that metadata for it.
const SYNC_EVERY: u64 = 8 << 20;
/// The filler rests this long between chunks (at most 500 MiB/s of zeros): it only has to stay
/// ahead of the log, and the disk's other user is every commit.
const PACE: std::time::Duration = std::time::Duration::from_millis(2);

#[derive(Debug)]
pub(super) struct LogFile {
    inner: FileBackend,
    fill: Arc<Fill>,
}

#[derive(Debug)]
struct Fill {
    /// Everything below this offset is either redb's or zeros written by the filler.
    filled: AtomicU64,
    state: Mutex<FillState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct FillState {
    /// The file's length: the filler works on `[filled, end)`.
    end: u64,
    /// Chunks at or above `filled` that redb has written into.
    taken: BTreeSet<u64>,
    closed: bool,
}

impl LogFile {
    pub fn open(path: &Path) -> anyhow::Result<LogFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        let zeros = Zeros::new(path, file.try_clone()?);
        let inner = FileBackend::new(file)?;
        let fill = Arc::new(Fill {
            filled: AtomicU64::new(len),
            state: Mutex::new(FillState {
                end: len,
                ..FillState::default()
            }),
            wake: Condvar::new(),
        });
        let filler = fill.clone();
        std::thread::Builder::new()
            .name("log-file-fill".into())
            .spawn(move || filler.run(zeros))
            .context("starting the log file's filler thread")?;
        Ok(LogFile { inner, fill })
    }

    /// Blocks until the filler has caught up with the file's length (tests).
    #[cfg(test)]
    fn wait_filled(&self) {
        let mut state = self.fill.lock();
        while self.fill.filled.load(Ordering::Acquire) < state.end {
            state = self
                .fill
                .wake
                .wait_timeout(state, std::time::Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Fill {
    fn lock(&self) -> MutexGuard<'_, FillState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, mut zeros: Zeros) {
        let mut unsynced = 0;
        loop {
            let mut state = self.lock();
            let mut at = self.filled.load(Ordering::Acquire);
            while !state.closed && at >= state.end {
                if unsynced > 0 {
                    drop(state);
                    // A failure here is redb's to see at its own next sync.
                    let _ = zeros.file.sync_data();
                    unsynced = 0;
                    state = self.lock();
                } else {
                    state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                at = self.filled.load(Ordering::Acquire);
            }
            if state.closed {
                return;
            }
            // One chunk (or the part of it from `at`) per turn of the lock.
            let chunk = at / CHUNK;
            let next = ((chunk + 1) * CHUNK).min(state.end);
            let zeroed = !state.taken.remove(&chunk);
            if zeroed && zeros.write(at, next - at).is_err() {
                // Leave the rest as holes: redb still works on them, only slower, and any
                // real trouble with the disk reaches redb through its own writes.
                return;
            }
            self.filled.store(next, Ordering::Release);
            drop(state);
            if zeroed {
                unsynced += next - at;
                if unsynced >= SYNC_EVERY {
                    let _ = zeros.file.sync_data();
                    unsynced = 0;
                }
                std::thread::sleep(PACE);
            }
        }
    }
}

/// The filler's writes: with `O_DIRECT` where the file system allows it (the zeros go to the
/// disk without passing through the page cache, at a tenth of the CPU), else buffered and
/// written back at once.
struct Zeros {
    file: File,
    direct: Option<File>,
    buf: Vec<u8>,
}

/// `O_DIRECT` wants the buffer, offset and length aligned to the logical block size; redb's
/// pages are multiples of this.
const ALIGN: usize = 4096;

impl Zeros {
    fn new(path: &Path, file: File) -> Zeros {
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Zeros {
            file,
            direct,
            buf: vec![0u8; CHUNK as usize + ALIGN],
        }
    }

    fn write(&mut self, at: u64, len: u64) -> std::io::Result<()> {
        let skip = self.buf.as_ptr().align_offset(ALIGN);
        let zeros = &self.buf[skip..skip + len as usize];
        let aligned = at.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN as u64);
        if let (Some(direct), true) = (&self.direct, aligned) {
            match direct.write_all_at(zeros, at) {
                Ok(()) => return Ok(()),
                // Not on this file system after all: buffered from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(zeros, at)?;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // Written back now (no flush, no metadata), so that no commit's fdatasync finds them
        // dirty. SAFETY: a plain syscall on a descriptor `self.file` keeps open.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), at as i64, len as i64, flags);
        }
        Ok(())
    }
}

impl StorageBackend for LogFile {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut state = self.fill.lock();
        self.inner.set_len(len)?;
        state.end = len;
        if self.fill.filled.load(Ordering::Acquire) > len {
            self.fill.filled.store(len, Ordering::Release);
        }
        state.taken.retain(|&c| c * CHUNK < len);
        self.fill.wake.notify_all();
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        if end > self.fill.filled.load(Ordering::Acquire) {
            // Claim the chunks first: once claimed, the filler never writes there, and it is
            // not writing there now (it holds the lock while it writes).
            let mut state = self.fill.lock();
            let filled = self.fill.filled.load(Ordering::Acquire);
            let from = offset.max(filled);
            if from < end {
                state.taken.extend(from / CHUNK..=(end - 1) / CHUNK);
            }
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.fill.lock().closed = true;
        self.fill.wake.notify_all();
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        self.fill.lock().closed = true;
        self.fill.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn grown_space_is_written_with_zeros_around_what_redb_wrote() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let f = LogFile::open(&path)?;
        f.set_len(CHUNK / 2)?;
        f.wait_filled();
        f.write(0, b"head")?;
        let len = 6 * CHUNK + 123;
        f.set_len(len)?;
        // Written by "redb" right after the growth, in a chunk the filler may not have reached.
        f.write(3 * CHUNK + 10, b"redb's page")?;
        f.wait_filled();
        f.write(5 * CHUNK, b"later")?;
        f.sync_data()?;

        let mut buf = vec![0u8; 11];
        f.read(3 * CHUNK + 10, &mut buf)?;
        assert_eq!(buf, b"redb's page");
        f.read(5 * CHUNK, &mut buf[..5])?;
        assert_eq!(&buf[..5], b"later");
        f.read(0, &mut buf[..4])?;
        assert_eq!(&buf[..4], b"head");
        let all = std::fs::read(&path)?;
        assert_eq!(all.len() as u64, len);
        let nonzero = all.iter().filter(|&&b| b != 0).count();
        assert_eq!(
            nonzero,
            4 + 11 + 5,
            "the filler overwrote nothing but holes"
        );
        // The space is allocated, not a hole: at most the chunk "redb" took is left sparse.
        let allocated = std::fs::metadata(&path)?.blocks() * 512;
        assert!(
            allocated >= len - CHUNK,
            "{allocated} bytes allocated of {len}"
        );
        Ok(())
    }

    #[test]
    fn shrinking_and_growing_again_fills_the_new_space() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let f = LogFile::open(&path)?;
        f.set_len(4 * CHUNK)?;
        f.wait_filled();
        f.set_len(CHUNK / 2)?;
        f.set_len(3 * CHUNK)?;
        f.wait_filled();
        let allocated = std::fs::metadata(&path)?.blocks() * 512;
        assert!(allocated >= 3 * CHUNK, "{allocated} bytes allocated");
        assert!(std::fs::read(&path)?.iter().all(|&b| b == 0));
        Ok(())
    }
}
