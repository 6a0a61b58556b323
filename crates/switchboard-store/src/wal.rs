//! The sync of SQLite's write-ahead log that makes committed append batches durable.
//!
//! An append batch commits with `synchronous=NORMAL`: SQLite writes the batch's frames to the log
//! (`<database>-wal`) without waiting for the disk. [`WalSync::sync`] then flushes the log file
//! (`fdatasync`), and the batch's callers are answered only after it (see `batch`): from the sync thread
//! while the writer goes on with the next batch, or from the writer itself when no other append waits.
//! This is what `synchronous=FULL` does inside the commit, moved off the writer's path, and one flush
//! covers every batch committed before it:
//!
//! - the log is written in order and a flush covers every write before it, so a batch is on the disk
//!   whole once a flush begun after its commit returns;
//! - recovery replays the log's frames up to the first one whose checksum chain breaks: a crash never
//!   leaves a later batch without an earlier one;
//! - a checkpoint (run with `synchronous=FULL` on a reader connection) flushes the log before it copies
//!   frames into the database, and the database after; SQLite starts the log over only after a complete
//!   checkpoint.
//!
//! The log file is the same for the store's whole life: SQLite removes it only when the last connection
//! closes, and the store keeps its connections open until it is closed. So the file is identified (device
//! and inode) at the first sync, its directory flushed, and every later sync checks that the log's path
//! still names it. A log that is missing, a file at its path that is not the one the writer's connection
//! writes (the log was removed, and a connection opened since made a new one: the writer's frames went to
//! the old file, which is gone at the next start), or a flush that fails, fails the sync: nothing committed
//! since the last sync is then known to be on the disk, nor anything the log held.
//!
//! One thing differs from `FULL`: a read connection sees a batch from its commit, before the sync, so a read
//! of the log in that window (well under a millisecond; a resume, an actor activated) can show events whose
//! appends are not answered yet. Only a crash of the machine (not of the process: the written log is in
//! the operating system's cache) in that window could take them back.
//!
//! Only the append writer's own connection runs with `NORMAL`. Other writes (leases, tickets, the license
//! limit) keep `synchronous=FULL`, set by the options of the other connections.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rustix::fs::{AtFlags, CWD, StatxFlags, makedev, statx};
use rustix::io::Errno;
use switchboard_proto::store::StoreError;

/// Flushes the write-ahead log of one SQLite database file.
#[derive(Debug)]
pub(crate) struct WalSync {
    path: PathBuf,
    /// The log file, with its identity, once opened.
    file: Mutex<Option<(File, Identity)>>,
}

/// A file's device and inode, as `stat` gives them.
type Identity = (u64, u64);

/// The identity of the file at `path`, asking for nothing else.
///
/// Not `std::fs::metadata`, which asks for the file's times too: since Linux 6.13 a file whose times were
/// asked for gets a fine-grained time at its next write (multigrain timestamps), so the first write to the
/// log after each sync moved its modification time and dirtied its inode. On this project's machine (ext4
/// without a journal) the next flush then wrote the inode's block too, a device round trip before the flush
/// itself: at 5,000 messages/s some 1,180 such writes a second, 280 once only the inode is asked for (the
/// coarse clock's ticks). `benches/README.md` has the measurements.
fn identity_at(path: &Path) -> std::io::Result<Identity> {
    match statx(CWD, path, AtFlags::empty(), StatxFlags::INO) {
        Ok(found) => Ok((makedev(found.stx_dev_major, found.stx_dev_minor), found.stx_ino)),
        // A kernel without `statx` (before 4.11), or a sandbox that forbids it.
        Err(Errno::NOSYS | Errno::PERM) => std::fs::metadata(path).map(|found| (found.dev(), found.ino())),
        Err(errno) => Err(errno.into()),
    }
}

impl WalSync {
    /// The log of the database file `database`.
    pub(crate) fn new(database: &Path) -> Arc<WalSync> {
        let mut path = database.as_os_str().to_owned();
        path.push("-wal");
        Arc::new(WalSync { path: PathBuf::from(path), file: Mutex::new(None) })
    }

    /// Flushes the log: every batch committed before the call is durable once it returns `Ok`. Blocks
    /// (the append writer's threads call it).
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        let failed = |what: &str, error: std::io::Error| {
            StoreError::Unavailable(format!("{what} {}: {error}", self.path.display()))
        };
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let on_disk = identity_at(&self.path).map_err(|error| failed("cannot find the log", error))?;
        if let Some((_, opened)) = file.as_ref()
            && *opened != on_disk
        {
            let replaced = std::io::Error::other("another file is at its path now: the log was removed");
            return Err(failed("cannot find the log", replaced));
        }
        if file.is_none() {
            let opened = File::open(&self.path).map_err(|error| failed("cannot open the log", error))?;
            // Only at the open, so `stat`'s times here cost one fine-grained stamp, not one per sync. The open
            // file's own identity, not the path's above: the file may have been replaced in between.
            let metadata = opened.metadata().map_err(|error| failed("cannot read the log", error))?;
            // The log's directory entry is durable too.
            if let Some(directory) = self.path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                File::open(directory)
                    .and_then(|directory| directory.sync_all())
                    .map_err(|error| failed("cannot flush the directory of the log", error))?;
            }
            *file = Some((opened, (metadata.dev(), metadata.ino())));
        }
        let Some((opened, _)) = file.as_ref() else {
            return Err(StoreError::Unavailable("the log is not open".into()));
        };
        opened.sync_data().map_err(|error| failed("cannot flush the log", error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(log: &WalSync) -> Option<Identity> {
        log.file.lock().unwrap().as_ref().map(|(_, identity)| *identity)
    }

    /// The log is known by its inode: a sync flushes the file first found at the log's path, and fails when
    /// another file is there now (the log was removed and made again: what the writer wrote went to the old
    /// one), or none.
    #[test]
    fn a_sync_flushes_the_file_at_the_logs_path_now() {
        let directory = tempfile::tempdir().unwrap();
        let database = directory.path().join("store.db");
        let path = directory.path().join("store.db-wal");
        let log = WalSync::new(&database);

        std::fs::write(&path, b"first").unwrap();
        log.sync().unwrap();
        let first = held(&log).unwrap();
        let stat = std::fs::metadata(&path).unwrap();
        assert_eq!(first, (stat.dev(), stat.ino()), "the file at the log's path is held, known as `stat` knows it");

        // Created before the old one goes, so that the new file cannot take the old inode number.
        let replacement = directory.path().join("replacement");
        std::fs::write(&replacement, b"second").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        let replaced = log.sync();
        assert!(
            matches!(replaced, Err(StoreError::Unavailable(ref why))
                if why.starts_with("cannot find the log") && why.contains("another file is at its path")),
            "{replaced:?}"
        );
        assert_eq!(held(&log), Some(first), "the first log is still the one known");

        std::fs::remove_file(&path).unwrap();
        let missing = log.sync();
        assert!(
            matches!(missing, Err(StoreError::Unavailable(ref why)) if why.starts_with("cannot find the log")),
            "{missing:?}"
        );
    }
}
