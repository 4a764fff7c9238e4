//! The TCP collective (`upcycle_parallel::tcp`) with its ranks as threads of this process
//! on loopback, meeting through the launcher's rendezvous store server
//! (`upcycle_launch::store_server`): every operation on 2, 3 and 4 ranks, a bit-identical
//! sum in rank order and large uneven all-to-alls, a silent rank named at its deadline, a
//! dead peer named at once, ranks out of step, a rank that never joins, a wrong token and
//! a stale attempt refused.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use upcycle_launch::store_server::StoreServer;
use upcycle_parallel::collective::{Collective, CollectiveError, ReduceOp};
use upcycle_parallel::store::{wire, Store};
use upcycle_parallel::tcp::TcpCollective;
use upcycle_parallel::testing::check_collectives;

fn store_server() -> (StoreServer, String) {
    let s = StoreServer::bind(
        "127.0.0.1:0",
        "test-token",
        Arc::new(|peer, why| eprintln!("store rejected {peer}: {why}")),
    )
    .unwrap();
    let addr = s.local_addr().to_string();
    (s, addr)
}

/// Runs `f(world)` on `size` ranks as threads of this process; returns their results.
fn ranks<R: Send>(size: usize, timeout: Duration, f: impl Fn(TcpCollective) -> R + Sync) -> Vec<R> {
    let (_server, addr) = store_server();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let (addr, f) = (addr.clone(), &f);
                s.spawn(move || {
                    let store = Store::connect(&addr, "test-token", Duration::from_secs(10))
                        .unwrap()
                        .scope("attempt-0/");
                    f(TcpCollective::new(&store, rank, size, timeout).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn every_operation_on_two_three_and_four_ranks() {
    for size in [2, 3, 4] {
        ranks(size, Duration::from_secs(30), |world| {
            check_collectives(&world, Device::Cpu)
        });
    }
}

#[test]
fn sums_are_bit_identical_on_every_rank_and_large_exchanges_do_not_deadlock() {
    // Values whose float sums depend on the order of addition.
    let data = |p: usize| {
        (Tensor::arange(1_000_003, (Kind::Float, Device::Cpu)) * (0.37 * (p + 1) as f64)).sin()
            * 1e3
    };
    let got = ranks(3, Duration::from_secs(60), |world| {
        let r = world.rank();
        let mut t = data(r);
        world.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        // Rank order: (x0 + x1) + x2 on every element.
        let want = (data(0) + data(1)) + data(2);
        assert!(t.equal(&want), "rank {r}: sum in rank order");
        // 8 MB to each peer at once, both directions, uneven with a zero.
        let counts: Vec<i64> = (0..3)
            .map(|p| if p == 2 { 0 } else { 2_000_000 + p })
            .collect();
        let total: i64 = counts.iter().sum();
        let send = Tensor::full([total], r as f64, (Kind::Float, Device::Cpu));
        assert!(total > 0);
        let recv = world.exchange_counts(&counts).unwrap();
        let out = world.all_to_all(&send, &counts, &recv).unwrap();
        assert_eq!(out.size()[0], recv.iter().sum::<i64>());
        Vec::<f32>::try_from(&t).unwrap()
    });
    assert!(got.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn a_silent_rank_is_named_when_the_deadline_passes() {
    let errors = ranks(3, Duration::from_millis(800), |world| {
        if world.rank() == 2 {
            // Never joins the all-reduce; stays alive past the others' deadline.
            std::thread::sleep(Duration::from_millis(2500));
            return None;
        }
        let t = Instant::now();
        let mut x = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let e = world.all_reduce(&mut x, ReduceOp::Sum).unwrap_err();
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(800) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        // The group is unusable afterwards, and says why.
        let again = world.barrier().unwrap_err().to_string();
        assert!(
            again.contains("unusable after an earlier failure"),
            "{again}"
        );
        Some(e)
    });
    for e in errors.into_iter().flatten() {
        let CollectiveError::Peers { op, peers, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!((*op, peers.as_slice()), ("all_reduce", &[2][..]), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("rank 2 delivered nothing within 0.8 s") && text.contains("group world"),
            "{text}"
        );
    }
}

#[test]
fn a_peer_that_is_gone_is_named_at_once_and_disagreements_are_reported() {
    let errors = ranks(2, Duration::from_secs(60), |world| {
        if world.rank() == 1 {
            drop(world); // as a process that died: its connections close
            return None;
        }
        let t = Instant::now();
        let e = world.all_gather(&Tensor::from_slice(&[1i64])).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        Some(e.to_string())
    });
    let e = errors[0].as_ref().unwrap();
    assert!(e.contains("rank 1 closed its connection"), "{e}");

    // Different collectives, and different shapes, are named with the peer.
    let errors = ranks(2, Duration::from_secs(60), |world| {
        let mut x = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let first = if world.rank() == 0 {
            world.all_reduce(&mut x, ReduceOp::Sum)
        } else {
            world.broadcast(&mut x, 0)
        };
        first.unwrap_err().to_string()
    });
    // The first to read the other's message names it (and breaks the group, which the
    // other then sees closed).
    assert!(
        errors.iter().any(|e| (e.contains("rank 1 is in broadcast")
            || e.contains("rank 0 is in all_reduce"))
            && e.contains("different collectives")),
        "{errors:?}"
    );
    let errors = ranks(2, Duration::from_secs(60), |world| {
        let n = 3 + world.rank() as i64;
        let mut x = Tensor::ones([n], (Kind::Float, Device::Cpu));
        world.broadcast(&mut x, 0).err().map(|e| e.to_string())
    });
    let e = errors[1].as_ref().unwrap();
    assert!(
        e.contains("rank 0 sent 12 bytes") && e.contains("disagree on shapes"),
        "{e}"
    );
}

#[test]
fn a_rank_that_never_joins_is_named_and_strangers_are_refused() {
    let (_server, addr) = store_server();
    let store = Store::connect(&addr, "test-token", Duration::from_secs(10))
        .unwrap()
        .scope("attempt-0/");
    // Rank 1 of 3 joins; 0 and 2 never come.
    let e = TcpCollective::new(&store, 1, 3, Duration::from_millis(500)).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("rank 0, rank 2 did not join within 0.5 s"),
        "{text}"
    );

    // A connection with a wrong token to a rank waiting for its peers is refused; the
    // real peer still joins.
    let store = Store::connect(&addr, "test-token", Duration::from_secs(10))
        .unwrap()
        .scope("attempt-1/");
    std::thread::scope(|s| {
        let st = store.clone();
        let zero = s.spawn(move || TcpCollective::new(&st, 0, 2, Duration::from_secs(20)));
        // Its own connection: clones of a Store share one, and a blocking get holds it.
        let other = Store::connect(&addr, "test-token", Duration::from_secs(10)).unwrap();
        let a = other
            .get("attempt-1/world/addr/0", Duration::from_secs(10))
            .unwrap();
        let a = String::from_utf8(a).unwrap();
        let mut raw = TcpStream::connect(&a).unwrap();
        let mut hello = wire::hello("wrong-token");
        hello.extend_from_slice(&[0; 8]);
        raw.write_all(&hello).unwrap();
        let answer = wire::read_hello_answer(&mut raw).unwrap_err();
        assert_eq!(answer.as_deref(), Some("wrong rendezvous token"));
        // A worker of another attempt (the token is right) is refused too.
        let mut raw = TcpStream::connect(&a).unwrap();
        let mut hello = wire::hello("test-token");
        let other = "attempt-0/world/";
        hello.extend_from_slice(&(other.len() as u32).to_le_bytes());
        hello.extend_from_slice(other.as_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        raw.write_all(&hello).unwrap();
        let answer = wire::read_hello_answer(&mut raw).unwrap_err().unwrap();
        assert!(answer.contains("another attempt or group"), "{answer}");
        let one = TcpCollective::new(&store, 1, 2, Duration::from_secs(20)).unwrap();
        let zero = zero.join().unwrap().unwrap();
        let mut x = Tensor::from_slice(&[one.rank() as i64 + 1]);
        let mut y = Tensor::from_slice(&[zero.rank() as i64 + 1]);
        std::thread::scope(|s| {
            s.spawn(|| one.all_reduce(&mut x, ReduceOp::Sum).unwrap());
            zero.all_reduce(&mut y, ReduceOp::Sum).unwrap();
        });
        assert_eq!((x.int64_value(&[0]), y.int64_value(&[0])), (3, 3));
    });
}
