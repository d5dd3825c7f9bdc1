//! Serving the gateway on a socket anyone on the network can reach: HTTPS (rustls, the
//! certificate reloaded when its files change) or plain HTTP, HTTP/1.1 only, with the
//! limits that keep a client without credentials from exhausting the process — a
//! deadline for the TLS handshake and for each request's headers (which also bounds how
//! long an idle keep-alive connection stays), small header buffers, caps on open
//! connections, in all and per source address (see `slots`), and a deadline for a
//! connection to authenticate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;

use super::slots::{ConnectionSlots, ConnectionState};

/// How much of the process one network peer, or all of them, may hold.
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Longest from the start of waiting for a request until its headers are complete;
    /// an idle keep-alive connection is closed after this too. Longer than the agents'
    /// heartbeat interval, so their connections are reused.
    pub header_timeout: Duration,
    /// Open connections at most (beyond it new ones are closed at once).
    pub max_connections: usize,
    /// Open connections at most from one source address (0: no per-source limit).
    pub max_connections_per_source: usize,
    /// How long a new connection is given to authenticate before a full gateway closes
    /// it ahead of younger ones (see `slots`).
    pub authentication_grace: Duration,
    /// Longest a connection may stay open without authenticating: registrations and
    /// health checks are done by then, and an agent's first request authenticates.
    pub authentication_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            max_connections: 16_384,
            max_connections_per_source: 1_024,
            authentication_grace: Duration::from_secs(2),
            authentication_timeout: Duration::from_secs(30),
        }
    }
}

/// How long a connection told to close may take to finish the request in progress
/// (long-polls answer at once, see `ConnectionState::closing`).
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Largest request head (request line and headers) the gateway reads. Agents send a
/// few hundred bytes; hyper's default would buffer up to ~400 KiB per connection.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most request headers.
const MAX_HEADERS: usize = 32;

/// The gateway's certificate, loaded at start so a bad file fails at once, and reloaded
/// in the background when either file changes (cert-manager, a renewed Secret).
pub async fn load_certificate(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<Option<RustlsConfig>> {
    use anyhow::Context as _;
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(None);
    };
    let config = RustlsConfig::from_pem_file(cert, key)
        .await
        .with_context(|| {
            format!(
                "loading the gateway certificate {} and key {}",
                cert.display(),
                key.display()
            )
        })?;
    offer_http1_only(&config);
    tokio::spawn(reload_certificate(
        config.clone(),
        cert.to_path_buf(),
        key.to_path_buf(),
    ));
    Ok(Some(config))
}

/// The gateway speaks HTTP/1.1 only (see [`serve`]): offer only http/1.1 in ALPN, so
/// clients that would pick h2 (curl, say) do not. Applied after every load.
fn offer_http1_only(config: &RustlsConfig) {
    let mut adjusted = (*config.get_inner()).clone();
    adjusted.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.reload_from_config(Arc::new(adjusted));
}

async fn reload_certificate(
    config: RustlsConfig,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
) {
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen = (modified(&cert), modified(&key));
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        match config.reload_from_pem_file(&cert, &key).await {
            Ok(()) => {
                offer_http1_only(&config);
                tracing::info!(cert = %cert.display(), "gateway certificate reloaded");
                seen = now;
            }
            Err(err) => tracing::warn!(error = %err, "cannot reload the gateway certificate"),
        }
    }
}

/// Serves `router` on `listener` until the listener fails: HTTPS when `tls` is set,
/// else plain HTTP; HTTP/1.1 only. Agents speak nothing else, and a connection that can
/// only be HTTP/1.1 costs far less memory than one that may still turn out to be HTTP/2
/// (measured with 8,000 idle long-polls: about 10 KiB each instead of 17.5 KiB), which
/// counts at one connection per agent. Handlers see the peer's address as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: std::net::TcpListener,
    router: axum::Router,
    tls: Option<RustlsConfig>,
    limits: ServeLimits,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = ConnectionSlots::new(&limits);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!(error = %err, "gateway cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = slots.admit(peer.ip()) else {
            tracing::debug!(%peer, open = slots.open(), "connection refused: at the connection limit");
            drop(stream);
            continue;
        };
        let busy = slot.state.clone();
        let service = hyper_util::service::TowerToHyperService::new(
            router
                .clone()
                .layer(axum::middleware::from_fn(
                    move |request: axum::extract::Request, next: axum::middleware::Next| {
                        let busy = busy.busy();
                        async move {
                            let response = next.run(request).await;
                            drop(busy);
                            response
                        }
                    },
                ))
                .layer(axum::Extension(axum::extract::ConnectInfo(peer)))
                .layer(axum::Extension(slot.state.clone())),
        );
        // The current configuration: a reloaded certificate applies to new connections.
        let acceptor = tls
            .as_ref()
            .map(|config| tokio_rustls::TlsAcceptor::from(config.get_inner()));
        let limits = limits.clone();
        tokio::spawn(async move {
            let connection = slot.state.clone();
            tokio::select! {
                () = serve_one(stream, service, acceptor, &limits, peer, &connection) => {}
                () = keep_authenticated(&connection, limits.authentication_timeout, peer) => {}
            }
            drop(slot);
        });
    }
}

/// Closes the connection (gracefully) when it has not authenticated within `timeout`
/// of opening, or later within any `2 × timeout`: a connection is protected as its
/// agent's only while the agent keeps proving it is one (a revoked agent's credential
/// stops authenticating, and its connections go). Agents authenticate every request,
/// and a long-poll lasts less than `timeout`. Never returns.
async fn keep_authenticated(connection: &ConnectionState, timeout: Duration, peer: SocketAddr) {
    tokio::time::sleep(timeout).await;
    let mut window = timeout;
    loop {
        if !connection.authenticated_within(window) {
            tracing::debug!(%peer, "closing a connection that has not authenticated in {window:?}");
            connection.close();
            return std::future::pending().await;
        }
        window = timeout * 2;
        tokio::time::sleep(timeout).await;
    }
}

/// Serves one accepted connection to its end, or until it is told to close: then the
/// request in progress is finished (within [`CLOSE_GRACE`]) and the connection closed.
async fn serve_one<S>(
    stream: tokio::net::TcpStream,
    service: S,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    limits: &ServeLimits,
    peer: SocketAddr,
    connection: &ConnectionState,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let Some(acceptor) = acceptor else {
        let served = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        return drive(served, connection, peer).await;
    };
    let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        accepted = handshake => match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
        () = connection.closing() => return,
    };
    let served = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    drive(served, connection, peer).await;
}

/// Runs an HTTP/1 connection until it ends, shutting it down gracefully when told to.
async fn drive<I, S>(
    served: hyper::server::conn::http1::Connection<I, S>,
    connection: &ConnectionState,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = axum::body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(served);
    let ended = tokio::select! {
        ended = served.as_mut() => ended,
        () = connection.closing() => {
            if connection.abrupt() {
                return;
            }
            served.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, served.as_mut()).await {
                Ok(ended) => ended,
                Err(_) => {
                    tracing::debug!(%peer, "closed: its request did not finish in time");
                    return;
                }
            }
        }
    };
    if let Err(err) = ended {
        tracing::debug!(%peer, error = %err, "gateway connection ended with an error");
    }
}

/// The peer of a request served by [`serve`] (unspecified when served another way,
/// e.g. in tests that call the router directly).
pub fn peer(extensions: &axum::http::Extensions) -> SocketAddr {
    extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|info| info.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}
