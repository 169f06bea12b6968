//! The Landlock + seccomp confinement of the fallback backend (no user namespaces needed).
//!
//! Everything here is prepared in the parent; the child, between `fork` and `exec`, only makes
//! raw system calls on memory prepared before the fork ([`Confinement::apply`]).
//!
//! * Landlock (file system): read and execute beneath the Python installation, `/usr` and the
//!   library directories, read/write on a few `/dev` nodes, everything on the run's work dir,
//!   nothing else (`/proc`, `/etc`, `/home`, other runs' work dirs are all refused). With
//!   Landlock ABI 4 (Linux 6.7) TCP bind/connect are refused too, and with ABI 6 (Linux 6.12)
//!   the program may not signal processes outside its domain nor reach abstract unix sockets.
//!   Landlock also stops `ptrace` of anything outside the domain, at every ABI.
//! * seccomp (system calls): sockets other than `AF_UNIX`, new namespaces, `ptrace` and
//!   cross-process memory access, `io_uring` (which bypasses the socket filter), `setsid` and
//!   `setpgid` (so nothing leaves the process group that is killed at the end), mounts,
//!   keyrings, BPF, perf, kernel modules, clocks and reboot fail with `EPERM`; `clone3` fails
//!   with `ENOSYS` (its flags sit behind a pointer seccomp cannot read, and libc falls back to
//!   `clone`, whose namespace flags are filtered).
//! * As root, every capability is dropped (bounding, ambient, effective, permitted and
//!   inheritable sets) and `no_new_privs` is set, so `exec` cannot grant any back.

use crate::error::VerifierError;
use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, ABI,
};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

/// The Landlock ABI the running kernel offers (0: none, or disabled at boot).
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: with the VERSION flag, a null attribute pointer and size 0 is the documented
    // way to query the ABI; the call has no other effect.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(rc).unwrap_or(0)
}

/// The landlock crate's ABI level for a kernel ABI number (capped at what the crate knows).
fn abi_level(abi: u32) -> ABI {
    match abi {
        0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        _ => ABI::V6,
    }
}

/// A compiled seccomp program (classic BPF), shared by every run.
#[derive(Clone)]
pub struct SeccompProgram {
    deny: Arc<Vec<seccompiler::sock_filter>>,
    enosys: Arc<Vec<seccompiler::sock_filter>>,
}

impl std::fmt::Debug for SeccompProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeccompProgram")
            .field("deny_instructions", &self.deny.len())
            .field("enosys_instructions", &self.enosys.len())
            .finish()
    }
}

/// System calls refused outright with `EPERM`.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_setsid,
    libc::SYS_setpgid,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_personality,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_quotactl,
    libc::SYS_mknod,
    libc::SYS_mknodat,
];

/// Namespace flags `clone` may not carry.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// A system call number as seccompiler wants it (`c_long` is `i64` on every supported arch).
#[allow(clippy::unnecessary_cast)]
fn nr(n: libc::c_long) -> i64 {
    n as i64
}

fn seccomp_error(e: impl std::fmt::Display) -> VerifierError {
    VerifierError::Sandbox(format!("seccomp filter: {e}"))
}

impl SeccompProgram {
    /// Compiles the filter for this machine's architecture.
    pub fn compile() -> Result<Self, VerifierError> {
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccomp_error)?;
        let cond = |arg: u8, op: SeccompCmpOp, value: u64| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
                .and_then(|c| SeccompRule::new(vec![c]))
        };
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            DENIED.iter().map(|&n| (nr(n), Vec::new())).collect();
        // Only unix sockets (AF_UNIX); abstract ones are scoped by Landlock where it can.
        rules.insert(
            nr(libc::SYS_socket),
            vec![cond(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64).map_err(seccomp_error)?],
        );
        let clone_rules = NAMESPACE_FLAGS
            .iter()
            .map(|&flag| {
                let flag = flag as u64;
                cond(0, SeccompCmpOp::MaskedEq(flag), flag)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(seccomp_error)?;
        rules.insert(nr(libc::SYS_clone), clone_rules);
        let deny: seccompiler::BpfProgram = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .and_then(TryInto::try_into)
        .map_err(seccomp_error)?;
        let enosys: seccompiler::BpfProgram = SeccompFilter::new(
            BTreeMap::from([(nr(libc::SYS_clone3), Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .and_then(TryInto::try_into)
        .map_err(seccomp_error)?;
        Ok(Self {
            deny: Arc::new(deny),
            enosys: Arc::new(enosys),
        })
    }
}

/// What the child applies to itself before `exec`.
pub struct Confinement {
    /// The Landlock ruleset of this run (the work dir is in it).
    landlock: Option<OwnedFd>,
    seccomp: Option<SeccompProgram>,
    drop_capabilities: bool,
}

impl Confinement {
    /// Prepares the confinement of one run whose only writable directory is `workdir` and
    /// which may read beneath `readable`. `landlock_abi` 0 skips Landlock.
    pub fn prepare(
        landlock_abi: u32,
        workdir: &Path,
        readable: &[&Path],
        seccomp: Option<&SeccompProgram>,
        drop_capabilities: bool,
    ) -> Result<Self, VerifierError> {
        let landlock = if landlock_abi == 0 {
            None
        } else {
            Some(landlock_ruleset(
                abi_level(landlock_abi),
                workdir,
                readable,
            )?)
        };
        Ok(Self {
            landlock,
            seccomp: seccomp.cloned(),
            drop_capabilities,
        })
    }

    /// Applies the confinement to the calling (child) process. Async-signal-safe: raw system
    /// calls on memory prepared before the fork.
    pub fn apply(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_long| {
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY (whole block): prctl/capset/landlock/seccomp calls with valid arguments on
        // memory owned by `self`; none allocate.
        unsafe {
            if self.drop_capabilities {
                for cap in 0..64 {
                    // EINVAL past the last capability the kernel knows.
                    libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                }
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                );
                #[repr(C)]
                struct CapHeader {
                    version: u32,
                    pid: libc::c_int,
                }
                #[repr(C)]
                #[derive(Clone, Copy)]
                struct CapData {
                    effective: u32,
                    permitted: u32,
                    inheritable: u32,
                }
                let header = CapHeader {
                    version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                    pid: 0,
                };
                let data = [CapData {
                    effective: 0,
                    permitted: 0,
                    inheritable: 0,
                }; 2];
                check(libc::syscall(
                    libc::SYS_capset,
                    &header as *const CapHeader,
                    data.as_ptr(),
                ))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
            if let Some(fd) = &self.landlock {
                check(libc::syscall(
                    libc::SYS_landlock_restrict_self,
                    fd.as_raw_fd(),
                    0u32,
                ))?;
            }
            if let Some(p) = &self.seccomp {
                // The two filters match disjoint calls, so their order is immaterial.
                for prog in [&p.enosys, &p.deny] {
                    #[repr(C)]
                    struct SockFprog {
                        len: libc::c_ushort,
                        filter: *const seccompiler::sock_filter,
                    }
                    let fprog = SockFprog {
                        len: prog.len() as libc::c_ushort,
                        filter: prog.as_ptr(),
                    };
                    check(libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0u32,
                        &fprog as *const SockFprog,
                    ))?;
                }
            }
        }
        Ok(())
    }
}

/// Creates the Landlock ruleset of one run; its fd is close-on-exec.
fn landlock_ruleset(
    abi: ABI,
    workdir: &Path,
    readable: &[&Path],
) -> Result<OwnedFd, VerifierError> {
    let err = |e: landlock::RulesetError| VerifierError::Sandbox(format!("landlock: {e}"));
    let devices = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(readable, AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            devices,
            AccessFs::ReadFile | AccessFs::WriteFile,
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules([workdir], AccessFs::from_all(abi)))
        .map_err(err)?;
    let fd: Option<OwnedFd> = ruleset.into();
    fd.ok_or_else(|| VerifierError::Sandbox("landlock is not supported by this kernel".into()))
}
