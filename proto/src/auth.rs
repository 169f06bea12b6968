//! Who may talk to a prime-rs service: the shared token every RPC carries, TLS and mutual TLS
//! (rustls), and the rule that a server without a token only listens on loopback.
//!
//! Every server (learner, verifier, prm-server) takes a [`ServerAuth`]: [`ServerAuth::server`]
//! checks its address and builds the transport with TLS, [`ServerAuth::guard`] puts a service
//! behind the [`TokenCheck`]. Every client adds [`BearerToken`] and [`ClientTls::apply`]. The
//! token is compared in constant time.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

/// What went wrong setting up authentication or TLS.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS settings are incomplete or rejected by rustls.
    #[error("TLS: {0}")]
    Tls(String),
    /// The token cannot be sent as a gRPC header.
    #[error("the token has characters a gRPC header cannot carry (use printable ASCII)")]
    BadToken,
    /// A server would accept anyone who can reach a non-loopback address.
    #[error(
        "refusing to serve on {0} without a token: set PRIME_TOKEN (or --token), listen on \
         127.0.0.1, or pass --allow-no-token to let anyone who reaches the port in"
    )]
    OpenListener(SocketAddr),
    /// The token given is empty or blank, which counts as none, on a non-loopback address.
    #[error(
        "refusing to serve on {0}: the token (--token or PRIME_TOKEN) is empty, which counts \
         as no token; set one of at least {MIN_TOKEN_CHARS} characters, listen on 127.0.0.1, \
         or pass --allow-no-token to let anyone who reaches the port in"
    )]
    EmptyToken(SocketAddr),
    /// The token is too short to resist guessing.
    #[error(
        "the token (--token or PRIME_TOKEN) has {0} characters: use at least \
         {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 24`)"
    )]
    ShortToken(usize),
}

/// The fewest characters a shared token may have. The Helm chart draws 48.
pub const MIN_TOKEN_CHARS: usize = 16;

/// A token as given on the command line or in the environment, made usable. An empty or
/// blank token is no token, exactly like a missing one: `PRIME_TOKEN=` from an unset deploy
/// variable must neither open a non-loopback listener nor let clients in with an empty
/// token. A token shorter than [`MIN_TOKEN_CHARS`] is refused.
pub fn usable_token(token: Option<&str>) -> Result<Option<&str>, AuthError> {
    let Some(token) = token.filter(|t| !t.trim().is_empty()) else {
        return Ok(None);
    };
    let chars = token.chars().count();
    if chars < MIN_TOKEN_CHARS {
        return Err(AuthError::ShortToken(chars));
    }
    Ok(Some(token))
}

/// Checks `authorization: Bearer <token>` on every request when a token is configured, and
/// answers `UNAUTHENTICATED` otherwise.
#[derive(Clone)]
pub struct TokenCheck {
    expected: Option<Vec<u8>>,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("TokenCheck")
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

impl TokenCheck {
    /// A check for `token` (no check when `None`, or empty like `None`: see
    /// [`usable_token`]; [`ServerAuth::server`] refuses a short one before any check runs).
    pub fn new(token: Option<String>) -> Self {
        Self {
            expected: token
                .filter(|t| !t.trim().is_empty())
                .map(|t| format!("Bearer {t}").into_bytes()),
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Constant time, so the answer's timing says nothing about how much of a guess was
        // right (lengths differ only when the guess is wrong anyway).
        if bool::from(presented.ct_eq(expected)) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("missing or wrong token"))
        }
    }
}

/// Adds `authorization: Bearer TOKEN` to every request when a token is set.
#[derive(Clone)]
pub struct BearerToken {
    value: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerToken")
            .field("enabled", &self.value.is_some())
            .finish()
    }
}

impl BearerToken {
    /// An interceptor for `token` (sending nothing when `None` or empty; a short token is an
    /// error, see [`usable_token`]).
    pub fn new(token: Option<&str>) -> Result<Self, AuthError> {
        let value = usable_token(token)?
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| AuthError::BadToken)
            })
            .transpose()?;
        Ok(Self { value })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A server's TLS material: its certificate chain and key, and for mutual TLS the CA that
/// client certificates must chain to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain of the server.
    pub cert: Option<PathBuf>,
    /// PEM private key of the server.
    pub key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Whether TLS is configured at all.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.client_ca.is_some()
    }

    /// The rustls configuration, or `None` for plain HTTP/2.
    pub fn config(&self) -> Result<Option<ServerTlsConfig>, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(AuthError::Tls(
                "a TLS server needs both a certificate (--tls-cert) and a key (--tls-key)".into(),
            ));
        };
        let identity = Identity::from_pem(read_pem("certificate", cert)?, read_pem("key", key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem("client CA", ca)?));
        }
        Ok(Some(config))
    }

    /// `builder` with TLS applied when configured.
    pub fn apply(&self, builder: Server) -> Result<Server, AuthError> {
        match self.config()? {
            Some(config) => builder
                .tls_config(config)
                .map_err(|e| AuthError::Tls(e.to_string())),
            None => Ok(builder),
        }
    }
}

/// A client's TLS material: the CA that signs the servers' certificates, and for mutual TLS
/// the client's own certificate and key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA bundle that server certificates must chain to. Required for `https://` URLs.
    pub ca: Option<PathBuf>,
    /// PEM certificate of this client (mutual TLS).
    pub cert: Option<PathBuf>,
    /// PEM private key of this client (mutual TLS).
    pub key: Option<PathBuf>,
    /// Name to check the server's certificate against, when it differs from the URL's host.
    pub domain: Option<String>,
}

impl ClientTls {
    /// `endpoint` with TLS applied when its URL is `https://`. An `http://` URL with TLS
    /// material, or an `https://` one without a CA, is an error rather than a silent
    /// downgrade.
    pub fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, AuthError> {
        let https = endpoint.uri().scheme_str() == Some("https");
        let configured = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        if !https {
            if configured {
                return Err(AuthError::Tls(format!(
                    "TLS files are set but the URL {} is plain http://: use https://",
                    endpoint.uri()
                )));
            }
            return Ok(endpoint);
        }
        let Some(ca) = &self.ca else {
            return Err(AuthError::Tls(format!(
                "{} is https:// but no CA is set (--tls-ca)",
                endpoint.uri()
            )));
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("CA", ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read_pem("certificate", cert)?,
                    read_pem("key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(AuthError::Tls(
                    "a client certificate needs its key and the other way round".into(),
                ))
            }
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        endpoint
            .tls_config(config)
            .map_err(|e| AuthError::Tls(e.to_string()))
    }
}

/// Who a server lets in: the shared token every RPC must carry, whether a non-loopback address
/// may go without one, and the TLS material.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ServerAuth {
    /// Shared token every RPC must carry (`authorization: Bearer TOKEN`), if any.
    pub token: Option<String>,
    /// Listen on a non-loopback address without a token (refused otherwise).
    pub allow_no_token: bool,
    /// TLS material; plain HTTP/2 when empty.
    pub tls: ServerTls,
}

impl std::fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("ServerAuth")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("allow_no_token", &self.allow_no_token)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ServerAuth {
    /// Refuses to listen on a non-loopback `addr` without a token, unless the operator said so
    /// explicitly (`allow_no_token`).
    /// An empty token counts as none and a short one is refused (see [`usable_token`]).
    pub fn check(&self, addr: SocketAddr) -> Result<(), AuthError> {
        let token = usable_token(self.token.as_deref())?;
        if token.is_some() || self.allow_no_token || addr.ip().is_loopback() {
            return Ok(());
        }
        Err(match self.token {
            Some(_) => AuthError::EmptyToken(addr),
            None => AuthError::OpenListener(addr),
        })
    }

    /// The transport of a server on `addr`, with TLS when configured, after [`Self::check`].
    pub fn server(&self, addr: SocketAddr) -> Result<Server, AuthError> {
        self.check(addr)?;
        self.tls.apply(Server::builder())
    }

    /// `service` behind the token check.
    pub fn guard<S>(&self, service: S) -> InterceptedService<S, TokenCheck> {
        InterceptedService::new(service, TokenCheck::new(self.token.clone()))
    }
}

/// Where a server listens and who it lets in.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// gRPC address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Prometheus address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Token and TLS.
    pub auth: ServerAuth,
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_header(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(v) = value {
            request
                .metadata_mut()
                .insert("authorization", v.parse().unwrap());
        }
        request
    }

    #[test]
    fn the_token_check_lets_only_the_exact_token_in() {
        let mut check = TokenCheck::new(Some("s3cret".into()));
        assert!(check.call(with_header(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret "),
            Some("s3cret"),
            Some("Bearer S3CRET"),
        ] {
            let status = check.call(with_header(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        let mut open = TokenCheck::new(None);
        assert!(open.call(with_header(None)).is_ok());
        assert!(!format!("{check:?}").contains("s3cret"));
    }

    #[test]
    fn the_bearer_token_is_what_the_check_expects() {
        let token = "s3cret-s3cret-s3cret";
        let mut send = BearerToken::new(Some(token)).unwrap();
        let mut check = TokenCheck::new(Some(token.into()));
        assert!(check.call(send.call(Request::new(())).unwrap()).is_ok());
        assert!(matches!(
            BearerToken::new(Some("bad\ntoken-bad-token")),
            Err(AuthError::BadToken)
        ));
    }

    #[test]
    fn an_open_listener_needs_a_token_or_consent() {
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let loopback6: SocketAddr = "[::1]:50051".parse().unwrap();
        let open = ServerAuth::default();
        let with_token = ServerAuth {
            token: Some("t".repeat(MIN_TOKEN_CHARS)),
            ..ServerAuth::default()
        };
        let consenting = ServerAuth {
            allow_no_token: true,
            ..ServerAuth::default()
        };
        assert!(matches!(
            open.check(public),
            Err(AuthError::OpenListener(_))
        ));
        assert!(matches!(
            open.server(public),
            Err(AuthError::OpenListener(_))
        ));
        assert!(with_token.check(public).is_ok());
        assert!(consenting.check(public).is_ok());
        assert!(open.check(loopback).is_ok());
        assert!(open.check(loopback6).is_ok());
        assert!(open.server(loopback).is_ok());
    }

    #[test]
    fn an_empty_token_is_no_token_and_a_short_one_is_refused() {
        for empty in [None, Some(""), Some("   "), Some("\t\n")] {
            assert_eq!(usable_token(empty).unwrap(), None, "{empty:?}");
        }
        let short = "x".repeat(MIN_TOKEN_CHARS - 1);
        assert!(matches!(
            usable_token(Some(&short)),
            Err(AuthError::ShortToken(n)) if n == MIN_TOKEN_CHARS - 1
        ));
        let long = "x".repeat(MIN_TOKEN_CHARS);
        assert_eq!(usable_token(Some(&long)).unwrap(), Some(long.as_str()));

        // The listener rule: an empty token opens nothing beyond loopback.
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        for empty in ["", "  "] {
            let auth = ServerAuth {
                token: Some(empty.into()),
                ..ServerAuth::default()
            };
            let refused = auth.check(public).unwrap_err();
            assert!(matches!(refused, AuthError::EmptyToken(_)));
            assert!(refused.to_string().contains("empty"), "{refused}");
            assert!(auth.check("127.0.0.1:1".parse().unwrap()).is_ok());
        }
        let short_auth = ServerAuth {
            token: Some(short.clone()),
            ..ServerAuth::default()
        };
        assert!(matches!(
            short_auth.check("127.0.0.1:1".parse().unwrap()),
            Err(AuthError::ShortToken(_))
        ));

        // A server without a usable token checks nothing; one with a token refuses a client
        // whose token is empty (it sends none).
        let mut check = TokenCheck::new(Some(long.clone()));
        let mut empty_client = BearerToken::new(Some("")).unwrap();
        let request = empty_client.call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
        assert_eq!(
            check.call(request).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            check.call(with_header(Some("Bearer "))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(format!("{:?}", TokenCheck::new(Some(" ".into()))).contains("false"));
        assert!(matches!(
            BearerToken::new(Some(&short)),
            Err(AuthError::ShortToken(_))
        ));
    }

    #[test]
    fn server_auth_never_prints_its_token() {
        let auth = ServerAuth {
            token: Some("s3cret".into()),
            ..ServerAuth::default()
        };
        let printed = format!("{auth:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("<set>"), "{printed}");
        let listen = ListenOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            auth,
        };
        assert!(!format!("{listen:?}").contains("s3cret"));
    }

    #[test]
    fn tls_settings_must_be_complete_and_match_the_url() {
        let half = ServerTls {
            cert: Some("cert.pem".into()),
            ..ServerTls::default()
        };
        assert!(matches!(half.config(), Err(AuthError::Tls(_))));
        let half_auth = ServerAuth {
            tls: half,
            ..ServerAuth::default()
        };
        assert!(matches!(
            half_auth.server("127.0.0.1:0".parse().unwrap()),
            Err(AuthError::Tls(_))
        ));
        let missing = ServerTls {
            cert: Some("/nonexistent/cert.pem".into()),
            key: Some("/nonexistent/key.pem".into()),
            client_ca: None,
        };
        assert!(matches!(missing.config(), Err(AuthError::Read { .. })));
        assert!(ServerTls::default().config().unwrap().is_none());

        let plain = Endpoint::from_static("http://127.0.0.1:1");
        let secure = Endpoint::from_static("https://127.0.0.1:1");
        assert!(ClientTls::default().apply(plain.clone()).is_ok());
        let with_ca = ClientTls {
            ca: Some("ca.pem".into()),
            ..ClientTls::default()
        };
        assert!(matches!(with_ca.apply(plain), Err(AuthError::Tls(_))));
        assert!(matches!(
            ClientTls::default().apply(secure),
            Err(AuthError::Tls(_))
        ));
    }
}
