//! The CPU backend: the ranks form a ring over TCP and run the classic ring algorithms
//! (reduce-scatter then all-gather for an all-reduce), so each rank sends and receives about
//! `2 (W−1)/W` times the buffer whatever the world size W. It needs no GPU and no library
//! beyond std, which is what lets data parallelism be tested on any machine.
//!
//! Forming the group: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects,
//! says its rank, the world size, the group epoch and the port of its own ring listener, and
//! gets back the address of every rank. Each rank then connects to the next one and accepts
//! the previous one. Every step (joining, each operation, each read and write) runs against a
//! deadline, and an error shuts the sockets down so the neighbours fail fast too instead of
//! waiting for their own deadline.
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use half::bf16;
use tch::{Device, Kind, Tensor};

use crate::env::RankInfo;
use crate::error::{CollectiveError, Result};
use crate::{check_numel, Collective, ReduceOp};

const JOIN_MAGIC: u32 = 0x5052_4a4e; // "PRJN"
const RING_MAGIC: u32 = 0x5052_5247; // "PRRG"
const OP_MAGIC: u32 = 0x5052_4f50; // "PROP"
/// Broadcasts are forwarded along the ring in pieces of this size, so the hops overlap.
const BROADCAST_PIECE: usize = 4 << 20;

/// Deadlines and identity of a TCP group.
#[derive(Clone, PartialEq)]
pub struct TcpOptions {
    /// How long forming the group may take (every rank started and connected).
    pub join_timeout: Duration,
    /// How long one collective may take before it fails.
    pub op_timeout: Duration,
    /// Generation of the group: a rank from another epoch (a restarted group) is turned away.
    pub epoch: u64,
    /// The run's shared token (`PRIME_TOKEN`): a peer must prove it holds the same one (a
    /// digest of it and the epoch, compared in constant time) to join or to take a ring
    /// position. Not encryption: keep the group on a trusted network.
    pub token: Option<String>,
}

impl std::fmt::Debug for TcpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("TcpOptions")
            .field("join_timeout", &self.join_timeout)
            .field("op_timeout", &self.op_timeout)
            .field("epoch", &self.epoch)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            join_timeout: Duration::from_secs(300),
            op_timeout: Duration::from_secs(600),
            epoch: 0,
            token: None,
        }
    }
}

/// Shuts a group's sockets down from another thread, so an operation blocked on them fails
/// at once (the watchdog's abort).
#[derive(Debug, Clone, Default)]
pub struct TcpAbort(Arc<Mutex<Vec<TcpStream>>>);

impl TcpAbort {
    /// Shuts down every socket of the group; its pending and later operations fail.
    pub fn abort(&self) {
        for stream in self.0.lock().expect("abort list").iter() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// This rank's bytes in [`TcpGroup::broadcast_host`].
pub enum HostBuffer<'a> {
    /// The root's bytes, sent to every other rank.
    Send(&'a [u8]),
    /// Where a non-root rank receives the root's bytes.
    Receive(&'a mut [u8]),
    /// A non-root rank receives `len` bytes piece by piece (4 MiB each, the last shorter):
    /// each piece is handed to `sink` once it has arrived and been passed on, so work on it
    /// (hashing) overlaps the rest of the transfer. The sink cannot fail the broadcast: the
    /// ranks after this one still need every piece.
    Pieces {
        /// Bytes to receive.
        len: usize,
        /// Takes each piece, in order.
        sink: &'a mut dyn FnMut(Vec<u8>),
    },
}

impl std::fmt::Debug for HostBuffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send(data) => write!(f, "Send({} bytes)", data.len()),
            Self::Receive(data) => write!(f, "Receive({} bytes)", data.len()),
            Self::Pieces { len, .. } => write!(f, "Pieces({len} bytes)"),
        }
    }
}

/// A ring of ranks over TCP implementing [`Collective`].
#[derive(Debug)]
pub struct TcpGroup {
    rank: usize,
    world_size: usize,
    epoch: u64,
    op_timeout: Duration,
    /// Connection to rank `rank + 1` (we send on it); `None` for a group of one.
    next: Option<TcpStream>,
    /// Connection from rank `rank − 1` (we receive on it).
    prev: Option<TcpStream>,
    /// Operations started, checked against the neighbours' so mismatched calls fail clearly.
    seq: u64,
    /// Set by the first failure: the ring is unusable afterwards.
    broken: Option<String>,
    abort: TcpAbort,
}

/// What a failing socket call was doing, for the error message.
#[derive(Clone, Copy)]
struct Ctx {
    rank: usize,
    peer: usize,
    op: &'static str,
    limit: Duration,
}

impl Ctx {
    fn io(self, source: std::io::Error) -> CollectiveError {
        match source.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => CollectiveError::PeerClosed {
                rank: self.rank,
                peer: self.peer,
                op: self.op,
            },
            _ => CollectiveError::Io {
                rank: self.rank,
                peer: self.peer,
                op: self.op,
                source,
            },
        }
    }

    fn timeout(self) -> CollectiveError {
        CollectiveError::Timeout {
            rank: self.rank,
            op: self.op,
            limit: self.limit,
        }
    }
}

fn remaining(deadline: Instant, ctx: Ctx) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ctx.timeout());
    }
    Ok(left)
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant, ctx: Ctx) -> Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        stream
            .set_read_timeout(Some(remaining(deadline, ctx)?))
            .map_err(|e| ctx.io(e))?;
        match stream.read(&mut buf[pos..]) {
            Ok(0) => return Err(ctx.io(ErrorKind::UnexpectedEof.into())),
            Ok(n) => pos += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(ctx.io(e)),
        }
    }
    Ok(())
}

/// Writes all of `buf` before `deadline`.
fn write_full(stream: &mut TcpStream, buf: &[u8], deadline: Instant, ctx: Ctx) -> Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        stream
            .set_write_timeout(Some(remaining(deadline, ctx)?))
            .map_err(|e| ctx.io(e))?;
        match stream.write(&buf[pos..]) {
            Ok(0) => return Err(ctx.io(ErrorKind::WriteZero.into())),
            Ok(n) => pos += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(ctx.io(e)),
        }
    }
    Ok(())
}

/// Little-endian encoding helpers for the small join and header messages.
struct Wire(Vec<u8>);

impl Wire {
    fn new() -> Self {
        Self(Vec::new())
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Byte ranges of `world` near-equal chunks of `elements` elements of `elt` bytes.
fn chunk_ranges(elements: usize, world: usize, elt: usize) -> Vec<Range<usize>> {
    (0..world)
        .map(|i| (i * elements / world * elt)..((i + 1) * elements / world * elt))
        .collect()
}

/// `dst += src` for f32 elements in little-endian bytes of any alignment.
fn add_f32_bytes(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
        let v = f32::from_le_bytes(d.try_into().expect("4"))
            + f32::from_le_bytes(s.try_into().expect("4"));
        d.copy_from_slice(&v.to_le_bytes());
    }
}

/// `dst += src` element-wise for the reducible dtypes, little-endian bytes on both sides.
fn add_into(dst: &mut [u8], src: &[u8], kind: Kind) {
    match kind {
        // The common case as whole f32 slices, which the compiler vectorises; tensor storage
        // and the scratch buffer are normally 4-byte aligned.
        Kind::Float if cfg!(target_endian = "little") => {
            // SAFETY: any 4 bytes are a valid f32.
            let (d, s) = unsafe { (dst.align_to_mut::<f32>(), src.align_to::<f32>()) };
            if d.0.is_empty() && d.2.is_empty() && s.0.is_empty() && s.2.is_empty() {
                for (a, b) in d.1.iter_mut().zip(s.1) {
                    *a += b;
                }
            } else {
                add_f32_bytes(dst, src);
            }
        }
        Kind::Float => add_f32_bytes(dst, src),
        Kind::Double => {
            for (d, s) in dst.chunks_exact_mut(8).zip(src.chunks_exact(8)) {
                let v = f64::from_le_bytes(d.try_into().expect("8"))
                    + f64::from_le_bytes(s.try_into().expect("8"));
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        Kind::BFloat16 => {
            // Summed in f32 and rounded once per hop, as NCCL does for bf16.
            for (d, s) in dst.chunks_exact_mut(2).zip(src.chunks_exact(2)) {
                let a = bf16::from_le_bytes(d.try_into().expect("2")).to_f32();
                let b = bf16::from_le_bytes(s.try_into().expect("2")).to_f32();
                d.copy_from_slice(&bf16::from_f32(a + b).to_le_bytes());
            }
        }
        _ => unreachable!("checked by reducible()"),
    }
}

fn reducible(t: &Tensor) -> Result<Kind> {
    match t.kind() {
        k @ (Kind::Float | Kind::Double | Kind::BFloat16) => Ok(k),
        k => Err(CollectiveError::Tensor(format!(
            "reductions take f32, f64 or bf16 tensors, not {k:?}"
        ))),
    }
}

/// Runs `f` on the bytes of `t` in host memory: in place for a contiguous CPU tensor, else
/// on a host copy that is written back when `write_back` is set.
fn with_host_bytes<R>(
    t: &mut Tensor,
    write_back: bool,
    f: impl FnOnce(&mut [u8]) -> Result<R>,
) -> Result<R> {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if t.device() == Device::Cpu && t.is_contiguous() {
        if len == 0 {
            return f(&mut []);
        }
        // SAFETY: a contiguous CPU tensor owns `len` bytes at data_ptr; `t` is borrowed
        // mutably for the whole call, so nothing else touches them meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) };
        return f(bytes);
    }
    let mut host = t.to_device(Device::Cpu).contiguous();
    let out = with_host_bytes(&mut host, true, f)?;
    if write_back {
        t.copy_(&host.view_(t.size()));
    }
    Ok(out)
}

/// Where the group's listeners bind: loopback only when rank 0 is on loopback (a
/// single-machine group is then unreachable from outside), else every interface. The ring
/// carries no credentials: on a shared network keep it on a private one (a NetworkPolicy).
fn listen_ip(info: &RankInfo) -> IpAddr {
    let loopback = info
        .master()
        .to_socket_addrs()
        .map(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    if loopback {
        IpAddr::from([127, 0, 0, 1])
    } else {
        IpAddr::from([0, 0, 0, 0])
    }
}

/// The listener of a rank's ring connection.
fn ring_listener(ip: IpAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind((ip, 0))
}

/// Accepts one connection before `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant, what: &str) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::Join(format!("listener: {e}")))?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|e| CollectiveError::Join(format!("{what}: {e}")))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(CollectiveError::Join(format!(
                        "timed out waiting for {what}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(CollectiveError::Join(format!("{what}: {e}"))),
        }
    }
}

/// What a rank shows to prove it belongs: SHA-256 of the token and the epoch (the token
/// itself never goes on the wire).
fn group_key(token: Option<&str>, epoch: u64) -> [u8; 32] {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(b"prime-rs group key\0");
    hash.update(token.unwrap_or_default().as_bytes());
    hash.update(b"\0");
    hash.update(epoch.to_le_bytes());
    hash.finalize().into()
}

fn same_key(a: &[u8], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

/// Connects to `addr`, retrying (the peer may not be listening yet) until `deadline`.
fn connect_until(addr: &str, deadline: Instant, what: &str) -> Result<TcpStream> {
    let mut last = String::new();
    while Instant::now() < deadline {
        let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                // The master's name may not resolve yet (a headless Service before its pod
                // exists): retry until the deadline.
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(1))) {
                Ok(s) => return Ok(s),
                Err(e) => last = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(CollectiveError::Join(format!(
        "could not reach {what} at {addr} before the join deadline: {last}"
    )))
}

impl TcpGroup {
    /// Forms the group described by `info`; returns when every rank has joined, or fails at
    /// `options.join_timeout`.
    pub fn join(info: &RankInfo, options: TcpOptions) -> Result<Self> {
        Self::join_inner(info, options, None)
    }

    /// Rank 0's [`TcpGroup::join`] on a join listener bound beforehand (port 0 lets the
    /// system pick one, which the caller hands to the other ranks); `info.master_port` is
    /// not used.
    pub fn join_listening(
        info: &RankInfo,
        options: TcpOptions,
        listener: TcpListener,
    ) -> Result<Self> {
        if info.rank != 0 {
            return Err(CollectiveError::Join(format!(
                "only rank 0 listens for the join, this is rank {}",
                info.rank
            )));
        }
        Self::join_inner(info, options, Some(listener))
    }

    fn join_inner(
        info: &RankInfo,
        options: TcpOptions,
        listener: Option<TcpListener>,
    ) -> Result<Self> {
        let (rank, world_size) = (info.rank, info.world_size);
        let mut group = Self {
            rank,
            world_size,
            epoch: options.epoch,
            op_timeout: options.op_timeout,
            next: None,
            prev: None,
            seq: 0,
            broken: None,
            abort: TcpAbort::default(),
        };
        if world_size == 1 {
            return Ok(group);
        }
        let deadline = Instant::now() + options.join_timeout;
        let ring = ring_listener(listen_ip(info))
            .map_err(|e| CollectiveError::Join(format!("ring listener: {e}")))?;
        let ring_port = ring
            .local_addr()
            .map_err(|e| CollectiveError::Join(e.to_string()))?
            .port();
        let key = group_key(options.token.as_deref(), options.epoch);
        let addresses = if rank == 0 {
            Self::serve_join(info, listener, options.epoch, &key, ring_port, deadline)?
        } else {
            Self::ask_join(info, options.epoch, &key, ring_port, deadline)?
        };
        let next_rank = (rank + 1) % world_size;
        let prev_rank = (rank + world_size - 1) % world_size;
        let mut next = connect_until(
            &addresses[next_rank].to_string(),
            deadline,
            &format!("rank {next_rank}"),
        )?;
        let mut hello = Wire::new()
            .u32(RING_MAGIC)
            .u64(options.epoch)
            .u32(rank as u32)
            .0;
        hello.extend_from_slice(&key);
        let ctx = Ctx {
            rank,
            peer: next_rank,
            op: "join",
            limit: options.join_timeout,
        };
        write_full(&mut next, &hello, deadline, ctx)?;
        let mut prev = accept_until(&ring, deadline, &format!("rank {prev_rank} to connect"))?;
        let mut buf = [0u8; 48];
        read_full(
            &mut prev,
            &mut buf,
            deadline,
            Ctx {
                peer: prev_rank,
                ..ctx
            },
        )?;
        let (magic, epoch, from) = (u32_at(&buf, 0), u64_at(&buf, 4), u32_at(&buf, 12));
        if magic == RING_MAGIC && epoch == options.epoch && !same_key(&buf[16..48], &key) {
            return Err(CollectiveError::Join(format!(
                "rank {rank}: the ring peer holds another token (PRIME_TOKEN differs)"
            )));
        }
        if magic != RING_MAGIC || epoch != options.epoch || from as usize != prev_rank {
            return Err(CollectiveError::Join(format!(
                "rank {rank}: expected rank {prev_rank} of epoch {} on the ring, got rank {from} \
                 of epoch {epoch}",
                options.epoch
            )));
        }
        for s in [&next, &prev] {
            s.set_nodelay(true)
                .map_err(|e| CollectiveError::Join(e.to_string()))?;
        }
        {
            let mut list = group.abort.0.lock().expect("abort list");
            for s in [&next, &prev] {
                list.push(
                    s.try_clone()
                        .map_err(|e| CollectiveError::Join(e.to_string()))?,
                );
            }
        }
        group.next = Some(next);
        group.prev = Some(prev);
        tracing::info!(
            rank,
            world_size,
            epoch = options.epoch,
            "joined the TCP group"
        );
        Ok(group)
    }

    /// Rank 0: collects every other rank's join, then tells each of them all ring addresses.
    fn serve_join(
        info: &RankInfo,
        listener: Option<TcpListener>,
        epoch: u64,
        key: &[u8; 32],
        ring_port: u16,
        deadline: Instant,
    ) -> Result<Vec<SocketAddr>> {
        let world = info.world_size;
        let listener = match listener {
            Some(listener) => listener,
            None => TcpListener::bind((listen_ip(info), info.master_port)).map_err(|e| {
                CollectiveError::Join(format!(
                    "rank 0 cannot listen on port {}: {e}",
                    info.master_port
                ))
            })?,
        };
        let mut joined: Vec<Option<(TcpStream, IpAddr, u16)>> = (0..world).map(|_| None).collect();
        let mut missing = world - 1;
        while missing > 0 {
            let what = format!("{missing} more rank(s) to join (of {world})");
            let mut stream = accept_until(&listener, deadline, &what)?;
            let ctx = Ctx {
                rank: 0,
                peer: usize::MAX,
                op: "join",
                limit: deadline.saturating_duration_since(Instant::now()),
            };
            let mut buf = [0u8; 54];
            if let Err(e) = read_full(&mut stream, &mut buf, deadline, ctx) {
                tracing::warn!(error = %e, "a joining connection failed");
                continue;
            }
            let (magic, their_epoch) = (u32_at(&buf, 0), u64_at(&buf, 4));
            let (rank, their_world) = (u32_at(&buf, 12) as usize, u32_at(&buf, 16) as usize);
            let port = u16::from_le_bytes([buf[20], buf[21]]);
            let refuse = if magic != JOIN_MAGIC {
                Some("not a prime-rs rank".to_string())
            } else if their_epoch == epoch && !same_key(&buf[22..54], key) {
                Some("wrong token: PRIME_TOKEN differs from rank 0's".to_string())
            } else if their_epoch != epoch {
                Some(format!(
                    "epoch {their_epoch}, the group is at epoch {epoch}"
                ))
            } else if their_world != world {
                Some(format!("world size {their_world}, the group has {world}"))
            } else if rank == 0 || rank >= world {
                Some(format!("rank {rank} is not in 1..{world}"))
            } else if joined[rank].is_some() {
                Some(format!("rank {rank} has already joined"))
            } else {
                None
            };
            if let Some(reason) = refuse {
                tracing::warn!(%reason, "turned a joining rank away");
                let mut reply = Wire::new().u32(JOIN_MAGIC).u32(1).0;
                reply.extend_from_slice(reason.as_bytes());
                let _ = stream.write_all(&reply);
                continue;
            }
            let ip = stream
                .peer_addr()
                .map_err(|e| CollectiveError::Join(e.to_string()))?
                .ip();
            joined[rank] = Some((stream, ip, port));
            missing -= 1;
        }
        let mut table = vec![None; world];
        for (rank, entry) in joined.iter().enumerate().skip(1) {
            let (_, ip, port) = entry.as_ref().expect("all joined");
            table[rank] = Some(SocketAddr::new(*ip, *port));
        }
        let mut addresses = Vec::new();
        for (rank, entry) in joined.iter_mut().enumerate().skip(1) {
            let (stream, _, _) = entry.as_mut().expect("all joined");
            // Rank 0 is reached the way this rank reached the master.
            let own = stream
                .local_addr()
                .map_err(|e| CollectiveError::Join(e.to_string()))?
                .ip();
            let full: Vec<SocketAddr> = table
                .iter()
                .map(|a| a.unwrap_or(SocketAddr::new(own, ring_port)))
                .collect();
            let mut reply = Wire::new().u32(JOIN_MAGIC).u32(0).0;
            for addr in &full {
                let text = addr.to_string();
                reply.extend_from_slice(&(text.len() as u32).to_le_bytes());
                reply.extend_from_slice(text.as_bytes());
            }
            let ctx = Ctx {
                rank: 0,
                peer: rank,
                op: "join",
                limit: deadline.saturating_duration_since(Instant::now()),
            };
            write_full(stream, &reply, deadline, ctx)?;
            // Rank 0 itself only needs the others' entries, the same in every table.
            addresses = full;
        }
        Ok(addresses)
    }

    /// Ranks above 0: joins at the master and reads the ring addresses.
    fn ask_join(
        info: &RankInfo,
        epoch: u64,
        key: &[u8; 32],
        ring_port: u16,
        deadline: Instant,
    ) -> Result<Vec<SocketAddr>> {
        let mut stream = connect_until(&info.master(), deadline, "rank 0")?;
        let mut hello = Wire::new()
            .u32(JOIN_MAGIC)
            .u64(epoch)
            .u32(info.rank as u32)
            .u32(info.world_size as u32)
            .0;
        hello.extend_from_slice(&ring_port.to_le_bytes());
        hello.extend_from_slice(key);
        let ctx = Ctx {
            rank: info.rank,
            peer: 0,
            op: "join",
            limit: deadline.saturating_duration_since(Instant::now()),
        };
        write_full(&mut stream, &hello, deadline, ctx)?;
        let mut head = [0u8; 8];
        read_full(&mut stream, &mut head, deadline, ctx)?;
        if u32_at(&head, 0) != JOIN_MAGIC {
            return Err(CollectiveError::Join(format!(
                "{} is not a prime-rs rank 0",
                info.master()
            )));
        }
        if u32_at(&head, 4) != 0 {
            let mut reason = String::new();
            let _ = stream.read_to_string(&mut reason);
            return Err(CollectiveError::Join(format!(
                "rank 0 refused rank {}: {reason}",
                info.rank
            )));
        }
        let mut addresses = Vec::new();
        for _ in 0..info.world_size {
            let mut len = [0u8; 4];
            read_full(&mut stream, &mut len, deadline, ctx)?;
            let mut text = vec![0u8; u32::from_le_bytes(len) as usize];
            read_full(&mut stream, &mut text, deadline, ctx)?;
            let addr = String::from_utf8_lossy(&text)
                .parse::<SocketAddr>()
                .map_err(|e| CollectiveError::Join(format!("bad ring address from rank 0: {e}")))?;
            addresses.push(addr);
        }
        Ok(addresses)
    }

    /// A handle that shuts this group's sockets down from any thread (see [`TcpAbort`]).
    pub fn abort_handle(&self) -> TcpAbort {
        self.abort.clone()
    }

    /// The group's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// [`Collective::broadcast`] on plain host bytes: the root sends `Send`, every other rank
    /// receives into `Receive` (of the same length). The bytes travel along the ring in 4 MiB
    /// pieces, each forwarded as soon as it arrives, so the root sends them once whatever the
    /// group's size and the hops overlap.
    pub fn broadcast_host(&mut self, buffer: HostBuffer<'_>, root: usize) -> Result<()> {
        let w = self.world_size;
        if root >= w {
            return Err(CollectiveError::Tensor(format!(
                "broadcast root {root} is not a rank of {w}"
            )));
        }
        let is_root = matches!(buffer, HostBuffer::Send(_));
        if is_root != (self.rank == root) {
            return Err(CollectiveError::Tensor(format!(
                "rank {} {} in a broadcast from rank {root}",
                self.rank,
                if is_root { "sends" } else { "receives" }
            )));
        }
        if w == 1 {
            return Ok(());
        }
        let bytes = match &buffer {
            HostBuffer::Send(data) => data.len(),
            HostBuffer::Receive(data) => data.len(),
            HostBuffer::Pieces { len, .. } => *len,
        };
        let (rank, next_rank) = (self.rank, (self.rank + 1) % w);
        let prev_rank = (rank + w - 1) % w;
        self.operation(
            "broadcast",
            4 + ((root as u32) << 8),
            bytes as u64,
            |g, deadline| {
                let (recv_ctx, send_ctx) =
                    (g.ctx("broadcast", prev_rank), g.ctx("broadcast", next_rank));
                let (next, prev) = (
                    g.next.as_mut().expect("ring"),
                    g.prev.as_mut().expect("ring"),
                );
                let forward = next_rank != root;
                match buffer {
                    HostBuffer::Send(data) => {
                        for piece in data.chunks(BROADCAST_PIECE) {
                            write_full(next, piece, deadline, send_ctx)?;
                        }
                    }
                    HostBuffer::Receive(data) => {
                        for piece in data.chunks_mut(BROADCAST_PIECE) {
                            read_full(prev, piece, deadline, recv_ctx)?;
                            if forward {
                                write_full(next, piece, deadline, send_ctx)?;
                            }
                        }
                    }
                    HostBuffer::Pieces { len, sink } => {
                        let mut left = len;
                        while left > 0 {
                            let mut piece = vec![0u8; left.min(BROADCAST_PIECE)];
                            read_full(prev, &mut piece, deadline, recv_ctx)?;
                            if forward {
                                write_full(next, &piece, deadline, send_ctx)?;
                            }
                            left -= piece.len();
                            sink(piece);
                        }
                    }
                }
                Ok(())
            },
        )
    }

    fn ctx(&self, op: &'static str, peer: usize) -> Ctx {
        Ctx {
            rank: self.rank,
            peer,
            op,
            limit: self.op_timeout,
        }
    }

    /// Runs one operation: checks the group is usable, exchanges a header with both
    /// neighbours (same op, sequence number and size everywhere), runs `body`, and on failure
    /// shuts the ring down so the other ranks fail fast.
    fn operation<R>(
        &mut self,
        op: &'static str,
        code: u32,
        bytes: u64,
        body: impl FnOnce(&mut Self, Instant) -> Result<R>,
    ) -> Result<R> {
        if let Some(reason) = &self.broken {
            return Err(CollectiveError::Protocol {
                rank: self.rank,
                message: format!("{op} on a group already failed: {reason}"),
            });
        }
        let deadline = Instant::now() + self.op_timeout;
        self.seq += 1;
        let result = self
            .check_header(op, code, bytes, deadline)
            .and_then(|()| body(self, deadline));
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
            self.abort.abort();
            tracing::error!(rank = self.rank, op, error = %e, "collective failed");
        }
        result
    }

    fn check_header(
        &mut self,
        op: &'static str,
        code: u32,
        bytes: u64,
        deadline: Instant,
    ) -> Result<()> {
        let header = Wire::new()
            .u32(OP_MAGIC)
            .u32(code)
            .u64(self.seq)
            .u64(bytes)
            .0;
        let mut theirs = [0u8; 24];
        self.exchange(op, &header, &mut theirs, deadline)?;
        let (magic, their_code) = (u32_at(&theirs, 0), u32_at(&theirs, 4));
        let (seq, their_bytes) = (u64_at(&theirs, 8), u64_at(&theirs, 16));
        if magic != OP_MAGIC || their_code != code || seq != self.seq || their_bytes != bytes {
            return Err(CollectiveError::Protocol {
                rank: self.rank,
                message: format!(
                    "{op} #{} of {bytes} bytes here, but the previous rank runs op {their_code} \
                     #{seq} of {their_bytes} bytes: the ranks call different collectives",
                    self.seq
                ),
            });
        }
        Ok(())
    }

    /// Sends `send` to the next rank while receiving `recv.len()` bytes from the previous one
    /// (both at once: sequential blocking writes around a ring would deadlock once the
    /// socket buffers fill).
    fn exchange(
        &mut self,
        op: &'static str,
        send: &[u8],
        recv: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        let world = self.world_size;
        let (to, from) = ((self.rank + 1) % world, (self.rank + world - 1) % world);
        let (send_ctx, recv_ctx) = (self.ctx(op, to), self.ctx(op, from));
        let (abort, reader_abort) = (self.abort.clone(), self.abort.clone());
        let (next, prev) = (
            self.next.as_mut().expect("ring of two or more"),
            self.prev.as_mut().expect("ring of two or more"),
        );
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let r = write_full(next, send, deadline, send_ctx);
                if r.is_err() {
                    // Unblocks the reader below instead of leaving it to its deadline.
                    abort.abort();
                }
                r
            });
            let read = read_full(prev, recv, deadline, recv_ctx);
            if read.is_err() {
                reader_abort.abort();
            }
            let wrote = writer.join().expect("writer thread");
            // The reader's error names the peer that failed first; prefer it.
            read.and(wrote)
        })
    }

    /// Ring reduce-scatter over `data` split into `chunks` (one per rank): afterwards chunk
    /// `rank` holds the sum over all ranks.
    fn ring_reduce_scatter(
        &mut self,
        op: &'static str,
        data: &mut [u8],
        chunks: &[Range<usize>],
        kind: Kind,
        deadline: Instant,
    ) -> Result<()> {
        let w = self.world_size;
        let longest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut scratch = vec![0u8; longest];
        for s in 0..w - 1 {
            let send = &chunks[(self.rank + 2 * w - s - 1) % w];
            let recv = &chunks[(self.rank + 2 * w - s - 2) % w];
            let buf = &mut scratch[..recv.len()];
            self.exchange(op, &data[send.clone()], buf, deadline)?;
            add_into(&mut data[recv.clone()], buf, kind);
        }
        Ok(())
    }

    /// Ring all-gather over `data` split into `chunks`: chunk `rank` is this rank's, and
    /// afterwards every chunk holds its owner's bytes.
    fn ring_all_gather(
        &mut self,
        op: &'static str,
        data: &mut [u8],
        chunks: &[Range<usize>],
        deadline: Instant,
    ) -> Result<()> {
        let w = self.world_size;
        for s in 0..w - 1 {
            let send = chunks[(self.rank + w - s) % w].clone();
            let recv = chunks[(self.rank + 2 * w - s - 1) % w].clone();
            let (send_buf, recv_buf) = disjoint(data, send, recv);
            self.exchange(op, send_buf, recv_buf, deadline)?;
        }
        Ok(())
    }
}

/// `(&data[a], &mut data[b])` for non-overlapping ranges.
fn disjoint(data: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&[u8], &mut [u8]) {
    debug_assert!(a.end <= b.start || b.end <= a.start, "overlapping chunks");
    if a.end <= b.start {
        let (left, right) = data.split_at_mut(b.start);
        (&left[a], &mut right[..b.len()])
    } else {
        let (left, right) = data.split_at_mut(a.start);
        (&right[..a.len()], &mut left[b])
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        let kind = reducible(tensor)?;
        if self.world_size == 1 {
            return Ok(());
        }
        let (elt, n) = (kind.elt_size_in_bytes(), tensor.numel());
        let chunks = chunk_ranges(n, self.world_size, elt);
        self.operation("all_reduce", 1, (n * elt) as u64, |g, deadline| {
            with_host_bytes(tensor, true, |data| {
                g.ring_reduce_scatter("all_reduce", data, &chunks, kind, deadline)?;
                g.ring_all_gather("all_reduce", data, &chunks, deadline)
            })
        })?;
        if op == ReduceOp::Mean {
            let _ = tensor.g_div_scalar_(self.world_size as f64);
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        let kind = reducible(input)?;
        let w = self.world_size;
        if !input.numel().is_multiple_of(w) {
            return Err(CollectiveError::Tensor(format!(
                "reduce_scatter input of {} elements does not split over {w} ranks",
                input.numel()
            )));
        }
        let n = input.numel() / w;
        check_numel(output, n, "reduce_scatter output")?;
        if output.kind() != kind {
            return Err(CollectiveError::Tensor(
                "reduce_scatter output dtype differs".into(),
            ));
        }
        let elt = kind.elt_size_in_bytes();
        let mut work = input.to_device(Device::Cpu).contiguous().view(-1).copy();
        let chunks = chunk_ranges(n * w, w, elt);
        if w > 1 {
            self.operation("reduce_scatter", 2, (n * w * elt) as u64, |g, deadline| {
                with_host_bytes(&mut work, false, |data| {
                    g.ring_reduce_scatter("reduce_scatter", data, &chunks, kind, deadline)
                })
            })?;
        }
        let mut mine = work.narrow(0, (self.rank * n) as i64, n as i64);
        if op == ReduceOp::Mean {
            mine /= w as f64;
        }
        output.view(-1).copy_(&mine);
        Ok(())
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let w = self.world_size;
        let n = input.numel();
        check_numel(output, n * w, "all_gather output")?;
        if output.kind() != input.kind() {
            return Err(CollectiveError::Tensor(
                "all_gather output dtype differs".into(),
            ));
        }
        output
            .view(-1)
            .narrow(0, (self.rank * n) as i64, n as i64)
            .copy_(&input.view(-1));
        if w == 1 {
            return Ok(());
        }
        let elt = input.kind().elt_size_in_bytes();
        let chunks = chunk_ranges(n * w, w, elt);
        self.operation("all_gather", 3, (n * w * elt) as u64, |g, deadline| {
            with_host_bytes(output, true, |data| {
                g.ring_all_gather("all_gather", data, &chunks, deadline)
            })
        })
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let is_root = self.rank == root;
        with_host_bytes(tensor, !is_root, |data| {
            let buffer = if is_root {
                HostBuffer::Send(data)
            } else {
                HostBuffer::Receive(data)
            };
            self.broadcast_host(buffer, root)
        })
    }

    fn set_op_timeout(&mut self, limit: Duration) -> Duration {
        std::mem::replace(&mut self.op_timeout, limit)
    }

    fn barrier(&mut self) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        let mut one = Tensor::from_slice(&[1f32]);
        self.all_reduce(&mut one, ReduceOp::Sum)?;
        let total = one.double_value(&[0]);
        if total != self.world_size as f64 {
            return Err(CollectiveError::Protocol {
                rank: self.rank,
                message: format!("barrier counted {total} ranks of {}", self.world_size),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer() {
        let c = chunk_ranges(10, 3, 4);
        assert_eq!(c, vec![0..12, 12..24, 24..40]);
        assert_eq!(chunk_ranges(2, 4, 2), vec![0..0, 0..2, 2..2, 2..4]);
    }

    #[test]
    fn bf16_sum_rounds_once() {
        let mut a = bf16::from_f32(1.0).to_le_bytes().to_vec();
        let b = bf16::from_f32(0.00390625).to_le_bytes();
        add_into(&mut a, &b, Kind::BFloat16);
        // 1 + 2^-8 is exactly half a bf16 step above 1: round to even gives 1.
        assert_eq!(bf16::from_le_bytes([a[0], a[1]]).to_f32(), 1.0);
    }
}
