//! The enrollment protocol (`proto/zds.proto`, shaped after Istio's ZDS):
//! messages, the server side ztunnel runs, and a small client for the CNI
//! plugin and tests.
//!
//! One message per `SOCK_SEQPACKET` packet. The client starts with a
//! [`ZdsHello`]; every [`WorkloadRequest`] then gets one
//! [`WorkloadResponse`] whose `Ack.error` is empty on success. An `add`
//! carries the pod's network namespace as exactly one `SCM_RIGHTS` fd.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use prost::Message;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tracing::{debug, info, warn};

include!(concat!(env!("OUT_DIR"), "/ambient.zds.rs"));

/// Largest message either side accepts (requests are a few hundred bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// What a server does with requests; implemented by the pod manager.
pub trait Handler: Send + Sync + 'static {
    /// `netns` is the fd that came with an `add` (if any).
    fn handle(
        &self,
        req: workload_request::Payload,
        netns: Option<OwnedFd>,
        resync: &mut Option<Vec<String>>,
    ) -> Result<(), String>;
}

/// Serves the enrollment socket at `path` (a stale socket file is replaced).
pub fn bind(path: &Path) -> anyhow::Result<UnixSeqpacketListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    UnixSeqpacketListener::bind(path)
        .with_context(|| format!("binding enrollment socket {}", path.display()))
}

pub async fn serve(mut listener: UnixSeqpacketListener, handler: Arc<dyn Handler>) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(conn, handler).await {
                        warn!(error = %format!("{e:#}"), "enrollment connection failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "enrollment accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn(conn: UnixSeqpacket, handler: Arc<dyn Handler>) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut anc = [0u8; 256];
    let (info, _) = conn.recv_with_ancillary(&mut buf, &mut anc).await?;
    if info.bytes_read() == 0 {
        return Ok(());
    }
    let hello = ZdsHello::decode(&buf[..info.bytes_read()]).context("decoding ZdsHello")?;
    if hello.version != Version::V1 as i32 {
        bail!("unsupported ZDS version {}", hello.version);
    }
    // Names seen since the last snapshot began, while a resync is under way.
    let mut resync: Option<Vec<String>> = None;
    loop {
        let (info, anc_reader) = conn.recv_with_ancillary(&mut buf, &mut anc).await?;
        let n = info.bytes_read();
        if n == 0 {
            return Ok(()); // peer closed
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in anc_reader.into_messages() {
            if let OwnedAncillaryMessage::FileDescriptors(f) = m {
                fds.extend(f);
            }
        }
        let result = if info.truncated() {
            Err(format!("message larger than {MAX_MESSAGE} bytes"))
        } else {
            match WorkloadRequest::decode(&buf[..n]) {
                Err(e) => Err(format!("decoding WorkloadRequest: {e}")),
                Ok(WorkloadRequest { payload: None }) => Err("empty WorkloadRequest".into()),
                Ok(WorkloadRequest {
                    payload: Some(payload),
                }) => {
                    let is_add = matches!(payload, workload_request::Payload::Add(_));
                    if is_add && fds.len() != 1 {
                        Err(format!(
                            "add needs exactly one network namespace fd, got {}",
                            fds.len()
                        ))
                    } else if !is_add && !fds.is_empty() {
                        Err("only add carries a file descriptor".into())
                    } else {
                        debug!(request = ?payload, "enrollment request");
                        // Setting up a pod blocks (netns switches, program
                        // loads): keep it off the data plane's workers.
                        let h = handler.clone();
                        let fd = fds.pop();
                        let mut rs = resync.take();
                        let (r, rs) = tokio::task::spawn_blocking(move || {
                            let r = h.handle(payload, fd, &mut rs);
                            (r, rs)
                        })
                        .await
                        .map_err(|e| anyhow!("enrollment handler failed: {e}"))?;
                        resync = rs;
                        r
                    }
                }
            }
        };
        if let Err(e) = &result {
            info!(error = %e, "enrollment request refused");
        }
        let resp = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: result.err().unwrap_or_default(),
            })),
        };
        conn.send(&resp.encode_to_vec()).await?;
    }
}

/// A connection to ztunnel's enrollment socket.
pub struct Client {
    conn: UnixSeqpacket,
}

impl Client {
    pub async fn connect(path: &Path) -> anyhow::Result<Client> {
        let conn = UnixSeqpacket::connect(path).await.with_context(|| {
            format!(
                "connecting to ztunnel's enrollment socket {}",
                path.display()
            )
        })?;
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        conn.send(&hello.encode_to_vec()).await?;
        Ok(Client { conn })
    }

    /// Sends one request (with the netns fd for an add) and waits for its ack.
    pub async fn request(
        &self,
        payload: workload_request::Payload,
        netns: Option<BorrowedFd<'_>>,
    ) -> anyhow::Result<()> {
        let msg = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        match netns {
            Some(fd) => {
                let mut space = [0u8; 64];
                let mut anc = AncillaryMessageWriter::new(&mut space);
                anc.add_fds([fd.as_fd()])
                    .map_err(|_| anyhow!("no room for the netns fd"))?;
                self.conn.send_with_ancillary(&msg, &mut anc).await?;
            }
            None => {
                self.conn.send(&msg).await?;
            }
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let info = self.conn.recv(&mut buf).await?;
        if info.bytes_read() == 0 {
            bail!("ztunnel closed the enrollment connection without an answer");
        }
        let resp = WorkloadResponse::decode(&buf[..info.bytes_read()])
            .context("decoding ztunnel's WorkloadResponse")?;
        match resp.payload {
            Some(workload_response::Payload::Ack(Ack { error })) if error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(Ack { error })) => {
                Err(anyhow!("ztunnel: {error}"))
            }
            None => Err(anyhow!("ztunnel sent an empty response")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    /// Records what it is asked; refuses uids starting with "bad".
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Handler for Recorder {
        fn handle(
            &self,
            req: workload_request::Payload,
            netns: Option<OwnedFd>,
            _resync: &mut Option<Vec<String>>,
        ) -> Result<(), String> {
            let what = match &req {
                workload_request::Payload::Add(a) => {
                    format!("add {} fd={}", a.uid, netns.is_some())
                }
                workload_request::Payload::Del(d) => format!("del {}", d.uid),
                workload_request::Payload::Keep(k) => format!("keep {}", k.uid),
                workload_request::Payload::SnapshotSent(_) => "snapshot".into(),
            };
            self.0.lock().unwrap().push(what.clone());
            if what.contains(" bad") {
                Err("refused".into())
            } else {
                Ok(())
            }
        }
    }

    fn sock_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("zds-test-{}-{name}.sock", std::process::id()))
    }

    #[tokio::test]
    async fn requests_acks_and_bad_input() {
        let path = sock_path("main");
        let rec = Arc::new(Recorder::default());
        tokio::spawn(serve(bind(&path).unwrap(), rec.clone()));
        let c = Client::connect(&path).await.unwrap();
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let add = |uid: &str| {
            workload_request::Payload::Add(AddWorkload {
                uid: uid.into(),
                ..Default::default()
            })
        };
        c.request(add("p1"), Some(netns.as_fd())).await.unwrap();
        // An add without the fd is refused before the handler sees it.
        let e = c.request(add("p2"), None).await.unwrap_err();
        assert!(
            e.to_string().contains("exactly one network namespace fd"),
            "{e}"
        );
        // The handler's refusal comes back as the ack's error.
        let e = c
            .request(
                workload_request::Payload::Del(DelWorkload { uid: "bad".into() }),
                None,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        // Garbage instead of a WorkloadRequest: an error ack, and the
        // connection keeps working.
        c.conn.send(b"\xff\xff\xff garbage").await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = c.conn.recv(&mut buf).await.unwrap().bytes_read();
        let resp = WorkloadResponse::decode(&buf[..n]).unwrap();
        match resp.payload {
            Some(workload_response::Payload::Ack(Ack { error })) => {
                assert!(error.contains("decoding WorkloadRequest"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        c.request(
            workload_request::Payload::SnapshotSent(SnapshotSent {}),
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec!["add p1 fd=true", "del bad", "snapshot"]
        );
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn wrong_version_closes() {
        let path = sock_path("version");
        tokio::spawn(serve(bind(&path).unwrap(), Arc::new(Recorder::default())));
        let conn = UnixSeqpacket::connect(&path).await.unwrap();
        conn.send(&ZdsHello { version: 7 }.encode_to_vec())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        // The server gives up on the connection: EOF (0 bytes).
        let n = conn
            .recv(&mut buf)
            .await
            .map(|i| i.bytes_read())
            .unwrap_or(0);
        assert_eq!(n, 0);
        let _ = std::fs::remove_file(&path);
    }
}
