//! `prime bench allreduce`: the CPU backend's ring all-reduce against a plain TCP copy of the
//! same bytes on loopback. Ranks run as threads of this process, each with its own sockets,
//! as separate processes would on one machine.
//!
//! Figures follow nccl-tests' convention: algorithm bandwidth is bytes / time; bus bandwidth
//! multiplies it by 2 (W−1)/W, the share of the buffer each rank's link carries in a ring
//! all-reduce, so it compares directly with the bandwidth of one plain TCP stream.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use prime_collective::tcp::TcpOptions;
use prime_collective::{Collective, RankInfo, ReduceOp, TcpGroup};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::error::{BenchError, Result};

/// What to measure.
#[derive(Debug, Clone)]
pub struct AllReduceSettings {
    /// Ranks in the ring.
    pub world: usize,
    /// Buffer sizes in bytes.
    pub sizes: Vec<usize>,
    /// f32 or bf16 elements.
    pub kind: Kind,
    /// Timed repeats per size after one warm-up; the median counts.
    pub repeats: usize,
}

/// One buffer size.
#[derive(Debug, Clone, Serialize)]
pub struct AllReduceRow {
    /// Buffer bytes per rank.
    pub bytes: usize,
    /// Median seconds of one all-reduce.
    pub seconds: f64,
    /// bytes / seconds, GB/s.
    pub algbw_gbs: f64,
    /// algbw · 2 (W−1)/W, GB/s.
    pub busbw_gbs: f64,
    /// Median seconds of sending the same bytes once over one loopback TCP stream.
    pub tcp_copy_seconds: f64,
    /// bytes / tcp_copy_seconds, GB/s.
    pub tcp_copy_gbs: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A loopback socket error, reported as I/O on `what`.
fn io_error(what: &str) -> impl Fn(std::io::Error) -> BenchError + Copy + '_ {
    move |source| BenchError::Io {
        path: what.into(),
        source,
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io_error("a free loopback port"))?
        .port())
}

/// Rank `rank` of a `world`-rank TCP group on loopback whose rank 0 listens on `port`.
pub(crate) fn join_loopback(
    rank: usize,
    world: usize,
    port: u16,
) -> std::result::Result<TcpGroup, String> {
    let info = RankInfo {
        rank,
        world_size: world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let options = TcpOptions {
        join_timeout: Duration::from_secs(60),
        op_timeout: Duration::from_secs(600),
        epoch: 0,
        token: None,
    };
    TcpGroup::join(&info, options).map_err(|e| e.to_string())
}

/// Median seconds of one all-reduce of `bytes` over `world` ranks.
fn time_all_reduce(settings: &AllReduceSettings, bytes: usize) -> Result<f64> {
    let port = free_port()?;
    let elements = (bytes / settings.kind.elt_size_in_bytes()) as i64;
    let world = settings.world;
    let times = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                scope.spawn(move || -> std::result::Result<Vec<f64>, String> {
                    let mut group = join_loopback(rank, world, port)?;
                    let mut t = Tensor::ones([elements], (settings.kind, Device::Cpu));
                    let mut times = Vec::new();
                    for i in 0..=settings.repeats {
                        group.barrier().map_err(|e| e.to_string())?;
                        let start = Instant::now();
                        group
                            .all_reduce(&mut t, ReduceOp::Mean)
                            .map_err(|e| e.to_string())?;
                        if i > 0 {
                            times.push(start.elapsed().as_secs_f64());
                        }
                    }
                    Ok(times)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect::<std::result::Result<Vec<_>, String>>()
    })
    .map_err(|e| io_error("the TCP ring")(std::io::Error::other(e)))?;
    // An all-reduce ends when its slowest rank does.
    let per_repeat = (0..settings.repeats)
        .map(|i| times.iter().map(|t| t[i]).fold(0.0, f64::max))
        .collect();
    Ok(median(per_repeat))
}

/// Median seconds of copying `bytes` once through one loopback TCP stream.
fn time_tcp_copy(bytes: usize, repeats: usize) -> Result<f64> {
    let io = io_error("the loopback TCP copy");
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; bytes];
        for _ in 0..=repeats {
            stream.read_exact(&mut buf)?;
            stream.write_all(&[1])?;
        }
        Ok(())
    });
    let mut stream = TcpStream::connect(addr).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let data = vec![7u8; bytes];
    let mut ack = [0u8; 1];
    let mut times = Vec::new();
    for i in 0..=repeats {
        let start = Instant::now();
        stream.write_all(&data).map_err(io)?;
        stream.read_exact(&mut ack).map_err(io)?;
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    reader.join().expect("reader thread").map_err(io)?;
    Ok(median(times))
}

/// Measures every size of `settings`.
pub fn run_allreduce(settings: &AllReduceSettings) -> Result<Vec<AllReduceRow>> {
    if settings.world < 2 || settings.repeats == 0 {
        return Err(BenchError::Settings(
            "allreduce needs at least 2 ranks and 1 repeat".into(),
        ));
    }
    let w = settings.world as f64;
    settings
        .sizes
        .iter()
        .map(|&bytes| {
            let seconds = time_all_reduce(settings, bytes)?;
            let tcp_copy_seconds = time_tcp_copy(bytes, settings.repeats)?;
            let algbw = bytes as f64 / seconds / 1e9;
            tracing::info!(bytes, seconds, tcp_copy_seconds, "all-reduce measured");
            Ok(AllReduceRow {
                bytes,
                seconds,
                algbw_gbs: algbw,
                busbw_gbs: algbw * 2.0 * (w - 1.0) / w,
                tcp_copy_seconds,
                tcp_copy_gbs: bytes as f64 / tcp_copy_seconds / 1e9,
            })
        })
        .collect()
}

/// The rows as a table.
pub fn table(settings: &AllReduceSettings, rows: &[AllReduceRow]) -> String {
    let mut out = format!(
        "all-reduce, TCP ring, {} ranks on loopback, {:?}\n{:>12} {:>11} {:>12} {:>12} {:>14} {:>13}\n",
        settings.world, settings.kind, "bytes", "time (ms)", "algbw GB/s", "busbw GB/s", "tcp copy (ms)", "tcp GB/s"
    );
    for r in rows {
        out += &format!(
            "{:>12} {:>11.2} {:>12.3} {:>12.3} {:>14.2} {:>13.3}\n",
            r.bytes,
            r.seconds * 1e3,
            r.algbw_gbs,
            r.busbw_gbs,
            r.tcp_copy_seconds * 1e3,
            r.tcp_copy_gbs
        );
    }
    out
}
