//! Listening and running a gRPC server on its own task, the same way for both services.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// Accepted connections of `listener`, with TCP_NODELAY: tonic's builder option only reaches
/// listeners tonic binds itself, and without it Nagle and delayed ACKs hold small replies for
/// ~40 ms.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The future a spawned server is told to stop with.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server running on its own task; dropping the handle shuts it down.
pub struct Running {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts the server down as SIGTERM would and waits until it has stopped.
    pub async fn shutdown(self) {
        drop(self.stop);
        let _ = self.done.await;
    }
}

/// Binds `addr` and runs `serve(listener, stop)` on its own task; `what` names the server in
/// the error log if it fails.
pub async fn spawn<S, F>(addr: SocketAddr, what: &'static str, serve: S) -> anyhow::Result<Running>
where
    S: FnOnce(TcpListener, StopSignal) -> F,
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = serve(
        listener,
        Box::pin(async {
            let _ = stopped.await;
        }),
    );
    let done = tokio::spawn(async move {
        if let Err(e) = serving.await {
            tracing::error!(error = %e, server = what, "server stopped");
        }
    });
    Ok(Running { addr, stop, done })
}
