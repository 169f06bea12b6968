//! Running untrusted Python in a sandbox.
//!
//! Three backends, chosen once at start-up by [`Sandbox::detect`] (the first whose probe
//! program runs wins) and reported in the service's status:
//!
//! * [`Backend::Bubblewrap`] (preferred): `bwrap` puts the run in fresh user, pid, mount, ipc,
//!   uts, cgroup and network namespaces, as uid/gid 65534 with all capabilities dropped. The
//!   file system is a tmpfs root with read-only binds of `/usr` (plus the `/bin`, `/lib*`
//!   symlinks) and of the Python installation, a fresh `/proc`, a minimal `/dev`, a private
//!   `/tmp`, and the per-run work dir as the only writable host path. `bwrap` itself starts
//!   with an empty environment (its init keeps the environment it was started with, readable
//!   through `/proc/1/environ`), and the program gets only `PATH`, `HOME` and `LANG`.
//!   No network: the new network namespace has only its own loopback.
//! * [`Backend::Landlock`] (where user namespaces are unavailable, e.g. a locked-down pod):
//!   Landlock confines the file system to read-only views of the Python installation and the
//!   system libraries plus the writable work dir, refuses TCP (ABI 4+) and signals or
//!   abstract sockets outside the sandbox (ABI 6+); a seccomp filter refuses non-unix
//!   sockets, namespaces, ptrace, io_uring, `setsid`/`setpgid` and other escape hatches; as
//!   root every capability is dropped and, where allowed, a private network namespace is
//!   added. See [`super::confine`]. Host paths still *exist* (a `stat` succeeds) but cannot
//!   be read, listed or written.
//! * [`Backend::Rlimits`] (last resort, kernel without Landlock): the same resource limits, an
//!   empty environment, a private work dir, a new session so the whole process group is
//!   killed, and (as root) a private network namespace. It does not hide host files.
//!
//! Every backend applies rlimits in the child before `exec` (CPU seconds, address space, file
//! size, open files, no core dumps, process count for non-root users), kills the whole process
//! group on the wall-clock limit, caps captured stdout/stderr (a run that exceeds the cap is
//! killed), and, where the grader may create cgroups (v2, or v1 `memory` + `pids`), puts the
//! run in its own cgroup with a memory cap and a pids cap for the whole tree and kills
//! everything in it afterwards, which also catches daemons that left the process group.
//!
//! Warm pool ([`Sandbox::with_warm_pool`]): a sandbox is started *before* its program is
//! known: work dir, cgroup (on cgroup v1, moving a task into a cgroup waits for an RCU grace
//! period per hierarchy), namespaces and the interpreter itself, which then blocks reading
//! its program from descriptor 3. A run writes the program there and its stdin to the
//! interpreter, so its critical path is only the program; a background thread starts the
//! replacement. Every run still gets a fresh process, work dir, cgroup and namespaces.
//! Measure with `cargo run --release -p prime-verifier --example sandbox_overhead`.
//!
//! Without a cgroup, the process-count cap is `RLIMIT_NPROC`, which the kernel counts per real
//! uid: concurrent runs under one non-root uid share it (a fork bomb in one run can make a
//! neighbour's fork fail), and it does not bind root at all. Give the grader a writable cgroup
//! (or run one sandbox at a time) where that matters.
//!
//! What a Kubernetes pod must allow for each backend is in `docs/verifier.md`.

use super::confine::{landlock_abi, Confinement, SeccompProgram};
use crate::error::VerifierError;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Resource limits of one sandboxed run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SandboxLimits {
    /// Wall-clock limit of the whole run.
    pub wall_time: Duration,
    /// CPU-time limit (`RLIMIT_CPU`), seconds.
    pub cpu_seconds: u64,
    /// Address-space limit per process (`RLIMIT_AS`), bytes.
    pub address_space_bytes: u64,
    /// Memory cap for the whole sandbox when a cgroup can be used, bytes.
    pub memory_bytes: u64,
    /// Most processes (and threads) in the sandbox.
    pub max_processes: u64,
    /// Largest file the program may write (`RLIMIT_FSIZE`), bytes.
    pub max_file_bytes: u64,
    /// Most open file descriptors (`RLIMIT_NOFILE`).
    pub max_open_files: u64,
    /// Most bytes kept of stdout and of stderr each; a run that writes more is killed.
    pub max_output_bytes: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            wall_time: Duration::from_secs(5),
            cpu_seconds: 5,
            address_space_bytes: 1 << 30,
            memory_bytes: 1 << 30,
            max_processes: 32,
            max_file_bytes: 16 << 20,
            max_open_files: 64,
            max_output_bytes: 8 << 20,
        }
    }
}

impl SandboxLimits {
    /// Whether `other` differs at most in the wall-clock limit and the output cap, which the
    /// supervisor enforces (the rest is fixed when the sandbox process starts).
    fn same_process_limits(&self, other: &SandboxLimits) -> bool {
        let strip = |l: &SandboxLimits| SandboxLimits {
            wall_time: Duration::ZERO,
            max_output_bytes: 0,
            ..l.clone()
        };
        strip(self) == strip(other)
    }
}

/// The isolation mechanism in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// bubblewrap namespaces plus rlimits.
    Bubblewrap {
        /// Path of the `bwrap` binary.
        bwrap: PathBuf,
    },
    /// Landlock + seccomp + rlimits + process-group kill: no namespaces needed (see
    /// [`super::confine`]).
    Landlock {
        /// The kernel's Landlock ABI version (1 or more).
        abi: u32,
    },
    /// rlimits, a new session and (as root) a private network namespace only.
    Rlimits,
}

impl Backend {
    /// Short name for status reports.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Bubblewrap { .. } => "bubblewrap",
            Backend::Landlock { .. } => "landlock+seccomp",
            Backend::Rlimits => "rlimits",
        }
    }

    /// The Landlock backend at the running kernel's ABI, when the kernel has Landlock.
    pub fn landlock() -> Option<Backend> {
        match landlock_abi() {
            0 => None,
            abi => Some(Backend::Landlock { abi }),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal (a crash, or an rlimit like `RLIMIT_CPU`).
    Signaled(i32),
    /// Killed at the wall-clock limit.
    TimedOut,
    /// Killed because it wrote more than the output cap.
    OutputLimit,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// How it ended.
    pub termination: Termination,
    /// Captured stdout (at most the cap).
    pub stdout: Vec<u8>,
    /// Captured stderr (at most the cap).
    pub stderr: Vec<u8>,
    /// Wall-clock duration.
    pub wall: Duration,
}

impl RunOutput {
    /// Whether the program exited normally with code 0.
    pub fn success(&self) -> bool {
        self.termination == Termination::Exited(0)
    }
}

/// The descriptor on which a started sandbox receives its program.
const PROGRAM_FD: RawFd = 3;

/// What the sandboxed interpreter runs: it waits for the program on [`PROGRAM_FD`], then
/// runs it as `__main__` from `main.py`, as `python3 main.py` would (its globals are
/// `__main__`'s; the loader's own names are removed first).
const LOADER: &str = "\
import sys as _s
_p = open(3, 'rb')
_c = compile(_p.read(), 'main.py', 'exec')
_p.close()
_s.argv = ['main.py']
__file__ = 'main.py'
del _p, _s
exec(_c)
";

/// A configured sandbox; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Sandbox {
    spawner: Spawner,
    pool: Option<Arc<WarmPool>>,
}

/// Everything needed to start one sandboxed interpreter.
#[derive(Debug, Clone)]
struct Spawner {
    backend: Backend,
    limits: SandboxLimits,
    /// Host path of the Python interpreter binary.
    python: PathBuf,
    /// Host directory of the Python installation (bound read-only into the sandbox).
    python_prefix: PathBuf,
    cgroups: Option<CgroupMounts>,
    /// The seccomp filter of the Landlock backend (`None` where it cannot be compiled).
    seccomp: Option<SeccompProgram>,
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Sandbox {
    /// Finds `python3` on `PATH` and the best available backend: bubblewrap, then Landlock +
    /// seccomp, then rlimits alone. Each candidate must run a probe program.
    pub fn detect(limits: SandboxLimits) -> Result<Self, VerifierError> {
        let (python, python_prefix) = locate_python()?;
        remove_stale(&std::env::temp_dir(), WORKDIR_PREFIX, |d| {
            std::fs::remove_dir_all(d)
        });
        let cgroups = CgroupMounts::detect();
        let seccomp = match SeccompProgram::compile() {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "no seccomp filter for this machine");
                None
            }
        };
        let base = Spawner {
            backend: Backend::Rlimits,
            limits,
            python,
            python_prefix,
            cgroups,
            seccomp,
        };
        let mut candidates = Vec::new();
        match find_on_path("bwrap") {
            Some(bwrap) => candidates.push(Backend::Bubblewrap { bwrap }),
            None => tracing::warn!("bwrap not found on PATH"),
        }
        match (Backend::landlock(), &base.seccomp) {
            (Some(b), Some(_)) => candidates.push(b),
            (None, _) => tracing::warn!("the kernel has no Landlock (or it is disabled at boot)"),
            (_, None) => tracing::warn!("Landlock without a seccomp filter is not offered"),
        }
        let mut backend = Backend::Rlimits;
        for candidate in candidates {
            let spawner = Spawner {
                backend: candidate.clone(),
                ..base.clone()
            };
            match spawner.probe() {
                Ok(()) => {
                    backend = candidate;
                    break;
                }
                Err(why) => tracing::warn!(
                    backend = candidate.name(),
                    reason = %why,
                    "sandbox backend unusable here; trying the next"
                ),
            }
        }
        let sandbox = Self {
            spawner: Spawner { backend, ..base },
            pool: None,
        };
        if sandbox.spawner.backend == Backend::Rlimits {
            tracing::warn!("only the rlimits backend is left: host files are not hidden");
            if let Err(why) = sandbox.spawner.probe() {
                return Err(VerifierError::Sandbox(format!(
                    "no sandbox backend works here: {why}"
                )));
            }
        }
        tracing::info!(
            backend = sandbox.backend().name(),
            cgroup = sandbox.has_cgroup(),
            python = %sandbox.python().display(),
            "code sandbox ready"
        );
        Ok(sandbox)
    }

    /// The same sandbox forced onto `backend` (tests use it to exercise the fallbacks).
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.spawner.backend = backend;
        let capacity = self.warm_pool_size();
        self.with_warm_pool(capacity)
    }

    /// The same sandbox with other limits. A warm pool is kept when only the wall-clock limit
    /// or the output cap changes, and restarted otherwise.
    pub fn with_limits(mut self, limits: SandboxLimits) -> Self {
        let restart = !self.spawner.limits.same_process_limits(&limits);
        self.spawner.limits = limits;
        if restart {
            let capacity = self.warm_pool_size();
            self.with_warm_pool(capacity)
        } else {
            self
        }
    }

    /// The same sandbox keeping up to `capacity` sandboxes started ahead of time (0: none),
    /// each with its work dir, cgroup and interpreter ready and waiting for a program. A run
    /// then costs only the program itself on its critical path; starting the sandbox happens
    /// on a background thread. Size it to the number of runs in flight at once.
    pub fn with_warm_pool(mut self, capacity: usize) -> Self {
        self.pool = (capacity > 0).then(|| WarmPool::start(self.spawner.clone(), capacity));
        self
    }

    /// How many sandboxes are kept started ahead of time.
    pub fn warm_pool_size(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.shared.capacity)
    }

    /// The Python interpreter the sandbox runs (the real binary behind `python3` on `PATH`).
    pub fn python(&self) -> &Path {
        &self.spawner.python
    }

    /// The active backend.
    pub fn backend(&self) -> &Backend {
        &self.spawner.backend
    }

    /// The limits applied to each run.
    pub fn limits(&self) -> &SandboxLimits {
        &self.spawner.limits
    }

    /// Whether each run gets a cgroup with a whole-sandbox memory and pids cap.
    pub fn has_cgroup(&self) -> bool {
        self.spawner.cgroups.is_some()
    }

    /// Runs the Python `program` with `stdin`, inside a fresh work dir that is removed after.
    pub fn run(&self, program: &str, stdin: &[u8]) -> Result<RunOutput, VerifierError> {
        let prepared = match self.pool.as_ref().and_then(|p| p.take()) {
            Some(p) => p,
            None => self.spawner.launch()?,
        };
        prepared.execute(program, stdin, &self.spawner.limits)
    }
}

impl Spawner {
    /// Runs a trivial program; `Err` says why the backend is unusable.
    fn probe(&self) -> Result<(), String> {
        let out = self
            .launch()
            .and_then(|p| p.execute("print(6 * 7)", b"", &self.limits))
            .map_err(|e| e.to_string())?;
        if out.success() && out.stdout.starts_with(b"42") {
            Ok(())
        } else {
            Err(format!(
                "probe ended {:?}: {}",
                out.termination,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Starts a sandboxed interpreter that waits for its program.
    fn launch(&self) -> Result<Prepared, VerifierError> {
        let workdir = tempfile::Builder::new()
            .prefix(&format!("{WORKDIR_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        let cgroup = match &self.cgroups {
            Some(m) => match m.create(&self.limits) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "could not create a cgroup for this run");
                    None
                }
            },
            None => None,
        };
        let (program_read, program_write) = pipe_cloexec()?;
        let mut cmd = self.command(workdir.path());
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let pre_exec = PreExec::new(
            self,
            cgroup.as_ref(),
            workdir.path(),
            program_read.as_raw_fd(),
        )?;
        // SAFETY: the closure only calls async-signal-safe libc functions (dup2, setsid,
        // prctl, write, unshare, setrlimit, capset, landlock, seccomp) on data prepared before
        // the fork.
        unsafe {
            cmd.pre_exec(move || pre_exec.apply());
        }
        let spawned = cmd.spawn();
        drop(cmd);
        drop(program_read);
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if let Some(c) = &cgroup {
                    c.kill_all_and_remove();
                }
                return Err(VerifierError::Sandbox(format!("spawn failed: {e}")));
            }
        };
        Ok(Prepared {
            child: Some(child),
            program: Some(std::fs::File::from(program_write)),
            workdir,
            cgroup,
        })
    }

    fn command(&self, workdir: &Path) -> Command {
        let python = self.python.to_string_lossy().into_owned();
        match &self.backend {
            Backend::Bubblewrap { bwrap } => {
                let mut c = Command::new(bwrap);
                c.env_clear();
                c.args([
                    "--unshare-all",
                    "--die-with-parent",
                    "--new-session",
                    "--cap-drop",
                    "ALL",
                    "--uid",
                    "65534",
                    "--gid",
                    "65534",
                    "--hostname",
                    "sandbox",
                    "--ro-bind",
                    "/usr",
                    "/usr",
                ]);
                for dir in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
                    let p = Path::new(dir);
                    if let Ok(target) = std::fs::read_link(p) {
                        c.arg("--symlink").arg(target).arg(dir);
                    } else if p.is_dir() {
                        c.args(["--ro-bind", dir, dir]);
                    }
                }
                if Path::new("/etc/ld.so.cache").exists() {
                    c.args(["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]);
                }
                if !self.python_prefix.starts_with("/usr") {
                    c.arg("--ro-bind")
                        .arg(&self.python_prefix)
                        .arg(&self.python_prefix);
                }
                c.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
                c.arg("--bind").arg(workdir).arg("/work");
                c.args([
                    "--chdir",
                    "/work",
                    "--clearenv",
                    "--setenv",
                    "PATH",
                    "/usr/local/bin:/usr/bin:/bin",
                    "--setenv",
                    "HOME",
                    "/work",
                    "--setenv",
                    "LANG",
                    "C.UTF-8",
                    "--",
                ]);
                c.args([python.as_str(), "-I", "-B", "-c", LOADER]);
                c
            }
            Backend::Landlock { .. } | Backend::Rlimits => {
                let mut c = Command::new(&self.python);
                c.env_clear()
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                    .env("HOME", workdir)
                    .env("TMPDIR", workdir)
                    .env("LANG", "C.UTF-8")
                    .current_dir(workdir)
                    .args(["-I", "-B", "-c", LOADER]);
                c
            }
        }
    }

    /// What the Landlock backend lets the program read (and execute).
    fn readable_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = [
            "/usr",
            "/bin",
            "/sbin",
            "/lib",
            "/lib32",
            "/lib64",
            "/libx32",
            "/etc/ld.so.cache",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        paths.push(self.python_prefix.clone());
        if let Some(dir) = self.python.parent() {
            paths.push(dir.to_path_buf());
        }
        paths
    }
}

/// Work dirs are named `prime-sandbox-PID-...` after the grader process that made them.
const WORKDIR_PREFIX: &str = "prime-sandbox-";

/// Removes what grader processes that are gone left in `dir`: entries named
/// `{prefix}{pid}-...` whose pid no longer exists (their cgroups, empty once the sandboxes
/// died with them through the parent-death signal, and their work dirs). Best effort.
fn remove_stale(dir: &Path, prefix: &str, remove: impl Fn(&Path) -> std::io::Result<()>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok());
        let Some(pid) = pid.filter(|&p| p > 0) else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } < 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = remove(&entry.path());
        }
    }
}

fn pipe_cloexec() -> Result<(OwnedFd, OwnedFd), VerifierError> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(VerifierError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A started sandbox whose interpreter waits for its program on [`PROGRAM_FD`].
struct Prepared {
    child: Option<Child>,
    program: Option<std::fs::File>,
    workdir: tempfile::TempDir,
    cgroup: Option<RunCgroup>,
}

impl Prepared {
    /// Whether the waiting interpreter died (it is then useless).
    fn is_dead(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Sends the program and its stdin, supervises the run, then removes the sandbox.
    fn execute(
        mut self,
        program: &str,
        stdin: &[u8],
        limits: &SandboxLimits,
    ) -> Result<RunOutput, VerifierError> {
        // A copy in the work dir, as `python3 main.py` would have, for tracebacks and
        // programs that read their own source.
        std::fs::write(self.workdir.path().join("main.py"), program)?;
        let child = self
            .child
            .take()
            .ok_or_else(|| VerifierError::Sandbox("sandbox already used".into()))?;
        let program_pipe = self.program.take();
        supervise(
            child,
            program_pipe.map(|p| (p, program.as_bytes().to_vec())),
            stdin,
            limits,
            Instant::now(),
        )
        // `self` drops here: the cgroup's leftovers are killed and the work dir removed.
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(child.id() as libc::pid_t);
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(c) = &self.cgroup {
            c.kill_all_and_remove();
        }
    }
}

/// Sandboxes started ahead of time by a background thread that lives as long as the pool
/// (the parent-death signal of each sandbox is tied to the thread that started it).
struct WarmPool {
    shared: Arc<PoolShared>,
    refill: mpsc::Sender<()>,
}

struct PoolShared {
    ready: Mutex<Vec<Prepared>>,
    capacity: usize,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ready = self.shared.ready.lock().map_or(0, |r| r.len());
        f.debug_struct("WarmPool")
            .field("capacity", &self.shared.capacity)
            .field("ready", &ready)
            .finish()
    }
}

impl WarmPool {
    fn start(spawner: Spawner, capacity: usize) -> Arc<Self> {
        let shared = Arc::new(PoolShared {
            ready: Mutex::new(Vec::with_capacity(capacity)),
            capacity,
        });
        let (refill, requests) = mpsc::channel::<()>();
        let filler = Arc::clone(&shared);
        let started = std::thread::Builder::new()
            .name("sandbox-pool".into())
            .spawn(move || {
                loop {
                    while filler.ready.lock().map_or(usize::MAX, |r| r.len()) < filler.capacity {
                        match spawner.launch() {
                            Ok(p) => match filler.ready.lock() {
                                Ok(mut r) => r.push(p),
                                Err(_) => return,
                            },
                            Err(e) => {
                                tracing::warn!(error = %e, "could not start a warm sandbox");
                                break;
                            }
                        }
                    }
                    if requests.recv().is_err() {
                        break;
                    }
                    while requests.try_recv().is_ok() {}
                }
                // The pool is gone: stop the waiting sandboxes.
                if let Ok(mut r) = filler.ready.lock() {
                    r.clear();
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "no warm-pool thread; sandboxes start on demand");
        }
        Arc::new(Self { shared, refill })
    }

    /// A ready sandbox, if one is waiting; asks for a replacement either way.
    fn take(&self) -> Option<Prepared> {
        let taken = {
            let mut ready = self.shared.ready.lock().ok()?;
            let mut found = None;
            while let Some(mut p) = ready.pop() {
                if !p.is_dead() {
                    found = Some(p);
                    break;
                }
            }
            found
        };
        let _ = self.refill.send(());
        taken
    }
}

/// Everything the child does between fork and exec, prepared in the parent.
struct PreExec {
    program_fd: RawFd,
    limits: Vec<(libc::__rlimit_resource_t, u64)>,
    cgroup_procs: Vec<std::fs::File>,
    new_netns: bool,
    confinement: Option<Confinement>,
}

impl PreExec {
    fn new(
        spawner: &Spawner,
        cgroup: Option<&RunCgroup>,
        workdir: &Path,
        program_fd: RawFd,
    ) -> Result<Self, VerifierError> {
        let limits = &spawner.limits;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut rl = vec![
            (libc::RLIMIT_CPU, limits.cpu_seconds),
            (libc::RLIMIT_AS, limits.address_space_bytes),
            (libc::RLIMIT_FSIZE, limits.max_file_bytes),
            (libc::RLIMIT_NOFILE, limits.max_open_files),
            (libc::RLIMIT_CORE, 0),
        ];
        // RLIMIT_NPROC counts every task of the real uid (the grader's own threads included)
        // and does not bind root at all. The cgroup pids cap is the real bound; without one, a
        // non-root grader caps the uid at what it runs now plus the sandbox's allowance.
        if !root && cgroup.is_none() {
            let current = tasks_of_current_uid();
            rl.push((libc::RLIMIT_NPROC, current + limits.max_processes));
        }
        let cgroup_procs = match cgroup {
            Some(c) => c.open_procs_files()?,
            None => Vec::new(),
        };
        let confinement = match &spawner.backend {
            Backend::Landlock { abi } => {
                let readable = spawner.readable_paths();
                let readable: Vec<&Path> = readable.iter().map(PathBuf::as_path).collect();
                Some(Confinement::prepare(
                    *abi,
                    workdir,
                    &readable,
                    spawner.seccomp.as_ref(),
                    root,
                )?)
            }
            _ => None,
        };
        Ok(Self {
            program_fd,
            limits: rl,
            cgroup_procs,
            new_netns: root && !matches!(spawner.backend, Backend::Bubblewrap { .. }),
            confinement,
        })
    }

    fn apply(&self) -> std::io::Result<()> {
        // SAFETY (whole function): async-signal-safe calls on memory owned by `self`.
        unsafe {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            for f in &self.cgroup_procs {
                // "0" moves the writing process itself.
                if libc::write(f.as_raw_fd(), b"0\n".as_ptr().cast(), 2) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if self.new_netns {
                // Root without CAP_SYS_ADMIN (a container's default capabilities) cannot make
                // one; the Landlock backend's seccomp filter still refuses network sockets.
                libc::unshare(libc::CLONE_NEWNET);
            }
            for (resource, value) in &self.limits {
                let lim = libc::rlimit {
                    rlim_cur: *value,
                    rlim_max: *value,
                };
                if libc::setrlimit(*resource, &lim) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        if let Some(c) = &self.confinement {
            c.apply()?;
        }
        // Last: the program pipe becomes fd 3, open across exec (dup2 clears close-on-exec).
        // Any descriptor the steps above use (a cgroup.procs file, the Landlock ruleset) may
        // itself be fd 3 when other threads opened and closed descriptors before the fork;
        // replacing fd 3 earlier would make those steps fail with EBADF.
        // SAFETY: dup2/fcntl are async-signal-safe and touch only descriptors.
        let rc = unsafe {
            if self.program_fd == PROGRAM_FD {
                libc::fcntl(PROGRAM_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(self.program_fd, PROGRAM_FD)
            }
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sends the program, feeds stdin, drains stdout/stderr up to the cap, enforces the wall
/// clock, kills the group.
fn supervise(
    mut child: Child,
    program: Option<(std::fs::File, Vec<u8>)>,
    stdin: &[u8],
    limits: &SandboxLimits,
    started: Instant,
) -> Result<RunOutput, VerifierError> {
    let pid = child.id() as libc::pid_t;
    let cap = limits.max_output_bytes;
    let stdin_data = stdin.to_vec();
    let mut stdin_pipe = child.stdin.take();
    let writer = std::thread::spawn(move || {
        if let Some((mut pipe, text)) = program {
            // Closing the pipe (end of scope) is the interpreter's end of program.
            let _ = pipe.write_all(&text);
        }
        if let Some(p) = stdin_pipe.as_mut() {
            // The program may exit without reading its input: a broken pipe is fine.
            let _ = p.write_all(&stdin_data);
        }
    });
    let (events_tx, events) = std::sync::mpsc::channel::<Event>();
    let reader = |pipe: Option<Box<dyn Read + Send>>, tx: std::sync::mpsc::Sender<Event>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let mut chunk = [0u8; 16384];
                loop {
                    match p.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if buf.len() + n > cap {
                                let keep = cap - buf.len();
                                buf.extend_from_slice(&chunk[..keep]);
                                let _ = tx.send(Event::OutputOverflow);
                                break;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                    }
                }
            }
            buf
        })
    };
    let out_reader = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        events_tx.clone(),
    );
    let err_reader = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        events_tx.clone(),
    );
    // Blocks until the child exits (without reaping it), so the supervisor wakes at once
    // instead of polling.
    let waiter = std::thread::spawn(move || {
        wait_exit_unreaped(pid);
        let _ = events_tx.send(Event::Exited);
    });
    let deadline = started + limits.wall_time;
    let event = events.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    let termination = match event {
        Ok(Event::Exited) => {
            // Kill what is left of the group while the leader is an unreaped zombie, so its
            // id cannot have been reused by an unrelated process.
            kill_group(pid);
            let status = child.wait()?;
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => Termination::Exited(code),
                (None, Some(sig)) => Termination::Signaled(sig),
                _ => Termination::Signaled(0),
            }
        }
        other => {
            kill_group(pid);
            let _ = child.kill();
            let _ = child.wait();
            if matches!(other, Ok(Event::OutputOverflow)) {
                Termination::OutputLimit
            } else {
                Termination::TimedOut
            }
        }
    };
    let _ = waiter.join();
    let wall = started.elapsed();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let _ = writer.join();
    Ok(RunOutput {
        termination,
        stdout,
        stderr,
        wall,
    })
}

/// Tasks (threads) that belong to this process's real uid, counted from `/proc`.
fn tasks_of_current_uid() -> u64 {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() }.to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                == Some(uid.as_str())
        })
        .map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(1)
        })
        .sum()
}

/// Blocks until `pid` has exited, without reaping it (returns at once if it is already
/// reaped).
fn wait_exit_unreaped(pid: libc::pid_t) {
    loop {
        // SAFETY: `info` is a valid out-pointer; WNOWAIT leaves the child waitable.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// What the supervisor waits for.
enum Event {
    Exited,
    OutputOverflow,
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill has no memory-safety preconditions; a stale group id fails with ESRCH.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Resolves `python3` on `PATH` to the real interpreter and its installation prefix (through
/// shims like pyenv's), by asking it.
fn locate_python() -> Result<(PathBuf, PathBuf), VerifierError> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, os; print(os.path.realpath(sys.executable)); print(sys.base_prefix)",
        ])
        .output()
        .map_err(|e| VerifierError::Sandbox(format!("python3 not runnable: {e}")))?;
    if !out.status.success() {
        return Err(VerifierError::Sandbox("python3 failed to start".into()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(exe), Some(prefix)) => Ok((PathBuf::from(exe), PathBuf::from(prefix))),
        _ => Err(VerifierError::Sandbox(
            "could not locate the python3 installation".into(),
        )),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .chain([Path::new("/usr/bin").join(name)])
        .find(|p| p.is_file())
}

/// Writable cgroup hierarchies with the memory and pids controllers.
#[derive(Debug, Clone)]
struct CgroupMounts {
    /// cgroup v2: one directory. v1: the memory and pids hierarchies.
    version: CgroupVersion,
}

#[derive(Debug, Clone)]
enum CgroupVersion {
    V2(PathBuf),
    V1 { memory: PathBuf, pids: PathBuf },
}

/// One run's cgroup directories.
struct RunCgroup {
    dirs: Vec<PathBuf>,
}

impl CgroupMounts {
    fn detect() -> Option<Self> {
        let root = Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok();
        let version = match controllers {
            Some(c) if c.contains("memory") && c.contains("pids") => {
                CgroupVersion::V2(root.join("prime-verifier"))
            }
            Some(_) => return None,
            None => CgroupVersion::V1 {
                memory: root.join("memory/prime-verifier"),
                pids: root.join("pids/prime-verifier"),
            },
        };
        let parents: Vec<PathBuf> = match &version {
            CgroupVersion::V2(p) => vec![p.clone()],
            CgroupVersion::V1 { memory, pids } => vec![memory.clone(), pids.clone()],
        };
        for p in &parents {
            if std::fs::create_dir_all(p).is_err() {
                return None;
            }
            remove_stale(p, "run-", |d| std::fs::remove_dir(d));
        }
        if let CgroupVersion::V2(p) = &version {
            // Enable the controllers for the per-run children.
            let _ = std::fs::write(p.join("cgroup.subtree_control"), "+memory +pids");
        }
        let probe = Self { version };
        match probe.create(&SandboxLimits::default()) {
            Ok(c) => {
                c.kill_all_and_remove();
                Some(probe)
            }
            Err(e) => {
                tracing::info!(error = %e, "cgroups not usable; whole-sandbox caps disabled");
                None
            }
        }
    }

    fn create(&self, limits: &SandboxLimits) -> std::io::Result<RunCgroup> {
        let name = format!(
            "run-{}-{}",
            std::process::id(),
            RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut cg = RunCgroup { dirs: Vec::new() };
        let mem = limits.memory_bytes.to_string();
        let pids = limits.max_processes.to_string();
        match &self.version {
            CgroupVersion::V2(parent) => {
                let d = parent.join(&name);
                std::fs::create_dir(&d)?;
                cg.dirs.push(d.clone());
                std::fs::write(d.join("memory.max"), &mem)?;
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                std::fs::write(d.join("pids.max"), &pids)?;
            }
            CgroupVersion::V1 {
                memory,
                pids: pids_dir,
            } => {
                let m = memory.join(&name);
                std::fs::create_dir(&m)?;
                cg.dirs.push(m.clone());
                std::fs::write(m.join("memory.limit_in_bytes"), &mem)?;
                let _ = std::fs::write(m.join("memory.memsw.limit_in_bytes"), &mem);
                let p = pids_dir.join(&name);
                std::fs::create_dir(&p)?;
                cg.dirs.push(p.clone());
                std::fs::write(p.join("pids.max"), &pids)?;
            }
        }
        Ok(cg)
    }
}

impl RunCgroup {
    fn open_procs_files(&self) -> Result<Vec<std::fs::File>, VerifierError> {
        self.dirs
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .map_err(VerifierError::from)
            })
            .collect()
    }

    /// Kills whatever is left in the cgroup (daemons that left the process group included)
    /// and removes it.
    fn kill_all_and_remove(&self) {
        for d in &self.dirs {
            let kill_file = d.join("cgroup.kill");
            if kill_file.exists() {
                let _ = std::fs::write(&kill_file, "1");
            }
        }
        for attempt in 0..50 {
            let mut busy = false;
            for d in &self.dirs {
                if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        busy = true;
                        // SAFETY: signalling a pid has no memory-safety preconditions.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
            if !busy {
                break;
            }
            std::thread::sleep(Duration::from_millis(2 * (attempt + 1)));
        }
        for d in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                tracing::warn!(dir = %d.display(), error = %e, "could not remove a run cgroup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_leftovers_of_dead_processes_are_removed_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = std::process::id();
        for name in [
            format!("run-{dead}-3"),
            format!("run-{mine}-4"),
            "run-x-1".to_string(),
            format!("other-{dead}-1"),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        remove_stale(dir.path(), "run-", |d| std::fs::remove_dir(d));
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut expected = vec![
            format!("other-{dead}-1"),
            format!("run-{mine}-4"),
            "run-x-1".to_string(),
        ];
        expected.sort();
        assert_eq!(left, expected);
    }
}
