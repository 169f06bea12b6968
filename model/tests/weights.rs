//! The weight-transfer codec: the byte layout and hashes against values derived by hand, round
//! trips through chunked transfers that reproduce a model bit for bit (also with a bf16
//! transfer, compared with casting in tch), chunk limits, and every kind of bad transfer
//! refused with the target model left as it was.
use bytes::Bytes;
use prime_model::weights::{
    apply_device_bytes, encode_tensors, encode_var_store, EncodedWeights, WeightAssembler,
};
use prime_model::{CausalLm, ModelError, Qwen2Config, DEFAULT_CHUNK_BYTES};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

fn config(vocab: i64, hidden: i64, intermediate: i64) -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }))
    .unwrap()
}

fn tiny() -> Qwen2Config {
    config(97, 32, 48)
}

fn model(config: &Qwen2Config, seed: i64, param_kind: Kind) -> CausalLm {
    tch::set_num_threads(1);
    tch::manual_seed(seed);
    CausalLm::random(config, Device::Cpu, param_kind, Kind::Float).unwrap()
}

/// Raw bytes of a tensor, to compare weights bit for bit.
fn bits(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, t.numel());
    out
}

/// `(name, bits, kind)` of every variable, sorted by name.
fn snapshot(lm: &CausalLm) -> Vec<(String, Vec<u8>, Kind)> {
    let mut vars: Vec<_> = lm
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, bits(&t), t.kind()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Sends `encoded` in chunks of `chunk_bytes`, letting `tamper` change each chunk's bytes, and
/// applies the result to `target`.
fn transfer(
    encoded: &EncodedWeights,
    chunk_bytes: usize,
    target: &CausalLm,
    tamper: impl Fn(u64, &mut Vec<u8>),
) -> Result<u64, ModelError> {
    let mut assembler = WeightAssembler::new(encoded.manifest.clone())?;
    assembler.check_target(&target.vs)?;
    for chunk in encoded.chunks(chunk_bytes) {
        let mut data = chunk.data.to_vec();
        tamper(chunk.offset, &mut data);
        assembler.push(chunk.policy_version, chunk.offset, Bytes::from(data))?;
    }
    assembler.apply(&target.vs)
}

/// A chunk's bytes as the wire delivers them.
fn shared(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(data)
}

fn weights_message(result: Result<u64, ModelError>) -> String {
    match result {
        Err(ModelError::Weights(message)) => message,
        other => panic!("expected a weight-transfer error, got {other:?}"),
    }
}

#[test]
fn bytes_and_hashes_match_hand_derived_values() {
    let values = [1.0f32, -2.5, 3.0e-3, 65504.0, -0.0, 1.0e-30];
    let matrix = Tensor::from_slice(&values).reshape([2, 3]);
    let empty = Tensor::zeros([0, 4], (Kind::Float, Device::Cpu));
    let vars = vec![("m".to_string(), matrix), ("e".to_string(), empty)];
    let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();

    let encoded = encode_tensors(&vars, 7, None).unwrap();
    assert_eq!(encoded.bytes, f32_bytes);
    let m = &encoded.manifest;
    assert_eq!((m.policy_version, m.total_bytes), (7, 24));
    assert_eq!(m.tensors[0].name, "m");
    assert_eq!(m.tensors[0].shape, vec![2, 3]);
    assert_eq!(
        (
            m.tensors[0].dtype.as_str(),
            m.tensors[0].offset,
            m.tensors[0].len
        ),
        ("f32", 0, 24)
    );
    assert_eq!(
        m.tensors[0].sha256,
        format!("{:x}", Sha256::digest(&f32_bytes))
    );
    // The SHA-256 of no bytes, a published constant.
    assert_eq!(
        m.tensors[1].sha256,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        (
            m.tensors[1].shape.clone(),
            m.tensors[1].offset,
            m.tensors[1].len
        ),
        (vec![0, 4], 24, 0)
    );

    // bf16 and f16: round to nearest even, as the `half` crate does on its own.
    let bf16_bytes: Vec<u8> = values
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let encoded = encode_tensors(&vars, 7, Some(Kind::BFloat16)).unwrap();
    assert_eq!(encoded.bytes, bf16_bytes);
    assert_eq!(encoded.manifest.tensors[0].dtype, "bf16");
    let f16_bytes: Vec<u8> = values
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let encoded = encode_tensors(&vars, 7, Some(Kind::Half)).unwrap();
    assert_eq!(encoded.bytes, f16_bytes);
    assert_eq!(encoded.manifest.tensors[0].dtype, "f16");
}

#[test]
fn unsupported_dtype_and_duplicate_names_are_refused() {
    let ints = vec![("i".to_string(), Tensor::from_slice(&[1i64, 2]))];
    assert!(weights_message(encode_tensors(&ints, 1, None).map(|_| 0)).contains("Int64"));
    let t = Tensor::from_slice(&[1.0f32]);
    let twice = vec![("a".to_string(), t.shallow_clone()), ("a".to_string(), t)];
    assert!(weights_message(encode_tensors(&twice, 1, None).map(|_| 0)).contains("twice"));
}

#[test]
fn f32_round_trip_is_bit_identical() {
    let source = model(&tiny(), 0, Kind::Float);
    let target = model(&tiny(), 1, Kind::Float);
    let expected = snapshot(&source);
    assert_ne!(snapshot(&target), expected, "the models start different");
    let encoded = encode_var_store(&source.vs, 3, None).unwrap();
    assert_eq!(encoded.manifest.tensors.len(), expected.len());
    // An odd chunk size, so that chunks straddle tensor boundaries.
    assert_eq!(transfer(&encoded, 1000, &target, |_, _| {}).unwrap(), 3);
    assert_eq!(snapshot(&target), expected);
}

/// Sends `encoded` in chunks of `chunk_bytes` whose payloads start `shift` bytes past an
/// aligned address, as payloads decoded from the wire do, and applies the result to `target`.
fn transfer_shifted(
    encoded: &EncodedWeights,
    chunk_bytes: usize,
    shift: usize,
    target: &CausalLm,
) -> Result<u64, ModelError> {
    let mut assembler = WeightAssembler::new(encoded.manifest.clone())?;
    for chunk in encoded.chunks(chunk_bytes) {
        let mut padded = vec![0u8; shift];
        padded.extend_from_slice(chunk.data);
        let data = Bytes::from(padded).slice(shift..);
        assembler.push(chunk.policy_version, chunk.offset, data)?;
    }
    assembler.apply(&target.vs)
}

#[test]
fn payloads_at_any_address_and_chunks_splitting_elements_arrive_bit_identical() {
    let source = model(&tiny(), 0, Kind::Float);
    let expected = snapshot(&source);
    let f32_stream = encode_var_store(&source.vs, 3, None).unwrap();
    let bf16_stream = encode_var_store(&source.vs, 3, Some(Kind::BFloat16)).unwrap();
    let as_bf16: Vec<_> = expected
        .iter()
        .map(|(name, _, _)| {
            let t = source.vs.variables()[name].to_kind(Kind::BFloat16);
            (name.clone(), bits(&t), Kind::BFloat16)
        })
        .collect();
    // Whole tensors in one chunk, parts of whole elements, parts that split elements (998, 999).
    for chunk_bytes in [1 << 20, 4096, 1000, 998, 999] {
        for shift in 0..4 {
            let target = model(&tiny(), 1, Kind::Float);
            transfer_shifted(&f32_stream, chunk_bytes, shift, &target).unwrap();
            assert_eq!(
                snapshot(&target),
                expected,
                "f32, {chunk_bytes} at +{shift}"
            );
            let target = model(&tiny(), 1, Kind::BFloat16);
            transfer_shifted(&bf16_stream, chunk_bytes, shift, &target).unwrap();
            assert_eq!(
                snapshot(&target),
                as_bf16,
                "bf16, {chunk_bytes} at +{shift}"
            );
        }
    }
}

#[test]
fn bf16_transfer_equals_casting_in_tch() {
    let source = model(&tiny(), 0, Kind::Float);
    let encoded = encode_var_store(&source.vs, 4, Some(Kind::BFloat16)).unwrap();
    let params: i64 = source
        .vs
        .variables()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(encoded.manifest.total_bytes, 2 * params as u64);

    // Into an f32 model: the bf16 values widened again.
    let target = model(&tiny(), 1, Kind::Float);
    transfer(&encoded, 4096, &target, |_, _| {}).unwrap();
    let targets = target.vs.variables();
    for (name, t) in source.vs.variables() {
        let expected = t.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        assert_eq!(targets[&name].kind(), Kind::Float);
        assert_eq!(bits(&targets[&name]), bits(&expected), "{name}");
    }

    // Into a bf16 model: exactly tch's cast.
    let target = model(&tiny(), 1, Kind::BFloat16);
    transfer(&encoded, 4096, &target, |_, _| {}).unwrap();
    let targets = target.vs.variables();
    for (name, t) in source.vs.variables() {
        assert_eq!(targets[&name].kind(), Kind::BFloat16);
        assert_eq!(
            bits(&targets[&name]),
            bits(&t.to_kind(Kind::BFloat16)),
            "{name}"
        );
    }
}

#[test]
fn chunks_respect_the_size_limit_and_cover_the_stream() {
    // Above 8 MiB in f32, so the default size gives at least three chunks.
    let source = model(&config(8192, 256, 512), 0, Kind::Float);
    let encoded = encode_var_store(&source.vs, 1, None).unwrap();
    let total = encoded.bytes.len();
    assert!(total > 2 * DEFAULT_CHUNK_BYTES, "{total} bytes");
    for limit in [1usize, 4093, 1 << 20, DEFAULT_CHUNK_BYTES, total, total + 1] {
        let chunks: Vec<_> = encoded.chunks(limit).collect();
        assert_eq!(chunks.len(), total.div_ceil(limit), "limit {limit}");
        let mut next = 0u64;
        for chunk in &chunks {
            assert!(!chunk.data.is_empty() && chunk.data.len() <= limit);
            assert_eq!((chunk.offset, chunk.policy_version), (next, 1));
            let at = next as usize;
            assert_eq!(chunk.data, &encoded.bytes[at..at + chunk.data.len()]);
            next += chunk.data.len() as u64;
        }
        assert_eq!(next, total as u64);
    }
    let target = model(&config(8192, 256, 512), 1, Kind::Float);
    transfer(&encoded, DEFAULT_CHUNK_BYTES, &target, |_, _| {}).unwrap();
    assert_eq!(snapshot(&target), snapshot(&source));
}

#[test]
fn a_flipped_byte_is_detected_and_the_target_left_untouched() {
    let source = model(&tiny(), 0, Kind::Float);
    let encoded = encode_var_store(&source.vs, 2, None).unwrap();
    // A byte inside the last tensor, so every tensor before it passes its check.
    let last = encoded.manifest.tensors.last().unwrap();
    let flip_at = last.offset + last.len / 2;
    let target = model(&tiny(), 1, Kind::Float);
    let before = snapshot(&target);
    let chunk_bytes = 777;
    let message = weights_message(transfer(&encoded, chunk_bytes, &target, |offset, data| {
        if (offset..offset + data.len() as u64).contains(&flip_at) {
            data[(flip_at - offset) as usize] ^= 0x10;
        }
    }));
    assert!(
        message.contains(&last.name) && message.contains("SHA-256"),
        "{message}"
    );
    assert_eq!(snapshot(&target), before);

    // A corrupt chunk poisons the transfer: the hashes are checked behind the pushes, so
    // later pushes may be refused or not, but apply refuses with the mismatch either way.
    let mut assembler = WeightAssembler::new(encoded.manifest.clone()).unwrap();
    for chunk in encoded.chunks(chunk_bytes) {
        let mut data = chunk.data.to_vec();
        if chunk.offset == 0 {
            data[3] ^= 1;
        }
        if let Err(error) = assembler.push(2, chunk.offset, Bytes::from(data)) {
            assert!(weights_message(Err(error)).contains("SHA-256"));
        }
    }
    let message = weights_message(assembler.apply(&target.vs));
    assert!(message.contains("SHA-256"), "{message}");
    assert_eq!(snapshot(&target), before);
}

#[test]
fn a_tampered_manifest_hash_is_refused() {
    let source = model(&tiny(), 0, Kind::Float);
    let mut encoded = encode_var_store(&source.vs, 2, None).unwrap();
    let last = encoded.manifest.tensors.last_mut().unwrap();
    last.sha256 = format!("{:x}", Sha256::digest(b"something else"));
    let name = last.name.clone();
    let target = model(&tiny(), 1, Kind::Float);
    let before = snapshot(&target);
    assert!(weights_message(transfer(&encoded, 4096, &target, |_, _| {})).contains(&name));
    assert_eq!(snapshot(&target), before);
}

#[test]
fn wrong_shapes_and_missing_or_unknown_tensors_are_refused() {
    let target = model(&tiny(), 1, Kind::Float);
    let before = snapshot(&target);

    let wider = model(&config(97, 32, 64), 0, Kind::Float);
    let encoded = encode_var_store(&wider.vs, 1, None).unwrap();
    let message = weights_message(transfer(&encoded, 4096, &target, |_, _| {}));
    assert!(
        message.contains("mlp") && message.contains("shape"),
        "{message}"
    );
    // The shape check also runs at apply time, for callers that skip check_target.
    let mut assembler = WeightAssembler::new(encoded.manifest.clone()).unwrap();
    for chunk in encoded.chunks(4096) {
        assembler.push(1, chunk.offset, shared(chunk.data)).unwrap();
    }
    assert!(weights_message(assembler.apply(&target.vs)).contains("shape"));

    let source = model(&tiny(), 0, Kind::Float);
    let mut vars: Vec<(String, Tensor)> = source.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let dropped = vars.remove(vars.len() / 2).0;
    let encoded = encode_tensors(&vars, 1, None).unwrap();
    let message = weights_message(transfer(&encoded, 4096, &target, |_, _| {}));
    assert!(
        message.contains("missing") && message.contains(&dropped),
        "{message}"
    );

    vars.push((dropped, Tensor::zeros([1], (Kind::Float, Device::Cpu))));
    vars.push((
        "extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let encoded = encode_tensors(&vars, 1, None).unwrap();
    let message = weights_message(transfer(&encoded, 4096, &target, |_, _| {}));
    assert!(message.contains("shape"), "{message}");
    vars.pop();
    let last = vars.pop().unwrap();
    let restored = source.vs.variables()[&last.0].shallow_clone();
    vars.push((last.0, restored));
    vars.push((
        "extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let encoded = encode_tensors(&vars, 1, None).unwrap();
    let message = weights_message(transfer(&encoded, 4096, &target, |_, _| {}));
    assert!(message.contains("extra.weight") && message.contains("not a model variable"));

    assert_eq!(snapshot(&target), before);
}

#[test]
fn chunks_of_another_version_out_of_order_or_past_the_end_are_refused() {
    let source = model(&tiny(), 0, Kind::Float);
    let encoded = encode_var_store(&source.vs, 5, None).unwrap();
    let chunks: Vec<_> = encoded.chunks(1000).collect();
    let mut assembler = WeightAssembler::new(encoded.manifest.clone()).unwrap();

    let message = weights_message(assembler.push(6, 0, shared(chunks[0].data)).map(|_| 0));
    assert!(message.contains("version 6"), "{message}");
    let message = weights_message(assembler.push(5, 1000, shared(chunks[1].data)).map(|_| 0));
    assert!(message.contains("expected 0"), "{message}");
    assert_eq!(
        assembler.received_bytes(),
        0,
        "refused chunks change nothing"
    );
    for chunk in &chunks {
        assembler.push(5, chunk.offset, shared(chunk.data)).unwrap();
    }
    let total = encoded.manifest.total_bytes;
    let message = weights_message(assembler.push(5, total, shared(&[0])).map(|_| 0));
    assert!(message.contains("past the end"), "{message}");

    // A chunk that starts right but runs past the end.
    let mut short = WeightAssembler::new(encoded.manifest.clone()).unwrap();
    let too_long = vec![0u8; total as usize + 1];
    assert!(
        weights_message(short.push(5, 0, Bytes::from(too_long)).map(|_| 0))
            .contains("past the end")
    );

    // An incomplete transfer is not applied.
    let target = model(&tiny(), 1, Kind::Float);
    let before = snapshot(&target);
    let mut partial = WeightAssembler::new(encoded.manifest.clone()).unwrap();
    partial.push(5, 0, shared(chunks[0].data)).unwrap();
    assert!(weights_message(partial.apply(&target.vs)).contains("incomplete"));
    assert_eq!(snapshot(&target), before);

    // The full transfer still applies.
    assert_eq!(assembler.apply(&target.vs).unwrap(), 5);
    assert_eq!(snapshot(&target), snapshot(&source));
}

#[test]
fn inconsistent_manifests_are_refused() {
    let source = model(&tiny(), 0, Kind::Float);
    let manifest = encode_var_store(&source.vs, 1, None).unwrap().manifest;
    let refused = |edit: &dyn Fn(&mut prime_model::WeightManifest), needle: &str| {
        let mut m = manifest.clone();
        edit(&mut m);
        let message = weights_message(WeightAssembler::new(m).map(|_| 0));
        assert!(message.contains(needle), "{message} lacks {needle:?}");
    };
    refused(&|m| m.total_bytes += 1, "total_bytes");
    refused(&|m| m.tensors[1].len += 4, "needs");
    refused(&|m| m.tensors[1].offset += 4, "offset");
    refused(&|m| m.tensors[0].dtype = "i64".into(), "unknown dtype");
    refused(&|m| m.tensors[0].shape[0] = -1, "invalid shape");
    refused(&|m| m.tensors[1].name = m.tensors[0].name.clone(), "twice");
    refused(&|m| m.tensors.swap(0, 1), "offset");
    WeightAssembler::new(manifest).unwrap();
}

/// What an NCCL broadcast leaves on the GPU, applied from a byte tensor (here on the CPU): the
/// same weights the hash-checking assembler applies, in f32, in bf16, and for a stream whose
/// tensors start at offsets that are not aligned for their dtype; wrong buffers and wrong
/// targets are refused before anything is copied.
#[test]
fn device_bytes_apply_like_the_assembler() {
    let source = model(&tiny(), 0, Kind::Float);
    for kind in [None, Some(Kind::BFloat16)] {
        let encoded = encode_var_store(&source.vs, 6, kind).unwrap();
        let via_assembler = model(&tiny(), 1, Kind::Float);
        transfer(&encoded, 4096, &via_assembler, |_, _| {}).unwrap();
        let target = model(&tiny(), 2, Kind::Float);
        let bytes = Tensor::from_slice(&encoded.bytes);
        let version = apply_device_bytes(&encoded.manifest, &bytes, &target.vs).unwrap();
        assert_eq!(version, 6);
        assert_eq!(snapshot(&target), snapshot(&via_assembler), "{kind:?}");
    }

    // Three bf16 values put the f32 tensor after them at offset 6: not a multiple of 4.
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _ = vs.root().zeros("a", &[3]);
    let _ = vs.root().zeros("b", &[2, 2]);
    let mut a = vs.variables()["a"].shallow_clone();
    a.set_data(&a.to_kind(Kind::BFloat16));
    let values_a = Tensor::from_slice(&[1.5f32, -2.25, 3.0]).to_kind(Kind::BFloat16);
    let values_b = Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4]).reshape([2, 2]);
    let encoded = encode_tensors(
        &[
            ("a".to_string(), values_a.shallow_clone()),
            ("b".to_string(), values_b.shallow_clone()),
        ],
        9,
        None,
    )
    .unwrap();
    assert_eq!(encoded.manifest.tensors[1].offset, 6);
    let bytes = Tensor::from_slice(&encoded.bytes);
    apply_device_bytes(&encoded.manifest, &bytes, &vs).unwrap();
    let vars = vs.variables();
    assert_eq!(bits(&vars["a"]), bits(&values_a));
    assert_eq!(bits(&vars["b"]), bits(&values_b));

    // A buffer of the wrong length or dtype, and a target missing a tensor, change nothing.
    let source_stream = encode_var_store(&source.vs, 7, None).unwrap();
    let target = model(&tiny(), 3, Kind::Float);
    let before = snapshot(&target);
    let short = Tensor::from_slice(&source_stream.bytes[1..]);
    let message = weights_message(apply_device_bytes(
        &source_stream.manifest,
        &short,
        &target.vs,
    ));
    assert!(message.contains("bytes as a 1-D uint8 tensor"), "{message}");
    let as_f32 = Tensor::from_slice(&source_stream.bytes).to_kind(Kind::Float);
    assert!(apply_device_bytes(&source_stream.manifest, &as_f32, &target.vs).is_err());
    let other = model(&config(97, 32, 64), 4, Kind::Float);
    let bytes = Tensor::from_slice(&source_stream.bytes);
    let message = weights_message(apply_device_bytes(
        &source_stream.manifest,
        &bytes,
        &other.vs,
    ));
    assert!(message.contains("shape"), "{message}");
    assert_eq!(snapshot(&target), before);
}
