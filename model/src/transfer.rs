//! Policy and PRM weights on the wire: the weights a learner publishes ([`Published`]), the
//! manifest to and from its `prime.v1` form, and the receiving end of a chunked
//! `WeightTransfer` stream (`FetchWeights`, `FetchPrmWeights`): the manifest first, then the
//! chunks, all fed to a [`WeightAssembler`], which checks every tensor's hash before anything
//! is copied into a model. The two halves of receiving are separate so that the caller can
//! check the manifest against its model (a tch call) between them.
use bytes::Bytes;
use prime_proto::v1 as pb;
use prime_proto::v1::weight_transfer::Payload;
use tokio_stream::{Stream, StreamExt};

use crate::error::{ModelError, Result};
use crate::weights::{EncodedWeights, TensorEntry, WeightAssembler, WeightManifest};

/// Weights as a learner publishes them, for `FetchWeights` and the weight broadcast.
#[derive(Debug)]
pub struct Published {
    /// The version these weights are.
    pub policy_version: u64,
    /// Names, shapes, dtypes, offsets and checksums.
    pub manifest: WeightManifest,
    /// Every tensor's bytes, back to back; chunks are slices of it (no copies).
    pub bytes: Bytes,
}

impl Published {
    /// Takes over encoded weights.
    pub fn new(weights: EncodedWeights) -> Self {
        Self {
            policy_version: weights.manifest.policy_version,
            manifest: weights.manifest,
            bytes: weights.bytes.into(),
        }
    }
}

/// The wire form of a weight manifest (read back with [`manifest_from_proto`]).
pub fn manifest_to_proto(m: &WeightManifest) -> pb::WeightManifest {
    pb::WeightManifest {
        policy_version: m.policy_version,
        tensors: m
            .tensors
            .iter()
            .map(|t| pb::TensorInfo {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype.clone(),
                offset: t.offset,
                length: t.len,
                sha256: t.sha256.clone(),
            })
            .collect(),
        total_bytes: m.total_bytes,
    }
}

/// The model crate's form of a wire manifest.
pub fn manifest_from_proto(manifest: pb::WeightManifest) -> WeightManifest {
    WeightManifest {
        policy_version: manifest.policy_version,
        tensors: manifest
            .tensors
            .into_iter()
            .map(|t| TensorEntry {
                name: t.name,
                shape: t.shape,
                dtype: t.dtype,
                offset: t.offset,
                len: t.length,
                sha256: t.sha256,
            })
            .collect(),
        total_bytes: manifest.total_bytes,
    }
}

fn stream_error(status: tonic::Status) -> ModelError {
    ModelError::TransferStream {
        code: status.code(),
        message: status.message().to_string(),
    }
}

fn protocol(message: impl Into<String>) -> ModelError {
    ModelError::TransferProtocol(message.into())
}

/// Reads the first message of a transfer, which must be the manifest of `policy_version`, and
/// starts assembling it (the manifest's own consistency is checked there).
pub async fn open_transfer<S>(stream: &mut S, policy_version: u64) -> Result<WeightAssembler>
where
    S: Stream<Item = Result<pb::WeightTransfer, tonic::Status>> + Unpin,
{
    let first = stream
        .next()
        .await
        .ok_or_else(|| protocol("weight stream ended before its manifest"))?
        .map_err(stream_error)?;
    let manifest = match first.payload {
        Some(Payload::Manifest(manifest)) => manifest,
        _ => return Err(protocol("weight stream does not start with a manifest")),
    };
    if manifest.policy_version != policy_version {
        return Err(protocol(format!(
            "asked for the weights of policy version {policy_version}, got version {}",
            manifest.policy_version
        )));
    }
    WeightAssembler::new(manifest_from_proto(manifest))
}

/// Feeds the rest of the stream to `assembler` until the stream ends, refusing chunks above
/// `max_chunk_bytes`, a second manifest, and a stream that ends short of the manifest's
/// length. A tensor whose hash does not match fails the transfer as soon as it is whole.
pub async fn receive_chunks<S>(
    stream: &mut S,
    assembler: &mut WeightAssembler,
    max_chunk_bytes: usize,
) -> Result<()>
where
    S: Stream<Item = Result<pb::WeightTransfer, tonic::Status>> + Unpin,
{
    while let Some(message) = stream.next().await {
        match message.map_err(stream_error)?.payload {
            Some(Payload::Chunk(chunk)) => {
                if chunk.data.len() > max_chunk_bytes {
                    return Err(protocol(format!(
                        "weight chunk of {} bytes at offset {}, more than {max_chunk_bytes}",
                        chunk.data.len(),
                        chunk.offset
                    )));
                }
                assembler.push(chunk.policy_version, chunk.offset, chunk.data)?;
            }
            Some(Payload::Manifest(_)) => {
                return Err(protocol("a second manifest in one weight stream"))
            }
            None => return Err(protocol("an empty weight message")),
        }
    }
    if !assembler.is_complete() {
        return Err(protocol(format!(
            "weight stream ended after {} of {} bytes",
            assembler.received_bytes(),
            assembler.manifest().total_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::encode_var_store;
    use crate::{CausalLm, Qwen2Config};
    use tch::{Device, Kind, Tensor};

    fn tiny_config() -> Qwen2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 61,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32,
        }))
        .unwrap()
    }

    fn model(seed: i64, kind: Kind) -> CausalLm {
        tch::set_num_threads(1);
        tch::manual_seed(seed);
        CausalLm::random(&tiny_config(), Device::Cpu, kind, kind).unwrap()
    }

    fn messages(encoded: &EncodedWeights, chunk_bytes: usize) -> Vec<pb::WeightTransfer> {
        let mut out = vec![pb::WeightTransfer {
            payload: Some(Payload::Manifest(manifest_to_proto(&encoded.manifest))),
        }];
        out.extend(encoded.chunks(chunk_bytes).map(|c| pb::WeightTransfer {
            payload: Some(Payload::Chunk(pb::WeightChunk {
                policy_version: c.policy_version,
                offset: c.offset,
                data: c.data.to_vec().into(),
            })),
        }));
        out
    }

    /// Runs the receive path on `messages` and applies the result to `target`.
    fn receive(
        messages: Vec<pb::WeightTransfer>,
        version: u64,
        max_chunk_bytes: usize,
        target: &CausalLm,
    ) -> Result<u64> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut stream = tokio_stream::iter(messages.into_iter().map(Ok));
        let mut assembler = runtime.block_on(open_transfer(&mut stream, version))?;
        assembler.check_target(&target.vs)?;
        runtime.block_on(receive_chunks(&mut stream, &mut assembler, max_chunk_bytes))?;
        assembler.apply(&target.vs)
    }

    fn snapshot(lm: &CausalLm) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = lm
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(b) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na} differs");
        }
    }

    #[test]
    fn a_chunked_stream_reproduces_the_learners_weights_exactly() {
        let source = model(1, Kind::Float);
        let target = model(2, Kind::Float);
        let encoded = encode_var_store(&source.vs, 7, None).unwrap();
        // Chunks that split tensors at odd places, and chunks of the protocol's maximum.
        for chunk in [1000, 4 << 20] {
            let version = receive(messages(&encoded, chunk), 7, 4 << 20, &target).unwrap();
            assert_eq!(version, 7);
            assert_same(&snapshot(&source), &snapshot(&target));
        }
    }

    #[test]
    fn bf16_weights_arrive_as_the_learner_cast_them() {
        let source = model(3, Kind::Float);
        let target = model(4, Kind::BFloat16);
        let encoded = encode_var_store(&source.vs, 2, Some(Kind::BFloat16)).unwrap();
        receive(messages(&encoded, 777), 2, 4 << 20, &target).unwrap();
        let expected: Vec<(String, Tensor)> = snapshot(&source)
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(Kind::BFloat16)))
            .collect();
        assert_same(&expected, &snapshot(&target));
    }

    #[test]
    fn bad_streams_are_refused_and_leave_the_model_as_it_was() {
        let source = model(5, Kind::Float);
        let target = model(6, Kind::Float);
        let before = snapshot(&target);
        let encoded = encode_var_store(&source.vs, 3, None).unwrap();
        let good = messages(&encoded, 1000);
        let expect_protocol = |result: Result<u64>, needle: &str| match result {
            Err(ModelError::TransferProtocol(message)) => {
                assert!(message.contains(needle), "{message}")
            }
            other => panic!("expected a protocol error with {needle:?}, got {other:?}"),
        };

        // Another version than asked for.
        expect_protocol(receive(good.clone(), 4, 4 << 20, &target), "version 3");
        // No manifest first.
        expect_protocol(
            receive(good[1..].to_vec(), 3, 4 << 20, &target),
            "start with a manifest",
        );
        // Cut short.
        expect_protocol(
            receive(good[..good.len() - 1].to_vec(), 3, 4 << 20, &target),
            "ended after",
        );
        // Chunks above the receiver's limit.
        expect_protocol(receive(good.clone(), 3, 999, &target), "more than 999");
        // A second manifest.
        let mut twice = good.clone();
        twice.insert(2, good[0].clone());
        expect_protocol(receive(twice, 3, 4 << 20, &target), "second manifest");

        // A flipped bit: the assembler's hash check fails.
        let mut corrupt = good.clone();
        if let Some(Payload::Chunk(chunk)) = &mut corrupt[1].payload {
            let mut data = chunk.data.to_vec();
            data[10] ^= 1;
            chunk.data = data.into();
        }
        match receive(corrupt, 3, 4 << 20, &target) {
            Err(ModelError::Weights(message)) => {
                assert!(message.contains("SHA-256"), "{message}")
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
        // A stream error from the sender.
        let mut broken = good.clone();
        broken.truncate(2);
        let mut stream = tokio_stream::iter(
            broken
                .into_iter()
                .map(Ok)
                .chain([Err(tonic::Status::unavailable("learner restarting"))]),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut assembler = runtime.block_on(open_transfer(&mut stream, 3)).unwrap();
        let err = runtime
            .block_on(receive_chunks(&mut stream, &mut assembler, 4 << 20))
            .unwrap_err();
        match err {
            ModelError::TransferStream { code, message } => {
                assert_eq!(code, tonic::Code::Unavailable);
                assert_eq!(message, "learner restarting");
            }
            other => panic!("expected the stream's status, got {other:?}"),
        }

        assert_same(&before, &snapshot(&target));
    }
}
