//! The TCP backend across threads on loopback: every operation against sums and copies
//! computed by hand from the inputs each rank was given.
use std::time::Duration;

use prime_collective::tcp::TcpOptions;
use prime_collective::{Collective, HostBuffer, RankInfo, ReduceOp, TcpGroup};
use tch::{Kind, Tensor};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `body(group)` on `world` ranks, one thread each, and returns their results in rank
/// order.
fn on_ranks<T: Send>(world: usize, body: impl Fn(&mut TcpGroup) -> T + Sync) -> Vec<T> {
    let port = free_port();
    let options = TcpOptions {
        join_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(20),
        epoch: 1,
        token: None,
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let body = &body;
                let options = options.clone();
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    let info = RankInfo {
                        rank,
                        world_size: world,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let mut group = TcpGroup::join(&info, options).unwrap();
                    body(&mut group)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Integer-valued inputs so every sum is exact in f32 and bf16, whatever the order.
fn input(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((rank * 7 + i * 3) % 11) as f32 - 5.0)
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).reshape(-1)).unwrap()
}

#[test]
fn all_reduce_sums_and_means_every_size() {
    for world in [2, 3, 4] {
        for n in [1, 7, 1000, 300_001] {
            let got = on_ranks(world, |g| {
                let mut t = Tensor::from_slice(&input(g.rank(), n));
                g.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                let mut m = Tensor::from_slice(&input(g.rank(), n)).view([-1, 1]);
                g.all_reduce(&mut m, ReduceOp::Mean).unwrap();
                (values(&t), values(&m))
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, n)).collect();
            let expected: Vec<f32> = (0..n).map(|i| inputs.iter().map(|x| x[i]).sum()).collect();
            for (sum, mean) in got {
                assert_eq!(sum, expected, "world {world}, n {n}");
                for (m, e) in mean.iter().zip(&expected) {
                    assert!((m - e / world as f32).abs() < 1e-6);
                }
            }
        }
    }
}

#[test]
fn bf16_and_f64_reduce_too() {
    let got = on_ranks(3, |g| {
        let mut b = Tensor::from_slice(&input(g.rank(), 33)).to_kind(Kind::BFloat16);
        g.all_reduce(&mut b, ReduceOp::Sum).unwrap();
        let mut d = Tensor::from_slice(&[0.1f64 * (g.rank() + 1) as f64]);
        g.all_reduce(&mut d, ReduceOp::Sum).unwrap();
        (b.kind(), values(&b), d.double_value(&[0]))
    });
    let inputs: Vec<Vec<f32>> = (0..3).map(|r| input(r, 33)).collect();
    let expected: Vec<f32> = (0..33).map(|i| inputs.iter().map(|x| x[i]).sum()).collect();
    for (kind, b, d) in got {
        assert_eq!(kind, Kind::BFloat16);
        assert_eq!(b, expected);
        assert!((d - 0.6).abs() < 1e-15);
    }
}

#[test]
fn reduce_scatter_all_gather_broadcast_barrier() {
    let world = 3;
    let n = 5;
    let got = on_ranks(world, |g| {
        let rank = g.rank();
        let input_t = Tensor::from_slice(&input(rank, n * world));
        let mut shard = Tensor::zeros([n as i64], (Kind::Float, tch::Device::Cpu));
        g.reduce_scatter(&input_t, &mut shard, ReduceOp::Sum)
            .unwrap();
        let mut gathered = Tensor::zeros([(n * world) as i64], (Kind::Float, tch::Device::Cpu));
        let mine = Tensor::from_slice(&[rank as f32 * 10.0; 5]);
        g.all_gather(&mine, &mut gathered).unwrap();
        let mut ids = Tensor::from_slice(&[rank as i64 + 100, 7]);
        g.broadcast(&mut ids, 1).unwrap();
        g.barrier().unwrap();
        (
            values(&shard),
            values(&gathered),
            Vec::<i64>::try_from(&ids).unwrap(),
        )
    });
    for (rank, (shard, gathered, ids)) in got.into_iter().enumerate() {
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, n * world)).collect();
        let expected: Vec<f32> = (rank * n..(rank + 1) * n)
            .map(|i| inputs.iter().map(|x| x[i]).sum())
            .collect();
        assert_eq!(shard, expected);
        let all: Vec<f32> = (0..world).flat_map(|r| [r as f32 * 10.0; 5]).collect();
        assert_eq!(gathered, all);
        assert_eq!(ids, vec![101, 7]);
    }
}

#[test]
fn large_broadcast_and_bytes() {
    let got = on_ranks(4, |g| {
        let n = 3_000_000i64; // several broadcast pieces
        let mut t = if g.rank() == 2 {
            Tensor::arange(n, (Kind::Float, tch::Device::Cpu))
        } else {
            Tensor::zeros([n], (Kind::Float, tch::Device::Cpu))
        };
        g.broadcast(&mut t, 2).unwrap();
        let text = if g.rank() == 0 {
            b"the batch".to_vec()
        } else {
            Vec::new()
        };
        let bytes = prime_collective::broadcast_bytes(g, text, 0, tch::Device::Cpu).unwrap();
        (t.sum(Kind::Double).double_value(&[]), bytes)
    });
    let n = 3_000_000f64;
    for (sum, bytes) in got {
        assert_eq!(sum, n * (n - 1.0) / 2.0);
        assert_eq!(bytes, b"the batch");
    }
}

#[test]
fn mismatched_collectives_fail_instead_of_hanging() {
    let got = on_ranks(2, |g| {
        let mut t = Tensor::from_slice(&[1f32, 2.0, 3.0][..g.rank() + 2]);
        g.all_reduce(&mut t, ReduceOp::Sum)
            .map_err(|e| e.to_string())
    });
    for r in got {
        let e = r.unwrap_err();
        assert!(
            e.contains("different collectives") || e.contains("closed"),
            "{e}"
        );
    }
}

#[test]
fn a_missing_rank_fails_the_join_at_its_deadline() {
    let info = RankInfo {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    let options = TcpOptions {
        join_timeout: Duration::from_millis(300),
        ..TcpOptions::default()
    };
    let start = std::time::Instant::now();
    let err = TcpGroup::join(&info, options).unwrap_err().to_string();
    assert!(err.contains("1 more rank(s) to join"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn another_epoch_is_turned_away() {
    let port = free_port();
    let info = |rank| RankInfo {
        rank,
        world_size: 2,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let options = |epoch| TcpOptions {
        join_timeout: Duration::from_secs(3),
        op_timeout: Duration::from_secs(3),
        epoch,
        token: None,
    };
    std::thread::scope(|scope| {
        let master = scope.spawn(|| TcpGroup::join(&info(0), options(5)).map(|_| ()));
        let stale = TcpGroup::join(&info(1), options(4))
            .unwrap_err()
            .to_string();
        assert!(
            stale.contains("epoch 4, the group is at epoch 5"),
            "{stale}"
        );
        let current = TcpGroup::join(&info(1), options(5));
        assert!(current.is_ok());
        master.join().unwrap().unwrap();
    });
}

#[test]
fn a_rank_without_the_runs_token_is_turned_away() {
    let port = free_port();
    let info = |rank| RankInfo {
        rank,
        world_size: 2,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let options = |token: Option<&str>| TcpOptions {
        join_timeout: Duration::from_secs(3),
        op_timeout: Duration::from_secs(3),
        epoch: 2,
        token: token.map(String::from),
    };
    std::thread::scope(|scope| {
        let master = scope.spawn(|| {
            let mut group = TcpGroup::join(&info(0), options(Some("s3cret")))?;
            let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
            group.all_reduce(&mut t, ReduceOp::Sum)?;
            Ok::<_, prime_collective::CollectiveError>(Vec::<f32>::try_from(&t).unwrap())
        });
        for wrong in [None, Some("guess")] {
            let refused = TcpGroup::join(&info(1), options(wrong))
                .unwrap_err()
                .to_string();
            assert!(refused.contains("wrong token"), "{refused}");
        }
        let mut group = TcpGroup::join(&info(1), options(Some("s3cret"))).unwrap();
        let mut t = Tensor::from_slice(&[10.0f32, 20.0]);
        group.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [11.0, 22.0]);
        assert_eq!(master.join().unwrap().unwrap(), [11.0, 22.0]);
    });
}

/// Host-memory broadcasts (the learner's weight broadcast): 9 MiB plus a few bytes from root
/// 0, so the 4 MiB pieces end mid-way, reach every rank of 4 bit-identical, whether received
/// into one buffer or piece by piece (rank 2, which passes them on to rank 3); rank 0 joins on a
/// listener bound beforehand on a system-picked port; a rank that takes the wrong role fails
/// at once, before anything is sent.
#[test]
fn host_broadcasts_from_a_listener_bound_beforehand() {
    let world = 4;
    let len = (9 << 20) + 13;
    let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = std::sync::Mutex::new(Some(listener));
    let options = TcpOptions {
        join_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(20),
        epoch: 3,
        token: Some("s3cret".into()),
    };
    let received: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (payload, options, listener) = (&payload, options.clone(), &listener);
                scope.spawn(move || {
                    let info = RankInfo {
                        rank,
                        world_size: world,
                        local_rank: 0,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let mut group = if rank == 0 {
                        let bound = listener.lock().unwrap().take().unwrap();
                        TcpGroup::join_listening(&info, options, bound).unwrap()
                    } else {
                        TcpGroup::join(&info, options).unwrap()
                    };
                    let mut mine = vec![0u8; len];
                    if rank == 0 {
                        // Sending is refused from a receiving role and the other way round.
                        let wrong = group.broadcast_host(HostBuffer::Receive(&mut mine), 0);
                        assert!(wrong.unwrap_err().to_string().contains("receives"));
                        group.broadcast_host(HostBuffer::Send(payload), 0).unwrap();
                        return payload.clone();
                    }
                    let wrong = group.broadcast_host(HostBuffer::Send(payload), 0);
                    assert!(wrong.unwrap_err().to_string().contains("sends"));
                    if rank != 2 {
                        group
                            .broadcast_host(HostBuffer::Receive(&mut mine), 0)
                            .unwrap();
                        return mine;
                    }
                    // Rank 2 takes the bytes piece by piece (and still passes them on).
                    let mut pieces: Vec<Vec<u8>> = Vec::new();
                    let mut sink = |piece: Vec<u8>| pieces.push(piece);
                    let buffer = HostBuffer::Pieces {
                        len,
                        sink: &mut sink,
                    };
                    group.broadcast_host(buffer, 0).unwrap();
                    let sizes: Vec<usize> = pieces.iter().map(Vec::len).collect();
                    assert_eq!(sizes, vec![4 << 20, 4 << 20, (1 << 20) + 13]);
                    pieces.concat()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, bytes) in received.iter().enumerate() {
        assert!(bytes == &payload, "rank {rank} received other bytes");
    }
    // Only rank 0 listens for the join.
    let info = RankInfo {
        rank: 1,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
    };
    let bound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = TcpGroup::join_listening(&info, TcpOptions::default(), bound).unwrap_err();
    assert!(err.to_string().contains("only rank 0"), "{err}");
}
