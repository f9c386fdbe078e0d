//! `lockstep dev`: a working local cluster from one command. A single node runs in this
//! process; a cluster runs as child `lockstep serve` processes with ports and data directories
//! chosen here, and stops as a whole when any of them exits (a port in use, a crash).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::process::Command;

use super::{ServeArgs, run_until_stopped, shutdown_signal};
use crate::node;

#[derive(clap::Args, Clone, Debug)]
pub struct DevArgs {
    /// How many nodes to run (1, 3 or 5 make sense).
    #[arg(long, default_value_t = 1)]
    pub nodes: u64,
    /// Where the nodes keep their data (DIR/<n>-nodes/nodeN); reused on the next run.
    #[arg(long, default_value = "lockstep-dev")]
    pub data_dir: PathBuf,
    /// HTTP port of node 1; node N uses PORT+N-1, and its peer port is 100 above.
    #[arg(long, default_value_t = 7070)]
    pub port: u16,
}

impl DevArgs {
    fn serve_args(&self, id: u64) -> ServeArgs {
        let addr = |port: u64| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], port as u16)) };
        let http = |i: u64| addr(self.port as u64 + i - 1);
        let raft = |i: u64| addr(self.port as u64 + 100 + i - 1);
        let peers: BTreeMap<u64, String> =
            (1..=self.nodes).map(|i| (i, raft(i).to_string())).collect();
        ServeArgs {
            id,
            // Clusters of different sizes must never share a log: each size has its own folder
            // and identity.
            data_dir: self
                .data_dir
                .join(format!("{}-nodes", self.nodes))
                .join(format!("node{id}")),
            http: http(id),
            advertise_http: None,
            raft: raft(id),
            peers,
            cluster_id: Some(format!("lockstep-dev-{}", self.nodes)),
            // Local processes on 127.0.0.1: nobody else to keep out.
            peer_secret_file: None,
            join: false,
            fuel_per_task: None,
            memory_mib: None,
            max_connections: crate::api::DEFAULT_MAX_CONNECTIONS,
            max_unapplied_mib: super::DEFAULT_MAX_UNAPPLIED_MIB,
            snapshot_every: super::DEFAULT_SNAPSHOT_EVERY,
            snapshot_keep: super::DEFAULT_SNAPSHOT_KEEP,
            scheduling: Default::default(),
        }
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=99).contains(&args.nodes),
        "--nodes must be between 1 and 99"
    );
    anyhow::ensure!(
        args.port as u64 + 100 + args.nodes <= u16::MAX as u64,
        "--port is too high for {} nodes",
        args.nodes
    );
    if args.nodes == 1 {
        let serve = args.serve_args(1);
        let running = node::start(serve.node_config()).await?;
        println!("lockstep dev: 1 node, data in {}", serve.data_dir.display());
        println!("  http://{}", running.http_addr);
        println!(
            "try: lockstep deploy counter counter.wasm && lockstep submit counter '{{\"add\":1}}'"
        );
        return run_until_stopped(running).await;
    }
    let exe = std::env::current_exe().context("locating the lockstep binary")?;
    let (exited_tx, mut exited) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut watchers = Vec::new();
    for id in 1..=args.nodes {
        let s = args.serve_args(id);
        let peers: Vec<String> = s.peers.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let mut child = Command::new(&exe)
            .arg("serve")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&s.data_dir)
            .args(["--http", &s.http.to_string(), "--raft", &s.raft.to_string()])
            .args(["--peers", &peers.join(",")])
            .arg("--cluster-id")
            .arg(s.cluster_id.as_deref().unwrap_or("lockstep-dev"))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node {id}"))?;
        println!(
            "  node {id}: http://{}  (data in {})",
            s.http,
            s.data_dir.display()
        );
        // One watcher per child: reports its exit, or kills it when the cluster stops.
        let (exited_tx, mut stop) = (exited_tx.clone(), stop.clone());
        watchers.push(tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let _ = exited_tx.send((id, status));
                }
                _ = stop.changed() => stop_child(&mut child).await,
            }
        }));
    }
    println!(
        "lockstep dev: {} nodes; clients default to http://{}",
        args.nodes,
        args.serve_args(1).http
    );
    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        Some((id, status)) = exited.recv() => {
            let how = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown status ({e})"),
            };
            Err(anyhow::anyhow!(
                "node {id} exited ({how}); stopped the other nodes (its error is above)"
            ))
        }
    };
    let _ = stop_tx.send(true);
    for w in watchers {
        let _ = w.await;
    }
    outcome
}

/// Stops a node as an operator would: SIGTERM, so it answers what it has received (README), and
/// SIGKILL only if it is still running well after its grace period.
async fn stop_child(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
        // SAFETY: kill(2) has no memory effects; the child is not reaped yet, so the pid is its.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let grace = crate::node::HTTP_GRACE + std::time::Duration::from_secs(3);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}
