//! Loopback harness: a waypoint in-process, backends (hyper, HTTP/1.1 and
//! HTTP/2) on 127.0.0.1, and a client that reaches the waypoint the way a
//! ztunnel does: HBONE (mTLS with its own SPIFFE identity, HTTP/2 CONNECT
//! to the original destination), then HTTP/1.1 or HTTP/2 inside.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use waypoint::app::{build, start, Parts, Running};
use waypoint::config::{parse_yaml, Store};
use waypoint::h2io::H2Io;
use ztunnel::identity::{CaClient, Identity, LocalCa, SecretManager};
use ztunnel::proxy::pool::{Pool, PoolKey};

/// The service address clients "connect" to; only ever a CONNECT authority.
pub const VIP: &str = "10.96.0.10:80";
pub const TD: &str = "cluster.local";

pub fn id(sa: &str) -> Identity {
    Identity::new(TD, "default", sa)
}

pub fn ca() -> Arc<dyn CaClient> {
    Arc::new(LocalCa::generate(TD).unwrap())
}

pub async fn waypoint(ca: Arc<dyn CaClient>, yaml: &str, sa: &str) -> Running {
    waypoint_at(ca, yaml, sa, "127.0.0.1".parse().unwrap()).await
}

pub async fn waypoint_at(
    ca: Arc<dyn CaClient>,
    yaml: &str,
    sa: &str,
    ip: std::net::IpAddr,
) -> Running {
    let store = Store::empty();
    store.apply(&parse_yaml(yaml).unwrap()).unwrap();
    let proxy = build(Parts {
        identity: id(sa),
        ca,
        cert_ttl: Duration::from_secs(3600),
        own_ip: ip,
        mark: 0,
        pool_max_streams: 100,
        store,
    });
    let hbone = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start(proxy, hbone, vec![admin]).await.unwrap()
}

/// A backend's record of what it saw, and what it should answer next.
#[derive(Default)]
pub struct BackendState {
    pub hits: AtomicUsize,
    /// Statuses to answer with, in order, before falling back to 200.
    pub script: Mutex<VecDeque<u16>>,
    pub seen: Mutex<Vec<(String, HeaderMap)>>,
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
}

impl Backend {
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
    pub fn script(&self, codes: &[u16]) {
        self.state
            .script
            .lock()
            .unwrap()
            .extend(codes.iter().copied());
    }
    pub fn last_headers(&self) -> HeaderMap {
        self.state.seen.lock().unwrap().last().unwrap().1.clone()
    }
    pub fn last_path(&self) -> String {
        self.state.seen.lock().unwrap().last().unwrap().0.clone()
    }
}

type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Answers every request on every connection `l` accepts with `answer`
/// (HTTP/1.1 or HTTP/2), in the background.
pub fn serve<F, Fut, B>(l: TcpListener, answer: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let out = answer(req);
                    async move { Ok::<_, Infallible>(out.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

/// A backend answering `<name> <path>`; `x-delay-ms` delays the answer;
/// gRPC requests get a gRPC answer (`grpc-status: 0` trailer) naming the
/// backend and the method.
pub async fn backend(name: &str) -> Backend {
    backend_at(name, "127.0.0.1:0".parse().unwrap()).await
}

pub async fn backend_at(name: &str, at: SocketAddr) -> Backend {
    let l = TcpListener::bind(at).await.unwrap();
    let addr = l.local_addr().unwrap();
    let state = Arc::new(BackendState::default());
    let st = state.clone();
    let n = name.to_string();
    serve(l, move |req| {
        let (st, n) = (st.clone(), n.clone());
        async move { answer(&n, &st, req).await }
    });
    Backend {
        name: name.to_string(),
        addr,
        state,
    }
}

async fn answer(name: &str, st: &BackendState, req: Request<Incoming>) -> Response<RespBody> {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut seen = req.headers().clone();
    // HTTP/2 carries the host in `:authority`: record it as a header.
    if let Some(a) = req.uri().authority() {
        seen.insert("x-seen-authority", a.as_str().parse().unwrap());
    }
    st.seen.lock().unwrap().push((path.clone(), seen));
    if let Some(ms) = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"));
    let _ = req.into_body().collect().await;
    if grpc {
        let msg = format!("{name} {path}");
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(msg.as_bytes());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from(framed))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures::stream::iter(frames)).boxed();
        return Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap();
    }
    let code = st.script.lock().unwrap().pop_front().unwrap_or(200);
    Response::builder()
        .status(code)
        .header("x-backend", name)
        .body(Full::new(Bytes::from(format!("{name} {path}"))).boxed())
        .unwrap()
}

/// An HBONE client with its own identity, as a ztunnel would be.
pub struct Client {
    pub pool: Arc<Pool>,
    pub identity: Identity,
    pub waypoint: SocketAddr,
    pub waypoint_id: Identity,
}

pub fn client(ca: Arc<dyn CaClient>, sa: &str, wp: &Running) -> Client {
    let secrets = SecretManager::new(ca, Duration::from_secs(3600));
    Client {
        pool: Pool::new(secrets, 0, 100, Duration::from_secs(60)),
        identity: id(sa),
        waypoint: wp.hbone_addr,
        waypoint_id: wp.proxy.identity.clone(),
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Client {
    pub async fn tunnel(&self, target: &str) -> anyhow::Result<H2Io> {
        let key = PoolKey {
            src: self.identity.clone(),
            dst: vec![self.waypoint_id.clone()],
            next_hop: self.waypoint,
        };
        let (s, guard) = self
            .pool
            .connect(key, target.parse()?, "127.0.0.1".parse()?)
            .await?;
        // The guard only counts streams; the tunnel lives on without it.
        drop(guard);
        Ok(H2Io::new(s))
    }

    pub async fn h1(&self, target: &str) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let io = self.tunnel(target).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    pub async fn h2(&self, target: &str) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let io = self.tunnel(target).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }

    /// One HTTP/1.1 request on a fresh tunnel.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request("GET", path, headers, "").await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut s = self.h1(VIP).await;
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "echo.default.svc.cluster.local");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        send(&mut s, req).await
    }
}

pub async fn send(
    s: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    let resp = s.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A cluster of plain-TCP loopback endpoints, as YAML.
pub fn cluster(name: &str, eps: &[SocketAddr], extra: &str) -> String {
    let mut s = format!("  - name: {name}\n{extra}    load_assignment:\n      endpoints:\n        - lb_endpoints:\n");
    for e in eps {
        s.push_str(&format!(
            "            - endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}\n",
            e.ip(),
            e.port()
        ));
    }
    s
}

/// A listener with one HTTP chain for the VIP, the given RBAC filters,
/// routes (a YAML list indented for `routes:`) and clusters.
pub fn config(rbac: &str, routes: &str, clusters: &str) -> String {
    format!(
        r#"listeners:
  - name: waypoint
    filter_chains:
      - name: echo
        filter_chain_match: {{destination_port: 80, prefix_ranges: ["10.96.0.10/32"]}}
        http_connection_manager:
          route_config_name: echo
          max_request_headers_kb: 8
          rbac: {rbac}
route_configurations:
  - name: echo
    virtual_hosts:
      - name: echo
        domains: ["*"]
        routes:
{routes}
clusters:
{clusters}
"#
    )
}

pub async fn admin_get(wp: &Running, path: &str) -> String {
    let s = tokio::net::TcpStream::connect(wp.admin_addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(&mut sender, req).await.body
}
