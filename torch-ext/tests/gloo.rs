//! c10d's Gloo process group across real processes on loopback: this test binary hosts a
//! TCPStore on a port the OS picks and starts itself W times as ranks (the `rank` test, which
//! runs only when asked for by name), each checking every collective against what it can
//! compute alone.
use selfplay_torch_ext::dist::{ProcessGroup, ReduceOp, Store};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(60);

fn ranks(world: usize) {
    let store = Store::serve("127.0.0.1", 0, TIMEOUT).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..world)
        .map(|r| {
            Command::new(&exe)
                .args(["--ignored", "--exact", "rank", "--nocapture", "--test-threads=1"])
                .env("SP_GLOO_PORT", store.port().to_string())
                .env("SP_GLOO_RANK", r.to_string())
                .env("SP_GLOO_WORLD", world.to_string())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    // Wait for every rank to exit: each bounds its own collectives by TIMEOUT, and a rank
    // that is still alive well after that is killed and fails the test.
    let deadline = Instant::now() + TIMEOUT * 3;
    let mut codes = vec![None; world];
    while codes.iter().any(Option::is_none) {
        for (r, c) in children.iter_mut().enumerate() {
            if codes[r].is_none() {
                codes[r] = c.try_wait().unwrap().map(|s| s.code());
            }
        }
        if Instant::now() > deadline {
            children.iter_mut().for_each(|c| drop(c.kill()));
            panic!("ranks still running after {:?}: {codes:?}", TIMEOUT * 3);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(codes.iter().all(|c| *c == Some(Some(0))), "rank exit codes: {codes:?}");
}

#[test]
fn two_ranks_agree_on_every_collective() {
    ranks(2);
}

#[test]
fn three_ranks_agree_on_every_collective() {
    ranks(3);
}

fn floats(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// One rank (started by `ranks`).
#[test]
#[ignore = "a rank of the multi-process tests; they start it"]
fn rank() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent test"));
    let port: u16 = var("SP_GLOO_PORT").parse().unwrap();
    let rank: usize = var("SP_GLOO_RANK").parse().unwrap();
    let world: usize = var("SP_GLOO_WORLD").parse().unwrap();
    let store = Store::connect("127.0.0.1", port, TIMEOUT).unwrap();
    let pg = ProcessGroup::gloo(&store, rank, world, "127.0.0.1", TIMEOUT).unwrap();
    assert_eq!((pg.rank(), pg.size()), (rank, world));
    let opts = (Kind::Float, Device::Cpu);
    // Rank r's data: r + i for element i (6 elements per rank, divisible by 2 and 3).
    let mine = |r: usize| Tensor::arange(6, opts) + r as f64;

    let t = mine(rank);
    pg.all_reduce(&t, ReduceOp::Sum).unwrap();
    let want = (0..world).map(mine).fold(Tensor::zeros([6], opts), |a, b| a + b);
    assert!(t.equal(&want), "all-reduce sum {:?} vs {:?}", floats(&t), floats(&want));

    let t = mine(rank);
    pg.all_reduce(&t, ReduceOp::Max).unwrap();
    assert!(t.equal(&mine(world - 1)));

    let t = mine(rank);
    pg.broadcast(&t, world - 1).unwrap();
    assert!(t.equal(&mine(world - 1)), "broadcast from the last rank");

    let out = Tensor::zeros([6 * world as i64], opts);
    pg.all_gather(&out, &mine(rank)).unwrap();
    let want = Tensor::cat(&(0..world).map(mine).collect::<Vec<_>>(), 0);
    assert!(out.equal(&want), "all-gather in rank order");

    // Reduce-scatter: each rank receives its 1/W share of the sum.
    let n = 6 / world as i64;
    let input = Tensor::cat(&(0..world).map(|_| mine(rank)).collect::<Vec<_>>(), 0).narrow(0, 0, 6).contiguous();
    let share = Tensor::zeros([n], opts);
    pg.reduce_scatter(&share, &input, ReduceOp::Sum).unwrap();
    let sum = (0..world).map(mine).fold(Tensor::zeros([6], opts), |a, b| a + b);
    assert!(share.equal(&sum.narrow(0, rank as i64 * n, n)), "reduce-scatter share");

    // The sharded-optimizer round trip: reduce-scatter gradients, update the own shard,
    // all-gather the weights; every rank ends with the update a single process would make.
    let w0 = Tensor::arange(6, opts) * 0.5;
    let grad = mine(rank) * 0.1;
    let g_share = Tensor::zeros([n], opts);
    pg.reduce_scatter(&g_share, &grad, ReduceOp::Sum).unwrap();
    let w_share = w0.narrow(0, rank as i64 * n, n) - g_share * 0.01;
    let w = Tensor::zeros([6], opts);
    pg.all_gather(&w, &w_share.contiguous()).unwrap();
    let total = (0..world).map(|r| mine(r) * 0.1).fold(Tensor::zeros([6], opts), |a, b| a + b);
    let want = &w0 - total * 0.01;
    assert!(w.allclose(&want, 0.0, 1e-6, false), "{:?} vs {:?}", floats(&w), floats(&want));

    // Shapes that disagree with the group are refused before any rank blocks.
    assert!(pg.reduce_scatter(&Tensor::zeros([n + 1], opts), &input, ReduceOp::Sum).is_err());
    pg.barrier().unwrap();
}
