//! Grading the learner's own samples by ability: math by the math grader in this process,
//! code by the code grader, either in this process's sandbox (`prime train --local`) or by a
//! Verifier service (`prime train` with services, the Helm chart), so that a learner pod needs
//! no sandbox of its own.
use std::time::Duration;

use prime_proto::auth::ClientTls;
use prime_proto::client::{lazy_channel_secure, request, verifier_client, with_deadline};
use prime_proto::v1 as pb;
use prime_verifier::service::ability_to_proto;
use prime_verifier::{Ability, GradeItem, Grader, GraderConfig, Outcome};

use crate::error::{LearnerError, Result};

/// How long one grading call to a Verifier service may take.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(600);
/// Calls to a Verifier service before an unavailable verifier fails the grading.
const SERVICE_ATTEMPTS: u32 = 4;
/// Items per call to a Verifier service.
const SERVICE_BATCH: usize = 256;

/// Where code responses are graded (math is always graded in this process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CodeGrading {
    /// In this process's sandbox, started on first use.
    #[default]
    InProcess,
    /// By the Verifier service at `url`, with the run's shared token.
    Service {
        /// gRPC URL of the verifier.
        url: String,
        /// Shared token the verifier asks for.
        token: Option<String>,
        /// TLS towards an `https://` URL.
        tls: ClientTls,
    },
}

/// One response to grade: its ability, the reference (answer or JSON test spec) and the text.
#[derive(Debug, Clone, Copy)]
pub struct ToGrade<'a> {
    /// Math or code.
    pub ability: Ability,
    /// Reference answer (math) or JSON test spec (code).
    pub ground_truth: &'a str,
    /// The decoded response.
    pub response: &'a str,
}

/// Grades by ability; holds the in-process sandbox once code was graded here.
#[derive(Debug, Default)]
pub struct Grading {
    code: CodeGrading,
    sandbox: Option<Grader>,
}

impl Grading {
    /// Grades code as `code` says.
    pub fn new(code: CodeGrading) -> Self {
        Self {
            code,
            sandbox: None,
        }
    }

    /// Where code is graded.
    pub fn code(&self) -> &CodeGrading {
        &self.code
    }

    /// Scores in [0, 1] of `items`, in order: math 0 or 1, code the share of tests passed.
    pub fn grade(&mut self, items: &[ToGrade<'_>]) -> Result<Vec<f64>> {
        let mut scores = vec![0.0; items.len()];
        let mut code = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.ability {
                Ability::Math => {
                    let verdict =
                        prime_verifier::math::grade_math(item.response, item.ground_truth);
                    scores[i] = f64::from(u8::from(verdict.correct));
                }
                Ability::Code => code.push(i),
            }
        }
        if code.is_empty() {
            return Ok(scores);
        }
        let code_items: Vec<ToGrade<'_>> = code.iter().map(|&i| items[i]).collect();
        let code_scores = match &self.code {
            CodeGrading::InProcess => self.grade_in_process(&code_items)?,
            CodeGrading::Service { url, token, tls } => {
                grade_by_service(url, token.as_deref(), tls, &code_items)?
            }
        };
        for (i, score) in code.into_iter().zip(code_scores) {
            scores[i] = score;
        }
        Ok(scores)
    }

    /// The code grader of this process (its sandbox started on first use).
    fn grade_in_process(&mut self, items: &[ToGrade<'_>]) -> Result<Vec<f64>> {
        let grader = self
            .sandbox
            .get_or_insert_with(|| Grader::new(GraderConfig::default()));
        items
            .iter()
            .map(|item| {
                let result = grader.grade_now(&GradeItem {
                    id: String::new(),
                    ability: Some(item.ability),
                    response: item.response.to_string(),
                    ground_truth: item.ground_truth.to_string(),
                });
                match result.outcome {
                    Outcome::Unavailable => Err(LearnerError::Data(format!(
                        "the code grader of this process cannot grade: {} (install bubblewrap, \
                         or pass the learner a verifier with --verifier)",
                        result.reason
                    ))),
                    _ => Ok(result.score),
                }
            })
            .collect()
    }
}

/// Whether a failed call may succeed if made again.
fn retryable(code: Option<tonic::Code>) -> bool {
    matches!(
        code,
        Some(tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown)
    )
}

/// Grades `items` with the Verifier service at `url`, a batch per call; a verifier that is
/// down or cannot grade is asked again a few times before the grading fails.
fn grade_by_service(
    url: &str,
    token: Option<&str>,
    tls: &ClientTls,
    items: &[ToGrade<'_>],
) -> Result<Vec<f64>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LearnerError::io("tokio runtime"))?;
    runtime.block_on(async {
        let channel = lazy_channel_secure("verifier", url, Duration::from_secs(10), token, tls)?;
        let mut client = verifier_client(channel);
        let mut scores = Vec::with_capacity(items.len());
        for batch in items.chunks(SERVICE_BATCH) {
            let message = pb::GradeRequest {
                items: batch
                    .iter()
                    .enumerate()
                    .map(|(i, item)| pb::GradeItem {
                        id: i.to_string(),
                        ability: ability_to_proto(Some(item.ability)) as i32,
                        response: item.response.to_string(),
                        ground_truth: item.ground_truth.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            };
            let mut attempt = 0;
            let results = loop {
                attempt += 1;
                let reply = with_deadline(
                    "Verifier",
                    "Grade",
                    SERVICE_TIMEOUT,
                    client.grade(request(message.clone(), SERVICE_TIMEOUT)),
                )
                .await;
                let failure = match reply {
                    Ok(reply) => {
                        let results = reply.into_inner().results;
                        let unavailable = results
                            .iter()
                            .find(|r| r.outcome == pb::GradeOutcome::Unavailable as i32);
                        match unavailable {
                            None => break results,
                            Some(r) => format!("it could not grade: {}", r.reason),
                        }
                    }
                    // A refused token or request is not asked again: only a verifier that is
                    // down or slow may answer differently later.
                    Err(e) if !retryable(e.code()) => {
                        return Err(LearnerError::Rpc(format!(
                            "the verifier at {url} refused to grade held-out code: {e}"
                        )))
                    }
                    Err(e) => e.to_string(),
                };
                if attempt >= SERVICE_ATTEMPTS {
                    return Err(LearnerError::Rpc(format!(
                        "the verifier at {url} failed {attempt} times grading held-out code: \
                         {failure}"
                    )));
                }
                tracing::warn!(attempt, %failure, "grading held-out code: asking the verifier again");
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            };
            if results.len() != batch.len() {
                return Err(LearnerError::Rpc(format!(
                    "the verifier answered {} results for {} items",
                    results.len(),
                    batch.len()
                )));
            }
            scores.extend(results.iter().map(|r| r.score));
        }
        Ok(scores)
    })
}
