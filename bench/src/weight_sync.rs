//! Weight sync: the learner's `FetchWeights` stream over loopback, received and verified the
//! way an actor does it, against a raw TCP copy of the same bytes on loopback.
//!
//! Ours: a Learner service (the real handler, plain HTTP/2, no token) serves an encoded
//! policy; a client asks for it, checks the manifest, feeds every chunk to the assembler
//! (which checks each tensor's SHA-256) and copies the weights into a second model of the
//! same shape. A third variant receives the stream and drops the chunks, which separates the
//! transport from the verification. The reference: one thread writes the same bytes into a TCP socket, another
//! reads them into a preallocated buffer and does nothing else.
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prime_learner::service::{LearnerService, Shared, MAX_MESSAGE_BYTES};
use prime_model::qwen2::{Init, Qwen2};
use prime_model::transfer::{open_transfer, receive_chunks, Published};
use prime_model::weights::{encode_var_store, DEFAULT_CHUNK_BYTES};
use prime_model::Qwen2Config;
use prime_proto::v1 as pb;
use serde::Serialize;
use tch::{nn, Device, Kind};
use tokio_stream::StreamExt;

use crate::error::{BenchError, Result};
use crate::learner_step::StepTimes;
use crate::machine::{cores, cpu_model, load_average};
use crate::python::TinyModel;

/// A plain learner client (no token: the benchmark's service checks none).
pub(crate) type LearnerClient = pb::learner_client::LearnerClient<tonic::transport::Channel>;

/// What `prime bench weight-sync` measured.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub model: TinyModel,
    /// Bytes of one transfer (f32 weights).
    pub bytes: u64,
    /// Encoding and hashing the weights once on the learner (not part of a transfer).
    pub encode_seconds: f64,
    /// Request to the last chunk received, the chunks dropped unread: the transport alone.
    pub grpc_stream_only: StepTimes,
    /// Request to the last chunk received and verified.
    pub grpc: StepTimes,
    /// The same plus copying the weights into the receiving model.
    pub grpc_applied: StepTimes,
    /// The raw TCP copy.
    pub tcp: StepTimes,
    pub grpc_stream_only_gb_per_s: f64,
    pub grpc_gb_per_s: f64,
    pub grpc_applied_gb_per_s: f64,
    pub tcp_gb_per_s: f64,
    /// Ours over raw TCP, transfer and verification only.
    pub ratio: f64,
    /// CPU model and logical cores.
    pub cpu: String,
    pub cores: usize,
    /// 1-minute load average before and after.
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

impl SyncReport {
    /// A plain-text table: the setting, the machine, then both transfers.
    pub fn table(&self) -> String {
        let m = &self.model;
        let load = |v: Option<f64>| v.map_or_else(|| "?".into(), |v| format!("{v:.2}"));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "weight sync over loopback: {:.1} MB of f32 weights (random Qwen2: vocab {}, hidden {}, {} layers, intermediate {}); median of {} transfers after a warm-up",
            self.bytes as f64 / 1e6, m.vocab, m.hidden, m.layers, m.intermediate, self.grpc.seconds_all.len()
        );
        let _ =
            writeln!(
            out,
            "machine: {}, {} cores, load {} -> {}; encoding + hashing once on the learner: {:.3} s",
            self.cpu, self.cores, load(self.load_before), load(self.load_after), self.encode_seconds
        );
        let _ = writeln!(
            out,
            "{:<44} {:>10} {:>8}  vs raw TCP",
            "transfer", "median s", "GB/s"
        );
        let rows = [
            (
                "FetchWeights, chunks dropped (transport only)",
                &self.grpc_stream_only,
                self.grpc_stream_only_gb_per_s,
            ),
            (
                "FetchWeights, received + SHA-256 checked",
                &self.grpc,
                self.grpc_gb_per_s,
            ),
            (
                "FetchWeights, + copied into the model",
                &self.grpc_applied,
                self.grpc_applied_gb_per_s,
            ),
            ("raw TCP copy (reference)", &self.tcp, self.tcp_gb_per_s),
        ];
        for (name, t, gb) in rows {
            let _ = writeln!(
                out,
                "{name:<44} {:>10.4} {gb:>8.3}  {:.0}%",
                t.seconds,
                100.0 * self.tcp.seconds / t.seconds
            );
        }
        out
    }
}

/// A random untied Qwen2 of `spec`'s shape in a fresh var store on the CPU.
pub(crate) fn random_model(spec: &TinyModel) -> Result<nn::VarStore> {
    let config: Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.max_positions,
        "tie_word_embeddings": false,
    }))
    .map_err(|e| BenchError::Settings(format!("model shape: {e}")))?;
    let vs = nn::VarStore::new(Device::Cpu);
    Qwen2::new(&vs.root(), &config, Init::Normal { std: 0.02 }, Kind::Float);
    Ok(vs)
}

/// Runs both transfers `repeats` times each after one warm-up.
pub fn run_sync_bench(spec: &TinyModel, repeats: usize) -> Result<SyncReport> {
    if repeats == 0 {
        return Err(BenchError::Settings("need at least one repeat".into()));
    }
    let load_before = load_average();
    let source = random_model(spec)?;
    let target = random_model(spec)?;
    let version = 1;
    let started = Instant::now();
    let encoded = encode_var_store(&source, version, None)?;
    let encode_seconds = started.elapsed().as_secs_f64();
    let published = Published::new(encoded);
    let bytes = published.bytes.clone();
    let total = bytes.len() as u64;

    let runtime = runtime()?;
    let shared = Shared::serving_weights(published)?;
    let (addr, stop) = runtime.block_on(serve(shared))?;
    let client = runtime.block_on(connect(addr))?;
    // The four transfers take turns within each repeat, so that all of them see the same
    // load on a shared machine and the ratios compare like with like.
    let mut raw = RawTcp::start(&bytes, repeats + 1)?;
    let (mut stream_only, mut grpc, mut applied, mut tcp) = (
        Vec::with_capacity(repeats),
        Vec::with_capacity(repeats),
        Vec::with_capacity(repeats),
        Vec::with_capacity(repeats),
    );
    for run in 0..=repeats {
        let start = Instant::now();
        let mut client_for_stream = client.clone();
        let received = runtime.block_on(async move {
            let mut stream = fetch(&mut client_for_stream, version).await?;
            let mut received = 0u64;
            while let Some(message) = stream.next().await {
                let message = message.map_err(|s| BenchError::Settings(s.to_string()))?;
                if let Some(pb::weight_transfer::Payload::Chunk(chunk)) = message.payload {
                    received += chunk.data.len() as u64;
                }
            }
            Ok::<_, BenchError>(received)
        })?;
        let stream_seconds = start.elapsed().as_secs_f64();
        if received != total {
            return Err(BenchError::Settings(format!(
                "the stream carried {received} of {total} bytes"
            )));
        }

        let start = Instant::now();
        let mut client_for_weights = client.clone();
        let mut assembler = runtime.block_on(async move {
            let mut stream = fetch(&mut client_for_weights, version).await?;
            let mut assembler = open_transfer(&mut stream, version).await?;
            receive_chunks(&mut stream, &mut assembler, DEFAULT_CHUNK_BYTES).await?;
            Ok::<_, BenchError>(assembler)
        })?;
        // Hashing runs behind the receiver: the transfer is checked when the last hash is.
        assembler.verify()?;
        let checked_seconds = start.elapsed().as_secs_f64();
        // The copy into the model runs on this thread, as the actor's compute thread does.
        assembler.apply(&target)?;
        let applied_seconds = start.elapsed().as_secs_f64();

        let raw_seconds = raw.copy_once()?;
        if run > 0 {
            stream_only.push(stream_seconds);
            grpc.push(checked_seconds);
            applied.push(applied_seconds);
            tcp.push(raw_seconds);
        }
    }
    raw.finish()?;
    let _ = stop.send(());
    runtime.shutdown_timeout(Duration::from_secs(2));

    let (grpc_stream_only, grpc, grpc_applied, tcp) = (
        StepTimes::new(stream_only),
        StepTimes::new(grpc),
        StepTimes::new(applied),
        StepTimes::new(tcp),
    );
    let gb = |t: &StepTimes| total as f64 / t.seconds / 1e9;
    Ok(SyncReport {
        model: spec.clone(),
        bytes: total,
        encode_seconds,
        grpc_stream_only_gb_per_s: gb(&grpc_stream_only),
        grpc_gb_per_s: gb(&grpc),
        grpc_applied_gb_per_s: gb(&grpc_applied),
        tcp_gb_per_s: gb(&tcp),
        ratio: tcp.seconds / grpc.seconds,
        grpc_stream_only,
        grpc,
        grpc_applied,
        tcp,
        cpu: cpu_model(),
        cores: cores(),
        load_before,
        load_after: load_average(),
    })
}

/// The runtime of the benchmark's service and clients: two workers, as a small learner has.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| BenchError::Io {
            path: "tokio runtime".into(),
            source,
        })
}

/// Serves the Learner service on `shared` on an ephemeral loopback port; sending on the
/// returned channel stops it.
pub(crate) async fn serve(
    shared: Arc<Shared>,
) -> Result<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let io = |source| BenchError::Io {
        path: "127.0.0.1:0".into(),
        source,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let incoming = prime_proto::transport::incoming(listener);
        let served = tonic::transport::Server::builder()
            .add_service(LearnerService::server(shared))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(%e, "the benchmark's learner service stopped");
        }
    });
    Ok((addr, stop_tx))
}

/// The reference: the same bytes over a fresh loopback TCP connection per copy, one thread
/// writing them, the caller reading them into a preallocated buffer.
struct RawTcp {
    addr: std::net::SocketAddr,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    expected: Arc<[u8]>,
    buffer: Vec<u8>,
}

impl RawTcp {
    /// Starts a writer that serves `copies` connections.
    fn start(bytes: &[u8], copies: usize) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(raw_io)?;
        let addr = listener.local_addr().map_err(raw_io)?;
        let payload: Arc<[u8]> = Arc::from(bytes);
        let expected = Arc::clone(&payload);
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            for _ in 0..copies {
                let (mut socket, _) = listener.accept()?;
                socket.set_nodelay(true)?;
                socket.write_all(&payload)?;
            }
            Ok(())
        });
        Ok(Self {
            addr,
            writer: Some(writer),
            expected,
            buffer: vec![0u8; bytes.len()],
        })
    }

    /// Receives one copy and returns its seconds (connecting included).
    fn copy_once(&mut self) -> Result<f64> {
        let start = Instant::now();
        let mut socket = TcpStream::connect(self.addr).map_err(raw_io)?;
        socket.read_exact(&mut self.buffer).map_err(raw_io)?;
        let seconds = start.elapsed().as_secs_f64();
        if self.buffer[..] != self.expected[..] {
            return Err(BenchError::Settings(
                "the raw TCP copy arrived corrupted".into(),
            ));
        }
        Ok(seconds)
    }

    /// Waits for the writer, reporting its errors.
    fn finish(mut self) -> Result<()> {
        match self.writer.take() {
            Some(writer) => writer
                .join()
                .map_err(|_| BenchError::Settings("the TCP writer panicked".into()))?
                .map_err(raw_io),
            None => Ok(()),
        }
    }
}

fn raw_io(source: std::io::Error) -> BenchError {
    BenchError::Io {
        path: "127.0.0.1 (raw TCP)".into(),
        source,
    }
}

/// A learner client on a connection of its own to `addr`, with the settings every prime
/// client uses (the actor's weight fetches among them).
pub(crate) async fn connect(addr: std::net::SocketAddr) -> Result<LearnerClient> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| BenchError::Settings(e.to_string()))?
        .tcp_nodelay(true);
    let channel = prime_proto::transport::bulk_client(endpoint)
        .connect()
        .await
        .map_err(|e| BenchError::Settings(format!("connecting to {addr}: {e}")))?;
    Ok(LearnerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

/// Opens a `FetchWeights` stream for `version`.
pub(crate) async fn fetch(
    client: &mut LearnerClient,
    version: u64,
) -> Result<tonic::Streaming<pb::WeightTransfer>> {
    let request = pb::FetchWeightsRequest {
        policy_version: version,
        max_chunk_bytes: 0,
    };
    Ok(client
        .fetch_weights(request)
        .await
        .map_err(|s| BenchError::Settings(format!("FetchWeights: {s}")))?
        .into_inner())
}
