//! The prime-rs wire protocol: `.proto` files of package `prime.v1` and the tonic/prost code
//! generated from them at build time (with a vendored `protoc`).

/// Generated types and services of package `prime.v1`.
pub mod v1 {
    tonic::include_proto!("prime.v1");
}

pub mod auth;
pub mod transport;
