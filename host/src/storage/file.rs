//! The log's file: redb's own file backend, plus a thread that writes zeros into the space the
//! file grows by, ahead of redb.
//!
//! redb grows its file with `set_len`, which leaves a hole. A commit writing pages into the
//! hole makes ext4 allocate their blocks, and its `fdatasync` then writes that metadata (the
//! inode, the block bitmaps) and waits for it, besides the data and the cache flush: two more
//! device round trips and context switches on every commit while the log grows, which is
//! always. Pages already written (with zeros) are plain overwrites. redb doubles its file, so
//! the zeros are written by a thread of their own rather than in the commit that grows it, and
//! only up to `AHEAD` past redb's highest write, so the disk space taken early stays bounded.
//! (On copy-on-write file systems, btrfs or zfs, an overwrite allocates anyway: there the zeros
//! gain nothing.)
//!
//! The zeros bypass the page cache (`O_DIRECT`): written through it, they cost enough CPU per
//! byte to lose more than the commits gained when the log grows fast (the batch endpoint).
//!
//! The filler never writes where redb has written: the space is split in chunks, and a chunk
//! redb writes to before the filler reaches it is skipped (left to be allocated the old way).
//! Both sides decide under one lock; redb's writes below the filled mark take no lock, and
//! the filler writes outside it, marking the one chunk it is writing as busy.

use std::collections::BTreeSet;
use std::fs::File;
use std::ops::Bound;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// The filler's unit: zeros are written a chunk at a time, straight to the disk (or written
/// back at once), so a commit's `fdatasync` never finds more than one chunk of them dirty; a
/// chunk redb wrote into first is skipped whole.
const CHUNK: u64 = 256 << 10;
/// The filler stays at most this far past the end of redb's highest write.
const AHEAD: u64 = 64 << 20;
/// The filler makes its work durable (the blocks' allocation, with one `fdatasync`) every this
/// many bytes, and when it has caught up: a commit in between may write that metadata for it.
const SYNC_EVERY: u64 = 8 << 20;
/// The filler rests this long between chunks (at most 256 MiB/s of zeros): it only has to stay
/// ahead of the log, and the disk's other user is every commit.
const PACE: Duration = Duration::from_millis(1);
/// How often a filler held back by `AHEAD` looks at redb's progress again.
const RECHECK: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub(super) struct LogFile {
    inner: FileBackend,
    fill: Arc<Fill>,
}

#[derive(Debug)]
struct Fill {
    /// The filler never writes below this offset (`u64::MAX` once it has stopped). Below it is
    /// redb's data, zeros, or the holes the filler skipped or found at open.
    filled: AtomicU64,
    /// The end of redb's highest write.
    high: AtomicU64,
    state: Mutex<FillState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct FillState {
    /// The file's length: the filler works on `[filled, end)`.
    end: u64,
    /// Chunks at or above `filled` that redb has written into.
    taken: BTreeSet<u64>,
    /// The chunk the filler is writing now, outside the lock.
    busy: Option<u64>,
    stopped: bool,
    /// Tests hold the filler back to place redb's writes ahead of it.
    #[cfg(test)]
    hold: bool,
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
        let inner = FileBackend::new(file)?;
        let zeros = Zeros::open(path)?;
        let fill = Arc::new(Fill {
            filled: AtomicU64::new(len),
            high: AtomicU64::new(len),
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
}

impl Fill {
    fn lock(&self) -> MutexGuard<'_, FillState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, FillState>) -> MutexGuard<'a, FillState> {
        self.wake.wait(state).unwrap_or_else(|e| e.into_inner())
    }

    /// The filler is gone for good: every later write takes the lock-free path.
    fn stop(&self, state: &mut FillState) {
        state.stopped = true;
        state.taken.clear();
        self.filled.store(u64::MAX, Ordering::Release);
        self.wake.notify_all();
    }

    /// How far the filler may go now: the file's end, and no more than `AHEAD` past redb's
    /// highest write.
    fn limit(&self, state: &FillState) -> u64 {
        state
            .end
            .min(self.high.load(Ordering::Acquire).saturating_add(AHEAD))
    }

    fn run(&self, mut zeros: Zeros) {
        let mut unsynced = 0;
        loop {
            let mut state = self.lock();
            let (at, next) = loop {
                if state.stopped {
                    return;
                }
                let at = self.filled.load(Ordering::Acquire);
                let limit = self.limit(&state);
                #[cfg(test)]
                let limit = if state.hold { 0 } else { limit };
                if at < limit {
                    break (at, ((at / CHUNK + 1) * CHUNK).min(state.end));
                }
                if unsynced > 0 {
                    drop(state);
                    zeros.sync();
                    unsynced = 0;
                    state = self.lock();
                } else if at < state.end {
                    // Held back by `AHEAD`: redb's writes do not wake the filler.
                    state = self
                        .wake
                        .wait_timeout(state, RECHECK)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                } else {
                    state = self.wait(state);
                }
            };
            let chunk = at / CHUNK;
            if state.taken.remove(&chunk) {
                self.filled.store(next, Ordering::Release);
                continue;
            }
            state.busy = Some(chunk);
            drop(state);
            let written = zeros.write(at, next - at);
            let mut state = self.lock();
            state.busy = None;
            self.wake.notify_all();
            if state.stopped {
                return;
            }
            if let Err(e) = written {
                // The rest stays holes: redb works on them as before, only slower.
                tracing::warn!(error = %e, "writing zeros ahead of the log failed; stopping");
                self.stop(&mut state);
                return;
            }
            self.filled.store(next, Ordering::Release);
            drop(state);
            unsynced += next - at;
            if unsynced >= SYNC_EVERY {
                zeros.sync();
                unsynced = 0;
            }
            std::thread::sleep(PACE);
        }
    }
}

/// The filler's writes, through file descriptions of its own (so a write-back error on redb's
/// pages is still reported to redb's `fdatasync`, not consumed by the filler's): with
/// `O_DIRECT` where the file system allows it (the zeros go to the disk without passing
/// through the page cache, at a tenth of the CPU), else buffered and written back at once.
struct Zeros {
    file: File,
    direct: Option<File>,
    buf: Vec<u8>,
}

/// `O_DIRECT` wants the buffer, offset and length aligned to the logical block size; redb's
/// pages are multiples of this.
const ALIGN: usize = 4096;

impl Zeros {
    fn open(path: &Path) -> anyhow::Result<Zeros> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {} for its filler", path.display()))?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(Zeros {
            file,
            direct,
            buf: vec![0u8; CHUNK as usize + ALIGN],
        })
    }

    fn write(&mut self, at: u64, len: u64) -> std::io::Result<()> {
        let skip = (ALIGN - self.buf.as_ptr() as usize % ALIGN) % ALIGN;
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

    /// Makes the zeros' allocation durable. A failure costs only speed (a commit writes that
    /// metadata itself), and through its own file description it hides nothing from redb.
    fn sync(&self) {
        if let Err(e) = self.file.sync_data() {
            tracing::warn!(error = %e, "syncing the zeros ahead of the log failed");
        }
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
        // A chunk written past a shrink would lengthen the file again.
        while state.busy.is_some() {
            state = self.fill.wait(state);
        }
        self.inner.set_len(len)?;
        if !state.stopped {
            state.end = len;
            if self.fill.filled.load(Ordering::Acquire) > len {
                self.fill.filled.store(len, Ordering::Release);
            }
            state.taken.retain(|&c| c * CHUNK < len);
            self.fill.wake.notify_all();
        }
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        if end > self.fill.filled.load(Ordering::Acquire) {
            // Claim the chunks first: once claimed, the filler never writes there. A chunk it
            // is writing now is waited for (it is then below `filled`).
            let mut state = self.fill.lock();
            loop {
                let filled = self.fill.filled.load(Ordering::Acquire);
                if end <= filled {
                    break;
                }
                let chunks = offset.max(filled) / CHUNK..=(end - 1) / CHUNK;
                if state.busy.is_some_and(|b| chunks.contains(&b)) {
                    state = self.fill.wait(state);
                    continue;
                }
                state.taken.extend(chunks);
                break;
            }
        }
        self.fill.high.fetch_max(end, Ordering::AcqRel);
        self.inner.write(offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.fill.stop(&mut self.fill.lock());
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
        self.fill.stop(&mut self.fill.lock());
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;

    use super::*;

    impl LogFile {
        fn hold(&self, hold: bool) {
            self.fill.lock().hold = hold;
            self.fill.wake.notify_all();
        }

        /// Waits until the filler has caught up with the file's length or `AHEAD`.
        fn wait_filled(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let state = self.fill.lock();
                let limit = self.fill.limit(&state);
                let filled = self.fill.filled.load(Ordering::Acquire);
                assert!(!state.stopped, "the filler stopped");
                if filled >= limit && state.busy.is_none() {
                    return;
                }
                drop(state);
                assert!(Instant::now() < deadline, "the filler is stuck at {filled}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// An empty log file in a directory of its own (dropped with the directory guard).
    fn new_file() -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf, LogFile)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let f = LogFile::open(&path)?;
        Ok((dir, path, f))
    }

    fn allocated(path: &Path) -> std::io::Result<u64> {
        Ok(std::fs::metadata(path)?.blocks() * 512)
    }

    #[test]
    fn grown_space_is_written_with_zeros_around_what_redb_wrote() -> anyhow::Result<()> {
        let (_dir, path, f) = new_file()?;
        f.set_len(CHUNK / 2)?;
        f.wait_filled();
        f.write(0, b"head")?;
        // "redb" writes into the grown space before the filler gets there.
        f.hold(true);
        let len = 6 * CHUNK + 123;
        f.set_len(len)?;
        f.write(3 * CHUNK + 10, b"redb's page")?;
        f.hold(false);
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
        // Allocated, except the chunk "redb" took first: that one is still mostly a hole.
        let allocated = allocated(&path)?;
        assert!(
            allocated >= len - CHUNK,
            "{allocated} bytes allocated of {len}"
        );
        assert!(
            allocated < len,
            "the taken chunk was skipped: {allocated} of {len}"
        );
        Ok(())
    }

    #[test]
    fn shrinking_and_growing_again_fills_the_new_space() -> anyhow::Result<()> {
        let (_dir, path, f) = new_file()?;
        f.set_len(4 * CHUNK)?;
        f.wait_filled();
        f.set_len(CHUNK / 2)?;
        f.set_len(3 * CHUNK)?;
        f.wait_filled();
        assert!(allocated(&path)? >= 3 * CHUNK);
        assert!(std::fs::read(&path)?.iter().all(|&b| b == 0));
        Ok(())
    }

    #[test]
    fn the_filler_stays_within_reach_of_redbs_writes() -> anyhow::Result<()> {
        let (_dir, path, f) = new_file()?;
        let len = 4 * AHEAD;
        f.set_len(len)?;
        f.wait_filled();
        let first = allocated(&path)?;
        assert!((AHEAD..AHEAD + CHUNK).contains(&first), "{first} allocated");
        f.write(AHEAD, b"redb moved on")?;
        f.wait_filled();
        let then = allocated(&path)?;
        assert!(then >= 2 * AHEAD && then < len, "{then} allocated");
        Ok(())
    }
}
