//! A fault-injecting TCP proxy on loopback, for network faults over real
//! hyper code: partitions, one-way partitions, resets mid-body, latency.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward both ways.
    Pass,
    /// A partition: accept connections but forward nothing either way.
    Blackhole,
    /// A one-way partition: requests reach the server, responses are lost.
    DropResponses,
    /// Forward this many bytes of the request, then reset both sides.
    ResetAfter(usize),
    /// Hold every chunk this long before forwarding it.
    Delay(Duration),
}

/// A proxy in front of `upstream`. Changing the mode cuts the connections
/// made under the old one, as a network change would.
pub struct FaultyProxy {
    addr: SocketAddr,
    mode: watch::Sender<(ProxyMode, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultyProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyProxy")
            .field("addr", &self.addr)
            .field("mode", &self.mode.borrow().0)
            .finish_non_exhaustive()
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const CHUNK_BYTES: usize = 16 * 1024;

impl FaultyProxy {
    /// Starts a proxy to `upstream` on a free loopback port, passing traffic.
    ///
    /// # Panics
    /// If no loopback port can be had.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let (mode, rx) = watch::channel((ProxyMode::Pass, 0));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, rx.clone()));
            }
        });
        Self { addr, mode, task }
    }

    /// The sync endpoint through the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}/sync", self.addr)
    }

    /// Switches mode; connections made before are cut.
    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_modify(|(m, generation)| {
            *m = mode;
            *generation += 1;
        });
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<(ProxyMode, u64)>) {
    let (current, generation) = *mode.borrow_and_update();
    let cut = async move {
        while mode.changed().await.is_ok() {
            if mode.borrow().1 != generation {
                return;
            }
        }
    };
    if current == ProxyMode::Blackhole {
        // Hold the connection, forward nothing, until the network changes.
        cut.await;
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    let up = async {
        let mut sent = 0usize;
        let mut buf = vec![0; CHUNK_BYTES];
        loop {
            let n = match client_r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let ProxyMode::Delay(d) = current {
                tokio::time::sleep(d).await;
            }
            let n = match current {
                ProxyMode::ResetAfter(limit) => n.min(limit.saturating_sub(sent)),
                _ => n,
            };
            if server_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n;
            if matches!(current, ProxyMode::ResetAfter(limit) if sent >= limit) {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0; CHUNK_BYTES];
        loop {
            let n = match server_r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if current == ProxyMode::DropResponses {
                continue;
            }
            if let ProxyMode::Delay(d) = current {
                tokio::time::sleep(d).await;
            }
            if client_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending (or the network changing) ends the connection.
    tokio::select! {
        () = up => {}
        () = down => {}
        () = cut => {}
    }
}
