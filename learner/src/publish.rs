//! Policy weights as the learner publishes them, and their manifest in wire form.
use prime_model::weights::{encode_var_store, EncodedWeights, WeightManifest};
use prime_model::CausalLm;
use prime_proto::v1 as pb;

use crate::error::Result;

/// Policy weights as published to actors.
#[derive(Debug)]
pub struct Published {
    /// The version these weights are.
    pub policy_version: u64,
    /// Names, shapes, dtypes, offsets and checksums.
    pub manifest: WeightManifest,
    /// Every tensor's bytes, back to back; chunks are slices of it (no copies).
    pub bytes: tonic::codegen::Bytes,
}

impl Published {
    /// Encodes the weights of `lm` as version `policy_version`.
    pub fn encode(lm: &CausalLm, policy_version: u64) -> Result<Self> {
        Ok(Self::new(encode_var_store(&lm.vs, policy_version, None)?))
    }

    /// Takes over encoded weights.
    pub fn new(weights: EncodedWeights) -> Self {
        Self {
            policy_version: weights.manifest.policy_version,
            manifest: weights.manifest,
            bytes: weights.bytes.into(),
        }
    }
}

/// The wire form of a weight manifest (the actor reads it back with
/// `prime_actor::weights::manifest_from_proto`).
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
