//! The `lockstep` command line: `serve` and `dev` run nodes; `deploy`, `list`, `describe`,
//! `delete`, `submit`, `batch`, `query`, `status`, `transfer-leader`, `add-member`,
//! `remove-member` and `move-member` talk to a running cluster over HTTP.

pub mod client;
pub mod dev;
pub mod scheduling;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hyper::Method;

use crate::node::{self, NodeConfig};
use crate::raft::MAX_NODE_ID;
use crate::wasm::Limits;

/// URL of the node `lockstep dev` starts first.
pub const DEV_URL: &str = "http://127.0.0.1:7070";

#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Replicated WebAssembly state machines over Raft"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node of a cluster.
    Serve(ServeArgs),
    /// Run a local cluster for development (one node unless --nodes says otherwise).
    Dev(dev::DevArgs),
    /// Deploy (or upgrade) a machine from a .wasm component.
    Deploy {
        name: String,
        file: PathBuf,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
    },
    /// List the deployed machines.
    List {
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
    },
    /// Show a machine's module and the last entry applied to it.
    Describe {
        name: String,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
        /// Also a sha256 of its state (compare replicas).
        #[arg(long)]
        digest: bool,
    },
    /// Delete a machine and its state.
    Delete {
        name: String,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
    },
    /// Submit a task; PAYLOAD is inline, @file, or - for stdin.
    Submit {
        name: String,
        payload: String,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
        /// Refuse the task unless the leader is in this term.
        #[arg(long)]
        expected_term: Option<u64>,
    },
    /// Submit many tasks in one request: TASKS is a JSON array (inline, @file, or - for stdin)
    /// of task payloads; prints one result per task, in order.
    Batch {
        name: String,
        tasks: String,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
        /// Refuse the tasks unless the leader is in this term.
        #[arg(long)]
        expected_term: Option<u64>,
    },
    /// Query a machine's state; REQUEST is inline, @file, or - for stdin.
    Query {
        name: String,
        #[arg(default_value = "")]
        request: String,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
        /// Read this node's applied state instead of a linearizable read.
        #[arg(long)]
        local: bool,
    },
    /// Show the cluster as the node at --url sees it.
    Status {
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
    },
    /// Hand leadership to member ID (before restarting the leader, say); waits until it leads.
    TransferLeader {
        id: u64,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
    },
    /// Add member ID, reached by its peers at RAFT (HOST:PORT); start it first with --join.
    /// Waits until the change commits.
    AddMember {
        id: u64,
        raft: String,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
    },
    /// Remove member ID (the leader included: it steps down). Waits until the change commits.
    RemoveMember {
        id: u64,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
    },
    /// Record that member ID is now reached by its peers at RAFT (HOST:PORT); restart it there
    /// with its data directory. Not the leader: hand leadership away first. Waits until the
    /// change commits.
    MoveMember {
        id: u64,
        raft: String,
        #[arg(long, env = "LOCKSTEP_URL", default_value = DEV_URL)]
        url: String,
    },
}

#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// This node's id in --peers.
    #[arg(long)]
    pub id: u64,
    #[arg(long)]
    pub data_dir: PathBuf,
    /// HTTP API address.
    #[arg(long)]
    pub http: SocketAddr,
    /// HOST:PORT that clients are sent to (redirects, `/v1/cluster`); defaults to --http, and
    /// is required when --http listens on every interface (0.0.0.0 or [::]).
    #[arg(long, value_parser = parse_advertise)]
    pub advertise_http: Option<String>,
    /// Peer transport address (must match this node's entry in --peers).
    #[arg(long)]
    pub raft: SocketAddr,
    /// Initial members: 1=RAFTADDR,2=RAFTADDR,... (the same on every initial member).
    #[arg(long, value_parser = parse_peers)]
    pub peers: BTreeMap<u64, String>,
    /// Cluster identity checked on every peer connection (default: derived from --peers).
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// A file holding a secret shared by every member: a caller on --raft must prove it holds
    /// it when it connects (the messages that follow are not signed). Without it anyone who
    /// reaches --raft can pose as a member.
    #[arg(long)]
    pub peer_secret_file: Option<PathBuf>,
    /// Join a running cluster (with its --cluster-id): start with no members, and be added by
    /// `lockstep add-member` on the leader. --peers then only says where the members are.
    #[arg(long)]
    pub join: bool,
    /// Fuel each task may burn before it fails with out_of_fuel (the same on every member).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub fuel_per_task: Option<u64>,
    /// Memory cap of each machine instance, in MiB (the same on every member).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub memory_mib: Option<u32>,
    /// Most HTTP connections served at once; more clients wait in the listen backlog until one
    /// closes.
    #[arg(long, default_value_t = crate::api::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// MiB of entries not yet committed and applied (payload and 512 bytes of overhead each)
    /// beyond which the leader answers new tasks `503 overloaded` (with Retry-After) instead
    /// of queueing them.
    #[arg(long, default_value_t = DEFAULT_MAX_UNAPPLIED_MIB,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_UNAPPLIED_MIB)))]
    pub max_unapplied_mib: u32,
    /// Applied entries between snapshots of the machines' state; behind each, the log is
    /// compacted. A restart replays the log from the latest snapshot; a follower behind the
    /// compacted log is sent the snapshot. 0: no snapshots, the log is kept whole.
    #[arg(long, default_value_t = DEFAULT_SNAPSHOT_EVERY)]
    pub snapshot_every: u64,
    /// Entries kept in the log before each snapshot, so that a follower a little behind
    /// catches up from the log instead of being sent the whole snapshot.
    #[arg(long, default_value_t = DEFAULT_SNAPSHOT_KEEP)]
    pub snapshot_keep: u64,
    /// How the OS schedules the node's threads (Linux; see `cli/scheduling.rs`).
    #[arg(long, value_enum, default_value_t)]
    pub scheduling: scheduling::Scheduling,
}

const DEFAULT_MAX_UNAPPLIED_MIB: u32 = 256;
/// etcd's default `--snapshot-count`.
const DEFAULT_SNAPSHOT_EVERY: u64 = 100_000;
const DEFAULT_SNAPSHOT_KEEP: u64 = 10_000;
/// Far above any machine's memory, and small enough that the byte count fits a 32-bit usize.
const MAX_UNAPPLIED_MIB: u32 = 4095;

fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not ID=ADDR"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("{id:?} is not a node id"))?;
        if id == 0 {
            return Err("node id 0 is reserved (ids start at 1)".into());
        }
        if id > MAX_NODE_ID {
            return Err(format!("node id {id} is too large (at most {MAX_NODE_ID})"));
        }
        if peers.insert(id, addr.trim().to_owned()).is_some() {
            return Err(format!("node id {id} appears twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers given".into());
    }
    Ok(peers)
}

/// HOST:PORT with a numeric port (IPv6 in brackets): exactly what goes after `http://` in a
/// redirect's Location, so it must be a URI authority on its own, with no user info.
fn parse_advertise(s: &str) -> Result<String, String> {
    let bad = || format!("{s:?} is not HOST:PORT (no scheme, no path)");
    let uri: hyper::Uri = format!("http://{s}/").parse().map_err(|_| bad())?;
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str() != s
        || authority.host().is_empty()
        || authority.port_u16().is_none()
        || s.contains('@')
    {
        return Err(bad());
    }
    Ok(s.to_owned())
}

impl ServeArgs {
    pub fn node_config(&self) -> NodeConfig {
        let mut limits = Limits::default();
        if let Some(f) = self.fuel_per_task {
            limits.fuel_per_entry = f;
        }
        if let Some(m) = self.memory_mib {
            limits.memory_bytes = (m as usize).saturating_mul(1024 * 1024);
        }
        NodeConfig {
            id: self.id,
            data_dir: self.data_dir.clone(),
            http_addr: self.http,
            advertise_http: self.advertise_http.clone(),
            raft_addr: self.raft,
            peers: self.peers.clone(),
            cluster_id: self.cluster_id.clone(),
            limits,
            max_connections: self.max_connections as usize,
            max_unapplied_bytes: self.max_unapplied_mib as usize * 1024 * 1024,
            snapshot_every: self.snapshot_every,
            snapshot_keep: self.snapshot_keep,
            peer_secret_file: self.peer_secret_file.clone(),
            join: self.join,
        }
    }
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Before any other thread exists, so that every thread of a node inherits it.
    let policy = match &cli.command {
        Cmd::Serve(args) => Some(args.scheduling),
        Cmd::Dev(_) => Some(scheduling::Scheduling::default()),
        _ => None,
    };
    if let Some(policy) = policy {
        if let Err(e) = scheduling::apply(policy) {
            tracing::warn!(error = %e, ?policy, "could not set the scheduling policy");
        }
        if let Err(e) = crate::fd_limit::raise() {
            tracing::warn!(error = %e, "could not raise the file-descriptor limit");
        }
    }
    // tokio reads TOKIO_WORKER_THREADS itself, and panics on a value it cannot use.
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = worker_threads()? {
        rt.worker_threads(workers);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(run(cli.command))
}

/// `TOKIO_WORKER_THREADS`, checked: a positive number, or unset for one worker per core.
fn worker_threads() -> anyhow::Result<Option<usize>> {
    match std::env::var_os("TOKIO_WORKER_THREADS") {
        None => Ok(None),
        Some(v) => match v.to_str().and_then(|v| v.trim().parse::<usize>().ok()) {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => anyhow::bail!(
                "TOKIO_WORKER_THREADS={} is not a positive number of worker threads",
                v.to_string_lossy()
            ),
        },
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Serve(args) => serve(args).await,
        Cmd::Dev(args) => dev::run(args).await,
        Cmd::Deploy { name, file, url } => {
            let target = machine_url(&url, &name, "")?;
            let module =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = client::request(Method::PUT, &target, module.into(), &[]).await?;
            print_reply(&r)
        }
        Cmd::List { url } => {
            let r = client::request(
                Method::GET,
                &format!("{url}/v1/machines"),
                Bytes::new(),
                &[],
            )
            .await?;
            print_reply(&r)
        }
        Cmd::Describe { name, url, digest } => {
            let query = if digest { "?digest=1" } else { "" };
            let target = machine_url(&url, &name, query)?;
            print_reply(&client::request(Method::GET, &target, Bytes::new(), &[]).await?)
        }
        Cmd::Delete { name, url } => {
            let target = machine_url(&url, &name, "")?;
            print_reply(&client::request(Method::DELETE, &target, Bytes::new(), &[]).await?)
        }
        Cmd::Submit {
            name,
            payload,
            url,
            expected_term,
        } => {
            let target = machine_url(&url, &name, "/tasks")?;
            let r = client::request(
                Method::POST,
                &target,
                read_arg(&payload)?,
                &term_header(expected_term),
            )
            .await?;
            print_reply(&r)
        }
        Cmd::Batch {
            name,
            tasks,
            url,
            expected_term,
        } => {
            let target = machine_url(&url, &name, "/tasks:batch")?;
            let r = client::request(
                Method::POST,
                &target,
                read_arg(&tasks)?,
                &term_header(expected_term),
            )
            .await?;
            print_reply(&r)
        }
        Cmd::Query {
            name,
            request,
            url,
            local,
        } => {
            let consistency = if local { "local" } else { "linearizable" };
            let target = machine_url(&url, &name, &format!("/query?consistency={consistency}"))?;
            let r = client::request(Method::POST, &target, read_arg(&request)?, &[]).await?;
            print_reply(&r)
        }
        Cmd::Status { url } => {
            let r = client::request(Method::GET, &format!("{url}/v1/cluster"), Bytes::new(), &[])
                .await?;
            print_reply(&r)
        }
        Cmd::AddMember { id, raft, url } => {
            let body = serde_json::json!({ "id": id, "raft": raft }).to_string();
            let target = format!("{url}/v1/cluster/members");
            let r = client::request(Method::POST, &target, body.into(), &[]).await?;
            print_reply(&r)
        }
        Cmd::RemoveMember { id, url } => {
            let target = format!("{url}/v1/cluster/members/{id}");
            let r = client::request(Method::DELETE, &target, Bytes::new(), &[]).await?;
            print_reply(&r)
        }
        Cmd::MoveMember { id, raft, url } => {
            let body = serde_json::json!({ "raft": raft }).to_string();
            let target = format!("{url}/v1/cluster/members/{id}");
            let r = client::request(Method::PUT, &target, body.into(), &[]).await?;
            print_reply(&r)
        }
        Cmd::TransferLeader { id, url } => {
            let r = client::request(
                Method::POST,
                &format!("{url}/v1/cluster/leader"),
                serde_json::json!({ "id": id }).to_string().into(),
                &[],
            )
            .await?;
            print_reply(&r)
        }
    }
}

/// `{url}/v1/machines/{name}{rest}`, once the name is one a node would take (a name with a
/// `/` or a space would otherwise make another URL, or none).
fn machine_url(url: &str, name: &str, rest: &str) -> anyhow::Result<String> {
    crate::machines::validate_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(format!("{url}/v1/machines/{name}{rest}"))
}

fn term_header(expected_term: Option<u64>) -> Vec<(&'static str, String)> {
    expected_term
        .map(|t| (crate::api::EXPECTED_TERM, t.to_string()))
        .into_iter()
        .collect()
}

/// `@file` reads a file, `-` reads stdin, anything else is the payload itself.
fn read_arg(arg: &str) -> anyhow::Result<Bytes> {
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf.into())
    } else if let Some(path) = arg.strip_prefix('@') {
        Ok(std::fs::read(path)
            .with_context(|| format!("reading {path}"))?
            .into())
    } else {
        Ok(Bytes::copy_from_slice(arg.as_bytes()))
    }
}

fn print_reply(r: &client::Reply) -> anyhow::Result<()> {
    if r.status.is_success() {
        let text = String::from_utf8_lossy(&r.body);
        println!("{}", text.trim_end());
        Ok(())
    } else {
        bail!("{}", client::describe_error(r))
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let running = node::start(args.node_config()).await?;
    println!(
        "lockstep node {} serving http://{}",
        args.id, running.http_addr
    );
    run_until_stopped(running).await
}

/// Serves until SIGINT/SIGTERM (then stops gracefully), or until the pipeline stops by itself.
pub async fn run_until_stopped(running: node::RunningNode) -> anyhow::Result<()> {
    let node = running.node.clone();
    tokio::select! {
        _ = shutdown_signal() => {}
        // A failed log commit or a panicked pipeline thread stops the pipeline: exit so a
        // supervisor restarts the node from its data directory instead of leaving a process
        // that only looks alive.
        _ = async {
            while !node.is_stopped() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        } => {
            running.shutdown().await;
            bail!("the replication pipeline stopped (see the log above); exiting");
        }
    }
    running.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::{Cli, Cmd, MAX_NODE_ID, parse_advertise, parse_peers};
    use clap::Parser;

    fn serve(extra: &[&str]) -> Result<Cli, clap::Error> {
        let base = [
            "lockstep",
            "serve",
            "--id",
            "1",
            "--data-dir",
            "d",
            "--http",
            "127.0.0.1:1",
            "--raft",
            "127.0.0.1:2",
            "--peers",
            "1=127.0.0.1:2",
        ];
        Cli::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn peers_take_ids_from_1() {
        let peers = parse_peers("1=127.0.0.1:2, 2=127.0.0.1:3").expect("two peers");
        assert_eq!(peers.keys().copied().collect::<Vec<_>>(), [1, 2]);
        let err = parse_peers("0=127.0.0.1:2,1=127.0.0.1:3").expect_err("id 0 accepted");
        assert!(err.contains("id 0 is reserved"), "{err}");
        // The largest id a membership can carry, and one past it.
        assert!(parse_peers(&format!("{MAX_NODE_ID}=a:1")).is_ok());
        let err = parse_peers(&format!("{}=a:1", MAX_NODE_ID + 1)).expect_err("id too large");
        assert!(err.contains("too large"), "{err}");
        assert!(
            parse_peers("1=a:1,1=b:2").is_err(),
            "a repeated id accepted"
        );
    }

    #[test]
    fn max_connections_defaults_and_refuses_zero() {
        let Ok(Cli {
            command: Cmd::Serve(args),
        }) = serve(&[])
        else {
            panic!("serve without --max-connections");
        };
        assert_eq!(args.node_config().max_connections, 4096);
        let Ok(Cli {
            command: Cmd::Serve(args),
        }) = serve(&["--max-connections", "7"])
        else {
            panic!("--max-connections 7");
        };
        assert_eq!(args.node_config().max_connections, 7);
        for bad in ["0", "-1", "x"] {
            assert!(
                serve(&["--max-connections", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn limits_refuse_zero_and_overflow() {
        for (flag, bad) in [
            ("--memory-mib", "0"),
            ("--memory-mib", "17592186044417"),
            ("--memory-mib", "65537"),
            ("--fuel-per-task", "0"),
        ] {
            assert!(serve(&[flag, bad]).is_err(), "{flag} {bad} accepted");
        }
        let Ok(Cli {
            command: Cmd::Serve(args),
        }) = serve(&["--memory-mib", "16", "--fuel-per-task", "5"])
        else {
            panic!("valid limits refused");
        };
        let limits = args.node_config().limits;
        assert_eq!((limits.memory_bytes, limits.fuel_per_entry), (16 << 20, 5));
    }

    #[test]
    fn max_unapplied_mib_defaults_and_refuses_zero_and_overflow() {
        let Ok(Cli {
            command: Cmd::Serve(args),
        }) = serve(&[])
        else {
            panic!("serve without --max-unapplied-mib");
        };
        assert_eq!(args.node_config().max_unapplied_bytes, 256 << 20);
        let Ok(Cli {
            command: Cmd::Serve(args),
        }) = serve(&["--max-unapplied-mib", "3"])
        else {
            panic!("--max-unapplied-mib 3");
        };
        assert_eq!(args.node_config().max_unapplied_bytes, 3 << 20);
        for bad in ["0", "4096", "x"] {
            assert!(
                serve(&["--max-unapplied-mib", bad]).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn advertise_http_takes_a_host_and_port_only() {
        for ok in [
            "localhost:7070",
            "10.0.0.5:80",
            "[::1]:7070",
            "node-1.example.com:443",
        ] {
            assert_eq!(parse_advertise(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "::1:7070",
            "::1",
            "fe80::1:7070",
            "[::1]",
            "localhost",
            "localhost:http",
            ":80",
            "a:99999",
            "http://a:80",
            "a:80/x",
            "a@b:80",
            "a b:80",
            "h\u{e9}llo:80",
            "",
        ] {
            assert!(parse_advertise(bad).is_err(), "{bad:?} accepted");
        }
    }
}
