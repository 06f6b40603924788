//! The gRPC sample app (`e2e/proto/sample.proto`) as a program to run in
//! a pod:
//!
//! ```text
//! sample-grpc serve [--listen [::]:50051] [--name NAME]
//! sample-grpc call --addr HOST:PORT [--method hello|echo] [--message TEXT]
//! ```
//!
//! `call` prints `served_by=<server> message=<reply>` and exits 0, or
//! prints the error (with the gRPC status) and exits 1.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use e2e::apps::grpc;

#[derive(Parser, Debug)]
#[command(about = "gRPC sample app of the mesh's end-to-end tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve sample.Sample (Hello, Echo) until killed.
    Serve {
        #[arg(long, default_value = "[::]:50051")]
        listen: SocketAddr,
        /// Named in every reply.
        #[arg(long, default_value = "sample-grpc")]
        name: String,
    },
    /// Make one call and print the reply.
    Call {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value = "hello")]
        method: String,
        #[arg(long, default_value = "world")]
        message: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sample-grpc: building the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve { listen, name } => {
                let l = tokio::net::TcpListener::bind(listen).await?;
                eprintln!("sample-grpc: serving on {listen} as {name}");
                grpc::serve(
                    grpc::SampleService { served_by: name },
                    l,
                    std::future::pending(),
                )
                .await
            }
            Cmd::Call {
                addr,
                method,
                message,
            } => {
                let (by, msg) = grpc::call(&addr, &method, &message).await?;
                println!("{}", grpc::call_output(&by, &msg));
                Ok(())
            }
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sample-grpc: {e:#}");
            ExitCode::FAILURE
        }
    }
}
