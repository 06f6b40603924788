//! What the plugin (`main.rs`) and the node agent (`install/`) share: the
//! ambient rule and its exclusions, the API server calls, finding a pod's
//! cgroup and network namespace on the node, and the installer's node
//! agent that makes running pods follow their labels (`follow.rs`).

pub mod api;
pub mod cgroup;
pub mod follow;
pub mod pods;
pub mod procfs;
