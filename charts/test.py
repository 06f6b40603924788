#!/usr/bin/env python3
"""Offline checks of the Helm charts in charts/ (no cluster, no image).

For each scenario (a consistent set of values for every chart, as a
platform engineer would install them together):

1. lint every chart with its values (Helm v4's linter, no errors);
2. render it (Helm v4's engine) and parse every document;
3. validate every built-in kind against the Kubernetes OpenAPI schemas of
   KUBE_VERSIONS (kubernetes-validate, strict: unknown fields fail); the
   Gateway API kinds, which that schema lacks, by structural checks and by
   the control plane's own manifest parser;
4. run each container's binary from this workspace's build
   (target/debug) with the rendered command, args and env (downward-API
   fields faked, $(VAR) expanded as the kubelet does) in a private mount
   and network namespace: clap's usage error (exit status 2) must not
   happen;
5. check what would break a real install across charts: the address,
   port, certificate name, token audience, trust domain, root certificate
   and node-agent account that ztunnel and waypoints use against the
   control plane's Service and flags; the enrollment socket shared by
   ztunnel and the CNI installer; the RBAC rules against every kind the
   control plane's Kubernetes source watches and every API call the CNI
   plugin makes (read from xds/src and cni/src, not copied here); the
   waypoint's Gateway, Service and pods;
6. start the rendered containers together (run_mesh): the control plane
   (manifest mode) on the CA root the chart generated, then ztunnel and
   the waypoint with their rendered command lines and mounts; the
   control plane must parse the rendered Gateway and Service without
   errors, its TLS certificate must verify against the published root
   under the names the clients expect, and both clients must become
   ready against it; then the CNI installer must chain the plugin with
   ztunnel's socket and remove it on SIGTERM.

Besides: every value is documented in README.md, the Containerfile
builds and installs every binary the charts run, and the root's choice
when its Secret is already in the cluster. Then checks that the checks
can fail: inconsistent charts, a missing RBAC rule, a bad flag, a bad
duration, an unknown field or value, another root, a refused Gateway.

Run as root (unshare). Exit status 0 when everything passed.
"""

from __future__ import annotations

import base64
import copy
import glob
import json
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from urllib.parse import urlparse

import kubernetes_validate
import yaml
from helm_python.chart import Chart, lint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "debug")
# The oldest Kubernetes the charts support (README: 1.30, for the token's
# node claim) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
KUBE_VERSION = KUBE_VERSIONS[-1]
# Binaries another part of the workspace may not have built yet.
OPTIONAL_BINARIES = {"ztunnel-cni-install"}
CHARTS = ["base", "control-plane", "ztunnel", "cni", "waypoint"]

FAILURES: list[str] = []


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"  FAIL {msg}")


def ok(msg: str) -> None:
    print(f"  ok   {msg}")


# ------------------------------------------------------------------ rendering


@dataclass
class Rendered:
    chart: str
    namespace: str
    objects: list[dict] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o.get("kind") == kind]


def render(chart: str, values: dict, namespace: str, release: str | None = None) -> Rendered:
    with Chart.load(os.path.join(HERE, chart)) as c:
        out = c.render(values=values, name=release or chart, namespace=namespace, is_install=True)
    r = Rendered(chart, namespace)
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                raise ValueError(f"{path}: a document that is not a Kubernetes object: {doc!r:.200}")
            r.objects.append(doc)
    return r


def lint_chart(chart: str, values: dict, namespace: str) -> list[str]:
    rep = lint(os.path.join(HERE, chart), values, strict=True, namespace=namespace,
               kube_version="v" + KUBE_VERSION)
    errs = [f"{m['path']}: {m['error']}" for m in rep.get("messages", []) if m.get("severity", 0) >= 2]
    return errs + list(rep.get("errors", []))


# ------------------------------------------------------------------ schemas

GATEWAY_GROUP = "gateway.networking.k8s.io"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def builtin(api_version: str) -> bool:
    """Whether the Kubernetes API server itself serves the group."""
    group = api_version.split("/")[0] if "/" in api_version else ""
    return group != GATEWAY_GROUP and ("." not in group or group.endswith(".k8s.io"))


def check_gateway(o: dict) -> list[str]:
    """What the control plane requires of a waypoint Gateway."""
    errs = []
    name = o.get("metadata", {}).get("name", "")
    if o.get("apiVersion") != f"{GATEWAY_GROUP}/v1":
        errs.append(f"apiVersion {o.get('apiVersion')!r}, want {GATEWAY_GROUP}/v1")
    if not DNS_LABEL.match(name):
        errs.append(f"name {name!r} is not a DNS label")
    spec = o.get("spec") or {}
    if spec.get("gatewayClassName") != "istio-waypoint":
        errs.append(f"gatewayClassName {spec.get('gatewayClassName')!r}, want istio-waypoint")
    listeners = spec.get("listeners") or []
    if not any(x.get("port") == 15008 and x.get("protocol") == "HBONE" for x in listeners):
        errs.append(f"no listener on 15008 with protocol HBONE: {listeners}")
    for i, x in enumerate(listeners):
        unknown = set(x) - {"name", "port", "protocol", "hostname", "allowedRoutes", "tls"}
        if unknown:
            errs.append(f"listeners[{i}]: unknown fields {sorted(unknown)}")
        if not DNS_LABEL.match(str(x.get("name", ""))):
            errs.append(f"listeners[{i}].name {x.get('name')!r} is not a DNS label")
    return errs


def validate_objects(r: Rendered) -> None:
    for o in r.objects:
        what = f"{r.chart}: {o['kind']} {o['metadata'].get('name')}"
        if builtin(o["apiVersion"]):
            bad = False
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(o, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    fail(f"{what}: Kubernetes {version} schema: {e.message} at {'.'.join(map(str, e.path))}")
                    bad = True
                except kubernetes_validate.SchemaNotFoundError:
                    fail(f"{what}: no schema for {o['apiVersion']} {o['kind']} in Kubernetes {version}")
                    bad = True
            if bad:
                continue
        elif o["kind"] == "Gateway":
            errs = check_gateway(o)
            if errs:
                for e in errs:
                    fail(f"{what}: {e}")
                continue
        else:
            fail(f"{what}: {o['apiVersion']} is neither built in nor checked here")
            continue
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition") \
                and o["metadata"].get("namespace") != r.namespace:
            fail(f"{what}: namespace {o['metadata'].get('namespace')!r}, not the release's {r.namespace}")
    ok(f"{r.chart}: {len(r.objects)} objects valid against Kubernetes {' and '.join(KUBE_VERSIONS)} "
       f"/ structural checks")


# ------------------------------------------------------------------ pods and flags

FAKE_FIELDS = {
    "spec.nodeName": "node-1",
    "status.hostIP": "10.1.0.1",
    "status.podIP": "10.244.1.7",
    "metadata.name": "pod-0",
    "spec.serviceAccountName": "sa",
}


def pod_spec(o: dict) -> dict | None:
    if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
        return o["spec"]["template"]["spec"]
    return None


def workloads(r: Rendered) -> list[tuple[dict, dict]]:
    return [(o, pod_spec(o)) for o in r.objects if pod_spec(o) is not None]


def container_env(c: dict, namespace: str) -> dict[str, str]:
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "fieldRef" in e.get("valueFrom", {}):
            fp = e["valueFrom"]["fieldRef"]["fieldPath"]
            if fp == "metadata.namespace":
                env[e["name"]] = namespace
            elif fp in FAKE_FIELDS:
                env[e["name"]] = FAKE_FIELDS[fp]
            else:
                raise ValueError(f"env {e['name']}: fieldRef {fp} has no stand-in here")
        else:
            raise ValueError(f"env {e['name']}: {e.get('valueFrom')} has no stand-in here")
    return env


def expand(s: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined variables only; $$ escapes."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, s)


def argv(c: dict, env: dict[str, str]) -> list[str]:
    return [expand(a, env) for a in list(c.get("command", [])) + list(c.get("args", []))]


def flag(args: list[str], name: str) -> list[str]:
    """Values of --name (as --name=v or --name v)."""
    out = []
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            out.append(a.split("=", 1)[1])
        elif a == f"--{name}" and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(args[i + 1])
    return out


def one_flag(args: list[str], name: str, default: str | None = None) -> str | None:
    v = flag(args, name)
    return v[-1] if v else default


def binary(cmd0: str) -> str:
    return os.path.join(BIN, os.path.basename(cmd0))


# A private mount namespace (tmpfs over /run and /sys/fs/bpf: nothing the
# binary creates there reaches the host) and a network namespace of its own.
SANDBOX = ("mount -t tmpfs tmpfs /run && (mount -t tmpfs tmpfs /sys/fs/bpf || true) "
           "&& ip link set lo up && exec \"$@\"")


def accepts_flags(cmd: list[str], env: dict[str, str], wait: float = 4.0) -> tuple[bool, str]:
    """Runs the binary; False with its stderr if clap refused the command line."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    p = subprocess.Popen(["unshare", "--mount", "--net", "--fork", "sh", "-c", SANDBOX, "sh", *cmd],
                         env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=wait)
        code = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        code = None  # still running: it got past argument parsing
    text = err.decode(errors="replace")
    usage = code == 2 or "\nUsage: " in text or text.startswith("error: ")
    return not usage, text


def check_flags(r: Rendered, skipped: set[str]) -> None:
    for o, spec in workloads(r):
        for c in spec.get("initContainers", []) + spec["containers"]:
            what = f"{r.chart}: {o['kind']} {o['metadata']['name']}/{c['name']}"
            env = container_env(c, r.namespace)
            cmd = argv(c, env)
            if not cmd:
                fail(f"{what}: no command (the image has no entrypoint)")
                continue
            b = binary(cmd[0])
            if not os.path.exists(b):
                name = os.path.basename(cmd[0])
                if name in OPTIONAL_BINARIES:
                    skipped.add(name)
                    print(f"  skip {what}: {b} not built (yet)")
                    continue
                fail(f"{what}: {b} does not exist (build the workspace first)")
                continue
            # Paths under the container's mounts moved to scratch
            # directories: nothing the binary creates reaches the host.
            with tempfile.TemporaryDirectory(prefix="charts-flags-") as d:
                objs = {(x["kind"], x["metadata"].get("namespace"), x["metadata"]["name"]): x for x in r.objects}
                mounts = materialize(spec, c, objs, r.namespace, d, strict=False)
                accepted, err = accepts_flags([b, *(relocate(a, mounts) for a in cmd[1:])], env)
            if accepted:
                ok(f"{what}: {os.path.basename(b)} accepts {' '.join(cmd[1:])}")
            else:
                fail(f"{what}: {os.path.basename(b)} refused its command line: {err.strip()[:600]}")


# ------------------------------------------------------------------ the control plane's kinds


def plural(kind: str) -> str:
    k = kind.lower()
    if k.endswith("y") and k[-2] not in "aeiou":
        return k[:-1] + "ies"
    if k.endswith("s"):
        return k + "es"
    return k + "s"


def openapi_group(module: str) -> str:
    """k8s_openapi::api::<module>::<version> -> API group."""
    return {"core": "", "apps": "apps", "batch": "batch", "policy": "policy",
            "autoscaling": "autoscaling"}.get(module, f"{module}.k8s.io")


def typed_imports(src: str) -> list[tuple[str, str]]:
    """(group, kind) of every k8s-openapi API type a Rust file imports."""
    out = []
    for m in re.finditer(r"use\s+k8s_openapi::api::(\w+)::(\w+)::(\{[^}]*\}|\w+)\s*;", src):
        names = [n.strip() for n in m.group(3).strip("{}").split(",") if n.strip()]
        for n in names:
            if not re.search(r"(Spec|Status|List|Condition)$", n):
                out.append((openapi_group(m.group(1)), n))
    return out


def watched_kinds() -> dict[tuple[str, str], set[str]]:
    """{(group, resource): verbs} the control plane needs, read from its source:
    every kind its Kubernetes source watches (list, watch), and what its
    TokenReview auth creates."""
    need: dict[tuple[str, str], set[str]] = {}
    kube_files = [f for f in glob.glob(os.path.join(ROOT, "xds/src/kube.rs"))
                  + glob.glob(os.path.join(ROOT, "xds/src/kube/**/*.rs"), recursive=True)
                  if not f.endswith("tests.rs")]
    if not kube_files:
        raise RuntimeError("no Kubernetes source in xds/src (kube.rs or kube/)")
    for f in kube_files:
        src = open(f).read()
        # The typed kinds of a file that runs reflectors are watched; another
        # file's (the waypoint controller's) are only what its calls ask.
        if re.search(r"\b(watcher::watcher|reflector::reflector)\s*\(", src):
            for g, k in typed_imports(src):
                need.setdefault((g, plural(k)), set()).update({"list", "watch"})
        for m in re.finditer(r'\(\s*"([a-z0-9.-]+)"\s*,\s*"(v\d\w*)"\s*,\s*"([A-Z]\w*)"\s*,?\s*\)', src):
            need.setdefault((m.group(1), plural(m.group(3))), set()).update({"list", "watch"})
    if not any(g == "" for g, _ in need) or not any("." in g and not g.endswith(".k8s.io") for g, _ in need):
        raise RuntimeError(f"read only {sorted(need)} from {kube_files}: has the Kubernetes source changed shape?")
    for key, verbs in api_calls([os.path.join(ROOT, "xds/src/auth.rs")] + kube_files).items():
        need.setdefault(key, set()).update(verbs)
    if "create" not in need.get(("authentication.k8s.io", "tokenreviews"), set()):
        raise RuntimeError("no TokenReview creation found in xds/src/auth.rs: has it changed shape?")
    if not {"create", "patch"} <= need.get(("apps", "deployments"), set()):
        raise RuntimeError("no server-side apply of Deployments found in xds/src/kube: has the waypoint "
                           "controller changed shape?")
    return need


# kube-rs Api methods -> (RBAC verb, subresource)
KUBE_VERBS = {"get": ("get", ""), "get_opt": ("get", ""), "list": ("list", ""), "watch": ("watch", ""),
              "create": ("create", ""), "patch": ("patch", ""), "replace": ("update", ""),
              "delete": ("delete", ""), "patch_status": ("patch", "/status"),
              "replace_status": ("update", "/status")}


DYNAMIC_KIND = re.compile(r'\(\s*"([a-z0-9.-]+)"\s*,\s*"(v\d\w*)"\s*,\s*"([A-Z]\w*)"\s*,?\s*\)')


def api_calls(files: list[str]) -> dict[tuple[str, str], set[str]]:
    """{(group, resource): verbs} of the kube-rs `Api` calls in Rust files:
    `Api::<K>::all(..).create(..)`, and `let x: Api<K> = ..; x.get(..)`.
    K is an imported k8s-openapi type, or DynamicObject in a file that
    names one kind as a ("group", "version", "Kind") tuple. A patch in a
    file that uses `Patch::Apply` is a server-side apply, which creates
    the object when it is missing: create and patch."""
    need: dict[tuple[str, str], set[str]] = {}
    for f in files:
        src = open(f).read()
        kinds = {k: (g, k) for g, k in typed_imports(src)}
        dynamic = {(g, k) for g, _, k in DYNAMIC_KIND.findall(src)}
        if len(dynamic) == 1:
            kinds["DynamicObject"] = next(iter(dynamic))
        applies = re.search(r"\bPatch::Apply\s*\(", src) is not None

        def add(kind: str, method: str) -> None:
            if kind in kinds and method in KUBE_VERBS:
                verb, sub = KUBE_VERBS[method]
                group, k = kinds[kind]
                verbs = need.setdefault((group, plural(k) + sub), set())
                verbs.add(verb)
                if applies and method == "patch":
                    verbs.add("create")

        for m in re.finditer(r"Api::<(\w+)>::\w+\(", src):
            depth, i = 1, m.end()
            while i < len(src) and depth:
                depth += {"(": 1, ")": -1}.get(src[i], 0)
                i += 1
            call = re.match(r"\s*\.\s*(\w+)\s*\(", src[i:])
            if call:
                add(m.group(1), call.group(1))
        for m in re.finditer(r"let\s+(?:mut\s+)?(\w+)\s*:\s*Api<(\w+)>", src):
            for call in re.finditer(rf"\b{m.group(1)}\s*\.\s*(\w+)\s*\(", src[m.end():]):
                add(m.group(2), call.group(1))
        # kube-rs watchers (kube::runtime::watcher) list and watch every
        # `Api::<K>` built in a file that runs one.
        if re.search(r"\bwatcher::watcher\s*\(", src):
            for m in re.finditer(r"Api::<(\w+)>::\w+\(", src):
                add(m.group(1), "list")
                add(m.group(1), "watch")
    return need


def cni_api_calls() -> dict[tuple[str, str], set[str]]:
    """What the CNI plugin (and its installer) ask of the API server."""
    files = [f for f in glob.glob(os.path.join(ROOT, "cni/src/**/*.rs"), recursive=True)
             if not f.endswith("tests.rs")]
    return api_calls(files)


def dynamic_kinds() -> list[tuple[str, str, str]]:
    out = []
    for f in glob.glob(os.path.join(ROOT, "xds/src/kube.rs")) + glob.glob(
            os.path.join(ROOT, "xds/src/kube/**/*.rs"), recursive=True):
        if f.endswith("tests.rs"):
            continue
        for m in re.finditer(r'\(\s*"([a-z0-9.-]+)"\s*,\s*"(v\d\w*)"\s*,\s*"([A-Z]\w*)"\s*,?\s*\)', open(f).read()):
            out.append(m.groups())
    return out


def rbac_allows(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    for r in rules:
        if (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", [])) \
                and (resource in r.get("resources", []) or "*" in r.get("resources", [])) \
                and (verb in r.get("verbs", []) or "*" in r.get("verbs", [])):
            return True
    return False


def rules_for(objs: list[dict], namespace: str, sa: str) -> list[dict]:
    roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterRole"}
    rules = []
    for b in (o for o in objs if o["kind"] == "ClusterRoleBinding"):
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == namespace
               for s in b.get("subjects", [])):
            role = roles.get(b["roleRef"]["name"])
            if role:
                rules += role.get("rules", [])
    return rules


# ------------------------------------------------------------------ cross-chart consistency


def duration_secs(s: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", s.strip())
    if not m:
        raise ValueError(f"{s!r} is not a duration")
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def the_container(r: Rendered, binary_name: str) -> tuple[dict, dict, dict, list[str]]:
    for o, spec in workloads(r):
        for c in spec["containers"]:
            if c.get("command") and os.path.basename(c["command"][0]) == binary_name:
                env = container_env(c, r.namespace)
                return o, spec, c, argv(c, env)
    raise LookupError(f"{r.chart}: no container runs {binary_name}")


def mount_for(spec: dict, c: dict, path: str) -> tuple[dict, str] | None:
    """The volume behind `path` in container c, and the path inside it."""
    best = None
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]["mountPath"].rstrip("/")):
                best = (m, path[len(mp):].lstrip("/"))
    if best is None:
        return None
    vol = next((v for v in spec.get("volumes", []) if v["name"] == best[0]["name"]), None)
    return (vol, best[1]) if vol else None


def host_path(spec: dict, c: dict, path: str) -> str | None:
    mf = mount_for(spec, c, path)
    if not mf or "hostPath" not in mf[0]:
        return None
    return os.path.join(mf[0]["hostPath"]["path"], mf[1]) if mf[1] else mf[0]["hostPath"]["path"]


def token_audience(spec: dict, c: dict, token_file: str) -> str | None:
    mf = mount_for(spec, c, token_file)
    if not mf or "projected" not in mf[0]:
        return None
    for s in mf[0]["projected"]["sources"]:
        t = s.get("serviceAccountToken")
        if t and t.get("path") == mf[1]:
            return t.get("audience")
    return None


def configmap_file(spec: dict, c: dict, path: str) -> tuple[str, str] | None:
    """(ConfigMap name, key) a file path reads, if it is a ConfigMap volume."""
    mf = mount_for(spec, c, path)
    if not mf or "configMap" not in mf[0]:
        return None
    cm = mf[0]["configMap"]
    for it in cm.get("items", []):
        if it["path"] == mf[1]:
            return cm["name"], it["key"]
    return cm["name"], mf[1]


def consistency(sc: dict[str, Rendered]) -> list[str]:
    errs: list[str] = []
    cp, zt, cni, wp = sc["control-plane"], sc["ztunnel"], sc["cni"], sc["waypoint"]
    cp_o, cp_spec, cp_c, cp_args = the_container(cp, "xds")
    cp_labels = cp_o["spec"]["template"]["metadata"]["labels"]
    listen_port = int(one_flag(cp_args, "listen", "0.0.0.0:15012").rsplit(":", 1)[1])
    metrics_port = int(one_flag(cp_args, "metrics-addr", "0.0.0.0:15014").rsplit(":", 1)[1])
    server_names = ",".join(flag(cp_args, "server-names") or ["istiod.istio-system.svc,localhost"]).split(",")
    audience = one_flag(cp_args, "token-audience", "istio-ca")
    trust_domain = one_flag(cp_args, "trust-domain", "cluster.local")
    cluster_domain = one_flag(cp_args, "cluster-domain", "cluster.local")
    trusted = ",".join(flag(cp_args, "trusted-node-accounts") or ["istio-system/ztunnel"]).split(",")

    # The Service in front of the control plane's xDS port.
    def cport_number(port) -> int | None:
        if isinstance(port, int):
            return port
        for p in cp_c.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
        return None

    endpoints = {}  # "host:port" -> Service port
    for s in cp.of_kind("Service"):
        if not matches(s["spec"].get("selector", {}), cp_labels):
            continue
        for p in s["spec"]["ports"]:
            if cport_number(p.get("targetPort", p["port"])) == listen_port:
                base = f"{s['metadata']['name']}.{s['metadata']['namespace']}.svc"
                for host in (base, f"{base}.{cluster_domain}"):
                    endpoints[f"{host}:{p['port']}"] = p
    if not endpoints:
        errs.append(f"control-plane: no Service selects the xds pods on its --listen port {listen_port}")

    # Its readiness probe is on the port it serves metrics on.
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        pr = cp_c.get(probe, {}).get("httpGet")
        if pr and cport_number(pr["port"]) != metrics_port:
            errs.append(f"control-plane: {probe} on port {pr['port']}, but xds serves HTTP on {metrics_port}")

    # Its CA root: the Secret volume behind --ca-cert/--ca-key.
    secrets = {s["metadata"]["name"]: s for s in cp.of_kind("Secret")}
    root_pem = None
    for f in ("ca-cert", "ca-key"):
        path = one_flag(cp_args, f)
        mf = mount_for(cp_spec, cp_c, path) if path else None
        if not mf or "secret" not in mf[0]:
            errs.append(f"control-plane: --{f} {path} is not in a Secret volume")
            continue
        sec = secrets.get(mf[0]["secret"]["secretName"])
        if sec is not None and mf[1] not in sec.get("data", {}):
            errs.append(f"control-plane: Secret {sec['metadata']['name']} has no {mf[1]} for --{f}")
    cms = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for r in sc.values() for o in r.of_kind("ConfigMap")}
    cp_root = cms.get((cp.namespace, "istio-ca-root-cert"))
    if cp_root is None:
        errs.append("control-plane: no ConfigMap istio-ca-root-cert publishing the root")
    else:
        root_pem = cp_root["data"].get("root-cert.pem")
        sec = next(iter(secrets.values()), None)
        if sec is not None and base64.b64decode(sec["data"]["ca-cert.pem"]).decode().strip() != (root_pem or "").strip():
            errs.append("control-plane: the published root-cert.pem is not the Secret's ca-cert.pem")

    # The RBAC of its service account covers every kind its source watches.
    rules = rules_for(cp.objects, cp.namespace, cp_spec.get("serviceAccountName", "default"))
    for (g, res), verbs in sorted(watched_kinds().items()):
        for v in sorted(verbs):
            if not rbac_allows(rules, g, res, v):
                errs.append(f"control-plane: its ClusterRole does not allow {v} on {res}.{g or 'core'}")

    # Clients: ztunnel and the waypoint.
    for r, name in ((zt, "ztunnel"), (wp, "waypoint")):
        o, spec, c, args = the_container(r, name)
        for f in ("xds-address", "ca-address"):
            url = one_flag(args, f)
            u = urlparse(url or "")
            if u.scheme != "https" or f"{u.hostname}:{u.port}" not in endpoints:
                errs.append(f"{name}: --{f} {url} is not the control plane's Service (https://"
                            f"{' or '.join(endpoints) or '?'})")
        sn = one_flag(args, "xds-server-name", "istiod.istio-system.svc")
        if sn not in server_names:
            errs.append(f"{name}: --xds-server-name {sn} is not in the control plane's --server-names {server_names}")
        tok = one_flag(args, "xds-token-file")
        aud = token_audience(spec, c, tok) if tok else None
        if aud != audience:
            errs.append(f"{name}: the token {tok} is for audience {aud!r}, the control plane reviews {audience!r}")
        root = one_flag(args, "xds-root-cert")
        cmk = configmap_file(spec, c, root) if root else None
        if cmk is None:
            errs.append(f"{name}: --xds-root-cert {root} is not from a ConfigMap")
        else:
            cm = cms.get((r.namespace, cmk[0]))
            if cm is not None:
                if cm["data"].get(cmk[1], "").strip() != (root_pem or "").strip():
                    errs.append(f"{name}: ConfigMap {cmk[0]} does not hold the control plane's root")
            elif r.namespace == cp.namespace:
                errs.append(f"{name}: reads ConfigMap {cmk[0]}, which the control plane does not publish")
            elif cmk != ("istio-ca-root-cert", "root-cert.pem"):
                errs.append(f"{name}: reads ConfigMap {cmk[0]}/{cmk[1]}, neither rendered nor Istio's copy")
        sa = spec.get("serviceAccountName", "default")
        if name == "ztunnel":
            td = one_flag(args, "trust-domain", "cluster.local")
            if td != trust_domain:
                errs.append(f"ztunnel: --trust-domain {td}, the control plane's is {trust_domain}")
            if f"{r.namespace}/{sa}" not in trusted:
                errs.append(f"ztunnel: its account {r.namespace}/{sa} is not in the control plane's "
                            f"--trusted-node-accounts {trusted}")
        else:
            want = f"spiffe://{trust_domain}/ns/{r.namespace}/sa/{sa}"
            if one_flag(args, "identity") != want:
                errs.append(f"waypoint: --identity {one_flag(args, 'identity')}, its account's is {want}")
        # Readiness on the binary's readiness port; termination after the drain.
        ready = int(one_flag(args, "readiness-addr", "[::]:15021").rsplit(":", 1)[1])
        pr = c.get("readinessProbe", {}).get("httpGet", {})
        if pr.get("port") != ready or pr.get("path") != "/healthz/ready":
            errs.append(f"{name}: readiness probe {pr}, the binary serves /healthz/ready on {ready}")
        ann = o["spec"]["template"]["metadata"].get("annotations", {})
        mport = one_flag(args, "metrics-addr", "[::]:15020").rsplit(":", 1)[1]
        if ann.get("prometheus.io/port") != mport:
            errs.append(f"{name}: prometheus.io/port {ann.get('prometheus.io/port')}, metrics are on {mport}")
        drain = duration_secs(one_flag(args, "drain-timeout", "30s"))
        if spec.get("terminationGracePeriodSeconds", 30) <= drain:
            errs.append(f"{name}: terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds', 30)}"
                        f" does not outlast --drain-timeout ({drain}s)")

    # ztunnel's in-pod state on the host, and the socket the CNI plugin uses.
    _, zspec, zc, zargs = the_container(zt, "ztunnel")
    sock = one_flag(zargs, "inpod-socket")
    if not sock:
        errs.append("ztunnel: no --inpod-socket (in-pod mode is off)")
    for f, default in (("inpod-bpf-dir", "/sys/fs/bpf/ztunnel"), ("inpod-state-dir", "/var/run/ztunnel/pods")):
        p = one_flag(zargs, f, default)
        if host_path(zspec, zc, p) is None:
            errs.append(f"ztunnel: --{f} {p} is not on a hostPath (lost on restart)")
    zsock_host = host_path(zspec, zc, sock) if sock else None
    if sock and zsock_host is None:
        errs.append(f"ztunnel: --inpod-socket {sock} is not on a hostPath: the CNI plugin cannot reach it")
    _, nspec, nc, nargs = the_container(cni, "ztunnel-cni-install")
    nsock = one_flag(nargs, "ztunnel-socket", "/var/run/ztunnel/ztunnel.sock")
    if zsock_host and nsock != zsock_host:
        errs.append(f"cni: --ztunnel-socket {nsock}, but ztunnel listens at {zsock_host} on the host")
    for f in ("cni-bin-dir", "cni-conf-dir"):
        p = one_flag(nargs, f)
        if not p or host_path(nspec, nc, p) is None:
            errs.append(f"cni: --{f} {p} is not a host directory")
    # The installer's node agent (NODE_NAME set) enrolls running pods: it
    # dials ztunnel at the host's path and reads the host's /proc and
    # cgroup2 tree.
    if any(e.get("name") == "NODE_NAME" for e in nc.get("env", [])):
        if host_path(nspec, nc, nsock) != nsock:
            errs.append(f"cni: ztunnel's socket {nsock} is not mounted at its host path in the installer")
        for f, default, want in (("proc-dir", "/host/proc", "/proc"),
                                 ("cgroup-dir", "/host/sys/fs/cgroup", "/sys/fs/cgroup")):
            p = one_flag(nargs, f, default)
            if host_path(nspec, nc, p) != want:
                errs.append(f"cni: --{f} {p} is not the host's {want}")
    conf = one_flag(nargs, "cni-conf-dir")
    conf_host = host_path(nspec, nc, conf) if conf else None
    said = one_flag(nargs, "host-cni-conf-dir", re.sub(r"^/host(?=/)", "", conf or ""))
    if conf_host and said != conf_host:
        errs.append(f"cni: --host-cni-conf-dir {said}, but --cni-conf-dir {conf} is the host's {conf_host}")
    crules = rules_for(cni.objects, cni.namespace, nspec.get("serviceAccountName", "default"))
    cni_need = cni_api_calls()
    for res in ("pods", "namespaces"):
        cni_need.setdefault(("", res), set()).add("get")
    for (g, res), verbs in sorted(cni_need.items()):
        for v in sorted(verbs):
            if not rbac_allows(crules, g, res, v):
                errs.append(f"cni: the plugin's account may not {v} {res}.{g or 'core'} (cni/src asks)")

    # The waypoint: Gateway, Service named like it, pods the control plane recognises.
    gws = wp.of_kind("Gateway")
    wo, wspec, wc, wargs = the_container(wp, "waypoint")
    wlabels = wo["spec"]["template"]["metadata"]["labels"]
    for gw in gws:
        gname = gw["metadata"]["name"]
        if wlabels.get("gateway.networking.k8s.io/gateway-name") != gname:
            errs.append(f"waypoint: pods lack gateway.networking.k8s.io/gateway-name={gname}")
        if wlabels.get("istio.io/dataplane-mode") != "none":
            errs.append("waypoint: pods are not labelled istio.io/dataplane-mode=none (ztunnel would capture them)")
        svc = next((s for s in wp.of_kind("Service") if s["metadata"]["name"] == gname), None)
        hbone = int(one_flag(wargs, "hbone-addr", "[::]:15008").rsplit(":", 1)[1])
        if svc is None:
            errs.append(f"waypoint: no Service named {gname} (the control plane sends traffic to {gname}.<ns>.svc)")
        else:
            if not matches(svc["spec"].get("selector", {}), wlabels):
                errs.append(f"waypoint: Service {gname} does not select the waypoint pods")
            ports = {p["port"]: p for p in svc["spec"]["ports"]}
            tp = ports.get(15008, {}).get("targetPort")
            cports = {p["name"]: p["containerPort"] for p in wc.get("ports", [])}
            if cports.get(tp, tp) != hbone:
                errs.append(f"waypoint: Service port 15008 does not reach --hbone-addr port {hbone}")
        # Deployed by hand (this chart): it must say so, or the control
        # plane deploys a second Deployment and Service for it.
        svc_host = f"{gname}.{wp.namespace}.svc"
        hosts = [a.get("value", "") for a in gw["spec"].get("addresses", []) if a.get("type") == "Hostname"]
        if not any(h == svc_host or h.startswith(svc_host + ".") for h in hosts):
            errs.append(f"waypoint: the Gateway has no Hostname address naming its Service {svc_host} "
                        f"({hosts}): the control plane would deploy it as well")
    if not gws:
        errs.append("waypoint: no Gateway")

    # The waypoints the control plane deploys dial it like the chart's do.
    for f in ("waypoint-xds-address",):
        url = one_flag(cp_args, f, "https://istiod.istio-system.svc:15012")
        u = urlparse(url or "")
        if u.scheme != "https" or f"{u.hostname}:{u.port}" not in endpoints:
            errs.append(f"control-plane: --{f} {url} is not its own Service (https://{' or '.join(endpoints) or '?'})")
    sn = one_flag(cp_args, "waypoint-xds-server-name", "istiod.istio-system.svc")
    if sn not in server_names:
        errs.append(f"control-plane: --waypoint-xds-server-name {sn} is not in its --server-names {server_names}")
    img = one_flag(cp_args, "waypoint-image", "ambient-mesh")
    if img != cp_c["image"]:
        errs.append(f"control-plane: --waypoint-image {img} is not its own image {cp_c['image']} (one image runs all)")

    # The CRDs the control plane's source needs: ours (base), or Gateway API (the user's).
    served = {(o["spec"]["group"], v["name"], o["spec"]["names"]["kind"])
              for o in sc["base"].of_kind("CustomResourceDefinition") for v in o["spec"]["versions"] if v["served"]}
    for g, v, k in dynamic_kinds():
        if g != GATEWAY_GROUP and (g, v, k) not in served:
            errs.append(f"base: no CRD serves {g}/{v} {k}, which the control plane watches")
    return errs


# ------------------------------------------------------------------ running the mesh

NODE_TOKEN = "charts-test-token"


def materialize(spec: dict, c: dict, objs: dict[tuple[str, str, str], dict], namespace: str,
                d: str, strict: bool = True) -> list[tuple[str, str]]:
    """Writes the container's volumes under d as the kubelet would mount
    them; returns (mountPath, local dir), longest first. A ConfigMap or
    Secret that is not in objs is an error, or (not strict) empty."""
    out = []
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = vols[m["name"]]
        local = os.path.join(d, "vol-" + m["name"])
        os.makedirs(local, exist_ok=True)
        files: dict[str, bytes] = {}
        if "configMap" in v or "secret" in v:
            kind, ref = ("ConfigMap", v["configMap"]["name"]) if "configMap" in v else ("Secret", v["secret"]["secretName"])
            o = objs.get((kind, namespace, ref))
            if o is None and not strict:
                o = {}
            if o is None:
                raise LookupError(f"{kind} {namespace}/{ref} (volume {m['name']}) is neither rendered nor expected")
            data = {k: (base64.b64decode(x) if kind == "Secret" else x.encode()) for k, x in o.get("data", {}).items()}
            src = v.get("configMap", v.get("secret"))
            items = src.get("items") or [{"key": k, "path": k} for k in data]
            files = {it["path"]: data[it["key"]] for it in items}
        elif "projected" in v:
            for srcs in v["projected"]["sources"]:
                if "serviceAccountToken" in srcs:
                    files[srcs["serviceAccountToken"]["path"]] = NODE_TOKEN.encode()
        for name, content in files.items():
            with open(os.path.join(local, name), "wb") as f:
                f.write(content)
        out.append((m["mountPath"].rstrip("/"), local))
    return sorted(out, key=lambda x: -len(x[0]))


def relocate(arg: str, mounts: list[tuple[str, str]]) -> str:
    """A path in an argument, moved from a mount path to its local dir."""
    head, sep, val = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    for mp, local in mounts:
        if val == mp or val.startswith(mp + "/"):
            val = local + val[len(mp):]
            break
    return f"{head}{sep}{val}"


def run_mesh(sc: dict[str, Rendered]) -> list[str]:
    """The rendered containers, started together in a private mount and
    network namespace: xds on the chart's CA root and server names (manifest
    source: the waypoint's Gateway, Service and a pod of its Deployment;
    node tokens instead of TokenReview, which needs an API server), then
    ztunnel and then the waypoint with their rendered command lines and
    mounts (ConfigMaps and Secrets as rendered, the projected token, host
    paths as empty directories), the control plane's DNS names resolving
    to it. Checks: no manifest errors, the TLS certificate verifies
    against the published root under the names the clients expect, and
    ztunnel and the waypoint each become ready (full xDS sync; for the
    waypoint, also its certificate from the CA)."""
    cp, zt, wp = sc["control-plane"], sc["ztunnel"], sc["waypoint"]
    _, cp_spec, cp_c, cp_args = the_container(cp, "xds")
    root = next(o for o in cp.of_kind("ConfigMap") if o["metadata"]["name"] == "istio-ca-root-cert")
    objs = {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]): o
            for r in sc.values() for o in r.objects if o["metadata"].get("namespace")}
    # What the README asks of the user: the root copied into the waypoint's namespace.
    copied = copy.deepcopy(root)
    copied["metadata"]["namespace"] = wp.namespace
    objs.setdefault(("ConfigMap", wp.namespace, "istio-ca-root-cert"), copied)
    clients = {"ztunnel": the_container(zt, "ztunnel"), "waypoint": the_container(wp, "waypoint")}
    names = [one_flag(a, "xds-server-name", "istiod.istio-system.svc") for _, _, _, a in clients.values()]
    hosts = sorted({urlparse(one_flag(a, f)).hostname for _, _, _, a in clients.values()
                    for f in ("xds-address", "ca-address")})
    errs = []
    with tempfile.TemporaryDirectory(prefix="charts-test-") as d:
        manifests = os.path.join(d, "manifests")
        os.mkdir(manifests)
        wo, wspec, _, _ = clients["waypoint"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": FAKE_FIELDS["metadata.name"], "namespace": wp.namespace,
                            "labels": wo["spec"]["template"]["metadata"]["labels"]},
               "spec": {"nodeName": FAKE_FIELDS["spec.nodeName"],
                        "serviceAccountName": wspec.get("serviceAccountName", "default"),
                        "containers": [{"name": "istio-proxy", "image": "ambient-mesh"}]},
               "status": {"phase": "Running", "podIP": FAKE_FIELDS["status.podIP"],
                          "podIPs": [{"ip": FAKE_FIELDS["status.podIP"]}],
                          "conditions": [{"type": "Ready", "status": "True"}]}}
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": wp.namespace}}
        docs = [ns, pod] + [o for o in wp.objects if o["kind"] in ("Gateway", "Service")]
        with open(os.path.join(manifests, "waypoint.yaml"), "w") as f:
            yaml.safe_dump_all(docs, f)
        with open(os.path.join(d, "tokens"), "w") as f:
            f.write(f"{FAKE_FIELDS['spec.nodeName']} {NODE_TOKEN}\n")
        with open(os.path.join(d, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {h}\n" for h in hosts))
        with open(os.path.join(d, "root.pem"), "w") as f:
            f.write(root["data"]["root-cert.pem"])
        # The control plane: its Secret volume where its flags point.
        cp_mounts = materialize(cp_spec, cp_c, objs, cp.namespace, os.path.join(d, "xds"))
        xds = [binary("xds"), "--manifests", manifests, "--tokens", os.path.join(d, "tokens")]
        xds += [relocate(a, cp_mounts) for a in cp_args[1:]
                if a not in ("--kubernetes", "--token-review")
                and not a.startswith(("--trusted-node-accounts", "--token-audience"))]
        metrics = one_flag(cp_args, "metrics-addr", "0.0.0.0:15014").rsplit(":", 1)[1]
        listen = one_flag(cp_args, "listen", "0.0.0.0:15012").rsplit(":", 1)[1]
        lines = ["set -u", "ip link set lo up", f"mount --bind {d}/hosts /etc/hosts",
                 f"{shlex.join(xds)} > {d}/xds.log 2>&1 & xpid=$!",
                 f"for i in $(seq 100); do curl -sf http://127.0.0.1:{metrics}/metrics >/dev/null && break; sleep 0.1; done",
                 f"curl -sS http://127.0.0.1:{metrics}/debug/errors > {d}/errors"]
        for n in names:
            lines.append(f"echo | openssl s_client -connect 127.0.0.1:{listen} -servername {shlex.quote(n)} "
                         f"-verify_hostname {shlex.quote(n)} -CAfile {d}/root.pem -verify_return_error "
                         f"> {d}/tls-{n} 2>&1")
        for name, (o, spec, c, args) in clients.items():
            r = zt if name == "ztunnel" else wp
            mounts = materialize(spec, c, objs, r.namespace, os.path.join(d, name))
            env = container_env(c, r.namespace)
            cmd = [binary(args[0])] + [relocate(a, mounts) for a in args[1:]]
            ready = one_flag(args, "readiness-addr", "[::]:15021").rsplit(":", 1)[1]
            lines += [f"env -i PATH=\"$PATH\" {shlex.join(f'{k}={v}' for k, v in env.items())} "
                      f"{shlex.join(cmd)} > {d}/{name}.log 2>&1 & pid=$!",
                      f"for i in $(seq 200); do curl -sf http://127.0.0.1:{ready}/healthz/ready >/dev/null "
                      f"&& touch {d}/{name}.ready && break; sleep 0.1; done",
                      "kill $pid; wait $pid"]
        lines.append("kill $xpid; wait $xpid")
        # The CNI installer as rendered (its binary may not be built yet):
        # it must chain the plugin into the node's primary config with
        # ztunnel's socket as the host sees it, and take it out on SIGTERM.
        cni = sc["cni"]
        _, nspec, nc, nargs = the_container(cni, "ztunnel-cni-install")
        installer = binary(nargs[0])
        if os.path.exists(installer):
            mounts = materialize(nspec, nc, objs, cni.namespace, os.path.join(d, "cni"))
            conf = relocate(one_flag(nargs, "cni-conf-dir"), mounts)
            bindir = relocate(one_flag(nargs, "cni-bin-dir"), mounts)
            primary = os.path.join(conf, "10-primary.conflist")
            with open(primary, "w") as f:
                json.dump({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "bridge"}]}, f)
            plugin = one_flag(nargs, "plugin-binary", "/usr/local/bin/ztunnel-cni")
            sa = "/run/secrets/kubernetes.io/serviceaccount"
            env = {**container_env(nc, cni.namespace), "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                   "KUBERNETES_SERVICE_PORT": "443"}
            # --ztunnel-socket is the host's path (written into the config
            # for the plugin, which runs on the host; the container mounts
            # its directory at that same path): not moved.
            cmd = [installer] + [a if a.startswith("--ztunnel-socket") else relocate(a, mounts)
                                 for a in nargs[1:]]
            lines += [
                # The image's files and the pod's service account, in this
                # mount namespace only.
                "mount -t tmpfs tmpfs /run",
                f"mkdir -p {sa} && echo {NODE_TOKEN} > {sa}/token && cp {d}/root.pem {sa}/ca.crt "
                f"&& echo {cni.namespace} > {sa}/namespace",
                f"mount -t tmpfs tmpfs {shlex.quote(os.path.dirname(plugin))}",
                f"cp {shlex.quote(binary('ztunnel-cni'))} {shlex.quote(plugin)}",
                f"env -i PATH=\"$PATH\" {shlex.join(f'{k}={v}' for k, v in env.items())} "
                f"{shlex.join(cmd)} > {d}/cni.log 2>&1 & pid=$!",
                f"for i in $(seq 100); do grep -q ztunnel-cni {primary} && [ -f {bindir}/ztunnel-cni ] && break; sleep 0.1; done",
                f"cp {primary} {d}/cni-installed.json",
                "kill -TERM $pid; wait $pid",
                f"cat {primary} > {d}/cni-removed.json",
            ]
        else:
            installer = None
        p = subprocess.Popen(["unshare", "--mount", "--net", "--fork", "sh", "-c", "\n".join(lines)],
                             start_new_session=True)
        try:
            p.wait(timeout=120)
        finally:
            # Nothing the script started outlives it, even if it failed.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()

        def log(name: str) -> str:
            p = os.path.join(d, f"{name}.log")
            return open(p).read()[-1500:] if os.path.exists(p) else "(no log)"

        if not os.path.exists(os.path.join(d, "errors")) or os.path.getsize(os.path.join(d, "errors")) == 0 \
                and not os.path.exists(os.path.join(d, f"tls-{names[0]}")):
            return [f"control plane did not serve; its log:\n{log('xds')}"]
        reported = open(os.path.join(d, "errors")).read().strip()
        if reported:
            errs.append(f"control plane: the rendered waypoint manifests have errors: {reported}")
        for n in names:
            # s_client's exit status also reflects how the server closed the
            # connection; the verification result is what counts.
            out = open(os.path.join(d, f"tls-{n}")).read()
            if "Verification: OK" not in out or "Verify return code: 0 (ok)" not in out:
                errs.append(f"control plane: TLS as {n} does not verify against the published root: {out[-800:]}")
        for name in clients:
            if not os.path.exists(os.path.join(d, f"{name}.ready")):
                errs.append(f"{name}: the rendered container did not become ready against the control plane; "
                            f"its log:\n{log(name)}\ncontrol plane's log:\n{log('xds')}")
        if installer:
            errs += check_installed(d, sc, log("cni"))
        if not errs:
            ok(f"control plane ran on the chart's CA root (certificate verified as {', '.join(sorted(set(names)))}, "
               f"waypoint manifests without errors); ztunnel and the waypoint, as rendered, became ready against it")
    return errs


def check_installed(d: str, sc: dict[str, Rendered], log: str) -> list[str]:
    """What the rendered CNI installer chained into the node's config."""
    _, zspec, zc, zargs = the_container(sc["ztunnel"], "ztunnel")
    sock = host_path(zspec, zc, one_flag(zargs, "inpod-socket") or "")
    _, nspec, nc, nargs = the_container(sc["cni"], "ztunnel-cni-install")
    conf_host = host_path(nspec, nc, one_flag(nargs, "cni-conf-dir") or "")
    try:
        installed = json.load(open(os.path.join(d, "cni-installed.json")))
        removed = json.load(open(os.path.join(d, "cni-removed.json")))
    except (OSError, ValueError) as e:
        return [f"cni: the installer's result cannot be read ({e}); its log:\n{log}"]
    ours = [p for p in installed.get("plugins", []) if p.get("type") == "ztunnel-cni"]
    errs = []
    if len(ours) != 1:
        return [f"cni: the installer did not chain ztunnel-cni once into the primary config: {installed}; "
                f"its log:\n{log}"]
    if ours[0].get("ztunnelSocket") != sock:
        errs.append(f"cni: the plugin would dial {ours[0].get('ztunnelSocket')}, ztunnel listens at {sock} (host)")
    kc = ours[0].get("kubeconfig", "")
    if conf_host is None or not kc.startswith(conf_host.rstrip("/") + "/"):
        errs.append(f"cni: the plugin's kubeconfig {kc!r} is not in the host's CNI conf dir {conf_host}")
    if any(p.get("type") == "ztunnel-cni" for p in removed.get("plugins", [])):
        errs.append(f"cni: the plugin is still chained after the installer's SIGTERM: {removed}")
    if not errs:
        ok(f"cni: the rendered installer chained ztunnel-cni (socket {sock}, kubeconfig {kc}) "
           f"and took it out on SIGTERM")
    return errs


# ------------------------------------------------------------------ scenarios


def scenarios(root_cert: str) -> dict[str, dict[str, tuple[str, dict]]]:
    """chart -> (namespace, values) for each consistent installation."""
    custom_cp = "mesh-cp"
    custom_ns = "mesh-system"
    addr = f"https://{custom_cp}.{custom_ns}.svc:15012"
    return {
        "defaults": {
            "base": ("istio-system", {}),
            "control-plane": ("istio-system", {}),
            "ztunnel": ("istio-system", {}),
            "cni": ("istio-system", {}),
            "waypoint": ("store", {}),
        },
        "custom": {
            "base": ("mesh-system", {"keepCRDs": False}),
            "control-plane": (custom_ns, {
                "name": custom_cp, "replicas": 1, "trustDomain": "example.org",
                "clusterDomain": "corp.local", "extraServerNames": ["xds.example.org"],
                "auth": {"tokenAudience": "mesh-xds", "trustedNodeAccounts": [f"{custom_ns}/zt"]},
                "maxCertTTL": "48h", "debounce": "50ms", "env": {"RUST_LOG": "debug"}, "logJSON": True,
                "image": {"repository": "registry.example.org/mesh/ambient", "tag": "dev"},
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "mesh", "operator": "Exists"}],
                "priorityClassName": "system-cluster-critical",
            }),
            "ztunnel": (custom_ns, {
                "name": "zt", "trustDomain": "example.org",
                "xds": {"address": addr, "serverName": "xds.example.org", "tokenAudience": "mesh-xds"},
                "drainTimeout": "2m", "certTTL": "12h", "workerThreads": 4, "logJSON": True,
                "inpod": {"socketDir": "/run/mesh", "exemptNodeIP": False, "exemptCIDRs": ["169.254.7.127/32", "fd00::1"]},
                "env": {"RUST_LOG": "info,access=warn"},
            }),
            "cni": (custom_ns, {
                "ztunnelSocket": "/run/mesh/ztunnel.sock",
                "cni": {"binDir": "/home/kubernetes/bin", "confDir": "/var/lib/rancher/k3s/agent/etc/cni/net.d"},
            }),
            "waypoint": ("reviews", {
                "name": "reviews-wp", "replicas": 1, "trustDomain": "example.org", "clusterDomain": "corp.local",
                "xds": {"address": f"https://{custom_cp}.{custom_ns}.svc.corp.local:15012",
                        "serverName": f"{custom_cp}.{custom_ns}.svc", "tokenAudience": "mesh-xds",
                        "rootCert": root_cert},
                "drainTimeout": "500ms", "logJSON": True, "waypointFor": "all", "pinWorkers": True,
            }),
        },
    }


def openssl_root(d: str) -> tuple[str, str]:
    """A root made as the README tells users to (EC P-256, PKCS#8)."""
    key, crt = os.path.join(d, "ca-key.pem"), os.path.join(d, "ca-cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", crt, "-days", "3650",
                    "-subj", "/O=example.org/CN=mesh root CA",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"],
                   check=True, capture_output=True)
    return open(crt).read(), open(key).read()


def run_scenario(name: str, charts: dict[str, tuple[str, dict]], skipped: set[str]) -> dict[str, Rendered]:
    print(f"== scenario {name}")
    sc = {}
    for chart in CHARTS:
        ns, values = charts[chart]
        errs = lint_chart(chart, values, ns)
        for e in errs:
            fail(f"{chart}: lint: {e}")
        if not errs:
            ok(f"{chart}: lint")
        sc[chart] = render(chart, values, ns)
        validate_objects(sc[chart])
        check_flags(sc[chart], skipped)
    errs = consistency(sc)
    for e in errs:
        fail(e)
    if not errs:
        ok("cross-chart consistency")
    for e in run_mesh(sc):
        fail(e)
    return sc


def check_ca_upgrades() -> None:
    """The root's choice when the cluster already has the Secret (what
    `lookup` returns on a real install, which an offline render cannot
    see): the chart's helper, rendered in a copy of the chart with the
    Secret handed in."""
    print("== the root on upgrade (Secret already in the cluster)")
    cert, key = base64.b64encode(b"CERT").decode(), base64.b64encode(b"KEY").decode()

    def secret(owner: str | None, data: dict) -> str:
        ann = f'(dict "meta.helm.sh/release-name" "{owner}")' if owner else "(dict)"
        pairs = " ".join(f'"{k}" "{v}"' for k, v in data.items())
        return f'(dict "metadata" (dict "annotations" {ann}) "data" (dict {pairs}))'

    cases = [
        ("ours, kept", {}, secret("control-plane", {"ca-cert.pem": cert, "ca-key.pem": key}),
         {"cert": "CERT", "key": "KEY", "create": True}),
        ("someone else's", {}, secret("other", {"ca-cert.pem": cert, "ca-key.pem": key}), "ca.existingSecret=true"),
        ("ours without a key", {}, secret("control-plane", {"ca-cert.pem": cert}), "has no ca-cert.pem and ca-key.pem"),
        ("existingSecret: its certificate", {"ca": {"existingSecret": True}}, secret(None, {"ca-cert.pem": cert}),
         {"cert": "CERT", "create": False}),
        ("values win over the Secret", {"ca": {"cert": "C2", "key": "K2"}},
         secret("control-plane", {"ca-cert.pem": cert, "ca-key.pem": key}), {"cert": "C2", "key": "K2", "create": True}),
    ]
    with tempfile.TemporaryDirectory() as d:
        chart = os.path.join(d, "control-plane")
        shutil.copytree(os.path.join(HERE, "control-plane"), chart)
        # Only the helper is under test; ca.yaml would ask the (empty) cluster.
        os.remove(os.path.join(chart, "templates", "ca.yaml"))
        for what, values, found, want in cases:
            with open(os.path.join(chart, "templates", "zz-case.yaml"), "w") as f:
                f.write('{{- if .Values.caseUnderTest }}\ncase: {{ include "cp.caFrom" (dict "ctx" . "found" '
                        + found + ') | quote }}\n{{- end }}\n')
            with open(os.path.join(chart, "values.schema.json")) as f:
                schema = json.load(f)
            schema["properties"]["caseUnderTest"] = {"type": "boolean"}
            with open(os.path.join(chart, "values.schema.json"), "w") as f:
                json.dump(schema, f)
            try:
                with Chart.load(chart) as c:
                    out = c.render(values={**values, "caseUnderTest": True}, name="control-plane",
                                   namespace="istio-system")
                got = json.loads(yaml.safe_load(out["control-plane/templates/zz-case.yaml"])["case"])
            except Exception as e:  # noqa: BLE001 - the engine's own error type
                got = str(e)
            if (isinstance(want, str) and isinstance(got, str) and want in got) or got == want:
                ok(f"root with a Secret in the cluster, {what}: {got if isinstance(got, dict) else 'refused'}")
            else:
                fail(f"root with a Secret in the cluster, {what}: got {got!r}, want {want!r}")


def self_checks(custom: dict[str, tuple[str, dict]]) -> None:
    """The checks catch what they are meant to."""
    print("== the checks can fail")
    # Custom control plane, but ztunnel and waypoint left at defaults; then
    # only the CNI installer left at its default socket.
    for left, want in ((("ztunnel", "waypoint"), ["--xds-address", "--ca-address", "--xds-server-name",
                                                  "audience", "--trust-domain", "--trusted-node-accounts",
                                                  "--identity", "--ztunnel-socket"]),
                       (("cni",), ["--ztunnel-socket"])):
        mixed = dict(custom)
        for chart in left:
            mixed[chart] = ("istio-system" if chart != "waypoint" else "store", {})
        sc = {c: render(c, v, ns) for c, (ns, v) in mixed.items()}
        errs = consistency(sc)
        missing = [w for w in want if not any(w in e for e in errs)]
        if missing:
            fail(f"{'/'.join(left)} at defaults: not caught: {missing}: {errs}")
        else:
            ok(f"{'/'.join(left)} at defaults against a custom control plane: {len(errs)} findings")
    # An RBAC rule missing.
    sc = {c: render(c, v, ns) for c, (ns, v) in custom.items()}
    for o in sc["control-plane"].objects:
        if o["kind"] == "ClusterRole":
            o["rules"] = [r for r in o["rules"] if "endpointslices" not in r["resources"]]
    if any("endpointslices" in e for e in consistency(sc)):
        ok("a ClusterRole without endpointslices is reported")
    else:
        fail("a ClusterRole without endpointslices was not reported")
    # A flag the binary does not have, and a value it refuses.
    for bad in (["--no-such-flag"], ["--drain-timeout=3x"]):
        accepted, _ = accepts_flags([binary("ztunnel"), "--node=n", *bad], {})
        if accepted:
            fail(f"ztunnel {' '.join(bad)} was taken as accepted")
        else:
            ok(f"ztunnel {' '.join(bad)} is refused")
    # A schema violation.
    sc = render("ztunnel", {}, "istio-system")
    ds = sc.of_kind("DaemonSet")[0]
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    try:
        kubernetes_validate.validate(ds, KUBE_VERSION, strict=True)
        fail("an unknown container field passed the schema")
    except kubernetes_validate.ValidationError:
        ok("an unknown container field fails the schema")
    # Values the templates refuse.
    for chart, values, ns in (("ztunnel", {"drainTimeout": "3x"}, "istio-system"),
                              ("control-plane", {"ca": {"cert": "x"}}, "istio-system"),
                              ("control-plane", {"ca": {"existingSecret": True}}, "istio-system")):
        try:
            render(chart, values, ns)
            fail(f"{chart} rendered with {values}")
        except Exception as e:  # noqa: BLE001 - the engine's own error type
            ok(f"{chart} refuses {values}: {str(e).splitlines()[0][:120]}")
    # The control plane run: another root published, a Gateway it refuses.
    sc = {c: render(c, v, ns) for c, (ns, v) in custom.items()}
    with tempfile.TemporaryDirectory() as d:
        other, _ = openssl_root(d)
    sc["control-plane"].of_kind("ConfigMap")[0]["data"]["root-cert.pem"] = other
    sc["waypoint"].of_kind("Gateway")[0]["spec"]["listeners"][0]["protocol"] = "HTTP"
    errs = run_mesh(sc)
    if any("does not verify" in e for e in errs) and any("manifests have errors" in e for e in errs) \
            and any(e.startswith("ztunnel: the rendered container did not become ready") for e in errs):
        ok("a foreign root (ztunnel not ready) and a Gateway the control plane refuses are reported")
    else:
        fail(f"a foreign root / a refused Gateway went unnoticed: {errs}")
    # A plugin that deleted pods would need a rule the cni chart does not
    # grant: reading the calls finds it.
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "evict.rs")
        with open(src, "w") as f:
            f.write("use k8s_openapi::api::core::v1::Pod;\n"
                    "async fn evict(c: Client) { let pods: Api<Pod> = Api::namespaced(c, \"ns\");\n"
                    "    pods\n        .delete(\"p\", &DeleteParams::default()).await; }\n")
        calls = api_calls([src])
    cni = render("cni", {}, "istio-system")
    rules = rules_for(cni.objects, "istio-system", "istio-cni-node")
    if calls.get(("", "pods")) == {"delete"} and not rbac_allows(rules, "", "pods", "delete"):
        ok("a pod delete in the plugin's source is read, and the cni ClusterRole does not grant it")
    else:
        fail(f"reading a pod delete from source: {calls}")
    # The waypoint controller's server-side applies and status writes are
    # read as create + patch, and patch on the status subresource.
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "deploy.rs")
        with open(src, "w") as f:
            f.write("use k8s_openapi::api::apps::v1::Deployment;\n"
                    "const GATEWAY: (&str, &str, &str) = (\"gateway.networking.k8s.io\", \"v1\", \"Gateway\");\n"
                    "async fn f(c: Client) { let ds: Api<Deployment> = Api::namespaced(c, \"ns\");\n"
                    "    ds.patch(\"w\", &pp, &Patch::Apply(&v)).await;\n"
                    "    let gws: Api<DynamicObject> = Api::namespaced_with(c, \"ns\", &ar);\n"
                    "    gws.patch_status(\"w\", &pp, &Patch::Apply(&s)).await; }\n")
        calls = api_calls([src])
    cp = render("control-plane", {}, "istio-system")
    cp_rules = rules_for(cp.objects, "istio-system", "istiod")
    no_create = [{**r, "verbs": [v for v in r["verbs"] if v != "create"]} if "deployments" in r["resources"] else r
                 for r in cp_rules]
    if calls == {("apps", "deployments"): {"create", "patch"},
                 ("gateway.networking.k8s.io", "gateways/status"): {"patch"}} \
            and rbac_allows(cp_rules, "apps", "deployments", "create") \
            and not rbac_allows(no_create, "apps", "deployments", "create"):
        ok("a server-side apply is read as create+patch, a DynamicObject Gateway's status write as "
           "patch gateways/status; a ClusterRole without create on deployments is told apart")
    else:
        fail(f"reading the waypoint controller's calls: {calls}")
    # The waypoint chart's Gateway without its Hostname address.
    sc = {c: render(c, v, ns) for c, (ns, v) in custom.items()}
    sc["waypoint"].of_kind("Gateway")[0]["spec"].pop("addresses")
    if any("would deploy it as well" in e for e in consistency(sc)):
        ok("a chart Gateway without its Hostname address (the control plane would deploy it too) is reported")
    else:
        fail("a chart Gateway without its Hostname address went unnoticed")
    # A kube-rs watcher on a kind is read as list + watch on it.
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "watch.rs")
        with open(src, "w") as f:
            f.write("use k8s_openapi::api::core::v1::Service;\n"
                    "fn w(c: Client) { let s = watcher::watcher(Api::<Service>::all(c), Default::default()); }\n")
        calls = api_calls([src])
    if calls.get(("", "services")) == {"list", "watch"} and not rbac_allows(rules, "", "services", "watch"):
        ok("a watcher in the plugin's source is read as list+watch, which the cni ClusterRole grants only on pods and namespaces")
    else:
        fail(f"reading a watcher from source: {calls}")
    # A misspelt value, a bad duration: refused by values.schema.json.
    for chart, values in (("ztunnel", {"drainTimout": "60s"}), ("waypoint", {"xds": {"adress": "x"}}),
                          ("control-plane", {"maxCertTTL": "30 days"})):
        try:
            render(chart, values, "istio-system")
            fail(f"{chart} rendered with {values}")
        except Exception as e:  # noqa: BLE001 - the engine's own error type
            ok(f"{chart} refuses {values}: {' '.join(str(e).split())[-90:]}")
    # The Gateway checks.
    gw = render("waypoint", {}, "store").of_kind("Gateway")[0]
    bad = copy.deepcopy(gw)
    bad["spec"]["listeners"][0]["protocol"] = "HTTP"
    if check_gateway(bad) and not check_gateway(gw):
        ok("a Gateway without an HBONE listener on 15008 is reported")
    else:
        fail("the Gateway check does not tell a waypoint Gateway from another")


def leaf_values(values: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += leaf_values(v, path + ".")
        else:
            out.append(path)
    return out


def check_readme() -> None:
    """charts/README.md documents every value of every chart (a value, or a
    map of them, in backticks in the chart's section)."""
    text = open(os.path.join(HERE, "README.md")).read()
    sections = dict(re.findall(r"^### (\S+)\n(.*?)(?=^### |^## |\Z)", text, re.M | re.S))
    for chart in CHARTS:
        with Chart.load(os.path.join(HERE, chart)) as c:
            values = c.values
        sec = sections.get(chart)
        if sec is None:
            fail(f"README.md: no section ### {chart}")
            continue
        parts = [p for p in leaf_values(values)]
        missing = [p for p in parts
                   if not any(f"`{'.'.join(p.split('.')[:i])}`" in sec for i in range(1, p.count('.') + 2))]
        if missing:
            fail(f"README.md: ### {chart} does not document {missing}")
        else:
            ok(f"README.md documents all {len(parts)} values of {chart}")


def binary_packages() -> dict[str, str]:
    """binary name -> workspace package that builds it."""
    ws = open(os.path.join(ROOT, "Cargo.toml")).read()
    members = re.findall(r'"([^"]+)"', re.search(r"members\s*=\s*\[([^\]]*)\]", ws).group(1))
    out = {}
    for m in members:
        toml = open(os.path.join(ROOT, m, "Cargo.toml")).read()
        pkg = re.search(r'^\[package\][^\[]*?^name\s*=\s*"([^"]+)"', toml, re.M | re.S).group(1)
        if os.path.exists(os.path.join(ROOT, m, "src/main.rs")):
            out[pkg] = pkg
        for b in re.finditer(r'^\[\[bin\]\][^\[]*?^name\s*=\s*"([^"]+)"', toml, re.M | re.S):
            out[b.group(1)] = pkg
        for f in glob.glob(os.path.join(ROOT, m, "src/bin/*.rs")) + glob.glob(os.path.join(ROOT, m, "src/bin/*/main.rs")):
            name = os.path.basename(f)[:-3] if not f.endswith("/main.rs") else os.path.basename(os.path.dirname(f))
            out[name] = pkg
    return out


def check_image(scs: list[dict[str, Rendered]], cf: str) -> list[str]:
    """The Containerfile (text cf) builds, with the right packages and
    features, and installs every binary the charts run, where they run it
    from."""
    build = re.search(r"cargo build --release[^&]*", cf.replace("\\\n", " "))
    if not build:
        return ["Containerfile: no `cargo build --release`"]
    pkgs = set(re.findall(r"-p\s+([\w-]+)", build.group(0)))
    features = set(re.findall(r"--features\s+([\w/,-]+)", build.group(0)))
    features = {f for group in features for f in group.split(",")}
    copied = set(re.findall(r"target/release/([\w-]+)", cf))
    dest = re.search(r"COPY --from=build /out/ (\S+)", cf)
    dest = dest.group(1).rstrip("/") if dest else None
    built_by = binary_packages()
    needed = set()
    for sc in scs:
        for r in sc.values():
            for _, spec in workloads(r):
                for c in spec["containers"]:
                    args = argv(c, container_env(c, r.namespace))
                    needed.add(args[0])
                    if one_flag(args, "plugin-binary"):
                        needed.add(one_flag(args, "plugin-binary"))
                    if os.path.basename(args[0]) == "xds" and ("--kubernetes" in args or "--token-review" in args) \
                            and "xds/kube" not in features:
                        needed.add("xds/kube")
    errs = []
    if "xds/kube" in needed:
        needed.remove("xds/kube")
        errs.append("the chart runs xds --kubernetes/--token-review, the image's xds is built without xds/kube")
    for path in sorted(needed):
        name = os.path.basename(path)
        if os.path.dirname(path) != dest:
            errs.append(f"{path}: the image installs binaries in {dest}")
        if name not in built_by:
            if name in OPTIONAL_BINARIES:
                print(f"  skip Containerfile: {name} is not in the workspace yet")
                continue
            errs.append(f"{name}: no workspace package builds it")
        elif built_by[name] not in pkgs:
            errs.append(f"{name}: its package {built_by[name]} is not built (-p)")
        if name not in copied:
            errs.append(f"{name}: not copied from target/release")
    if "waypoint" in copied and not re.search(r"scripts/pgo-waypoint\.sh\s+/out/waypoint\s", cf):
        errs.append("waypoint: not replaced in /out by its profile-guided build (scripts/pgo-waypoint.sh)")
    if not errs:
        ok(f"Containerfile builds and installs {', '.join(sorted(os.path.basename(p) for p in needed))}")
    return [f"Containerfile: {e}" for e in errs]


# What the waypoint chart renders at its defaults for the Gateway shop/waypoint:
# the control plane's waypoint controller must deploy the same pods and
# Service (xds/src/kube/tests.rs compares its objects with this file).
CONTROLLER_FIXTURE = os.path.join(ROOT, "xds/src/kube/testdata/waypoint-chart.yaml")


# Stands in for the root the control plane hands the waypoints it deploys.
FIXTURE_ROOT = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"


def chart_waypoint_objects() -> str:
    r = render("waypoint", {"xds": {"rootCert": FIXTURE_ROOT}}, "shop")
    docs = [o for o in r.objects if o["kind"] in ("ConfigMap", "ServiceAccount", "Deployment", "Service")]
    return ("# Written by charts/test.py --update-fixture: charts/waypoint at its defaults\n"
            "# with a root certificate, namespace shop. xds/src/kube/tests.rs compares the\n"
            "# waypoint controller's objects with it.\n" + yaml.safe_dump_all(docs, sort_keys=True))


def check_controller_fixture(update: bool) -> None:
    want = chart_waypoint_objects()
    if update:
        os.makedirs(os.path.dirname(CONTROLLER_FIXTURE), exist_ok=True)
        with open(CONTROLLER_FIXTURE, "w") as f:
            f.write(want)
    have = open(CONTROLLER_FIXTURE).read() if os.path.exists(CONTROLLER_FIXTURE) else ""
    if have == want:
        ok(f"{os.path.relpath(CONTROLLER_FIXTURE, ROOT)} is what the waypoint chart renders")
    else:
        fail(f"{os.path.relpath(CONTROLLER_FIXTURE, ROOT)} is not what the waypoint chart renders now: "
             "run charts/test.py --update-fixture, then make the control plane's waypoint controller "
             "(xds/src/kube/deploy.rs) deploy the same (cargo test -p xds --features kube --lib)")


def main() -> int:
    if os.geteuid() != 0:
        print("charts/test.py: run as root (it uses unshare)", file=sys.stderr)
        return 1
    for tool in ("unshare", "openssl", "curl", "ip"):
        if shutil.which(tool) is None:
            print(f"charts/test.py: {tool} is missing", file=sys.stderr)
            return 1
    print(f"binaries from {BIN}; Kubernetes schemas {', '.join(KUBE_VERSIONS)}")
    skipped: set[str] = set()
    with tempfile.TemporaryDirectory() as d:
        cert, key = openssl_root(d)
    print("== README")
    check_readme()
    print("== the control plane's waypoints")
    check_controller_fixture("--update-fixture" in sys.argv[1:])
    scs = scenarios(cert)
    defaults = run_scenario("defaults (root generated by the chart)", scs["defaults"], skipped)
    custom = dict(scs["custom"])
    ns, v = custom["control-plane"]
    custom["control-plane"] = (ns, {**v, "ca": {"cert": cert, "key": key}})
    customised = run_scenario("custom (own names, trust domain, audience, own root)", custom, skipped)
    print("== image")
    containerfile = open(os.path.join(HERE, "Containerfile")).read()
    for e in check_image([defaults, customised], containerfile):
        fail(e)
    bad = containerfile.replace(" --features xds/kube", "").replace(" -p waypoint", "")
    errs = check_image([defaults], bad)
    if any("xds/kube" in e for e in errs) and any("waypoint" in e for e in errs):
        ok("a Containerfile without xds/kube and without the waypoint package is reported")
    else:
        fail(f"a Containerfile without xds/kube and the waypoint package went unnoticed: {errs}")
    errs = check_image([defaults], containerfile.replace("scripts/pgo-waypoint.sh", "true"))
    if any("profile-guided" in e for e in errs):
        ok("a Containerfile that ships the plain waypoint is reported")
    else:
        fail(f"a Containerfile that ships the plain waypoint went unnoticed: {errs}")
    # The Secret made outside the chart: only its certificate is given.
    ext = dict(custom)
    ns, v = ext["control-plane"]
    ext["control-plane"] = (ns, {**v, "ca": {"existingSecret": True, "cert": cert, "secretName": "mesh-root"}})
    print("== scenario existing CA Secret")
    r = render("control-plane", ext["control-plane"][1], ns)
    validate_objects(r)
    if r.of_kind("Secret"):
        fail("control-plane: with ca.existingSecret the chart still writes a Secret")
    elif r.of_kind("ConfigMap")[0]["data"]["root-cert.pem"].strip() != cert.strip():
        fail("control-plane: with ca.existingSecret the published root is not ca.cert")
    else:
        ok("control-plane: ca.existingSecret: no Secret written, ca.cert published")
    check_ca_upgrades()
    self_checks(scs["custom"] | {"control-plane": custom["control-plane"]})
    if skipped:
        print(f"skipped (not built): {', '.join(sorted(skipped))}")
    if FAILURES:
        print(f"charts/test.py: {len(FAILURES)} failure(s)")
        return 1
    print("charts/test.py: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
