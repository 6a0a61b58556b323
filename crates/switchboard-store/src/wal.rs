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
//! closes, and the store keeps its connections open until it is closed. Should it be replaced all the same, the new file
//! is opened (its inode differs) and its directory flushed. A log that is missing, or a flush that fails,
//! fails the sync: nothing committed since the last sync is then known to be on the disk.
//!
//! One thing differs from `FULL`: a read connection sees a batch from its commit, before the sync, so a read
//! of the log in that window (well under a millisecond; a resume, an actor activated) can show events whose
//! appends are not answered yet. Only a crash of the machine (not of the process: the written log is in
//! the operating system's cache) in that window could take them back.
//!
//! Only the append writer's own connection runs with `NORMAL`. Other writes (leases, tickets, the license
//! limit) keep `synchronous=FULL`, set by the options of the other connections.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use switchboard_proto::store::StoreError;

/// Flushes the write-ahead log of one SQLite database file.
#[derive(Debug)]
pub(crate) struct WalSync {
    path: PathBuf,
    /// The log file, with its device and inode, once opened.
    file: Mutex<Option<(File, (u64, u64))>>,
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
        let on_disk = std::fs::metadata(&self.path).map_err(|error| failed("cannot find the log", error))?;
        let identity = (on_disk.dev(), on_disk.ino());
        if file.as_ref().is_none_or(|(_, opened)| *opened != identity) {
            let opened = File::open(&self.path).map_err(|error| failed("cannot open the log", error))?;
            let metadata = opened.metadata().map_err(|error| failed("cannot read the log", error))?;
            // The log's directory entry, new or replaced, is durable too.
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
