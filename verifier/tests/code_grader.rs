//! Code grading end to end in the real sandbox: formats, comparison, partial credit, and
//! attacks that must be contained (each scores 0, ends within its limit, leaves the host alone).

use prime_verifier::code::sandbox::{Backend, Sandbox, SandboxLimits, Termination};
use prime_verifier::code::{extract_code, grade_code, stdout_matches, CodeGraderConfig};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let limits = SandboxLimits {
            wall_time: Duration::from_secs(3),
            cpu_seconds: 3,
            ..SandboxLimits::default()
        };
        Sandbox::detect(limits).expect("python3 available")
    })
}

/// The Landlock + seccomp backend with a warm pool of two, forced even where bubblewrap
/// works; `None` (with the reason printed) only where the kernel has no Landlock.
fn landlock_sandbox() -> Option<&'static Sandbox> {
    static SANDBOX: OnceLock<Option<Sandbox>> = OnceLock::new();
    SANDBOX
        .get_or_init(|| {
            Backend::landlock().map(|b| sandbox().clone().with_backend(b).with_warm_pool(2))
        })
        .as_ref()
        .or_else(|| {
            eprintln!("SKIPPED for landlock+seccomp: this kernel has no Landlock (or it is off)");
            None
        })
}

/// Every backend this machine offers: the detected one, then Landlock + seccomp.
fn backends() -> Vec<&'static Sandbox> {
    std::iter::once(sandbox())
        .chain(landlock_sandbox())
        .collect()
}

fn fence(code: &str) -> String {
    format!("Here is my solution:\n```python\n{code}\n```\nDone.")
}

fn grade(code: &str, tests: &str) -> f64 {
    grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        &fence(code),
        tests,
        None,
    )
    .expect("valid spec")
    .score
}

const ADD_TESTS: &str =
    r#"{"inputs": ["1 2\n", "3 4\n", "10 -5\n"], "outputs": ["3\n", "7\n", "5\n"]}"#;

#[test]
fn stdin_stdout_correct_and_wrong() {
    assert_eq!(
        grade("a, b = map(int, input().split())\nprint(a + b)", ADD_TESTS),
        1.0
    );
    assert_eq!(
        grade("a, b = map(int, input().split())\nprint(a - b)", ADD_TESTS),
        0.0
    );
    // Fails only the third test.
    let partial = "a, b = map(int, input().split())\nprint(a + b if b > 0 else 0)";
    assert!((grade(partial, ADD_TESTS) - 2.0 / 3.0).abs() < 1e-9);
    // Reading all of stdin and an `if __name__` guard work.
    let main_guard = "import sys\ndef main():\n    a, b = map(int, sys.stdin.read().split())\n    print(a + b)\nif __name__ == '__main__':\n    main()";
    assert_eq!(grade(main_guard, ADD_TESTS), 1.0);
}

#[test]
fn partial_credit_counts_the_first_ten() {
    let inputs: Vec<String> = (0..12).map(|i| format!("{i}\n")).collect();
    let outputs: Vec<String> = (0..12).map(|i| format!("{}\n", i * 2)).collect();
    let tests = serde_json::json!({"inputs": inputs, "outputs": outputs}).to_string();
    // Wrong on input 3 only: 9 of the first 10.
    let code = "n = int(input())\nprint(n * 2 if n != 3 else 0)";
    assert!((grade(code, &tests) - 0.9).abs() < 1e-9);
    // Wrong only after the first ten: the spec's rule gives 1.0.
    let late = "n = int(input())\nprint(n * 2 if n < 11 else 0)";
    assert_eq!(grade(late, &tests), 1.0);
    // Binary mode: all or nothing.
    let binary = CodeGraderConfig {
        continuous: false,
        ..CodeGraderConfig::default()
    };
    let v = grade_code(sandbox(), &binary, &fence(late), &tests, None).unwrap();
    assert_eq!(v.score, 0.0);
}

#[test]
fn call_based_functions_and_solution_class() {
    let tests =
        r#"{"fn_name": "add", "inputs": ["1\n2", "[1, 2]\n[3]"], "outputs": [3, [1, 2, 3]]}"#;
    assert_eq!(
        grade(
            "def add(a, b):\n    print('noise')\n    return a + b",
            tests
        ),
        1.0
    );
    let class = r#"{"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9]], "outputs": [[0, 1]]}"#;
    let code = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n                return (seen[target - x], i)\n            seen[x] = i";
    assert_eq!(grade(code, class), 1.0);
    // `result == expected[0]` is accepted, and ints equal floats by value.
    let wrapped = r#"{"fn_name": "f", "inputs": [[2]], "outputs": [[4.0]]}"#;
    assert_eq!(grade("def f(x):\n    return x * 2", wrapped), 1.0);
    assert_eq!(grade("def f(x):\n    return x * 3", wrapped), 0.0);
    assert_eq!(grade("def g(x):\n    return x * 2", wrapped), 0.0);
}

#[test]
fn compile_errors_and_missing_code_score_zero() {
    assert_eq!(grade("def broken(:\n  pass", ADD_TESTS), 0.0);
    let v = grade_code(sandbox(), &CodeGraderConfig::default(), "", ADD_TESTS, None).unwrap();
    assert_eq!(v.score, 0.0);
    assert!(grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        "x",
        "not json",
        None
    )
    .is_err());
    assert!(grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        "x",
        r#"{"inputs": [], "outputs": []}"#,
        None
    )
    .is_err());
}

#[test]
fn extraction_takes_the_last_python_block() {
    let r = "```python\nprint(1)\n```\nBetter:\n```python\nprint(2)\n```";
    assert_eq!(extract_code(r).trim(), "print(2)");
    assert_eq!(extract_code("print(3)"), "print(3)");
    assert_eq!(extract_code("```python\nprint(4)").trim(), "print(4)");
}

#[test]
fn stdout_comparison_rules() {
    assert!(stdout_matches("3\n", "3"));
    assert!(stdout_matches("1 2\n3  \n", "1 2\n3\n"));
    assert!(stdout_matches("a\n\nb\n", "a\nb"));
    assert!(stdout_matches("0.3333333\n", "0.33333333"));
    assert!(!stdout_matches("0.34\n", "0.33"));
    assert!(!stdout_matches("YES", "NO"));
    assert!(!stdout_matches("", "1"));
}

/// Runs an attack as a stdin problem whose only correct output is "ok" and checks it scores 0
/// within its limit.
fn contained(name: &str, code: &str) {
    for sb in backends() {
        contained_in(sb, name, code);
    }
}

fn contained_in(sb: &Sandbox, name: &str, code: &str) {
    let tests = r#"{"inputs": [""], "outputs": ["unreachable-expected-output"]}"#;
    let backend = sb.backend().name();
    let start = Instant::now();
    let score = grade_code(sb, &CodeGraderConfig::default(), &fence(code), tests, None)
        .expect("valid spec")
        .score;
    let took = start.elapsed();
    assert_eq!(score, 0.0, "{name} scored under {backend}");
    assert!(
        took < Duration::from_secs(20),
        "{name} took {took:?} under {backend}"
    );
}

/// Grades `code` against `tests` in `sb`.
fn grade_in(sb: &Sandbox, code: &str, tests: &str) -> f64 {
    grade_code(sb, &CodeGraderConfig::default(), &fence(code), tests, None)
        .expect("valid spec")
        .score
}

#[test]
fn attack_infinite_loop_and_sleep() {
    contained("infinite loop", "while True:\n    pass");
    contained("long sleep", "import time\ntime.sleep(3600)");
}

#[test]
fn attack_fork_bomb() {
    // As root, only a pids cgroup bounds the process count (RLIMIT_NPROC does not bind root);
    // without one, running a fork bomb would endanger the test machine itself.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && !sandbox().has_cgroup() {
        eprintln!("SKIPPED fork bomb: running as root without a writable cgroup (RLIMIT_NPROC does not bind root)");
        return;
    }
    contained(
        "fork bomb",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    );
    // The host still forks fine afterwards.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
}

#[test]
fn attack_memory_bomb() {
    contained(
        "memory bomb",
        "x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))",
    );
}

#[test]
fn attack_huge_output_is_capped() {
    contained(
        "huge output",
        "import sys\nchunk = 'x' * (1 << 20)\nwhile True:\n    sys.stdout.write(chunk)",
    );
}

#[test]
fn attack_disk_fill_and_fd_exhaustion() {
    contained(
        "disk fill",
        "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))",
    );
    contained(
        "fd exhaustion",
        "fs = []\nwhile True:\n    fs.append(open('/dev/null'))",
    );
}

#[test]
fn attack_segfault_and_deep_recursion() {
    contained("ctypes segfault", "import ctypes\nctypes.string_at(0)");
    contained(
        "deep recursion",
        "def f(n):\n    return f(n + 1) + 1\nprint(f(0))",
    );
}

#[test]
fn attack_daemon_does_not_outlive_the_run() {
    // A daemon that leaves the process group is caught by the pid namespace (bubblewrap) or
    // the run's cgroup; the bare rlimit backend has neither.
    if sandbox().backend() == &Backend::Rlimits && !sandbox().has_cgroup() {
        eprintln!("SKIPPED daemon attack: rlimits backend without a writable cgroup");
        return;
    }
    let marker = std::env::temp_dir().join(format!("prime-daemon-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    // The daemon double-forks, leaves the session, and tries to write a host file later.
    let code = format!(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1.5)\n        open({path:?}, 'w').write('escaped')\n        os._exit(0)\n    os._exit(0)\nprint('parent done')",
        path = marker.display().to_string()
    );
    contained("daemon", &code);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !marker.exists(),
        "a daemon outlived the run and wrote {marker:?}"
    );
}

/// The backends that isolate files, network and other processes: bubblewrap (where it is
/// usable) and Landlock + seccomp. The rlimit-only fallback promises none of that. Says why
/// when a backend is missing here.
fn isolating_backends() -> Vec<&'static Sandbox> {
    let mut out = Vec::new();
    if matches!(sandbox().backend(), Backend::Bubblewrap { .. }) {
        out.push(sandbox());
    } else {
        eprintln!(
            "SKIPPED for bubblewrap: detected backend is {} (bwrap missing or user namespaces off)",
            sandbox().backend().name()
        );
    }
    out.extend(landlock_sandbox());
    out
}

#[test]
fn attack_host_files_and_environment_are_invisible() {
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    let grader_pid = std::process::id();
    // The Python installation is visible on purpose (read-only): its path's components are
    // expected in listings.
    let python_parts: Vec<String> = sandbox()
        .python()
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for sb in isolating_backends() {
        // Contents of host files, directory listings, and any process's environment
        // (bubblewrap's init and the grader's own) must be out of reach; so must the
        // grader's variables in the program's own environment.
        let code = format!(
            "import os\nleak = []\nfor p in [{secret:?}, '/etc/passwd', '/etc/hostname', '/root/.bashrc', '/proc/1/environ', '/proc/{grader_pid}/environ', '/work/../etc/shadow']:\n    try:\n        if open(p, 'rb').read():\n            leak.append(p)\n    except Exception:\n        pass\nfor d in ['/', '/etc', '/home', '/root', '/tmp']:\n    try:\n        if any(n not in ('work', 'usr', 'bin', 'sbin', 'lib', 'lib64', 'lib32', 'libx32', 'proc', 'dev', 'tmp', 'etc', 'ld.so.cache', *{python_parts:?}) for n in os.listdir(d)):\n            leak.append(d)\n    except Exception:\n        pass\nif 'CARGO' in str(os.environ) or len(os.environ) > 4:\n    leak.append('environ')\nprint('LEAK', leak) if leak else print('SAFE')",
            secret = secret.display().to_string()
        );
        let out = sb.run(&code, b"").unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "SAFE",
            "{} leaked host state ({})",
            sb.backend().name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Under bubblewrap the host paths do not even exist.
    if matches!(sandbox().backend(), Backend::Bubblewrap { .. }) {
        let code = "import os\nprint('LEAK' if any(os.path.exists(p) for p in ['/etc/passwd', '/home', '/root/.cargo']) else 'SAFE')";
        assert_eq!(grade(code, r#"{"inputs": [""], "outputs": ["SAFE"]}"#), 1.0);
    }
}

#[test]
fn attack_writes_outside_and_killing_others() {
    for sb in isolating_backends() {
        // Landlock scopes signals from ABI 6 (Linux 6.12); before that a same-uid process
        // could be signalled, so only the write is checked there.
        let check_kill = match sb.backend() {
            Backend::Landlock { abi } if *abi < 6 => {
                eprintln!("SKIPPED kill check for landlock+seccomp: Landlock ABI {abi} < 6");
                false
            }
            _ => true,
        };
        let target = std::env::temp_dir().join(format!(
            "prime-outside-{}-{}",
            std::process::id(),
            sb.backend().name()
        ));
        let mut victim = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let code = format!(
            "import os, signal\nfor p in [{target:?}, '/tmp/prime-outside-x', os.path.expanduser('~/../escape')]:\n    try:\n        open(p, 'w').write('x')\n    except Exception:\n        pass\ntry:\n    os.kill({victim}, signal.SIGKILL)\nexcept Exception:\n    pass\nfor pid in range(2, 500):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except Exception:\n        pass",
            target = target.display().to_string(),
            victim = victim.id()
        );
        contained_in(sb, "outside write and kill", &code);
        assert!(
            !target.exists(),
            "{} wrote outside the work dir",
            sb.backend().name()
        );
        if check_kill {
            assert!(
                victim.try_wait().unwrap().is_none(),
                "{} killed a host process",
                sb.backend().name()
            );
        }
        let _ = victim.kill();
        victim.wait().unwrap();
    }
}

#[test]
fn attack_network_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = format!(
        "import socket\nreached = []\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n    try:\n        s = socket.create_connection(addr, timeout=1)\n        reached.append(addr)\n    except Exception:\n        pass\ntry:\n    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    u.sendto(b'x', ('1.1.1.1', 53))\n    reached.append('udp')\nexcept Exception:\n    pass\nprint('REACHED', reached) if reached else print('ISOLATED')"
    );
    let tests = r#"{"inputs": [""], "outputs": ["ISOLATED"]}"#;
    for sb in isolating_backends() {
        assert_eq!(
            grade_in(sb, &code, tests),
            1.0,
            "{} reached the network",
            sb.backend().name()
        );
    }
}

#[test]
fn landlock_seccomp_blocks_namespaces_ptrace_and_new_sessions() {
    let Some(sb) = landlock_sandbox() else {
        return;
    };
    // Each escape hatch must fail inside the sandbox; the program lists what worked.
    let code = "import os, ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nworked = []\nif libc.unshare(0x10000000) == 0:\n    worked.append('unshare-user')\nif libc.unshare(0x40000000) == 0:\n    worked.append('unshare-net')\nif libc.ptrace(16, 1, 0, 0) == 0:\n    worked.append('ptrace')\ntry:\n    os.setsid()\n    worked.append('setsid')\nexcept OSError:\n    pass\nif libc.syscall(425, 8, 0) >= 0:\n    worked.append('io_uring')\nprint('ESCAPED', worked) if worked else print('CONFINED')";
    let tests = r#"{"inputs": [""], "outputs": ["CONFINED"]}"#;
    let v = grade_code(sb, &CodeGraderConfig::default(), &fence(code), tests, None).unwrap();
    assert_eq!(v.score, 1.0, "landlock+seccomp let through: {}", v.reason);
    // And ordinary programs still work there: threads, subprocesses, temp files.
    let ok = "import threading, subprocess, tempfile, sys\nt = threading.Thread(target=lambda: None)\nt.start(); t.join()\nout = subprocess.run([sys.executable, '-c', 'print(2 + 2)'], capture_output=True, text=True).stdout.strip()\nwith tempfile.TemporaryFile() as f:\n    f.write(b'x')\nprint(out)";
    let tests = r#"{"inputs": [""], "outputs": ["4"]}"#;
    let v = grade_code(sb, &CodeGraderConfig::default(), &fence(ok), tests, None).unwrap();
    assert_eq!(v.score, 1.0, "an ordinary program failed: {}", v.reason);
}

#[test]
fn rlimit_fallback_still_contains_runaway_code() {
    let fallback = sandbox().clone().with_backend(Backend::Rlimits);
    let tests = r#"{"inputs": ["2\n"], "outputs": ["4\n"]}"#;
    let cfg = CodeGraderConfig::default();
    let ok = grade_code(
        &fallback,
        &cfg,
        &fence("print(int(input()) * 2)"),
        tests,
        None,
    )
    .unwrap();
    assert_eq!(ok.score, 1.0);
    let start = Instant::now();
    let looping = grade_code(&fallback, &cfg, &fence("while True: pass"), tests, None).unwrap();
    assert_eq!(looping.score, 0.0);
    assert!(start.elapsed() < Duration::from_secs(10));
    let env = grade_code(
        &fallback,
        &cfg,
        &fence(
            "import os\nprint(4 if 'CARGO' not in str(os.environ) and len(os.environ) <= 4 else 5)",
        ),
        tests,
        None,
    )
    .unwrap();
    assert_eq!(
        env.score, 1.0,
        "grader environment leaked into the fallback sandbox"
    );
}

#[test]
fn deadline_stops_remaining_tests() {
    let tests = r#"{"inputs": ["", "", "", ""], "outputs": ["x", "x", "x", "x"]}"#;
    let start = Instant::now();
    let deadline = start + Duration::from_millis(1500);
    let v = grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        &fence("while True: pass"),
        tests,
        Some(deadline),
    )
    .unwrap();
    assert_eq!(v.score, 0.0);
    assert!(
        v.tests_run < 4,
        "ran {} tests past the deadline",
        v.tests_run
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn warm_pool_runs_are_fresh_and_isolated() {
    let pooled = sandbox().clone().with_warm_pool(2);
    assert_eq!(pooled.warm_pool_size(), 2);
    // A shorter wall clock keeps the pool; other limits restart it with the same size.
    let mut limits = pooled.limits().clone();
    limits.wall_time = Duration::from_secs(1);
    assert_eq!(
        pooled.clone().with_limits(limits.clone()).warm_pool_size(),
        2
    );
    limits.max_open_files = 32;
    assert_eq!(pooled.clone().with_limits(limits).warm_pool_size(), 2);
    for sb in [&pooled, landlock_sandbox().unwrap_or(&pooled)] {
        let backend = sb.backend().name();
        // Each run leaves a file, a variable and a background process behind; the next run
        // must see none of them, and see its own stdin and `__name__`.
        for i in 0..4 {
            let program = "import os, sys, subprocess\nseen = [p for p in ('leftover.txt',) if os.path.exists(p)]\nopen('leftover.txt', 'w').write('x')\nif 'marker' in globals():\n    seen.append('globals')\nmarker = 1\nsubprocess.Popen(['sleep', '30'])\nprint(__name__, sys.argv[0], sys.stdin.read().strip(), seen)";
            let stdin = format!("run-{i}");
            let out = sb.run(program, stdin.as_bytes()).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("__main__ main.py run-{i} []"),
                "{backend}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A program that fails to compile reports it as python would.
        let out = sb.run("def broken(:\n", b"").unwrap();
        assert_eq!(out.termination, Termination::Exited(1), "{backend}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("SyntaxError"),
            "{backend}"
        );
    }
}

#[test]
fn status_reports_the_active_backend() {
    use prime_verifier::{Grader, GraderConfig};
    let detected = Grader::with_sandbox(GraderConfig::default(), Some(sandbox().clone()));
    assert_eq!(
        detected.status().sandbox_backend,
        sandbox().backend().name()
    );
    if let Some(sb) = landlock_sandbox() {
        let g = Grader::with_sandbox(GraderConfig::default(), Some(sb.clone()));
        assert_eq!(g.status().sandbox_backend, "landlock+seccomp");
    }
    let none = Grader::with_sandbox(GraderConfig::default(), None);
    assert_eq!(none.status().sandbox_backend, "unavailable");
}
