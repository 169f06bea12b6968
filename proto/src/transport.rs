//! Connection settings: [`incoming`] for every server's accepted sockets, and HTTP/2 settings
//! for the clients that receive bulk streams (policy and PRM weights).
//!
//! Data from a server to a client is paced by the client's HTTP/2 settings: its flow-control
//! windows bound how much the server may send before the client acknowledges, and its
//! `SETTINGS_MAX_FRAME_SIZE` bounds each DATA frame. hyper's client defaults (2 MiB stream
//! window, 5 MiB connection window, 16 KiB frames) cut a 4 MiB weight chunk into 256 frames and
//! stall the sender on window updates twice per chunk. The settings below let a few whole
//! chunks be in flight in large frames. Servers keep their defaults: what they receive
//! (rollouts, grading requests) is small, and a large receive window on a server would let
//! every connected client make it buffer that much.
use tonic::transport::server::TcpIncoming;
use tonic::transport::Endpoint;

/// The connections `listener` accepts, for `serve_with_incoming*`, with `TCP_NODELAY` set.
/// tonic sets it only on listeners it binds itself; without it a small reply (a long poll's
/// answer, a status) that follows another write waits for the peer's delayed ACK, about
/// 40 ms on Linux.
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Per-stream receive window of a bulk client: four default weight chunks in flight.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;

/// Receive window of the whole connection: two such streams.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Largest DATA frame the client accepts (HTTP/2 allows up to 2^24 - 1 bytes).
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// `endpoint` with the bulk-receive settings above.
pub fn bulk_client(endpoint: Endpoint) -> Endpoint {
    endpoint
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
}

#[cfg(test)]
mod tests {
    use tonic::codegen::tokio_stream::StreamExt;

    /// The accepted socket carries TCP_NODELAY, which a plain listener's does not.
    #[test]
    fn accepted_connections_have_nodelay() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let accept_one = |wrap: bool| async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let client = tokio::net::TcpStream::connect(addr).await.unwrap();
                let accepted = if wrap {
                    super::incoming(listener).next().await.unwrap().unwrap()
                } else {
                    listener.accept().await.unwrap().0
                };
                drop(client);
                accepted.nodelay().unwrap()
            };
            assert!(accept_one(true).await);
            assert!(!accept_one(false).await, "the system default has Nagle on");
        });
    }
}
