//! The gRPC rendezvous of a communicator that needs an id from rank 0 (NCCL's unique id):
//! rank 0 serves [`Rendezvous`] with the id of the current epoch; the other ranks call
//! [`fetch_unique_id`] until it answers or the join deadline passes. A rank of another epoch
//! (left over from a group that restarted) or another world size is refused, so a restarted
//! group never mixes ids.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prime_proto::v1::rendezvous_client::RendezvousClient;
use prime_proto::v1::rendezvous_server::{Rendezvous, RendezvousServer};
use prime_proto::v1::{JoinReply, JoinRequest};
use tonic::{Request, Response, Status};

use crate::error::{CollectiveError, Result};

/// What rank 0 hands out.
#[derive(Debug, Clone)]
pub struct GroupId {
    /// The opaque communicator id.
    pub unique_id: Vec<u8>,
    /// The group generation it belongs to.
    pub epoch: u64,
    /// Ranks in the group.
    pub world_size: usize,
}

#[tonic::async_trait]
impl Rendezvous for GroupId {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let r = request.into_inner();
        if r.epoch != self.epoch {
            return Err(Status::failed_precondition(format!(
                "rank {} asks for epoch {}, the group is at epoch {}",
                r.rank, r.epoch, self.epoch
            )));
        }
        if r.world_size as usize != self.world_size {
            return Err(Status::invalid_argument(format!(
                "rank {} has world size {}, the group has {}",
                r.rank, r.world_size, self.world_size
            )));
        }
        if r.rank == 0 || r.rank as usize >= self.world_size {
            return Err(Status::invalid_argument(format!(
                "rank {} is not in 1..{}",
                r.rank, self.world_size
            )));
        }
        tracing::info!(rank = r.rank, epoch = r.epoch, "rank joined");
        Ok(Response::new(JoinReply {
            unique_id: self.unique_id.clone().into(),
            epoch: self.epoch,
        }))
    }
}

/// Rank 0's rendezvous server, stopped when dropped.
#[derive(Debug)]
pub struct RendezvousServerHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for RendezvousServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Serves `id` on `addr` (port 0 picks one) from a runtime of its own, so it can be called
/// from the compute thread. With a `token`, a rank must carry it like any RPC of the project.
pub fn serve(
    addr: SocketAddr,
    id: GroupId,
    token: Option<String>,
) -> Result<RendezvousServerHandle> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| CollectiveError::Join(format!("tokio runtime: {e}")))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| CollectiveError::Join(format!("rendezvous cannot listen on {addr}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CollectiveError::Join(e.to_string()))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        let incoming = prime_proto::transport::incoming(listener);
        let served = tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                RendezvousServer::new(id),
                prime_proto::auth::TokenCheck::new(token),
            ))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "rendezvous server failed");
        }
    });
    Ok(RendezvousServerHandle {
        addr,
        stop: Some(stop),
        runtime: Some(runtime),
    })
}

/// Asks rank 0 at `master` (`host:port`) for the id of `epoch`, retrying while it is not up
/// yet, until `timeout`. A refusal (wrong epoch, world size or token) fails at once.
pub fn fetch_unique_id(
    master: &str,
    rank: usize,
    world_size: usize,
    epoch: u64,
    timeout: Duration,
    token: Option<&str>,
) -> Result<Vec<u8>> {
    let bearer = prime_proto::auth::BearerToken::new(token)
        .map_err(|e| CollectiveError::Join(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CollectiveError::Join(format!("tokio runtime: {e}")))?;
    let deadline = Instant::now() + timeout;
    let url = format!("http://{master}");
    runtime.block_on(async {
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|e| CollectiveError::Join(format!("{url}: {e}")))?
                .connect_timeout(left)
                .timeout(left);
            match endpoint.connect().await {
                Ok(channel) => {
                    let mut client = RendezvousClient::with_interceptor(channel, bearer.clone());
                    let request = JoinRequest {
                        rank: rank as u32,
                        world_size: world_size as u32,
                        epoch,
                    };
                    match client.join(request).await {
                        Ok(reply) => return Ok(reply.into_inner().unique_id.to_vec()),
                        Err(status) if status.code() == tonic::Code::Unavailable => {
                            last = status.message().to_string();
                        }
                        Err(status) => {
                            return Err(CollectiveError::Join(format!(
                                "rank 0 refused rank {rank}: {}",
                                status.message()
                            )))
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(CollectiveError::Join(format!(
            "rank 0 at {master} did not hand out the group id within {timeout:?}: {last}"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_the_id_of_its_epoch_only() {
        let id = GroupId {
            unique_id: (0..128u8).collect(),
            epoch: 7,
            world_size: 3,
        };
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            id,
            Some("s3cret-s3cret-s3cret".into()),
        )
        .unwrap();
        let master = server.addr.to_string();
        let fetch = |rank, world, epoch, token| {
            fetch_unique_id(&master, rank, world, epoch, Duration::from_secs(10), token)
        };
        let got = fetch(2, 3, 7, Some("s3cret-s3cret-s3cret")).unwrap();
        assert_eq!(got, (0..128u8).collect::<Vec<_>>());
        let stale = fetch(1, 3, 6, Some("s3cret-s3cret-s3cret")).unwrap_err();
        assert!(stale.to_string().contains("epoch 6"), "{stale}");
        let wrong = fetch(1, 4, 7, Some("s3cret-s3cret-s3cret")).unwrap_err();
        assert!(wrong.to_string().contains("world size 4"), "{wrong}");
        for token in [None, Some("guess-guess-guess-guess")] {
            let start = Instant::now();
            let refused = fetch(1, 3, 7, token).unwrap_err();
            assert!(refused.to_string().contains("token"), "{refused}");
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "a refusal fails at once"
            );
        }
    }

    #[test]
    fn gives_up_at_the_join_deadline() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let start = Instant::now();
        let err = fetch_unique_id(
            &format!("127.0.0.1:{port}"),
            1,
            2,
            0,
            Duration::from_millis(500),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("did not hand out"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
