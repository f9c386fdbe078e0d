//! The replication pipeline benchmark: three in-process nodes, real redb files with durable
//! group commits, the in-process transport, a trivial state machine. Reports tasks/s, latency
//! percentiles and process CPU per task at several submitter counts.
//!
//! `cargo run --release -p lockstep --bin pipeline-bench -- [--secs 5] [--payload 32]
//!  [--submitters 1,64,256] [--dir /tmp/x] [--workers 2]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use lockstep::raft::local::LocalNetwork;
use lockstep::raft::{Node, NodeId, RaftConfig, Role};
use lockstep::state_machine::{Entry, StateMachine};
use lockstep::storage::LogStore;

/// Counts entries and payload bytes; the output is the running count.
#[derive(Default)]
struct Counter {
    entries: u64,
    bytes: u64,
}

impl StateMachine for Counter {
    type Output = u64;
    fn apply(&mut self, batch: Vec<Entry>) -> Vec<u64> {
        batch
            .iter()
            .map(|e| {
                self.entries += 1;
                self.bytes += e.payload.len() as u64;
                self.entries
            })
            .collect()
    }
}

const USAGE: &str = "usage: pipeline-bench [--secs 5] [--payload 32] [--submitters 1,64,256] \
                     [--dir DIR] [--workers 2]";

struct Args {
    secs: u64,
    payload: usize,
    submitters: Vec<usize>,
    dir: Option<std::path::PathBuf>,
    workers: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        secs: 5,
        payload: 32,
        submitters: vec![1, 64, 256],
        dir: None,
        workers: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--secs" => a.secs = val()?.parse()?,
            "--payload" => a.payload = val()?.parse()?,
            "--submitters" => {
                a.submitters = val()?
                    .split(',')
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?;
            }
            "--dir" => a.dir = Some(val()?.into()),
            "--workers" => a.workers = val()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// User + system CPU seconds of this process so far (Linux), for CPU µs per task.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(after) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the command.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => {
            std::env::temp_dir().join(format!("lockstep-pipeline-bench-{}", std::process::id()))
        }
    };
    let members: Vec<NodeId> = vec![1, 2, 3];
    let net = LocalNetwork::new();
    let mut nodes = Vec::new();
    for &id in &members {
        let mut cfg = RaftConfig::new(id, members.clone());
        cfg.election_timeout = (Duration::from_millis(300), Duration::from_millis(600));
        cfg.heartbeat_interval = Duration::from_millis(50);
        let log = LogStore::open(&base.join(format!("n{id}/log.redb")))?;
        let node = Node::start(cfg, log, net.transport(id), Counter::default())?;
        net.register(id, node.clone());
        nodes.push(node);
    }
    let leader = loop {
        if let Some(n) = nodes.iter().find(|n| n.status().role == Role::Leader) {
            break n.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "pipeline-bench: 3 nodes, redb logs under {}, durable (fdatasync per group commit), {} B payloads, {} s per level",
        base.display(),
        args.payload,
        args.secs
    );
    println!(
        "| submitters | tasks/s | p50 | p99 | p99.9 | CPU µs/task | entries/fsync (leader) | fsync mean (leader) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let payload = Bytes::from(vec![7u8; args.payload]);
    for &n in &args.submitters {
        let stop = Arc::new(AtomicBool::new(false));
        let measuring = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (node, stop, measuring, payload) = (
                leader.clone(),
                stop.clone(),
                measuring.clone(),
                payload.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = node.propose(payload.clone(), None).await;
                    if measuring.load(Ordering::Relaxed) {
                        match r {
                            Ok(_) => lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32),
                            Err(_) => errors += 1,
                        }
                    }
                }
                (lat, errors)
            }));
        }
        // Warm up, then measure.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let m0 = leader.metrics();
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(args.secs)).await;
        measuring.store(false, Ordering::Relaxed);
        let (cpu1, elapsed) = (cpu_seconds(), t0.elapsed());
        let m1 = leader.metrics();
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await?;
            lat.extend(l);
            errors += e;
        }
        lat.sort_unstable();
        let pct = |p: f64| -> String {
            if lat.is_empty() {
                return "-".into();
            }
            let v = lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            if v >= 1000 {
                format!("{:.2} ms", v as f64 / 1000.0)
            } else {
                format!("{v} µs")
            }
        };
        let done = lat.len() as f64;
        let fsyncs = m1.fsync_latency_us.count - m0.fsync_latency_us.count;
        let per_fsync = (m1.fsync_entries - m0.fsync_entries) as f64 / fsyncs.max(1) as f64;
        let fsync_mean =
            (m1.fsync_latency_us.sum - m0.fsync_latency_us.sum) as f64 / fsyncs.max(1) as f64;
        println!(
            "| {n} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.0} µs |{}",
            done / elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            pct(0.999),
            (cpu1 - cpu0) * 1e6 / done.max(1.0),
            per_fsync,
            fsync_mean,
            if errors > 0 {
                format!(" ({errors} errors)")
            } else {
                String::new()
            }
        );
    }
    for n in &nodes {
        n.shutdown().await;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    Ok(())
}
