//! Failures with real processes: a rank that is killed, one that hangs, and the watchdog
//! ending a process whose collective never returns. The child processes are this test
//! binary run again on its ignored `child` test, told what to do by environment variables.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prime_collective::tcp::TcpOptions;
use prime_collective::watchdog::WATCHDOG_EXIT_CODE;
use prime_collective::{Collective, RankInfo, ReduceOp, TcpGroup, Watchdog, Watched};
use tch::Tensor;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn info(rank: usize, port: u16) -> RankInfo {
    RankInfo {
        rank,
        world_size: 2,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

fn options(op_timeout: Duration) -> TcpOptions {
    TcpOptions {
        join_timeout: Duration::from_secs(30),
        op_timeout,
        epoch: 0,
        token: None,
    }
}

/// Starts this binary's `child` test as a rank with `role`; its stdout is piped.
fn spawn_child(role: &str, rank: usize, port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("PRIME_FAULT_ROLE", role)
        .env("PRIME_FAULT_RANK", rank.to_string())
        .env("PRIME_FAULT_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the child prints `line` on stdout.
fn wait_for_line(child: &mut Child, line: &str) {
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut text = String::new();
    loop {
        text.clear();
        assert!(
            reader.read_line(&mut text).unwrap() > 0,
            "child ended before {line:?}"
        );
        // libtest prints "test child ... " without a newline before the child's own output.
        if text.trim().ends_with(line) {
            return;
        }
    }
}

/// The child side. `step-then-wait`: joins, takes part in one all-reduce, says so, then
/// sleeps as if computing. `watched-stuck`: rank 0 under a 500 ms watchdog whose
/// collective's own deadline is far away, and which ignores the error the abort causes
/// (a process stuck elsewhere) so only the watchdog's exit can end it.
#[test]
#[ignore = "run as a child process by the other tests"]
fn child() {
    let Ok(role) = std::env::var("PRIME_FAULT_ROLE") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    let rank: usize = std::env::var("PRIME_FAULT_RANK").unwrap().parse().unwrap();
    let port: u16 = std::env::var("PRIME_FAULT_PORT").unwrap().parse().unwrap();
    let group = TcpGroup::join(&info(rank, port), options(Duration::from_secs(120))).unwrap();
    match role.as_str() {
        "step-then-wait" => {
            let mut group = group;
            let mut t = Tensor::from_slice(&[1f32; 1000]);
            group.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            println!("stepped");
            std::thread::sleep(Duration::from_secs(120));
        }
        "watched-stuck" => {
            let abort = group.abort_handle();
            let dog = Watchdog::exiting(Duration::from_millis(500), move || abort.abort());
            let mut group = Watched::new(group, dog);
            println!("joined");
            let mut t = Tensor::from_slice(&[1f32; 10]);
            let result = group.all_reduce(&mut t, ReduceOp::Sum);
            eprintln!("the collective returned: {result:?}");
            std::thread::sleep(Duration::from_secs(120));
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn a_killed_rank_makes_the_other_fail_fast() {
    tch::set_num_threads(1);
    let port = free_port();
    let mut child = spawn_child("step-then-wait", 1, port);
    let op_timeout = Duration::from_secs(60);
    let mut group = TcpGroup::join(&info(0, port), options(op_timeout)).unwrap();
    let mut t = Tensor::from_slice(&[2f32; 1000]);
    group.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(t.double_value(&[0]), 3.0);
    wait_for_line(&mut child, "stepped");
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    let err = group
        .all_reduce(&mut t, ReduceOp::Sum)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 1 closed the connection"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // The group stays failed: no later operation waits on the dead ring.
    let again = group.barrier().unwrap_err().to_string();
    assert!(again.contains("already failed"), "{again}");
}

#[test]
fn a_stuck_rank_fails_the_other_at_the_deadline() {
    tch::set_num_threads(1);
    let port = free_port();
    let mut child = spawn_child("step-then-wait", 1, port);
    let mut group = TcpGroup::join(&info(0, port), options(Duration::from_millis(800))).unwrap();
    let mut t = Tensor::from_slice(&[2f32; 1000]);
    group.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    wait_for_line(&mut child, "stepped");
    let start = Instant::now();
    let err = group
        .all_reduce(&mut t, ReduceOp::Sum)
        .unwrap_err()
        .to_string();
    let waited = start.elapsed();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(err.contains("did not finish within 800ms"), "{err}");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn the_watchdog_ends_a_process_stuck_in_a_collective() {
    let port = free_port();
    let mut child = spawn_child("watched-stuck", 0, port);
    // Rank 1 joins and then never calls the collective rank 0 waits in.
    let group = TcpGroup::join(&info(1, port), options(Duration::from_secs(60))).unwrap();
    wait_for_line(&mut child, "joined");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the watchdog did not end the child"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(group);
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(WATCHDOG_EXIT_CODE), "{stderr}");
    assert!(
        stderr.contains("all_reduce ran longer than 500ms"),
        "{stderr}"
    );
    // The abort made the blocked call return an error before the exit.
    assert!(stderr.contains("the collective returned: Err"), "{stderr}");
}
