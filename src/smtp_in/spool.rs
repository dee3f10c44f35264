//! The message being received, in memory while it is small and in an
//! unlinked file beside the queue once it is not: 20 clients sending 20 MiB
//! each must not hold 400 MiB of heap while they send.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes kept in memory before the message moves to a file.
pub const IN_MEMORY: usize = 1024 * 1024;

pub struct Spool {
    dir: PathBuf,
    mem: Vec<u8>,
    file: Option<BufWriter<File>>,
    len: usize,
}

impl Spool {
    /// A spool whose large messages go to files in `dir`.
    pub fn new(dir: &Path) -> Spool {
        Spool {
            dir: dir.to_path_buf(),
            mem: Vec::new(),
            file: None,
            len: 0,
        }
    }

    /// Empties it for the next message (a file is closed, and so gone).
    pub fn clear(&mut self) {
        self.mem = Vec::new();
        self.file = None;
        self.len = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.len += buf.len();
        if let Some(f) = self.file.as_mut() {
            return f.write_all(buf);
        }
        if self.mem.len() + buf.len() <= IN_MEMORY {
            self.mem.extend_from_slice(buf);
            return Ok(());
        }
        let mut f = BufWriter::with_capacity(64 * 1024, anonymous_file(&self.dir)?);
        f.write_all(&self.mem)?;
        f.write_all(buf)?;
        self.mem = Vec::new();
        self.file = Some(f);
        Ok(())
    }

    /// Copies the message into `out` without holding it in memory (a large
    /// one is read back from its file in pieces).
    pub fn write_to(mut self, out: &mut impl Write) -> std::io::Result<u64> {
        let Some(f) = self.file.take() else {
            out.write_all(&self.mem)?;
            return Ok(self.mem.len() as u64);
        };
        let mut f = f.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        std::io::copy(&mut f, out)
    }

    /// The whole message, read back from its file when it has one.
    pub fn into_bytes(mut self) -> std::io::Result<Vec<u8>> {
        let Some(f) = self.file.take() else {
            return Ok(std::mem::take(&mut self.mem));
        };
        let mut f = f.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        let mut out = Vec::with_capacity(self.len);
        f.read_to_end(&mut out)?;
        Ok(out)
    }
}

/// A file that no name points to: it disappears with its last handle, even
/// after a crash.
fn anonymous_file(dir: &Path) -> std::io::Result<File> {
    std::fs::create_dir_all(dir)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("in-{}-{n}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_stays_in_memory_large_goes_to_a_file_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::new(dir.path());
        s.push(b"hello ").unwrap();
        s.push(b"world").unwrap();
        assert!(s.file.is_none());
        assert_eq!(s.len(), 11);
        let chunk = vec![b'x'; 300 * 1024];
        for _ in 0..5 {
            s.push(&chunk).unwrap();
        }
        assert!(s.file.is_some(), "over IN_MEMORY: in a file");
        assert!(s.mem.is_empty());
        // Unlinked: nothing left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let all = s.into_bytes().unwrap();
        assert_eq!(all.len(), 11 + 5 * 300 * 1024);
        assert!(all.starts_with(b"hello world"));
        assert!(all[11..].iter().all(|&b| b == b'x'));
    }

    #[test]
    fn write_to_copies_from_memory_and_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut small = Spool::new(dir.path());
        small.push(b"short").unwrap();
        let mut out = Vec::new();
        assert_eq!(small.write_to(&mut out).unwrap(), 5);
        assert_eq!(out, b"short");
        let mut large = Spool::new(dir.path());
        let chunk: Vec<u8> = (0..400 * 1024).map(|i| (i % 253) as u8).collect();
        for _ in 0..3 {
            large.push(&chunk).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(large.write_to(&mut out).unwrap(), 3 * 400 * 1024);
        assert_eq!(out, chunk.repeat(3));
    }
}
