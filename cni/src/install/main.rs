//! `ztunnel-cni-install`: puts `ztunnel-cni` on a node and takes it off
//! again. It runs as a DaemonSet container with the host's CNI bin and conf
//! dirs mounted, until SIGTERM (or SIGINT):
//!
//! 1. copies the plugin binary into the CNI bin dir (atomically: temp file
//!    and rename, so the runtime never runs half a binary);
//! 2. writes the plugin's kubeconfig (`ztunnel-cni-kubeconfig`, mode 0600)
//!    into the conf dir from the pod's service-account token and CA and
//!    `KUBERNETES_SERVICE_HOST`/`_PORT` (see `kubeconfig.rs`);
//! 3. chains the plugin into the primary CNI's config (see `conflist.rs`).
//!
//! Then, every second, it does all three again where something changed (a
//! rotated token, a primary CNI that rewrote its config, a deleted binary),
//! so a node converges whatever order things start in. Failures (no primary
//! config yet, a malformed one, an unreadable token) are logged once, naming
//! the file and what is wrong, and retried on the next tick; the last good
//! state stays.
//!
//! On SIGTERM it removes its entry from the primary's config (restoring the
//! primary's file byte for byte when nobody touched it since), then the
//! kubeconfig, then the binary, and exits 0: pods created after that are
//! not enrolled, rather than failing on a plugin that is gone. Unless its
//! DaemonSet is being updated (`--pod-name`, `--pod-namespace`; see
//! `upgrade.rs`): then all stays in place, and pods created before the new
//! installer starts wait for it instead of starting outside the mesh. This
//! is Istio's install-cni, minus its template and its sidecar-mode options.
//!
//! With `--node-name` (the downward API's `spec.nodeName`) it is also
//! Istio's node agent for running pods: they follow their ambient labels
//! without a restart (see `follow.rs`).
//!
//! Paths: the installer sees the host's dirs where they are mounted
//! (`--cni-conf-dir /host/etc/cni/net.d`), but the plugin runs on the host,
//! so the kubeconfig path it is given is the host's
//! (`--host-cni-conf-dir`, by default `--cni-conf-dir` without a leading
//! `/host`).

mod conflist;
mod files;
mod kubeconfig;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Parser;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};
use ztunnel_cni::{follow, upgrade};

const KUBECONFIG_NAME: &str = "ztunnel-cni-kubeconfig";

#[derive(Parser)]
#[command(about = "Installs the ztunnel-cni plugin on this node until SIGTERM")]
struct Args {
    /// The host's CNI bin dir, as mounted here.
    #[arg(long)]
    cni_bin_dir: PathBuf,
    /// The host's CNI conf dir, as mounted here.
    #[arg(long)]
    cni_conf_dir: PathBuf,
    /// The same dir as the host sees it (default: --cni-conf-dir without a
    /// leading /host).
    #[arg(long)]
    host_cni_conf_dir: Option<PathBuf>,
    /// ztunnel's enrollment socket, as the host sees it.
    #[arg(long, default_value = "/var/run/ztunnel/ztunnel.sock")]
    ztunnel_socket: PathBuf,
    /// The plugin to install.
    #[arg(long, default_value = "/usr/local/bin/ztunnel-cni")]
    plugin_binary: PathBuf,
    /// Where the pod's service-account token and ca.crt are.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount")]
    service_account_dir: PathBuf,
    /// How often to check that everything is still in place.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// This node's name (the downward API's `spec.nodeName`): when given,
    /// running pods of this node follow their ambient labels (see
    /// `follow.rs`); needs --proc-dir, --cgroup-dir and ztunnel's socket.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The host's /proc, as mounted here.
    #[arg(long, default_value = "/host/proc")]
    proc_dir: PathBuf,
    /// The host's cgroup2 mount, as mounted here.
    #[arg(long, default_value = "/host/sys/fs/cgroup")]
    cgroup_dir: PathBuf,
    /// The same dir as the host (and ztunnel) sees it (default:
    /// --cgroup-dir without a leading /host).
    #[arg(long)]
    host_cgroup_dir: Option<PathBuf>,
    /// This installer's pod (the downward API's `metadata.name`) and
    /// namespace: when both are given, a stop during an update of its
    /// DaemonSet leaves the plugin in place (see `upgrade.rs`).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?}: give a unit (ms or s)"))?;
    let n: u64 = n.parse().map_err(|e| format!("{s:?}: {e}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!("{s:?}: unit must be ms or s")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if let Err(e) = run(Args::parse()).await {
        error!("{e:#}");
        std::process::exit(1);
    }
}

/// The host's view of a dir mounted at `mounted`: `explicit`, or
/// `mounted` without a leading `/host`.
fn host_dir(mounted: &Path, explicit: Option<&Path>) -> PathBuf {
    match (explicit, mounted.strip_prefix("/host")) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Ok(rest)) => Path::new("/").join(rest),
        (None, Err(_)) => mounted.to_path_buf(),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| anyhow!("{k} is not set (the kubelet sets it in every pod)"))
    };
    let server = kubeconfig::server_url(
        &env("KUBERNETES_SERVICE_HOST")?,
        &env("KUBERNETES_SERVICE_PORT")?,
    );
    for dir in [&args.cni_bin_dir, &args.cni_conf_dir] {
        if !dir.is_dir() {
            return Err(anyhow!("{} is not a directory", dir.display()));
        }
    }
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;

    let mut node = Node {
        plugin_dest: args.cni_bin_dir.join(conflist::PLUGIN_TYPE),
        binary_installed: false,
        kubeconfig: args.cni_conf_dir.join(KUBECONFIG_NAME),
        sa_dir: args.service_account_dir.clone(),
        server,
        chain: conflist::Chain::new(
            args.cni_conf_dir.clone(),
            json!({
                "type": conflist::PLUGIN_TYPE,
                "ztunnelSocket": args.ztunnel_socket,
                "kubeconfig": host_dir(&args.cni_conf_dir, args.host_cni_conf_dir.as_deref())
                    .join(KUBECONFIG_NAME),
                "capabilities": {"cgroupPath": true},
            }),
        ),
        plugin_binary: args.plugin_binary.clone(),
        reported: [None, None, None],
        chained: None,
        conf_dir: args.cni_conf_dir.clone(),
    };
    // The node agent, if asked for: it ends only on an error that stops it
    // for good (the API client or the watches), which stops the installer
    // too (after its clean-up) so that the DaemonSet restarts it.
    let server = node.server.clone();
    let follow = async {
        let Some(name) = args.node_name.clone() else {
            return std::future::pending().await;
        };
        let client =
            ztunnel_cni::api::client_in_cluster(&server, &args.service_account_dir).await?;
        follow::run(
            client,
            follow::Options {
                node: name,
                proc_dir: args.proc_dir.clone(),
                host_cgroup_dir: host_dir(&args.cgroup_dir, args.host_cgroup_dir.as_deref()),
                cgroup_dir: args.cgroup_dir.clone(),
                socket: args.ztunnel_socket.clone(),
                interval: args.interval,
            },
        )
        .await
    };
    tokio::pin!(follow);
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = None;
    loop {
        tokio::select! {
            _ = tick.tick() => node.reconcile(),
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = &mut follow => {
                failed = Some(r.err().unwrap_or_else(|| anyhow!("ended")));
                break;
            }
        }
    }
    let uninstalled = match stop_decision(&args, &node.server).await {
        upgrade::Stop::Keep(why) => {
            info!("stopping: leaving the plugin on this node for the next installer: {why}");
            Ok(())
        }
        upgrade::Stop::Remove(why) => {
            info!("stopping: removing the plugin from this node: {why}");
            node.uninstall()
        }
    };
    match failed {
        Some(e) => Err(e.context("following pod labels")),
        None => uninstalled,
    }
}

/// Whether to leave the plugin in place on the way out (see `upgrade.rs`).
async fn stop_decision(args: &Args, server: &str) -> upgrade::Stop {
    let (Some(pod), Some(namespace)) = (args.pod_name.clone(), args.pod_namespace.clone()) else {
        return upgrade::Stop::Remove("no --pod-name and --pod-namespace to look up".into());
    };
    let me = upgrade::Me {
        namespace,
        pod,
        node: args.node_name.clone(),
    };
    // Well within the pod's grace period (the chart's is 10 s).
    const LIMIT: Duration = Duration::from_secs(5);
    let decided = tokio::time::timeout(LIMIT, async {
        let client = ztunnel_cni::api::client_in_cluster(server, &args.service_account_dir).await?;
        anyhow::Ok(upgrade::decide(&client, &me).await)
    });
    match decided.await {
        Ok(Ok(stop)) => stop,
        Ok(Err(e)) => upgrade::Stop::Remove(format!("{e:#}")),
        Err(_) => upgrade::Stop::Remove(format!("the API server did not answer within {LIMIT:?}")),
    }
}

/// What the installer keeps in place on this node.
struct Node {
    plugin_binary: PathBuf,
    plugin_dest: PathBuf,
    binary_installed: bool,
    kubeconfig: PathBuf,
    sa_dir: PathBuf,
    server: String,
    chain: conflist::Chain,
    /// The last error of each step, so that a lasting failure is logged
    /// once (and its end too), not every tick.
    reported: [Option<String>; 3],
    /// The last outcome of chaining logged: the file, or none yet.
    chained: Option<Option<PathBuf>>,
    conf_dir: PathBuf,
}

impl Node {
    /// One pass of the three steps; a step that fails does not stop the
    /// others from keeping what they put in place (but chaining waits for
    /// the binary and the kubeconfig, so the runtime never calls a plugin
    /// that is not there or cannot read its labels).
    fn reconcile(&mut self) {
        let binary = self.install_binary();
        let binary_ok = self.report(0, "installing the plugin binary", binary);
        let kc = self.write_kubeconfig();
        let kc_ok = self.report(1, "writing the plugin's kubeconfig", kc);
        if binary_ok && kc_ok {
            let chained = self.chain.reconcile();
            if let Some(now) = self.report_value(2, "chaining the plugin", chained) {
                if self.chained.as_ref() != Some(&now) {
                    match &now {
                        Some(path) => info!(
                            config = %path.display(),
                            "chained ztunnel-cni into the primary CNI config"
                        ),
                        None => info!(
                            dir = %self.conf_dir.display(),
                            "no CNI config yet: waiting for the primary CNI to write one"
                        ),
                    }
                    self.chained = Some(now);
                }
            }
        }
    }

    /// Copied on the first pass whatever is there (an older version, say),
    /// then again only if it went missing or changed size.
    fn install_binary(&mut self) -> anyhow::Result<()> {
        let want = std::fs::metadata(&self.plugin_binary)
            .with_context(|| format!("reading {}", self.plugin_binary.display()))?;
        let in_place = self.binary_installed
            && std::fs::metadata(&self.plugin_dest).is_ok_and(|have| have.len() == want.len());
        if !in_place {
            files::copy_atomic(&self.plugin_binary, &self.plugin_dest)?;
            info!(path = %self.plugin_dest.display(), "installed the plugin binary");
            self.binary_installed = true;
        }
        Ok(())
    }

    fn write_kubeconfig(&self) -> anyhow::Result<()> {
        let data = kubeconfig::render(&self.server, &self.sa_dir)?;
        if !kubeconfig::unchanged(&self.kubeconfig, &data) {
            files::write_atomic(&self.kubeconfig, &data, 0o600)?;
            info!(path = %self.kubeconfig.display(), "wrote the plugin's kubeconfig");
        }
        Ok(())
    }

    fn report(&mut self, i: usize, what: &str, r: anyhow::Result<()>) -> bool {
        self.report_value(i, what, r).is_some()
    }

    fn report_value<T>(&mut self, i: usize, what: &str, r: anyhow::Result<T>) -> Option<T> {
        match r {
            Ok(v) => {
                if self.reported[i].take().is_some() {
                    info!("{what}: recovered");
                }
                Some(v)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if self.reported[i].as_ref() != Some(&msg) {
                    error!("{what}: {msg} (retrying)");
                    self.reported[i] = Some(msg);
                }
                None
            }
        }
    }

    /// Config entry first (no new pod calls the plugin after it), then the
    /// kubeconfig, then the binary. Each is attempted even if one fails.
    fn uninstall(&mut self) -> anyhow::Result<()> {
        let results = [
            self.chain.uninstall().context("unchaining the plugin"),
            files::remove(&self.kubeconfig),
            files::remove(&self.plugin_dest),
        ];
        let mut failed = false;
        for e in results.into_iter().filter_map(Result::err) {
            error!("{e:#}");
            failed = true;
        }
        if failed {
            return Err(anyhow!("could not remove everything (see above)"));
        }
        info!("removed the plugin, its kubeconfig and its config entry");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            host_dir(&p("/host/etc/cni/net.d"), None),
            p("/etc/cni/net.d")
        );
        assert_eq!(
            host_dir(&p("/host/etc/cni/net.d"), Some(&p("/var/lib/cni/net.d"))),
            p("/var/lib/cni/net.d")
        );
        assert_eq!(host_dir(&p("/hostetc/net.d"), None), p("/hostetc/net.d"));
        assert_eq!(host_dir(&p("/tmp/net.d"), None), p("/tmp/net.d"));
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("2m").is_err());
        assert!(parse_duration("ms").is_err());
    }
}
