//! Running untrusted Python in a sandbox.
//!
//! Two backends, chosen once at start-up by [`Sandbox::detect`] and reported in the service's
//! status:
//!
//! * [`Backend::Bubblewrap`] (preferred): `bwrap` puts the run in fresh user, pid, mount, ipc,
//!   uts, cgroup and network namespaces, as uid/gid 65534 with all capabilities dropped. The
//!   file system is a tmpfs root with read-only binds of `/usr` (plus the `/bin`, `/lib*`
//!   symlinks) and of the Python installation, a fresh `/proc`, a minimal `/dev`, a private
//!   `/tmp`, and the per-run work dir as the only writable host path. `bwrap` itself starts
//!   with an empty environment (its init keeps the environment it was started with, readable
//!   through `/proc/1/environ`), and the program gets only `PATH`, `HOME` and `LANG`.
//!   No network: the new network namespace has only a down loopback.
//! * [`Backend::Rlimits`] (fallback where user namespaces are unavailable, e.g. a locked-down
//!   pod): the same resource limits, an empty environment, a private work dir, a new session
//!   so the whole process group is killed, and a private network namespace when the process
//!   may create one (root); without it the program can reach the network. This backend does
//!   not hide host files; it is weaker and the status says so.
//!
//! Both backends apply rlimits in the child before `exec` (CPU seconds, address space, file
//! size, open files, no core dumps, process count for non-root users), kill the whole process
//! group on the wall-clock limit, cap captured stdout/stderr (a run that exceeds the cap is
//! killed), and, where the grader may create cgroups (v2, or v1 `memory` + `pids`), put the run
//! in its own cgroup with a memory cap and a pids cap for the whole tree and kill everything in
//! it afterwards, which also catches daemons that left the process group.
//!
//! Cost: on a 2-core machine, a trivial program's test took about 45 ms with bare `python3`,
//! 65 ms under bubblewrap (a fresh network namespace is most of it), and about 30 ms more with
//! the per-run cgroup on cgroup v1, where moving a task into a cgroup waits for an RCU grace
//! period per hierarchy (measure with `cargo run --release -p prime-verifier --example
//! sandbox_overhead`). Safety comes first: the cgroup is the only whole-sandbox memory cap and
//! the only process cap that binds root.
//!
//! Without a cgroup, the process-count cap is `RLIMIT_NPROC`, which the kernel counts per real
//! uid: concurrent runs under one non-root uid share it (a fork bomb in one run can make a
//! neighbour's fork fail), and it does not bind root at all. Give the grader a writable cgroup
//! (or run one sandbox at a time) where that matters.
//!
//! Kubernetes: bubblewrap needs user namespaces inside the pod, i.e. a seccomp profile that
//! allows `unshare`/`clone` with `CLONE_NEWUSER` (`Unconfined` or a custom profile; the
//! RuntimeDefault profile of containerd blocks it for non-root), an AppArmor profile that
//! allows user namespaces (`unconfined` on Ubuntu hosts with
//! `apparmor_restrict_unprivileged_userns`), and `procMount: Unmasked` or a pod without masked
//! `/proc` paths so `bwrap --proc` can mount a fresh procfs. The cgroup caps need a writable
//! cgroup file system (cgroup v2 with delegation, or a privileged container). Without those the
//! rlimit backend still runs, with the weaker guarantees listed above.

use crate::error::VerifierError;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Resource limits of one sandboxed run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

/// The isolation mechanism in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// bubblewrap namespaces plus rlimits.
    Bubblewrap {
        /// Path of the `bwrap` binary.
        bwrap: PathBuf,
    },
    /// rlimits, a new session and (as root) a private network namespace only.
    Rlimits,
}

impl Backend {
    /// Short name for status reports.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Bubblewrap { .. } => "bubblewrap",
            Backend::Rlimits => "rlimits",
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

/// A configured sandbox; cheap to share between threads.
#[derive(Debug, Clone)]
pub struct Sandbox {
    backend: Backend,
    limits: SandboxLimits,
    /// Host path of the Python interpreter binary.
    python: PathBuf,
    /// Host directory of the Python installation (bound read-only into the sandbox).
    python_prefix: PathBuf,
    cgroups: Option<CgroupMounts>,
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Sandbox {
    /// Finds `python3` on `PATH` and the best available backend.
    pub fn detect(limits: SandboxLimits) -> Result<Self, VerifierError> {
        let (python, python_prefix) = locate_python()?;
        let cgroups = CgroupMounts::detect();
        let mut sandbox = Self {
            backend: Backend::Rlimits,
            limits,
            python,
            python_prefix,
            cgroups,
        };
        if let Some(bwrap) = find_on_path("bwrap") {
            let candidate = Self {
                backend: Backend::Bubblewrap { bwrap },
                ..sandbox.clone()
            };
            match candidate.run("print(6 * 7)", b"") {
                Ok(out) if out.success() && out.stdout.starts_with(b"42") => sandbox = candidate,
                Ok(out) => tracing::warn!(
                    stderr = %String::from_utf8_lossy(&out.stderr),
                    "bubblewrap present but unusable here (user namespaces disabled?); using rlimits"
                ),
                Err(e) => tracing::warn!(error = %e, "bubblewrap probe failed; using rlimits"),
            }
        } else {
            tracing::warn!("bwrap not found on PATH; sandbox falls back to rlimits only");
        }
        tracing::info!(
            backend = sandbox.backend.name(),
            cgroup = sandbox.cgroups.is_some(),
            python = %sandbox.python.display(),
            "code sandbox ready"
        );
        Ok(sandbox)
    }

    /// The same sandbox forced onto `backend` (tests use it to exercise the fallback).
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The same sandbox with other limits.
    pub fn with_limits(mut self, limits: SandboxLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The Python interpreter the sandbox runs (the real binary behind `python3` on `PATH`).
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// The active backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The limits applied to each run.
    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// Whether each run gets a cgroup with a whole-sandbox memory and pids cap.
    pub fn has_cgroup(&self) -> bool {
        self.cgroups.is_some()
    }

    /// Runs the Python `program` with `stdin`, inside a fresh work dir that is removed after.
    pub fn run(&self, program: &str, stdin: &[u8]) -> Result<RunOutput, VerifierError> {
        let workdir = tempfile::Builder::new()
            .prefix("prime-sandbox-")
            .tempdir()?;
        let script = workdir.path().join("main.py");
        std::fs::write(&script, program)?;
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
        let result = self.spawn_and_supervise(workdir.path(), stdin, cgroup.as_ref());
        if let Some(c) = &cgroup {
            c.kill_all_and_remove();
        }
        result
    }

    fn spawn_and_supervise(
        &self,
        workdir: &Path,
        stdin: &[u8],
        cgroup: Option<&RunCgroup>,
    ) -> Result<RunOutput, VerifierError> {
        let mut cmd = self.command(workdir);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let pre_exec = PreExec::new(&self.limits, cgroup, &self.backend)?;
        // SAFETY: the closure only calls async-signal-safe libc functions (setsid, prctl,
        // setrlimit, write, unshare) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || pre_exec.apply());
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| VerifierError::Sandbox(format!("spawn failed: {e}")))?;
        supervise(child, stdin, &self.limits, started)
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
                c.args([python.as_str(), "-I", "-B", "main.py"]);
                c
            }
            Backend::Rlimits => {
                let mut c = Command::new(&self.python);
                c.env_clear()
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                    .env("HOME", workdir)
                    .env("LANG", "C.UTF-8")
                    .current_dir(workdir)
                    .args(["-I", "-B", "main.py"]);
                c
            }
        }
    }
}

/// Everything the child does between fork and exec, prepared in the parent.
struct PreExec {
    limits: Vec<(libc::__rlimit_resource_t, u64)>,
    cgroup_procs: Vec<std::fs::File>,
    new_netns: bool,
}

impl PreExec {
    fn new(
        limits: &SandboxLimits,
        cgroup: Option<&RunCgroup>,
        backend: &Backend,
    ) -> Result<Self, VerifierError> {
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
        Ok(Self {
            limits: rl,
            cgroup_procs,
            new_netns: root && *backend == Backend::Rlimits,
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
                use std::os::fd::AsRawFd;
                // "0" moves the writing process itself.
                if libc::write(f.as_raw_fd(), b"0\n".as_ptr().cast(), 2) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if self.new_netns && libc::unshare(libc::CLONE_NEWNET) < 0 {
                return Err(std::io::Error::last_os_error());
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
        Ok(())
    }
}

/// Feeds stdin, drains stdout/stderr up to the cap, enforces the wall clock, kills the group.
fn supervise(
    mut child: Child,
    stdin: &[u8],
    limits: &SandboxLimits,
    started: Instant,
) -> Result<RunOutput, VerifierError> {
    let pid = child.id() as libc::pid_t;
    let cap = limits.max_output_bytes;
    let stdin_data = stdin.to_vec();
    let mut stdin_pipe = child.stdin.take();
    let writer = std::thread::spawn(move || {
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
