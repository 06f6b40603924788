//! What the plugin (`main.rs`) and the node agent (`install/`) share: the
//! ambient rule and its exclusions, the API server calls, finding a pod's
//! cgroup and network namespace on the node, and the installer's node
//! agent that makes running pods follow their labels (`follow.rs`) and
//! knows an update of its DaemonSet from a removal (`upgrade.rs`).

pub mod api;
pub mod cgroup;
pub mod follow;
pub mod pods;
pub mod procfs;
pub mod upgrade;

/// `f`, failing if `who` has not answered within 10s: the plugin holds up
/// a pod's start, and the agent its other pods, while it waits.
pub async fn within<T>(
    who: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    const LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
    tokio::time::timeout(LIMIT, f)
        .await
        .map_err(|_| anyhow::anyhow!("{who} did not answer within {LIMIT:?}"))?
}
