//! `prime grade`: grade a JSONL file locally or through a running verifier.
//!
//! Input lines: `{"id": ..., "ability": "math"|"code", "response": "...", "ground_truth": "..."}`
//! (for code the ground truth is the JSON test spec as a string). Each output line is the input
//! object plus `"score"` (float in [0, 1]) and `"reason"`, in input order.

use crate::error::VerifierError;
use crate::grade::{GradeItem, GradeResult, Grader, GraderConfig};
use crate::service::item_to_proto;
use prime_proto::v1 as pb;
use serde_json::{Map, Value};
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

/// Items sent per batch (locally or in one `Grade` call).
const BATCH: usize = 256;

/// Options of `prime grade`.
#[derive(Debug, Clone)]
pub struct GradeFileOptions {
    /// Input JSONL path.
    pub input: PathBuf,
    /// Output JSONL path.
    pub output: PathBuf,
    /// Verifier URL (`http://host:port`); grade locally when `None`.
    pub addr: Option<String>,
    /// Shared token for the remote verifier.
    pub token: Option<String>,
    /// Settings for local grading.
    pub grader: GraderConfig,
}

/// Totals of a graded file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradeFileSummary {
    /// Lines graded.
    pub items: usize,
    /// Sum of scores.
    pub total_score: f64,
}

enum Backend {
    Local(Grader),
    Remote(
        pb::verifier_client::VerifierClient<tonic::transport::Channel>,
        Option<String>,
    ),
}

/// Grades `options.input` into `options.output`.
pub fn grade_file(options: &GradeFileOptions) -> Result<GradeFileSummary, VerifierError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(grade_file_async(options))
}

async fn grade_file_async(options: &GradeFileOptions) -> Result<GradeFileSummary, VerifierError> {
    let mut backend = match &options.addr {
        None => Backend::Local(Grader::new(options.grader.clone())),
        Some(addr) => {
            let client = pb::verifier_client::VerifierClient::connect(addr.clone())
                .await
                .map_err(|e| VerifierError::Unavailable(format!("cannot reach {addr}: {e}")))?
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            Backend::Remote(client, options.token.clone())
        }
    };
    let reader = std::io::BufReader::new(std::fs::File::open(&options.input)?);
    let mut writer = BufWriter::new(std::fs::File::create(&options.output)?);
    let mut summary = GradeFileSummary {
        items: 0,
        total_score: 0.0,
    };
    let mut pending: Vec<(Map<String, Value>, GradeItem)> = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let object = match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(o)) => o,
            _ => {
                return Err(VerifierError::InvalidRequest(format!(
                    "line {} of {} is not a JSON object",
                    n + 1,
                    options.input.display()
                )))
            }
        };
        let item = item_from_json(&object, n);
        pending.push((object, item));
        if pending.len() == BATCH {
            flush(&mut backend, &mut pending, &mut writer, &mut summary).await?;
        }
    }
    flush(&mut backend, &mut pending, &mut writer, &mut summary).await?;
    writer.flush()?;
    Ok(summary)
}

/// The grade item of one input object; an unknown ability is kept as `None` and graded 0.
fn item_from_json(object: &Map<String, Value>, line: usize) -> GradeItem {
    let text = |key: &str| match object.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    let id = match object.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => line.to_string(),
    };
    GradeItem {
        id,
        ability: text("ability").parse().ok(),
        response: text("response"),
        ground_truth: text("ground_truth"),
    }
}

async fn flush(
    backend: &mut Backend,
    pending: &mut Vec<(Map<String, Value>, GradeItem)>,
    writer: &mut impl Write,
    summary: &mut GradeFileSummary,
) -> Result<(), VerifierError> {
    if pending.is_empty() {
        return Ok(());
    }
    let items: Vec<GradeItem> = pending.iter().map(|(_, i)| i.clone()).collect();
    let scored: Vec<(f64, String)> = match backend {
        Backend::Local(grader) => grader
            .grade_batch(items)
            .await
            .into_iter()
            .map(|r: GradeResult| (r.score, r.reason))
            .collect(),
        Backend::Remote(client, token) => {
            let mut request = tonic::Request::new(pb::GradeRequest {
                items: items.iter().map(item_to_proto).collect(),
            });
            request.set_timeout(std::time::Duration::from_secs(3600));
            if let Some(t) = token {
                let value = format!("Bearer {t}")
                    .parse()
                    .map_err(|_| VerifierError::InvalidRequest("token is not ASCII".into()))?;
                request.metadata_mut().insert("authorization", value);
            }
            let response = client
                .grade(request)
                .await
                .map_err(|s| VerifierError::Unavailable(format!("remote grade failed: {s}")))?
                .into_inner();
            if response.results.len() != items.len() {
                return Err(VerifierError::Unavailable(format!(
                    "verifier answered {} results for {} items",
                    response.results.len(),
                    items.len()
                )));
            }
            response
                .results
                .into_iter()
                .map(|r| (r.score, r.reason))
                .collect()
        }
    };
    for ((mut object, _), (score, reason)) in pending.drain(..).zip(scored) {
        object.insert("score".into(), Value::from(score));
        object.insert("reason".into(), Value::from(reason));
        serde_json::to_writer(&mut *writer, &Value::Object(object))
            .map_err(|e| VerifierError::Io(e.into()))?;
        writer.write_all(b"\n")?;
        summary.items += 1;
        summary.total_score += score;
    }
    Ok(())
}
