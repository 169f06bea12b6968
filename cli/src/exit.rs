//! The exit status of `prime`: what class of failure ended it, so a supervisor (Kubernetes,
//! `prime train`, a shell loop) can tell a bad config from a peer that is down.
//!
//! | status | class | a supervisor should |
//! |---|---|---|
//! | 0 | done | not restart |
//! | 1 | [`ExitClass::Fatal`]: any other error | restart a few times at most |
//! | 2 | [`ExitClass::BadInput`]: a config, flag or input file is wrong (also clap's usage errors) | not restart: the same input fails the same way |
//! | 70 | an internal error (a panic; [`prime_check::panics::INTERNAL_ERROR`]) | report a bug |
//! | 75 | [`ExitClass::Retryable`]: a peer is down or did not answer in time | restart, with backoff |
//!
//! The class comes from the typed errors of the crates anywhere in the error's chain: one
//! retryable cause makes the whole error retryable (a learner that cannot reach its verifier
//! while checking a config is still waiting on a peer), otherwise one bad-input cause makes it
//! bad input.
use prime_actor::ActorError;
use prime_collective::CollectiveError;
use prime_learner::LearnerError;
use prime_model::ModelError;
use prime_prm_server::PrmError;
use prime_proto::auth::AuthError;
use prime_proto::client::ClientError;
use prime_verifier::VerifierError;

/// Exit status of a bad config, flag or input (clap uses the same for its usage errors).
pub const BAD_INPUT: i32 = 2;
/// Exit status of a retryable failure (`EX_TEMPFAIL` of sysexits.h): a peer is down.
pub const RETRYABLE: i32 = 75;
/// Exit status of any other error.
pub const FATAL: i32 = 1;

/// What class of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitClass {
    /// Neither of the others.
    Fatal,
    /// The input is wrong; running again with the same input fails again.
    BadInput,
    /// A peer is down or late; running again later may succeed.
    Retryable,
}

impl ExitClass {
    /// The process exit status of this class.
    pub fn code(self) -> i32 {
        match self {
            Self::Fatal => FATAL,
            Self::BadInput => BAD_INPUT,
            Self::Retryable => RETRYABLE,
        }
    }
}

/// An error the CLI itself raises about its arguments or input files, with the message shown.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// A failure the CLI itself knows to be retryable (a child process that exited with
/// [`RETRYABLE`]), with the message shown.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Retryable(pub String);

/// The class of a process's exit status (another `prime`'s): [`BAD_INPUT`] and [`RETRYABLE`]
/// keep theirs, anything else is fatal.
pub fn class_of_status(code: i32) -> ExitClass {
    match code {
        BAD_INPUT => ExitClass::BadInput,
        RETRYABLE => ExitClass::Retryable,
        _ => ExitClass::Fatal,
    }
}

/// The class of an error: the strongest class of any cause in its chain (retryable over bad
/// input over fatal).
pub fn classify(error: &anyhow::Error) -> ExitClass {
    let marked = [
        error
            .downcast_ref::<BadInput>()
            .map(|_| ExitClass::BadInput),
        error
            .downcast_ref::<Retryable>()
            .map(|_| ExitClass::Retryable),
    ];
    error
        .chain()
        .map(link_class)
        .chain(marked.into_iter().flatten())
        .max()
        .unwrap_or(ExitClass::Fatal)
}

/// A gRPC code that says the peer is down, overloaded or late.
fn retryable_code(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted
    )
}

/// An I/O error of a connection to a peer.
fn retryable_io(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut
    )
}

fn client_class(error: &ClientError) -> ExitClass {
    match error {
        ClientError::Url { .. } => ExitClass::BadInput,
        ClientError::Auth(_) => ExitClass::BadInput,
        ClientError::Rpc { code, .. } if retryable_code(*code) => ExitClass::Retryable,
        ClientError::Rpc { .. } => ExitClass::Fatal,
    }
}

fn collective_class(error: &CollectiveError) -> ExitClass {
    match error {
        CollectiveError::Io { .. }
        | CollectiveError::PeerClosed { .. }
        | CollectiveError::Timeout { .. }
        | CollectiveError::Join(_) => ExitClass::Retryable,
        CollectiveError::Env(_) => ExitClass::BadInput,
        _ => ExitClass::Fatal,
    }
}

fn model_class(error: &ModelError) -> ExitClass {
    match error {
        ModelError::Config(_)
        | ModelError::Input(_)
        | ModelError::Device(_)
        | ModelError::NoCuda(_)
        | ModelError::CudaIndex { .. }
        | ModelError::Dtype(_)
        | ModelError::Tokenizer(_) => ExitClass::BadInput,
        ModelError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ExitClass::BadInput
        }
        ModelError::TransferStream { code, .. } if retryable_code(*code) => ExitClass::Retryable,
        _ => ExitClass::Fatal,
    }
}

/// The class of one cause by its own type (its sources are further links of the chain).
fn link_class(link: &(dyn std::error::Error + 'static)) -> ExitClass {
    if link.is::<BadInput>() {
        return ExitClass::BadInput;
    }
    if link.is::<Retryable>() {
        return ExitClass::Retryable;
    }
    if let Some(e) = link.downcast_ref::<LearnerError>() {
        return match e {
            LearnerError::Config { .. }
            | LearnerError::Data(_)
            | LearnerError::MemoryPlan(_)
            | LearnerError::Auth(_) => ExitClass::BadInput,
            LearnerError::Unavailable(_) => ExitClass::Retryable,
            LearnerError::Client(e) => client_class(e),
            LearnerError::Collective(e) => collective_class(e),
            LearnerError::Model(e) => model_class(e),
            _ => ExitClass::Fatal,
        };
    }
    if let Some(e) = link.downcast_ref::<ActorError>() {
        return match e {
            ActorError::Config(_) | ActorError::Url { .. } | ActorError::MemoryPlan(_) => {
                ExitClass::BadInput
            }
            ActorError::GaveUp { .. } => ExitClass::Retryable,
            ActorError::Rpc { code, .. } if retryable_code(*code) => ExitClass::Retryable,
            ActorError::Broadcast(e) => collective_class(e),
            ActorError::Model(e) => model_class(e),
            _ => ExitClass::Fatal,
        };
    }
    if let Some(e) = link.downcast_ref::<PrmError>() {
        return match e {
            PrmError::Input(_) => ExitClass::BadInput,
            PrmError::Unavailable(_) => ExitClass::Retryable,
            PrmError::Client(e) => client_class(e),
            PrmError::Model(e) => model_class(e),
            _ => ExitClass::Fatal,
        };
    }
    if let Some(e) = link.downcast_ref::<VerifierError>() {
        return match e {
            VerifierError::Config(_) | VerifierError::File(_) => ExitClass::BadInput,
            VerifierError::Unavailable(_) => ExitClass::Retryable,
            _ => ExitClass::Fatal,
        };
    }
    if let Some(e) = link.downcast_ref::<ClientError>() {
        return client_class(e);
    }
    if let Some(e) = link.downcast_ref::<CollectiveError>() {
        return collective_class(e);
    }
    if let Some(e) = link.downcast_ref::<ModelError>() {
        return model_class(e);
    }
    if link.downcast_ref::<AuthError>().is_some() {
        return ExitClass::BadInput;
    }
    if let Some(status) = link.downcast_ref::<tonic::Status>() {
        if retryable_code(status.code()) {
            return ExitClass::Retryable;
        }
    }
    if link.downcast_ref::<tonic::transport::Error>().is_some() {
        return ExitClass::Retryable;
    }
    if let Some(e) = link.downcast_ref::<std::io::Error>() {
        if retryable_io(e) {
            return ExitClass::Retryable;
        }
        // a file or directory the command was given that is not there
        if e.kind() == std::io::ErrorKind::NotFound {
            return ExitClass::BadInput;
        }
    }
    ExitClass::Fatal
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::time::Duration;

    fn class(error: impl Into<anyhow::Error>) -> i32 {
        classify(&error.into()).code()
    }

    #[test]
    fn each_class_has_its_documented_status() {
        // bad config, at any depth of context
        let config: anyhow::Result<()> = Err(LearnerError::Config {
            path: "run.toml".into(),
            message: "learner.steps: expected an integer".into(),
        }
        .into());
        assert_eq!(
            class(config.context("starting the learner").unwrap_err()),
            2
        );
        assert_eq!(class(ActorError::Config("max_prompts 0".into())), 2);
        assert_eq!(class(ModelError::NoCuda("cuda".into())), 2);
        assert_eq!(class(anyhow::Error::new(BadInput("--config".into()))), 2);
        let missing = LearnerError::Io {
            path: "run.toml".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        assert_eq!(class(missing), 2);
        assert_eq!(
            class(anyhow::Error::new(BadInput("x".into())).context("outer")),
            2
        );
        // a peer that is down
        let gave_up = ActorError::GaveUp {
            url: "http://learner:50051".into(),
            waited: Duration::from_secs(30),
        };
        assert_eq!(
            class(anyhow::Error::new(gave_up).context("actor failed")),
            75
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(class(refused), 75);
        let rpc = ClientError::Rpc {
            service: "Learner",
            rpc: "Status",
            code: tonic::Code::Unavailable,
            message: "connection refused".into(),
        };
        assert_eq!(class(LearnerError::Client(rpc)), 75);
        assert_eq!(class(PrmError::Unavailable("learner".into())), 75);
        // anything else
        let denied = ClientError::Rpc {
            service: "Learner",
            rpc: "Status",
            code: tonic::Code::PermissionDenied,
            message: "wrong token".into(),
        };
        assert_eq!(class(denied), 1);
        assert_eq!(class(anyhow::anyhow!("disk full")), 1);
        assert_eq!(
            class(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
            1
        );
    }

    #[test]
    fn a_child_process_keeps_its_class() {
        assert_eq!(class_of_status(2), ExitClass::BadInput);
        assert_eq!(class_of_status(75), ExitClass::Retryable);
        assert_eq!(class_of_status(1), ExitClass::Fatal);
        assert_eq!(class_of_status(70), ExitClass::Fatal);
        assert_eq!(class(anyhow::Error::new(Retryable("learner".into()))), 75);
    }

    #[test]
    fn a_retryable_cause_outranks_bad_input() {
        let down = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = anyhow::Error::new(down).context(BadInput("checking the config".into()));
        assert_eq!(classify(&error), ExitClass::Retryable);
    }
}
