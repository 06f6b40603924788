//! What the plugin (`main.rs`) and the node agent (`install/`) share: the
//! ambient rule and its exclusions, the API server calls, and finding a
//! pod's cgroup and network namespace on the node.

pub mod api;
pub mod cgroup;
pub mod pods;
pub mod procfs;
