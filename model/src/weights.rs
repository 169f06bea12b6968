//! The weight-transfer codec: a model's named tensors become a manifest plus one byte stream
//! sent in chunks, and a received stream is checked and copied into a model.
//!
//! The byte stream holds the tensors back to back in manifest order, each as row-major
//! little-endian bytes, so a receiver can check a tensor (its SHA-256) as soon as its last
//! chunk arrives. These are plain Rust types; the gRPC layer maps them to `prime.v1` messages.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::{tensor_byte_len, write_tensor_bytes};
use crate::device::parse_kind;
use crate::error::{ModelError, Result};

/// Largest chunk sent by default: 4 MiB, the size gRPC messages are kept under. A receiver's
/// `max_decoding_message_size` must leave room for the message framing on top of it.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// One tensor of the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Hugging Face parameter name (the VarStore variable name).
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<i64>,
    /// Element type of the bytes: "f32", "bf16" or "f16".
    pub dtype: String,
    /// Where the tensor's bytes start in the stream.
    pub offset: u64,
    /// Number of bytes: elements times element size.
    pub len: u64,
    /// SHA-256 of the tensor's bytes, lowercase hex.
    pub sha256: String,
}

/// Describes a byte stream: its tensors, packed back to back in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightManifest {
    /// The policy version the weights are.
    pub policy_version: u64,
    /// Every tensor, in stream order.
    pub tensors: Vec<TensorEntry>,
    /// Length of the byte stream.
    pub total_bytes: u64,
}

/// An encoded set of weights, kept by the sender to serve any number of transfers.
#[derive(Debug, Clone)]
pub struct EncodedWeights {
    /// What the bytes hold.
    pub manifest: WeightManifest,
    /// The byte stream, `manifest.total_bytes` long.
    pub bytes: Vec<u8>,
}

/// A piece of the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightChunk<'a> {
    /// The manifest's policy version.
    pub policy_version: u64,
    /// Position of `data` in the stream.
    pub offset: u64,
    /// The bytes.
    pub data: &'a [u8],
}

/// The dtype name a manifest uses for `kind`, for the kinds a transfer supports.
fn dtype_name(kind: Kind) -> Result<&'static str> {
    match kind {
        Kind::Float => Ok("f32"),
        Kind::BFloat16 => Ok("bf16"),
        Kind::Half => Ok("f16"),
        other => Err(ModelError::Weights(format!(
            "dtype {other:?} cannot be transferred (f32, bf16, f16)"
        ))),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Fills in every entry's SHA-256 from `bytes`, spreading the tensors over a few threads
/// (hashing is most of what encoding costs once the bytes are on the host).
fn hash_entries(entries: &mut [TensorEntry], bytes: &[u8]) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let total = bytes.len().max(1);
    // Contiguous runs of tensors of about equal bytes, one per thread.
    let mut runs: Vec<&mut [TensorEntry]> = Vec::with_capacity(threads);
    let mut rest = entries;
    for t in 1..threads {
        let boundary = (total * t / threads) as u64;
        let split = rest.iter().take_while(|e| e.offset < boundary).count();
        let (run, tail) = rest.split_at_mut(split);
        runs.push(run);
        rest = tail;
    }
    runs.push(rest);
    std::thread::scope(|scope| {
        for run in runs {
            scope.spawn(move || {
                for entry in run {
                    let range = entry.offset as usize..(entry.offset + entry.len) as usize;
                    entry.sha256 = sha256_hex(&bytes[range]);
                }
            });
        }
    });
}

fn weights_error(message: impl Into<String>) -> ModelError {
    ModelError::Weights(message.into())
}

/// Encodes `vars` in the given order as the weights of `policy_version`, each tensor cast to
/// `kind` when one is given (e.g. bf16 to halve the transfer), on its own device before the
/// copy to the host so that less crosses the bus.
pub fn encode_tensors(
    vars: &[(String, Tensor)],
    policy_version: u64,
    kind: Option<Kind>,
) -> Result<EncodedWeights> {
    let _guard = tch::no_grad_guard();
    let mut names = HashSet::new();
    let mut total = 0usize;
    for (name, t) in vars {
        if !names.insert(name.as_str()) {
            return Err(weights_error(format!("tensor {name} is given twice")));
        }
        dtype_name(kind.unwrap_or(t.kind()))?;
        total += t.numel() * kind.unwrap_or(t.kind()).elt_size_in_bytes();
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(total)
        .map_err(|e| weights_error(format!("cannot allocate {total} bytes: {e}")))?;
    let mut tensors = Vec::with_capacity(vars.len());
    for (name, t) in vars {
        let t = kind.map_or_else(|| t.shallow_clone(), |k| t.to_kind(k));
        let t = t.to_device(Device::Cpu);
        let start = bytes.len();
        bytes.resize(start + tensor_byte_len(&t), 0);
        write_tensor_bytes(&t, &mut bytes[start..])?;
        tensors.push(TensorEntry {
            name: name.clone(),
            shape: t.size(),
            dtype: dtype_name(t.kind())?.to_string(),
            offset: start as u64,
            len: (bytes.len() - start) as u64,
            sha256: String::new(),
        });
    }
    hash_entries(&mut tensors, &bytes);
    tracing::debug!(
        policy_version,
        tensors = tensors.len(),
        bytes = bytes.len(),
        "encoded weights"
    );
    Ok(EncodedWeights {
        manifest: WeightManifest {
            policy_version,
            tensors,
            total_bytes: bytes.len() as u64,
        },
        bytes,
    })
}

/// Encodes every variable of `vs`, sorted by name, as [`encode_tensors`] does.
pub fn encode_var_store(
    vs: &nn::VarStore,
    policy_version: u64,
    kind: Option<Kind>,
) -> Result<EncodedWeights> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    encode_tensors(&vars, policy_version, kind)
}

impl EncodedWeights {
    /// The byte stream in order, in chunks of at most `max_chunk_bytes` (the last may be
    /// shorter; an empty stream has no chunks).
    ///
    /// # Panics
    /// When `max_chunk_bytes` is 0.
    pub fn chunks(&self, max_chunk_bytes: usize) -> impl Iterator<Item = WeightChunk<'_>> {
        assert!(max_chunk_bytes > 0, "chunks need a positive size");
        let policy_version = self.manifest.policy_version;
        self.bytes
            .chunks(max_chunk_bytes)
            .enumerate()
            .map(move |(i, data)| WeightChunk {
                policy_version,
                offset: (i * max_chunk_bytes) as u64,
                data,
            })
    }
}

/// Hashes a stream's tensors in order as their bytes arrive: each tensor's SHA-256 is
/// computed incrementally over the chunks that carry it and compared with the manifest as soon
/// as its last byte is in, so no pass over the whole stream is left for the end. It is fed the
/// whole stream but hashes only the tensors it owns, stepping over the others' bytes, so that
/// several hashers can share one stream.
#[derive(Debug)]
struct StreamHasher {
    /// `(name, len, sha256)` of every tensor, in stream order.
    entries: Vec<(String, u64, String)>,
    /// Which tensors this hasher checks.
    owned: Vec<bool>,
    /// The tensor the stream is in.
    index: usize,
    /// Bytes of it passed so far.
    filled: u64,
    state: Sha256,
}

impl StreamHasher {
    /// A hasher of the tensors `owned` says (one flag per manifest tensor).
    fn new(manifest: &WeightManifest, owned: Vec<bool>) -> Self {
        Self {
            entries: manifest
                .tensors
                .iter()
                .map(|e| (e.name.clone(), e.len, e.sha256.clone()))
                .collect(),
            owned,
            index: 0,
            filled: 0,
            state: Sha256::new(),
        }
    }

    /// A hasher of every tensor.
    #[cfg(test)]
    fn all(manifest: &WeightManifest) -> Self {
        Self::new(manifest, vec![true; manifest.tensors.len()])
    }

    /// Takes the next bytes of the stream (the caller never passes bytes past its end).
    fn feed(&mut self, mut data: &[u8]) -> std::result::Result<(), String> {
        loop {
            self.close_complete()?;
            let Some((_, len, _)) = self.entries.get(self.index) else {
                return if data.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} bytes past the last tensor", data.len()))
                };
            };
            if data.is_empty() {
                return Ok(());
            }
            let take = (len - self.filled).min(data.len() as u64) as usize;
            if self.owned[self.index] {
                self.state.update(&data[..take]);
            }
            self.filled += take as u64;
            data = &data[take..];
        }
    }

    /// Compares every owned tensor whose bytes are all in (empty ones included) with its hash
    /// and steps past the others.
    fn close_complete(&mut self) -> std::result::Result<(), String> {
        while let Some((name, len, expected)) = self.entries.get(self.index) {
            if self.filled < *len {
                break;
            }
            if self.owned[self.index] {
                let actual = format!("{:x}", self.state.finalize_reset());
                if &actual != expected {
                    return Err(format!(
                        "{name}: SHA-256 {actual} of the received bytes, the manifest says {expected}"
                    ));
                }
            }
            self.index += 1;
            self.filled = 0;
        }
        Ok(())
    }

    /// Succeeds when the whole stream has passed and every owned tensor matched.
    fn finish(mut self) -> std::result::Result<(), String> {
        self.close_complete()?;
        match self.entries.get(self.index) {
            None => Ok(()),
            Some((name, len, _)) => Err(format!(
                "{name}: only {} of {len} bytes were hashed",
                self.filled
            )),
        }
    }
}

/// Splits the tensors of `lens` (bytes, stream order) among `workers` hashers: each tensor goes
/// to the worker with the fewest bytes so far, so the work is even and every worker has some
/// of each part of the stream. Returns each worker's ownership flags.
fn assign_tensors(lens: &[u64], workers: usize) -> Vec<Vec<bool>> {
    let workers = workers.max(1);
    let mut owned = vec![vec![false; lens.len()]; workers];
    let mut load = vec![0u64; workers];
    for (t, &len) in lens.iter().enumerate() {
        let w = (0..workers).min_by_key(|&w| load[w]).unwrap_or(0);
        owned[w][t] = true;
        load[w] += len.max(1);
    }
    owned
}

/// Hashing threads per transfer: one per core, at most 8, never more than the tensors.
fn hash_workers(tensors: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(tensors.max(1))
}

/// [`StreamHasher`]s on their own threads, each fed every received chunk (shared, not copied)
/// and hashing its share of the tensors, so that hashing overlaps receiving the next chunks
/// and spreads over the cores. The queues hold only handles to chunks the assembler keeps
/// anyway, so they are unbounded.
#[derive(Debug)]
struct BackgroundHasher {
    senders: Vec<Sender<Bytes>>,
    threads: Vec<JoinHandle<std::result::Result<(), String>>>,
    /// Set by a thread at its first mismatch, so that `push` can stop a bad transfer early.
    failed: Arc<AtomicBool>,
    /// The threads' verdict once they have been joined.
    verdict: Option<std::result::Result<(), String>>,
}

impl BackgroundHasher {
    fn start(manifest: &WeightManifest, workers: usize) -> Result<Self> {
        let lens: Vec<u64> = manifest.tensors.iter().map(|t| t.len).collect();
        let failed = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for owned in assign_tensors(&lens, workers) {
            let (sender, receiver) = channel::<Bytes>();
            let flag = Arc::clone(&failed);
            let mut hasher = StreamHasher::new(manifest, owned);
            let thread = std::thread::Builder::new()
                .name("weight-hash".into())
                .spawn(move || {
                    for chunk in receiver {
                        if let Err(message) = hasher.feed(&chunk) {
                            flag.store(true, Ordering::Release);
                            return Err(message);
                        }
                    }
                    hasher.finish()
                })
                .map_err(|e| weights_error(format!("cannot start a hashing thread: {e}")))?;
            senders.push(sender);
            threads.push(thread);
        }
        Ok(Self {
            senders,
            threads,
            failed,
            verdict: None,
        })
    }

    /// Queues a chunk for every thread; false when one has stopped (it found a mismatch) or
    /// the verdict is already in.
    fn send(&self, chunk: Bytes) -> bool {
        !self.senders.is_empty() && self.senders.iter().all(|s| s.send(chunk.clone()).is_ok())
    }

    /// Whether a mismatch has been found (the check may still be behind).
    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Stops taking chunks, waits for the threads to hash everything sent and returns their
    /// verdict: every tensor whole and matching its hash (otherwise the mismatch one of them
    /// found).
    fn finish(&mut self) -> Result<()> {
        self.senders.clear();
        if self.verdict.is_none() {
            let mut verdict = Ok(());
            for thread in self.threads.drain(..) {
                let result = thread
                    .join()
                    .unwrap_or_else(|_| Err("a hashing thread panicked".into()));
                if verdict.is_ok() {
                    verdict = result;
                }
            }
            self.verdict = Some(verdict);
        }
        match &self.verdict {
            Some(Ok(())) => Ok(()),
            Some(Err(message)) => Err(weights_error(message.clone())),
            None => unreachable!("the verdict is set when the threads are joined"),
        }
    }
}

/// Checks that `manifest` is self-consistent (unique names, known dtypes, lengths that fit
/// the shapes, tensors packed in order up to `total_bytes`) and returns each tensor's kind.
fn manifest_kinds(manifest: &WeightManifest) -> Result<Vec<Kind>> {
    let mut names = HashSet::new();
    let mut kinds = Vec::with_capacity(manifest.tensors.len());
    let mut end = 0u64;
    for entry in &manifest.tensors {
        let name = &entry.name;
        if !names.insert(name.as_str()) {
            return Err(weights_error(format!("tensor {name} is listed twice")));
        }
        let kind = parse_kind(&entry.dtype)
            .map_err(|_| weights_error(format!("{name}: unknown dtype {:?}", entry.dtype)))?;
        let len = entry
            .shape
            .iter()
            .try_fold(kind.elt_size_in_bytes() as u64, |acc, &d| {
                u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            })
            .ok_or_else(|| weights_error(format!("{name}: invalid shape {:?}", entry.shape)))?;
        if len != entry.len {
            return Err(weights_error(format!(
                "{name}: {} bytes listed, shape {:?} of {} needs {len}",
                entry.len, entry.shape, entry.dtype
            )));
        }
        if entry.offset != end {
            return Err(weights_error(format!(
                "{name}: offset {} where the previous tensor ends at {end}",
                entry.offset
            )));
        }
        end = end
            .checked_add(len)
            .ok_or_else(|| weights_error("tensor sizes overflow"))?;
        kinds.push(kind);
    }
    if end != manifest.total_bytes {
        return Err(weights_error(format!(
            "total_bytes is {}, the tensors take {end}",
            manifest.total_bytes
        )));
    }
    Ok(kinds)
}

/// Receives a byte stream chunk by chunk, checks each tensor against its SHA-256 as the bytes
/// arrive (on a background thread, overlapping the transfer), and copies the weights into a
/// model only once everything has been checked.
#[derive(Debug)]
pub struct WeightAssembler {
    manifest: WeightManifest,
    kinds: Vec<Kind>,
    /// The chunks as received, in stream order (kept, not copied into one buffer).
    chunks: Vec<Bytes>,
    /// Bytes received so far: the chunks' total length.
    received: u64,
    hasher: BackgroundHasher,
}

impl WeightAssembler {
    /// Starts a transfer described by `manifest`, after checking that it is self-consistent
    /// (known dtypes, lengths that fit the shapes, tensors packed in order) and reserving its
    /// bytes.
    pub fn new(manifest: WeightManifest) -> Result<Self> {
        let kinds = manifest_kinds(&manifest)?;
        let hasher = BackgroundHasher::start(&manifest, hash_workers(manifest.tensors.len()))?;
        Ok(Self {
            manifest,
            kinds,
            chunks: Vec::new(),
            received: 0,
            hasher,
        })
    }

    /// The manifest of this transfer.
    pub fn manifest(&self) -> &WeightManifest {
        &self.manifest
    }

    /// Bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received
    }

    /// Whether the whole stream has arrived.
    pub fn is_complete(&self) -> bool {
        self.received_bytes() == self.manifest.total_bytes
    }

    /// Takes the next chunk: it must carry the manifest's version and start where the bytes
    /// received so far end, and must not run past the stream. A rejected chunk changes
    /// nothing. The chunk is shared with the hashing thread, not copied for it. Fails once a
    /// tensor has been found not to match its hash (the check runs behind the pushes, so the
    /// push that completed the tensor may already have returned); the transfer cannot be
    /// applied after that.
    pub fn push(&mut self, policy_version: u64, offset: u64, data: Bytes) -> Result<()> {
        if self.hasher.has_failed() {
            return self.hasher.finish();
        }
        if policy_version != self.manifest.policy_version {
            return Err(weights_error(format!(
                "chunk of policy version {policy_version} in a transfer of version {}",
                self.manifest.policy_version
            )));
        }
        let received = self.received_bytes();
        if offset != received {
            return Err(weights_error(format!(
                "chunk at offset {offset}, expected {received}"
            )));
        }
        if data.len() as u64 > self.manifest.total_bytes - received {
            return Err(weights_error(format!(
                "chunk of {} bytes at offset {offset} runs past the end ({} bytes)",
                data.len(),
                self.manifest.total_bytes
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.received += data.len() as u64;
        self.chunks.push(data.clone());
        if !self.hasher.send(data) {
            return self.hasher.finish();
        }
        Ok(())
    }

    /// Waits until every tensor has been checked against its hash and says whether all
    /// matched; fails for an incomplete stream. [`apply`](Self::apply) calls it; call it
    /// first to know a transfer is good before touching the model. Once it has failed or
    /// succeeded, later pushes are refused.
    pub fn verify(&mut self) -> Result<()> {
        if self.hasher.has_failed() {
            return self.hasher.finish();
        }
        if !self.is_complete() {
            return Err(weights_error(format!(
                "transfer incomplete: {} of {} bytes received",
                self.received_bytes(),
                self.manifest.total_bytes
            )));
        }
        self.hasher.finish()
    }

    /// Checks that the transfer fits `vs`: the same tensor names, with the same shapes. Call
    /// it on the manifest alone to refuse a transfer before its bytes are sent.
    pub fn check_target(&self, vs: &nn::VarStore) -> Result<()> {
        check_target(&self.manifest, vs)
    }

    /// Copies the received weights into `vs` (converting to its dtype and device) and returns
    /// their policy version. Nothing is copied unless the stream is complete, every hash has
    /// matched and [`check_target`](Self::check_target) passes.
    pub fn apply(mut self, vs: &nn::VarStore) -> Result<u64> {
        let clock = std::time::Instant::now();
        self.verify()?;
        let hash_wait = clock.elapsed().as_secs_f64();
        self.check_target(vs)?;
        let _guard = tch::no_grad_guard();
        let mut variables: HashMap<String, Tensor> = vs.variables();
        let mut pieces = Pieces::new(&self.chunks);
        for (entry, &kind) in self.manifest.tensors.iter().zip(&self.kinds) {
            let var = variables
                .get_mut(&entry.name)
                .expect("check_target found every tensor");
            let parts = pieces.take(entry.len as usize);
            copy_pieces_into(var, &parts, &entry.shape, kind)?;
        }
        tracing::debug!(
            policy_version = self.manifest.policy_version,
            tensors = self.manifest.tensors.len(),
            hash_wait_seconds = hash_wait,
            copy_seconds = clock.elapsed().as_secs_f64() - hash_wait,
            "applied weights"
        );
        Ok(self.manifest.policy_version)
    }
}

/// Errors unless `manifest` lists exactly the variables of `vs`, with their shapes.
fn check_target(manifest: &WeightManifest, vs: &nn::VarStore) -> Result<()> {
    let variables = vs.variables();
    for entry in &manifest.tensors {
        let var = variables
            .get(&entry.name)
            .ok_or_else(|| weights_error(format!("{}: not a model variable", entry.name)))?;
        if var.size() != entry.shape {
            return Err(weights_error(format!(
                "{}: shape {:?} in the transfer, the model has {:?}",
                entry.name,
                entry.shape,
                var.size()
            )));
        }
    }
    let listed: HashSet<&str> = manifest.tensors.iter().map(|e| e.name.as_str()).collect();
    let mut missing: Vec<&String> = variables
        .keys()
        .filter(|n| !listed.contains(n.as_str()))
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(weights_error(format!(
            "model variables missing from the transfer: {missing:?}"
        )));
    }
    Ok(())
}

/// Copies weights received whole into a tensor of bytes (`uint8`, on any device: an NCCL
/// broadcast leaves them on the GPU) into `vs`, tensor by tensor as views of `bytes`, and
/// returns their policy version. The manifest and the target are checked first; the hashes
/// are not (the bytes never reach the host: NCCL's transports carry their own integrity
/// checks; every other path goes through [`WeightAssembler`]).
pub fn apply_device_bytes(
    manifest: &WeightManifest,
    bytes: &Tensor,
    vs: &nn::VarStore,
) -> Result<u64> {
    let kinds = manifest_kinds(manifest)?;
    check_target(manifest, vs)?;
    if bytes.kind() != Kind::Uint8
        || bytes.dim() != 1
        || bytes.numel() as u64 != manifest.total_bytes
    {
        return Err(weights_error(format!(
            "expected {} bytes as a 1-D uint8 tensor, got {:?} of {:?}",
            manifest.total_bytes,
            bytes.size(),
            bytes.kind()
        )));
    }
    let _guard = tch::no_grad_guard();
    let mut variables: HashMap<String, Tensor> = vs.variables();
    for (entry, &kind) in manifest.tensors.iter().zip(&kinds) {
        let var = variables
            .get_mut(&entry.name)
            .expect("check_target found every tensor");
        let mut part = bytes.f_narrow(0, entry.offset as i64, entry.len as i64)?;
        if !(entry.offset as usize).is_multiple_of(kind.elt_size_in_bytes()) {
            // A dtype view needs an aligned start.
            part = part.copy();
        }
        var.f_copy_(&part.f_view_dtype(kind)?.f_reshape(&entry.shape)?)?;
    }
    Ok(manifest.policy_version)
}

/// Walks the received chunks in stream order, handing out each tensor's bytes as the slices
/// of the chunks that hold them.
struct Pieces<'a> {
    chunks: std::slice::Iter<'a, Bytes>,
    /// The unread rest of the current chunk.
    current: &'a [u8],
}

impl<'a> Pieces<'a> {
    fn new(chunks: &'a [Bytes]) -> Self {
        Self {
            chunks: chunks.iter(),
            current: &[],
        }
    }

    /// The next `len` bytes of the stream, as one slice per chunk they span. The assembler
    /// calls it only for a complete stream, in manifest order.
    fn take(&mut self, mut len: usize) -> Vec<&'a [u8]> {
        let mut parts = Vec::new();
        while len > 0 {
            if self.current.is_empty() {
                self.current = self
                    .chunks
                    .next()
                    .expect("a complete stream holds every tensor");
            }
            let n = len.min(self.current.len());
            let (part, rest) = self.current.split_at(n);
            parts.push(part);
            self.current = rest;
            len -= n;
        }
        parts
    }
}

/// Copies a row-major tensor of `shape` and `kind`, whose bytes are `parts` back to back, into
/// `var` (converting dtype and device as needed), part by part into its range of `var`. A part
/// at an address aligned for `kind` is read in place, so the only copy is the one into the
/// model; an unaligned one (the wire does not align chunk payloads) goes through a temporary
/// tensor of the part's size, still warm in cache when it is copied on. A tensor whose parts
/// split an element (streams mixing dtypes) is gathered whole first.
fn copy_pieces_into(var: &mut Tensor, parts: &[&[u8]], shape: &[i64], kind: Kind) -> Result<()> {
    let size = kind.elt_size_in_bytes();
    let whole_elements = parts.iter().all(|p| p.len().is_multiple_of(size));
    let aligned = |p: &[u8]| (p.as_ptr() as usize).is_multiple_of(size);
    if parts.is_empty() || !whole_elements || !var.is_contiguous() {
        let bytes = parts.concat();
        let source = Tensor::f_from_data_size(&bytes, shape, kind)?;
        var.f_copy_(&source)?;
        return Ok(());
    }
    let flat = var.f_view([-1])?;
    let mut start = 0i64;
    for part in parts {
        let n = (part.len() / size) as i64;
        let source = if aligned(part) {
            borrowed_tensor(part, kind)?
        } else {
            Tensor::f_from_data_size(part, &[n], kind)?
        };
        flat.f_narrow(0, start, n)?.f_copy_(&source)?;
        start += n;
    }
    Ok(())
}

/// A 1-D CPU tensor of `kind` that reads `bytes` in place. Only for a copy that ends before
/// `bytes` goes away.
fn borrowed_tensor(bytes: &[u8], kind: Kind) -> Result<Tensor> {
    let n = (bytes.len() / kind.elt_size_in_bytes()) as i64;
    // SAFETY: `bytes` holds exactly `n` elements of `kind` (callers split parts on element
    // boundaries), it is aligned for `kind` (checked by the caller), and the tensor is only
    // read by a copy that finishes before the borrow of `bytes` ends.
    Ok(unsafe { Tensor::f_from_blob(bytes.as_ptr(), &[n], &[1], kind, Device::Cpu)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest of `tensors` (name, bytes) packed back to back, hashed independently.
    fn manifest(tensors: &[(&str, &[u8])]) -> WeightManifest {
        let mut offset = 0;
        let tensors = tensors
            .iter()
            .map(|(name, data)| {
                let entry = TensorEntry {
                    name: name.to_string(),
                    shape: vec![data.len() as i64],
                    dtype: "f32".into(),
                    offset,
                    len: data.len() as u64,
                    sha256: format!("{:x}", Sha256::digest(data)),
                };
                offset += data.len() as u64;
                entry
            })
            .collect();
        WeightManifest {
            policy_version: 1,
            tensors,
            total_bytes: offset,
        }
    }

    const TENSORS: [(&str, &[u8]); 5] = [
        ("empty_first", b""),
        ("a", b"abcdefg"),
        ("empty_middle", b""),
        ("b", b"0123456789"),
        ("empty_last", b""),
    ];

    fn stream() -> Vec<u8> {
        TENSORS
            .iter()
            .flat_map(|(_, d)| d.iter().copied())
            .collect()
    }

    #[test]
    fn tensors_split_anywhere_across_chunks_hash_like_the_whole() {
        let m = manifest(&TENSORS);
        let bytes = stream();
        for piece in 1..=bytes.len() {
            let mut hasher = StreamHasher::all(&m);
            for chunk in bytes.chunks(piece) {
                hasher.feed(chunk).unwrap();
            }
            hasher.finish().unwrap();
        }
        // Empty pieces change nothing.
        let mut hasher = StreamHasher::all(&m);
        hasher.feed(&[]).unwrap();
        hasher.feed(&bytes).unwrap();
        hasher.feed(&[]).unwrap();
        hasher.finish().unwrap();
    }

    #[test]
    fn a_flipped_byte_names_its_tensor_and_a_short_stream_is_not_whole() {
        let m = manifest(&TENSORS);
        for (at, name) in [(0, "a"), (6, "a"), (7, "b"), (16, "b")] {
            let mut bytes = stream();
            bytes[at] ^= 0x40;
            let mut hasher = StreamHasher::all(&m);
            let error = bytes
                .chunks(3)
                .try_for_each(|c| hasher.feed(c))
                .and_then(|()| hasher.finish())
                .unwrap_err();
            assert!(error.starts_with(&format!("{name}: SHA-256")), "{error}");
        }
        let bytes = stream();
        let mut hasher = StreamHasher::all(&m);
        hasher.feed(&bytes[..10]).unwrap();
        let error = hasher.finish().unwrap_err();
        assert!(error.contains("b: only 3 of 10 bytes"), "{error}");
        let mut hasher = StreamHasher::all(&m);
        let error = hasher.feed(&[bytes.clone(), vec![0]].concat()).unwrap_err();
        assert!(error.contains("1 bytes past the last tensor"), "{error}");
    }

    #[test]
    fn the_background_hasher_reports_the_first_mismatch() {
        let m = manifest(&TENSORS);
        let mut good = BackgroundHasher::start(&m, 1).unwrap();
        for chunk in stream().chunks(4) {
            assert!(good.send(Bytes::copy_from_slice(chunk)));
        }
        good.finish().unwrap();
        good.finish().unwrap();

        let mut bad = BackgroundHasher::start(&m, 1).unwrap();
        let mut bytes = stream();
        bytes[2] ^= 1;
        for chunk in bytes.chunks(4) {
            // The thread stops at the mismatch; later sends may find it gone.
            let _ = bad.send(Bytes::copy_from_slice(chunk));
        }
        let error = bad.finish().unwrap_err().to_string();
        assert!(error.contains("a: SHA-256"), "{error}");
        assert!(bad.has_failed());
    }

    #[test]
    fn several_hashing_threads_share_the_stream_and_each_mismatch_is_found() {
        let m = manifest(&TENSORS);
        for workers in 1..=6 {
            let mut good = BackgroundHasher::start(&m, workers).unwrap();
            for chunk in stream().chunks(3) {
                assert!(good.send(Bytes::copy_from_slice(chunk)));
            }
            good.finish().unwrap();
            for (at, name) in [(1, "a"), (12, "b")] {
                let mut bytes = stream();
                bytes[at] ^= 2;
                let mut bad = BackgroundHasher::start(&m, workers).unwrap();
                for chunk in bytes.chunks(5) {
                    let _ = bad.send(Bytes::copy_from_slice(chunk));
                }
                let error = bad.finish().unwrap_err().to_string();
                assert!(
                    error.contains(&format!("{name}: SHA-256")),
                    "{workers}: {error}"
                );
            }
            // A stream cut short is not whole for whichever thread owns the cut tensor.
            let mut short = BackgroundHasher::start(&m, workers).unwrap();
            assert!(short.send(Bytes::copy_from_slice(&stream()[..9])));
            let error = short.finish().unwrap_err().to_string();
            assert!(
                error.contains("b: only 2 of 10 bytes"),
                "{workers}: {error}"
            );
        }
    }

    #[test]
    fn tensors_are_split_evenly_and_each_owned_once() {
        let lens = [64u64, 8, 8, 0, 8, 32, 8, 8, 8, 8];
        for workers in 1..=4 {
            let owned = assign_tensors(&lens, workers);
            assert_eq!(owned.len(), workers);
            for t in 0..lens.len() {
                assert_eq!(owned.iter().filter(|o| o[t]).count(), 1, "tensor {t}");
            }
        }
        // Greedy by hand: 64 to worker 0; 8, 8, 0 (counted as 1), 8, 32, 8 to worker 1
        // (65 by then); 8 to worker 0 (72); 8 to worker 1 (73); 8 to worker 0 (80).
        let owned = assign_tensors(&lens, 2);
        let bytes =
            |o: &Vec<bool>| -> u64 { (0..lens.len()).filter(|&t| o[t]).map(|t| lens[t]).sum() };
        assert_eq!((bytes(&owned[0]), bytes(&owned[1])), (80, 72));
        assert_eq!(hash_workers(0), 1);
        assert!(hash_workers(3) <= 3);
    }
}
