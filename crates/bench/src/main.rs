//! framecast-bench: load client for framecast and any KServe v2 server, and the demo client.

mod avi;
mod client;
mod demo;
mod stats;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Load client for framecast and KServe v2 servers; renders the demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Wait until every URL reports grpc.health.v1 SERVING.
    Wait {
        /// gRPC URLs, e.g. http://127.0.0.1:8001
        #[arg(required = true)]
        urls: Vec<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Render the demo avatar and write frames, an MJPEG AVI and a contact sheet.
    Demo(demo::DemoArgs),
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    match Cli::parse().command {
        Command::Wait { urls, timeout_s } => {
            rt.block_on(client::wait_healthy(&urls, Duration::from_secs(timeout_s)))
        }
        Command::Demo(args) => rt.block_on(demo::run(args)),
    }
}
