//! Command-line and environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 24h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

/// ztunnel: the per-node proxy of the ambient mesh.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Config {
    /// This node's name; workloads whose `node` matches are served here.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,

    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Local state file (workloads, services, policies), reloaded on change.
    #[arg(long, env = "LOCAL_STATE")]
    pub local_state: Option<PathBuf>,

    /// Root certificate (PEM) of the local CA; generated if missing.
    #[arg(long, env = "CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// Root key (PKCS#8 PEM) of the local CA; generated if missing.
    #[arg(long, env = "CA_KEY")]
    pub ca_key: Option<PathBuf>,

    /// Control plane (workload xDS), e.g. `https://172.30.0.9:15012`.
    /// Replaces `--local-state`.
    #[arg(long, env = "XDS_ADDRESS", conflicts_with = "local_state")]
    pub xds_address: Option<String>,

    /// The control plane's CA; replaces the local CA when set.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,

    /// Root (PEM) the control plane's certificate must chain to
    /// (default: `--ca-cert`).
    #[arg(long, env = "XDS_ROOT_CERT")]
    pub xds_root_cert: Option<PathBuf>,

    /// Name expected in the control plane's certificate.
    #[arg(
        long,
        env = "XDS_SERVER_NAME",
        default_value = "istiod.istio-system.svc"
    )]
    pub xds_server_name: String,

    /// File with this node's bearer token for the control plane.
    #[arg(long, env = "XDS_TOKEN_FILE")]
    pub xds_token_file: Option<PathBuf>,

    /// Lifetime of workload certificates; renewed at half life.
    #[arg(long, env = "CERT_TTL", value_parser = duration, default_value = "24h")]
    pub cert_ttl: Duration,

    #[arg(long, default_value = "[::]:15001")]
    pub outbound_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15006")]
    pub inbound_plaintext_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15008")]
    pub inbound_addr: SocketAddr,
    /// Admin (`/config_dump`); localhost only by default, as in Istio.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,
    /// SOCKS5 listener (off unless set), e.g. 127.0.0.1:15080.
    #[arg(long, env = "SOCKS5_ADDR")]
    pub socks5_addr: Option<SocketAddr>,

    /// Set IP_TRANSPARENT on the capture listeners (TPROXY capture).
    #[arg(long)]
    pub transparent: bool,

    /// SO_MARK of ztunnel's own sockets, which capture must let through.
    #[arg(long, default_value_t = 0x539)]
    pub socket_mark: u32,

    /// Port HBONE peers listen on.
    #[arg(long, default_value_t = 15008)]
    pub hbone_port: u16,

    /// HTTP/2 streams per pooled HBONE connection before another opens.
    #[arg(long, default_value_t = 100)]
    pub pool_max_streams: usize,

    /// Close pooled HBONE connections idle this long.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub pool_idle_timeout: Duration,

    /// On SIGTERM, how long open connections may take to finish before
    /// ztunnel exits anyway.
    #[arg(long, env = "DRAIN_TIMEOUT", value_parser = duration, default_value = "30s")]
    pub drain_timeout: Duration,

    /// In-pod mode: the enrollment socket (Istio ZDS shape) where the CNI
    /// plugin adds and removes pods. Off unless set.
    #[arg(long, env = "INPOD_SOCKET")]
    pub inpod_socket: Option<PathBuf>,

    /// Where each enrolled pod's eBPF programs and maps are pinned
    /// (`<dir>/<pod uid>/`, on a bpffs).
    #[arg(long, env = "INPOD_BPF_DIR", default_value = "/sys/fs/bpf/ztunnel")]
    pub inpod_bpf_dir: PathBuf,

    /// Where enrolled pods are recorded, to re-adopt them after a restart.
    #[arg(long, env = "INPOD_STATE_DIR", default_value = "/var/run/ztunnel/pods")]
    pub inpod_state_dir: PathBuf,

    /// Source CIDR whose inbound connections to enrolled pods are never
    /// captured (for example the kubelet's probe address); repeatable.
    #[arg(long, value_parser = crate::inpod::parse_cidr)]
    pub inpod_exempt: Vec<ipnet::IpNet>,

    /// Data-plane worker threads [default: half the CPUs this process may
    /// run on, at least 1]. One runs on a single-threaded runtime.
    #[arg(long, env = "WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON")]
    pub log_json: bool,
}

/// Worker threads when none are configured: half the CPUs this process may
/// run on (std counts its CPU affinity and cgroup CPU quota), at least one.
///
/// ztunnel shares its node with the workloads whose bytes it carries: every
/// byte it moves is also written by a client and read by a server on the
/// same cores. A worker per core made ztunnel's threads compete with them
/// and wake each other (tokio unparks an idle sibling whenever it queues
/// work), for nothing on a small node: on the 2-CPU bench machine, 6
/// alternating quiet runs each of 2 workers against 1 gave one-stream
/// throughput 0.283-0.296x against 0.299-0.336x direct and connection rate
/// 0.208-0.215x against 0.226-0.239x, the round trip no worse (README,
/// Benchmarks).
pub fn default_worker_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(duration("7"), Ok(Duration::from_secs(7)));
        assert!(duration("x").is_err());
        assert!(duration("3d").is_err());
    }
}
