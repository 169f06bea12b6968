//! The weight-transfer codec: a model's named tensors become a manifest plus one byte stream
//! sent in chunks, and a received stream is checked and copied into a model.
//!
//! The byte stream holds the tensors back to back in manifest order, each as row-major
//! little-endian bytes, so a receiver can check a tensor (its SHA-256) as soon as its last
//! chunk arrives. These are plain Rust types; the gRPC layer maps them to `prime.v1` messages.
use std::collections::{HashMap, HashSet};

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
            sha256: sha256_hex(&bytes[start..]),
        });
    }
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

/// Receives a byte stream chunk by chunk, checks each tensor as soon as it is whole, and
/// copies the weights into a model only once everything has been checked.
#[derive(Debug)]
pub struct WeightAssembler {
    manifest: WeightManifest,
    kinds: Vec<Kind>,
    bytes: Vec<u8>,
    /// Tensors at the front of the stream whose bytes have all arrived and match their hash.
    verified: usize,
}

impl WeightAssembler {
    /// Starts a transfer described by `manifest`, after checking that it is self-consistent
    /// (known dtypes, lengths that fit the shapes, tensors packed in order) and reserving its
    /// bytes.
    pub fn new(manifest: WeightManifest) -> Result<Self> {
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
        let mut bytes = Vec::new();
        usize::try_from(end)
            .ok()
            .and_then(|n| bytes.try_reserve_exact(n).ok())
            .ok_or_else(|| weights_error(format!("cannot allocate {end} bytes")))?;
        Ok(Self {
            manifest,
            kinds,
            bytes,
            verified: 0,
        })
    }

    /// The manifest of this transfer.
    pub fn manifest(&self) -> &WeightManifest {
        &self.manifest
    }

    /// Bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the whole stream has arrived.
    pub fn is_complete(&self) -> bool {
        self.received_bytes() == self.manifest.total_bytes
    }

    /// Takes the next chunk: it must carry the manifest's version and start where the bytes
    /// received so far end, and must not run past the stream. A rejected chunk changes
    /// nothing. Fails when a tensor completed by this chunk does not match its hash; the
    /// transfer cannot be applied after that.
    pub fn push(&mut self, policy_version: u64, offset: u64, data: &[u8]) -> Result<()> {
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
        self.bytes.extend_from_slice(data);
        self.verify_arrived()
    }

    /// Hashes the tensors that have become whole since the last call.
    fn verify_arrived(&mut self) -> Result<()> {
        let received = self.received_bytes();
        while let Some(entry) = self.manifest.tensors.get(self.verified) {
            if entry.offset + entry.len > received {
                break;
            }
            let range = entry.offset as usize..(entry.offset + entry.len) as usize;
            let actual = sha256_hex(&self.bytes[range]);
            if actual != entry.sha256 {
                return Err(weights_error(format!(
                    "{}: SHA-256 {actual} of the received bytes, the manifest says {}",
                    entry.name, entry.sha256
                )));
            }
            self.verified += 1;
        }
        Ok(())
    }

    /// Checks that the transfer fits `vs`: the same tensor names, with the same shapes. Call
    /// it on the manifest alone to refuse a transfer before its bytes are sent.
    pub fn check_target(&self, vs: &nn::VarStore) -> Result<()> {
        let variables = vs.variables();
        for entry in &self.manifest.tensors {
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
        let listed: HashSet<&str> = self
            .manifest
            .tensors
            .iter()
            .map(|e| e.name.as_str())
            .collect();
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

    /// Copies the received weights into `vs` (converting to its dtype and device) and returns
    /// their policy version. Nothing is copied unless the stream is complete, every hash has
    /// matched and [`check_target`](Self::check_target) passes.
    pub fn apply(mut self, vs: &nn::VarStore) -> Result<u64> {
        self.verify_arrived()?;
        if !self.is_complete() {
            return Err(weights_error(format!(
                "transfer incomplete: {} of {} bytes received",
                self.received_bytes(),
                self.manifest.total_bytes
            )));
        }
        self.check_target(vs)?;
        let _guard = tch::no_grad_guard();
        let mut variables: HashMap<String, Tensor> = vs.variables();
        for (entry, &kind) in self.manifest.tensors.iter().zip(&self.kinds) {
            let range = entry.offset as usize..(entry.offset + entry.len) as usize;
            let source = Tensor::f_from_data_size(&self.bytes[range], &entry.shape, kind)?;
            let var = variables
                .get_mut(&entry.name)
                .expect("check_target found every tensor");
            var.f_copy_(&source)?;
        }
        tracing::debug!(
            policy_version = self.manifest.policy_version,
            tensors = self.manifest.tensors.len(),
            "applied weights"
        );
        Ok(self.manifest.policy_version)
    }
}
