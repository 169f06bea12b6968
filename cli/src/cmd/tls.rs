//! Token, TLS and token-policy flags shared by every server and client subcommand (the logic
//! lives in `prime_proto::auth`).
use std::path::PathBuf;

use prime_proto::auth::{ClientTls, ServerAuth, ServerTls};

/// Who a server lets in: the shared token, TLS (`--tls-cert` and `--tls-key` turn it on,
/// `--tls-client-ca` makes it mutual), and the one way to serve a non-loopback address without
/// a token.
#[derive(clap::Args, Clone, Default)]
pub struct ServerSecurityArgs {
    /// Shared token every RPC must carry (`authorization: Bearer TOKEN`).
    #[arg(long, env = "PRIME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM certificate chain this server presents (TLS on when set, with --tls-key).
    #[arg(long, env = "PRIME_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PRIME_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients must present a certificate it signed (mutual TLS).
    #[arg(long, env = "PRIME_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve a non-loopback address without a token (refused otherwise): anyone who can
    /// reach the port gets in.
    #[arg(long)]
    pub allow_no_token: bool,
}

impl std::fmt::Debug for ServerSecurityArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // ServerAuth's Debug never prints the token.
        std::fmt::Debug::fmt(&self.settings(), f)
    }
}

/// A `--token`/`PRIME_TOKEN` as every command takes it (`prime_proto::auth::usable_token`):
/// empty or blank is no token, like a missing one; shorter than the minimum is an error.
pub fn token(token: &Option<String>) -> anyhow::Result<Option<String>> {
    if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        tracing::warn!("the token (--token or PRIME_TOKEN) is empty: running without one");
    }
    Ok(prime_proto::auth::usable_token(token.as_deref())?.map(str::to_string))
}

impl ServerSecurityArgs {
    /// The settings as the servers take them; the listener rule is applied by the server
    /// itself (`ServerAuth::check`), which words an empty token apart from a missing one.
    pub fn auth(&self) -> anyhow::Result<ServerAuth> {
        token(&self.token)?;
        Ok(self.settings())
    }

    fn settings(&self) -> ServerAuth {
        ServerAuth {
            token: self.token.clone(),
            allow_no_token: self.allow_no_token,
            tls: ServerTls {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                client_ca: self.tls_client_ca.clone(),
            },
        }
    }
}

/// TLS for a client: an `https://` URL needs `--tls-ca`; `--tls-client-cert` and
/// `--tls-client-key` answer a server that asks for mutual TLS.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientSecurityArgs {
    /// PEM CA bundle that the servers' certificates chain to (needed for https:// URLs).
    #[arg(long, env = "PRIME_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate this client presents to servers that require mutual TLS.
    #[arg(long, env = "PRIME_TLS_CLIENT_CERT")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "PRIME_TLS_CLIENT_KEY")]
    pub tls_client_key: Option<PathBuf>,
    /// Name the servers' certificates must carry, when it is not the URL's host.
    #[arg(long, env = "PRIME_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl ClientSecurityArgs {
    /// The TLS material as the clients take it.
    pub fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_client_cert.clone(),
            key: self.tls_client_key.clone(),
            domain: self.tls_domain.clone(),
        }
    }
}
