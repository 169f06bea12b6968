//! Outputs that never destroy inputs or earlier results: an output must not be the input
//! ([`distinct`]), and an output file or directory replaces what was there only once it is
//! complete ([`AtomicFile`], [`StagedDir`]). A command that fails halfway leaves every file it
//! found as it was.
use std::fmt::{self, Display};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::Invalid;

/// An I/O failure on a named file, or a file whose content is refused (at a line when known).
#[derive(Debug)]
pub struct FileError {
    /// The file at fault.
    pub path: PathBuf,
    /// The 1-based line, for line-oriented input.
    pub line: Option<usize>,
    /// What went wrong.
    pub message: String,
}

impl FileError {
    /// `action` (e.g. "creating") failed on `path` with `error`.
    pub fn io(action: &str, path: &Path, error: io::Error) -> Self {
        Self {
            path: path.to_path_buf(),
            line: None,
            message: format!("{action}: {error}"),
        }
    }

    /// Line `line` of `path` is refused for `message`.
    pub fn at_line(path: &Path, line: usize, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            line: Some(line),
            message: message.into(),
        }
    }
}

impl Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for FileError {}

/// Where `path` is or would be: the file itself when it exists, else its canonical parent
/// joined with its name.
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(path) = fs::canonicalize(path) {
        return Some(path);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(fs::canonicalize(parent).ok()?.join(path.file_name()?))
}

/// Whether `a` and `b` name one file: the same inode when both exist (hard and symbolic links
/// included), the same resolved place otherwise.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    match (resolved(a), resolved(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Refuses an output (`output_key`, e.g. `--output`) that is the input (`input_key`): writing
/// it would destroy the data being read.
pub fn distinct(
    input_key: &str,
    input: &Path,
    output_key: &str,
    output: &Path,
) -> Result<(), Invalid> {
    if same_file(input, output) {
        Err(Invalid::new(
            output_key,
            format!("another file than {input_key} ({})", input.display()),
            output.display(),
        ))
    } else {
        Ok(())
    }
}

/// A name for a hidden temporary sibling of `path`, unique within this process and across
/// processes, that ends like `path` (writers that pick a format by extension see the same).
fn temporary_sibling(path: &Path, what: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{what}-{}-{n}.{name}", std::process::id()))
}

/// Has `write` produce the file at a temporary path next to `path` (ending with the same
/// extension), then renames it onto `path`: for writers that take a path, like a plotting
/// library. When `write` fails, the temporary is removed and `path` stays as it was.
pub fn replace_with<T, E: From<FileError>>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let temporary = temporary_sibling(path, "tmp");
    let value = match write(&temporary) {
        Ok(value) => value,
        Err(e) => {
            let _ = fs::remove_file(&temporary);
            return Err(e);
        }
    };
    if let Err(e) = fs::rename(&temporary, path) {
        let _ = fs::remove_file(&temporary);
        return Err(FileError::io("writing", path, e).into());
    }
    Ok(value)
}

/// An output file written next to its destination and renamed onto it by [`commit`]: until
/// then the destination keeps its old content (or stays absent), and a dropped, uncommitted
/// file removes its temporary.
///
/// [`commit`]: AtomicFile::commit
pub struct AtomicFile {
    path: PathBuf,
    temporary: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts the replacement of `path` (its directory must exist).
    pub fn create(path: &Path) -> Result<Self, FileError> {
        if path.is_dir() {
            return Err(FileError::io(
                "writing",
                path,
                io::Error::other("is a directory"),
            ));
        }
        let temporary = temporary_sibling(path, "tmp");
        let file = File::create(&temporary).map_err(|e| FileError::io("creating", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            temporary,
            writer: Some(BufWriter::new(file)),
        })
    }

    /// The destination.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes, syncs and renames the file onto its destination.
    pub fn commit(mut self) -> Result<(), FileError> {
        let writer = self.writer.take().expect("committed once");
        let error = |e| FileError::io("writing", &self.path, e);
        let file = writer.into_inner().map_err(|e| error(e.into_error()))?;
        file.sync_all().map_err(error)?;
        drop(file);
        if let Err(e) = fs::rename(&self.temporary, &self.path) {
            let _ = fs::remove_file(&self.temporary);
            return Err(error(e));
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.as_mut().expect("not committed").write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = fs::remove_file(&self.temporary);
        }
    }
}

/// Replaces `path` with `contents` as one step (see [`AtomicFile`]).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(contents)
        .map_err(|e| FileError::io("writing", path, e))?;
    file.commit()
}

/// An output directory assembled in a temporary sibling and moved into place by [`commit`]:
/// each entry written replaces the entry of the same name in the destination (other entries
/// stay), and nothing in the destination changes before then. Dropped uncommitted, the
/// temporary directory is removed.
///
/// [`commit`]: StagedDir::commit
pub struct StagedDir {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Starts an output into `target` (created with its parents when absent; an existing
    /// `target` must be a directory).
    pub fn create(target: &Path) -> Result<Self, FileError> {
        if target.exists() && !target.is_dir() {
            return Err(FileError::io(
                "writing into",
                target,
                io::Error::other("exists and is not a directory"),
            ));
        }
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| FileError::io("creating", parent, e))?;
        }
        let staging = temporary_sibling(target, "staging");
        fs::create_dir(&staging).map_err(|e| FileError::io("creating", &staging, e))?;
        Ok(Self {
            target: target.to_path_buf(),
            staging,
            committed: false,
        })
    }

    /// Where to write the entries.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the entries into the destination, each replacing its namesake.
    pub fn commit(mut self) -> Result<(), FileError> {
        let error = |path: &Path| {
            let path = path.to_path_buf();
            move |e| FileError::io("moving into place", &path, e)
        };
        if !self.target.exists() {
            fs::rename(&self.staging, &self.target).map_err(error(&self.target))?;
            self.committed = true;
            return Ok(());
        }
        for entry in fs::read_dir(&self.staging).map_err(error(&self.staging))? {
            let entry = entry.map_err(error(&self.staging))?;
            let destination = self.target.join(entry.file_name());
            let old = temporary_sibling(&destination, "old");
            let had_old = fs::symlink_metadata(&destination).is_ok();
            if had_old {
                fs::rename(&destination, &old).map_err(error(&destination))?;
            }
            if let Err(e) = fs::rename(entry.path(), &destination) {
                if had_old {
                    let _ = fs::rename(&old, &destination);
                }
                return Err(error(&destination)(e));
            }
            if had_old {
                let _ = remove_any(&old);
            }
        }
        self.committed = true;
        let _ = fs::remove_dir_all(&self.staging);
        Ok(())
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_same_file_is_found_through_other_spellings_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.jsonl");
        fs::write(&file, "{}\n").unwrap();
        let dotted = dir.path().join(".").join("s.jsonl");
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let hard = dir.path().join("hard.jsonl");
        fs::hard_link(&file, &hard).unwrap();
        for other in [&file, &dotted, &link, &hard] {
            assert!(same_file(&file, other), "{}", other.display());
        }
        assert!(!same_file(&file, &dir.path().join("other.jsonl")));
        // Neither exists yet: compared by where they would be.
        let absent = dir.path().join("new.jsonl");
        assert!(same_file(&absent, &dir.path().join("./new.jsonl")));
        let message = distinct("--input", &file, "--output", &dotted)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("--output must be another file than --input")
                && message.contains("s.jsonl"),
            "{message}"
        );
        assert!(distinct("--input", &file, "--output", &absent).is_ok());
    }

    #[test]
    fn an_atomic_file_replaces_its_destination_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        fs::write(&path, "old\n").unwrap();
        {
            let mut file = AtomicFile::create(&path).unwrap();
            file.write_all(b"half").unwrap();
            // Dropped without a commit: a failed command.
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "old\n");
        assert_eq!(names(dir.path()), ["out.jsonl"]);
        let mut file = AtomicFile::create(&path).unwrap();
        file.write_all(b"new\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "old\n");
        file.commit().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(names(dir.path()), ["out.jsonl"]);
        write_atomic(&path, b"again").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "again");
        // Errors name the output, not some other file.
        let missing = dir.path().join("no-such-dir").join("out.jsonl");
        let message = AtomicFile::create(&missing).err().unwrap().to_string();
        assert!(message.contains("no-such-dir/out.jsonl"), "{message}");
        let message = AtomicFile::create(dir.path()).err().unwrap().to_string();
        assert!(message.contains("is a directory"), "{message}");
    }

    #[test]
    fn a_file_written_by_path_replaces_its_destination_only_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        fs::write(&path, "old").unwrap();
        let failed: Result<(), FileError> = replace_with(&path, |tmp| {
            assert_eq!(tmp.extension().unwrap(), "png");
            assert_eq!(tmp.parent(), path.parent());
            fs::write(tmp, "half").unwrap();
            Err(FileError::io("drawing", &path, io::Error::other("no font")))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(names(dir.path()), ["chart.png"]);
        replace_with::<_, FileError>(&path, |tmp| {
            fs::write(tmp, "new").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(names(dir.path()), ["chart.png"]);
    }

    #[test]
    fn a_staged_directory_replaces_entries_only_when_committed() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        fs::create_dir_all(target.join("policy")).unwrap();
        fs::write(target.join("policy").join("w"), "old").unwrap();
        fs::write(target.join("keep.txt"), "kept").unwrap();
        {
            let staged = StagedDir::create(&target).unwrap();
            fs::create_dir(staged.path().join("policy")).unwrap();
            fs::write(staged.path().join("policy").join("w"), "half").unwrap();
        }
        assert_eq!(fs::read_to_string(target.join("policy/w")).unwrap(), "old");
        assert_eq!(names(root.path()), ["out"]);
        let staged = StagedDir::create(&target).unwrap();
        fs::create_dir(staged.path().join("policy")).unwrap();
        fs::write(staged.path().join("policy").join("w2"), "new").unwrap();
        fs::write(staged.path().join("metrics.json"), "{}").unwrap();
        staged.commit().unwrap();
        assert_eq!(names(&target), ["keep.txt", "metrics.json", "policy"]);
        assert_eq!(names(&target.join("policy")), ["w2"]);
        assert_eq!(names(root.path()), ["out"]);
        // A fresh destination, parents included.
        let fresh = root.path().join("a").join("b");
        let staged = StagedDir::create(&fresh).unwrap();
        fs::write(staged.path().join("x"), "1").unwrap();
        staged.commit().unwrap();
        assert_eq!(names(&fresh), ["x"]);
        // A file where the directory should go.
        let file = root.path().join("file");
        fs::write(&file, "f").unwrap();
        let message = StagedDir::create(&file).err().unwrap().to_string();
        assert!(message.contains("not a directory"), "{message}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "f");
    }
}
