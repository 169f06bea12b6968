//! The prime-rs wire protocol: `.proto` files of package `prime.v1` and the tonic/prost code
//! generated from them at build time (with a vendored `protoc`), plus what every server and
//! client of them shares: [`auth`] (token and TLS), [`client`] (channels, clients, deadlines),
//! [`transport`] (socket and HTTP/2 settings) and [`metrics`] (the Prometheus exporter and the
//! probes on the metrics port).

/// Generated types and services of package `prime.v1`.
pub mod v1 {
    tonic::include_proto!("prime.v1");
}

pub mod auth;
pub mod client;
pub mod metrics;
pub mod transport;
