//! The gRPC sample (`proto/sample.proto`): service `sample.Sample` with
//! `Hello` and `Echo`, each reply naming the server. [`GrpcServer`] runs
//! it inside a pod's namespace; the `sample-grpc` binary is the same
//! server (`serve`) and a one-shot client (`call`) for use inside pods.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use anyhow::{anyhow, bail, Result};
use tonic::{Request, Response, Status};

use super::Background;
use crate::cluster::App;

/// The generated messages, client and server.
pub mod pb {
    tonic::include_proto!("sample");
}

use pb::sample_server::{Sample, SampleServer};

/// The gRPC path of each method, as a waypoint routes on it.
pub const HELLO_PATH: &str = "/sample.Sample/Hello";
pub const ECHO_PATH: &str = "/sample.Sample/Echo";

/// The service; `served_by` goes in every reply.
#[derive(Clone, Debug)]
pub struct SampleService {
    pub served_by: String,
}

#[tonic::async_trait]
impl Sample for SampleService {
    async fn hello(&self, req: Request<pb::HelloRequest>) -> Result<Response<pb::Reply>, Status> {
        Ok(Response::new(pb::Reply {
            message: format!("hello {}", req.into_inner().name),
            served_by: self.served_by.clone(),
        }))
    }

    async fn echo(&self, req: Request<pb::EchoRequest>) -> Result<Response<pb::Reply>, Status> {
        Ok(Response::new(pb::Reply {
            message: req.into_inner().message,
            served_by: self.served_by.clone(),
        }))
    }
}

/// Serves `svc` on `listener` until `stop` resolves.
pub async fn serve(
    svc: SampleService,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tonic::transport::Server::builder()
        .add_service(SampleServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop,
        )
        .await?;
    Ok(())
}

/// A running gRPC sample server; dropping it stops it.
#[derive(Debug)]
pub struct GrpcServer {
    bg: Background,
}

impl GrpcServer {
    /// Serves on `[::]:<port>` in `app`'s namespace, replies naming
    /// `<namespace>/<name>`.
    pub fn start_for(app: &App, port: u16) -> Result<GrpcServer> {
        let svc = SampleService {
            served_by: app.key(),
        };
        let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let bg = Background::start(app.pod.netns(), addr, "grpc", move |l, stop| async move {
            if let Err(e) = serve(svc, l, async {
                let _ = stop.await;
            })
            .await
            {
                eprintln!("e2e: gRPC sample server: {e:#}");
            }
        })?;
        Ok(GrpcServer { bg })
    }

    pub fn addr(&self) -> SocketAddr {
        self.bg.addr()
    }
}

/// Calls `method` (`hello` or `echo`) on `addr` (`host:port`) with
/// `message`: `(served_by, reply message)`.
pub async fn call(addr: &str, method: &str, message: &str) -> Result<(String, String)> {
    let mut c = pb::sample_client::SampleClient::connect(format!("http://{addr}")).await?;
    let reply = match method.to_ascii_lowercase().as_str() {
        "hello" => c
            .hello(pb::HelloRequest {
                name: message.to_string(),
            })
            .await
            .map_err(status_error)?,
        "echo" => c
            .echo(pb::EchoRequest {
                message: message.to_string(),
            })
            .await
            .map_err(status_error)?,
        other => bail!("unknown method {other:?}: hello or echo"),
    }
    .into_inner();
    Ok((reply.served_by, reply.message))
}

fn status_error(s: Status) -> anyhow::Error {
    anyhow!("grpc-status {:?}: {}", s.code(), s.message())
}

/// The line `sample-grpc call` prints on success.
pub fn call_output(served_by: &str, message: &str) -> String {
    format!("served_by={served_by} message={message}")
}

/// Parses `sample-grpc call`'s output back into `(served_by, message)`.
pub fn parse_call_output(out: &str) -> Result<(String, String)> {
    out.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("served_by=")?;
            let (by, msg) = rest.split_once(" message=")?;
            Some((by.to_string(), msg.to_string()))
        })
        .ok_or_else(|| anyhow!("no reply in sample-grpc output: {}", out.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_output_round_trips() {
        let line = call_output("a/b", "hello x y");
        assert_eq!(
            parse_call_output(&format!("noise\n{line}\n")).ok(),
            Some(("a/b".into(), "hello x y".into()))
        );
        assert!(parse_call_output("error: grpc-status Unavailable").is_err());
    }
}
