//! `prime grade`: grade a JSONL file locally or through a running verifier.
//!
//! Input lines: `{"id": ..., "ability": "math"|"code", "response": "...", "ground_truth": "..."}`
//! (for code the ground truth is the JSON test spec as a string). Each output line is the input
//! object plus `"score"` (float in [0, 1]) and `"reason"`, in input order.

use crate::error::VerifierError;
use crate::grade::{GradeItem, GradeResult, Grader, GraderConfig};
use crate::service::item_to_proto;
use prime_check::FileError;
use prime_proto::v1 as pb;
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Grades `options.input` into `options.output`. Before anything is graded or written, the
/// output must be another file than the input and every input line must be a JSON object with
/// a known `ability`, a `response` and a `ground_truth` (the error names the file and line).
/// The output is written next to its destination and replaces it only once every line is
/// graded, so a failure leaves an existing output as it was.
pub fn grade_file(options: &GradeFileOptions) -> Result<GradeFileSummary, VerifierError> {
    prime_check::path::distinct("--input", &options.input, "--output", &options.output)
        .map_err(|e| VerifierError::File(e.to_string()))?;
    let token = prime_proto::auth::usable_token(options.token.as_deref())
        .map_err(|e| VerifierError::Config(e.to_string()))?
        .map(str::to_string);
    let rows = read_items(&options.input)?;
    let mut output = prime_check::path::AtomicFile::create(&options.output)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = runtime.block_on(grade_rows(options, token, rows, &mut output))?;
    output.commit()?;
    Ok(summary)
}

/// An input line's object (copied to the output with the score) and its grade item.
type Row = (Map<String, Value>, GradeItem);

/// The input's objects and their grade items, every line checked.
fn read_items(path: &Path) -> Result<Vec<Row>, VerifierError> {
    prime_check::jsonl::read(path)?
        .into_iter()
        .map(|line| {
            let refuse = |message: String| FileError::at_line(path, line.number, message);
            let Value::Object(object) = line.value else {
                return Err(refuse("not a JSON object".into()).into());
            };
            let item = item_from_json(&object, line.number).map_err(refuse)?;
            Ok((object, item))
        })
        .collect()
}

async fn grade_rows(
    options: &GradeFileOptions,
    token: Option<String>,
    rows: Vec<Row>,
    writer: &mut impl Write,
) -> Result<GradeFileSummary, VerifierError> {
    let mut backend = match &options.addr {
        None => Backend::Local(Grader::new(options.grader.clone())),
        Some(addr) => {
            let client = pb::verifier_client::VerifierClient::connect(addr.clone())
                .await
                .map_err(|e| VerifierError::Unavailable(format!("cannot reach {addr}: {e}")))?
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            Backend::Remote(client, token)
        }
    };
    let mut summary = GradeFileSummary {
        items: 0,
        total_score: 0.0,
    };
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let mut pending: Vec<_> = rows.by_ref().take(BATCH).collect();
        flush(&mut backend, &mut pending, writer, &mut summary).await?;
    }
    writer.flush()?;
    Ok(summary)
}

/// The grade item of one input object (`line` is its 1-based line, the default id): the
/// ability must be math or code, and the response and ground truth present (a number is taken
/// as its text).
fn item_from_json(object: &Map<String, Value>, line: usize) -> Result<GradeItem, String> {
    let text = |key: &str| match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => Err(format!("missing \"{key}\"")),
        Some(number @ Value::Number(_)) => Ok(number.to_string()),
        Some(other) => Err(format!(
            "\"{key}\" must be a string, got {}",
            json_type(other)
        )),
    };
    let id = match object.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => line.to_string(),
    };
    let ability = text("ability")?
        .parse()
        .map_err(|e: VerifierError| match e {
            VerifierError::InvalidRequest(message) => message,
            other => other.to_string(),
        })?;
    Ok(GradeItem {
        id,
        ability: Some(ability),
        response: text("response")?,
        ground_truth: text("ground_truth")?,
    })
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

async fn flush(
    backend: &mut Backend,
    pending: &mut Vec<Row>,
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
                let value = format!("Bearer {t}").parse().map_err(|_| {
                    VerifierError::Config(
                        "the token has characters a gRPC header cannot carry".into(),
                    )
                })?;
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
