//! The plugin's contract with a runtime that needs no ztunnel: VERSION,
//! pods outside the mesh (prevResult passed through, nothing enrolled) and
//! bad input (the spec's error object, exit status 1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use support::run_plugin as run;

#[test]
fn version() {
    let (ok, v) = run(&[("CNI_COMMAND", "VERSION")], "");
    assert!(ok);
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));
}

#[test]
fn add_for_a_pod_outside_the_mesh_passes_prev_result_through() {
    let dir = std::env::temp_dir().join(format!("cni-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let labels = dir.join("labels.json");
    std::fs::write(
        &labels,
        r#"{"namespaces": {"default": {"istio.io/dataplane-mode": "ambient"}},
            "pods": {"default/opted-out": {"istio.io/dataplane-mode": "none"}}}"#,
    )
    .unwrap();
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/32"}]});
    let conf = json!({
        "cniVersion": "1.0.0", "name": "n", "type": "ztunnel-cni",
        // Nothing listens here: enrolling would fail, so success proves
        // the plugin did not try.
        "ztunnelSocket": dir.join("absent.sock"),
        "labelsFile": labels,
        "prevResult": prev,
    });
    for args in [
        "K8S_POD_NAMESPACE=legacy;K8S_POD_NAME=app;K8S_POD_UID=u1",
        "K8S_POD_NAMESPACE=default;K8S_POD_NAME=opted-out;K8S_POD_UID=u2",
    ] {
        let (ok, out) = run(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/nonexistent"),
                ("CNI_ARGS", args),
            ],
            &conf.to_string(),
        );
        assert!(ok, "{args}: {out}");
        assert_eq!(out, prev, "{args}");
    }
    // An ambient pod with ztunnel away: a retryable error naming the socket.
    let (ok, out) = run(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=app;K8S_POD_UID=u3",
            ),
        ],
        &json!({"cniVersion": "1.0.0", "ztunnelSocket": dir.join("absent.sock"),
                "labelsFile": labels, "prevResult": prev,
                "runtimeConfig": {"cgroupPath": "/"}})
        .to_string(),
    );
    assert!(!ok);
    assert_eq!(out["code"], 11, "{out}");
    assert!(
        out["details"].as_str().unwrap().contains("absent.sock"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_a_cni_error() {
    let (ok, out) = run(&[("CNI_COMMAND", "ADD")], "not json");
    assert!(!ok);
    assert_eq!(out["code"], 6);
    let (ok, out) = run(&[("CNI_COMMAND", "ADD")], r#"{"cniVersion": "1.0.0"}"#);
    assert!(!ok, "ADD without prevResult");
    assert!(out["msg"].as_str().unwrap().contains("prevResult"), "{out}");
    let (ok, out) = run(&[("CNI_COMMAND", "FROB")], "{}");
    assert!(!ok);
    assert_eq!(out["code"], 4);
    let (ok, out) = run(&[], "{}");
    assert!(!ok, "no CNI_COMMAND: {out}");
}
