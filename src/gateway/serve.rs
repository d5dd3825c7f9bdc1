//! Serving the gateway on a socket anyone on the network can reach: HTTPS (rustls, the
//! certificate reloaded when its files change) or plain HTTP, HTTP/1.1 only, with the
//! limits that keep a client without credentials from exhausting the process — a
//! deadline for the TLS handshake and for each request's headers (which also bounds how
//! long an idle keep-alive connection stays), small header buffers, and caps on open
//! connections, in all and per source address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use parking_lot::Mutex;

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
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            max_connections: 16_384,
            max_connections_per_source: 1_024,
        }
    }
}

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

/// Open connections, in all and per source; a [`ConnectionSlot`] is held for each.
/// When the gateway is full, a new connection takes the place of one that may be
/// closed: one that never authenticated and is not in the middle of a request, or one
/// beyond an agent's share of authenticated connections — the oldest of the source
/// that holds the most of them, so a flooder makes room at its own expense. Strangers
/// holding sockets cannot lock the agents out, nor can one agent's credential.
pub struct ConnectionSlots {
    state: Mutex<SlotsState>,
    max: usize,
    max_per_source: usize,
    /// Authenticated connections an agent may hold before more of them may be closed.
    max_per_agent: usize,
}

#[derive(Default)]
struct SlotsState {
    per_source: HashMap<IpAddr, usize>,
    open: usize,
    /// Connections told to close to make room, not yet gone.
    evicting: usize,
    next_id: u64,
    /// Every open connection, oldest first.
    connections: std::collections::BTreeMap<u64, (IpAddr, Arc<ConnectionState>)>,
    /// Authenticated connections per agent.
    per_agent: HashMap<String, usize>,
}

/// What a connection's handlers can tell its slot, and how the slot closes it.
#[derive(Default)]
pub struct ConnectionState {
    /// The agent it authenticated as, if it did, and whether it is beyond that agent's
    /// share (then it may be closed to make room, like a stranger's).
    agent: Mutex<Option<(String, bool)>>,
    evicted: std::sync::atomic::AtomicBool,
    /// Requests being served on it: a connection in the middle of a request (a
    /// registration waiting for the caches, say) is not closed to make room unless it
    /// is beyond its agent's share.
    in_flight: std::sync::atomic::AtomicUsize,
    close: tokio::sync::Notify,
    slots: std::sync::Weak<ConnectionSlots>,
}

impl ConnectionState {
    /// A request on this connection authenticated as `agent`: within the agent's share
    /// of connections it is never closed to make room.
    pub fn trust(&self, agent: &str) {
        let Some(slots) = self.slots.upgrade() else {
            return;
        };
        // The slots' lock before the connection's, as `admit` takes them.
        let mut state = slots.state.lock();
        let mut me = self.agent.lock();
        if me.is_some() {
            return;
        }
        let held = state.per_agent.entry(agent.to_string()).or_insert(0);
        *held += 1;
        *me = Some((agent.to_string(), *held > slots.max_per_agent));
    }

    /// Whether it may be closed to make room.
    fn may_close(&self) -> bool {
        match &*self.agent.lock() {
            None => self.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0,
            Some((_, beyond_share)) => *beyond_share,
        }
    }

    /// Marks a request in progress until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves when the connection must close to make room for a new one.
    pub async fn closed(&self) {
        self.close.notified().await;
    }
}

/// A request in progress on a connection (see [`ConnectionState::busy`]).
pub struct Busy(Arc<ConnectionState>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One admitted connection; dropping it frees the slot.
pub struct ConnectionSlot {
    id: u64,
    source: IpAddr,
    pub state: Arc<ConnectionState>,
    slots: Arc<ConnectionSlots>,
}

impl ConnectionSlots {
    pub fn new(limits: &ServeLimits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotsState::default()),
            max: limits.max_connections,
            max_per_source: limits.max_connections_per_source,
            max_per_agent: (limits.max_connections / 64).clamp(1, 16),
        })
    }

    /// A slot for a connection from `source`, or `None` when the source holds its share
    /// or nothing may be closed to make room. Sources are counted as the rate limits
    /// count them: an IPv6 address by its /64.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<ConnectionSlot> {
        let source = super::limits::bucket_of(source);
        let mut state = self.state.lock();
        let held = state.per_source.get(&source).copied().unwrap_or(0);
        if self.max_per_source > 0 && held >= self.max_per_source {
            return None;
        }
        if state.open - state.evicting >= self.max {
            let victim = Self::victim(&state)?;
            let (_, closing) = state.connections.remove(&victim).expect("just found");
            closing
                .evicted
                .store(true, std::sync::atomic::Ordering::Relaxed);
            closing.close.notify_one();
            state.evicting += 1;
        }
        *state.per_source.entry(source).or_insert(0) += 1;
        state.open += 1;
        let id = state.next_id;
        state.next_id += 1;
        let connection = Arc::new(ConnectionState {
            slots: Arc::downgrade(self),
            ..ConnectionState::default()
        });
        state.connections.insert(id, (source, connection.clone()));
        Some(ConnectionSlot {
            id,
            source,
            state: connection,
            slots: self.clone(),
        })
    }

    /// The connection to close to make room: of those that may be closed, the oldest
    /// of the source that has the most of them.
    fn victim(state: &SlotsState) -> Option<u64> {
        let mut closable: HashMap<IpAddr, (usize, u64)> = HashMap::new();
        for (&id, (source, connection)) in &state.connections {
            if connection.may_close() {
                let entry = closable.entry(*source).or_insert((0, id));
                entry.0 += 1;
            }
        }
        closable
            .into_values()
            .max_by_key(|&(count, oldest)| (count, std::cmp::Reverse(oldest)))
            .map(|(_, oldest)| oldest)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.lock().open
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let agent = self.state.agent.lock().take();
        let mut state = self.slots.state.lock();
        if let Some(held) = state.per_source.get_mut(&self.source) {
            *held -= 1;
            if *held == 0 {
                state.per_source.remove(&self.source);
            }
        }
        state.open -= 1;
        state.connections.remove(&self.id);
        if let Some((agent, beyond_share)) = agent
            && let Some(held) = state.per_agent.get_mut(&agent)
        {
            *held -= 1;
            if *held == 0 {
                state.per_agent.remove(&agent);
            } else if !beyond_share {
                // A place within the agent's share came free: its oldest connection
                // beyond the share takes it (slots, then connection: the lock order).
                for (_, other) in state.connections.values() {
                    let mut other = other.agent.lock();
                    if let Some((name, beyond)) = other.as_mut()
                        && *name == agent
                        && *beyond
                    {
                        *beyond = false;
                        break;
                    }
                }
            }
        }
        if self
            .state
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            state.evicting -= 1;
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
            let state = slot.state.clone();
            let _slot = slot;
            tokio::select! {
                () = serve_one(stream, service, acceptor, &limits, peer) => {}
                () = state.closed() => {
                    tracing::debug!(%peer, "closed to make room: the gateway is full and this connection never authenticated");
                }
            }
        });
    }
}

/// Serves one accepted connection to its end.
async fn serve_one<S>(
    stream: tokio::net::TcpStream,
    service: S,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    limits: &ServeLimits,
    peer: SocketAddr,
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
    let served = match acceptor {
        Some(acceptor) => {
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        None => {
            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(err) = served {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_connections_in_all_and_per_source() {
        let slots = ConnectionSlots::new(&ServeLimits {
            max_connections: 3,
            max_connections_per_source: 2,
            ..ServeLimits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.admit(a).expect("a's first");
        let _second = slots.admit(a).expect("a's second");
        assert!(slots.admit(a).is_none(), "a holds its share");
        let third = slots.admit(b).expect("b's first");
        for (i, slot) in [&first, &_second, &third].into_iter().enumerate() {
            slot.state.trust(&format!("agent-{i}"));
        }
        assert!(
            slots.admit(b).is_none(),
            "the gateway is full of authenticated connections"
        );
        drop(first);
        assert_eq!(slots.open(), 2);
        assert!(slots.admit(b).is_some(), "a freed slot is free again");
    }

    /// When an agent's connection within its share closes, one beyond the share takes
    /// its place: the agent's last connection is never left closable.
    #[test]
    fn an_agents_remaining_connection_moves_into_its_share() {
        let slots = ConnectionSlots::new(&ServeLimits {
            max_connections: 2,
            max_connections_per_source: 0,
            ..ServeLimits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let first = slots.admit(a).unwrap();
        first.state.trust("web-1");
        let second = slots.admit(a).unwrap();
        second.state.trust("web-1");
        assert!(second.state.may_close(), "beyond web-1's share of 1");
        drop(first);
        assert!(!second.state.may_close(), "now within it");
        let stranger = slots.admit(a).expect("room for one more");
        assert!(
            slots.admit(a).is_some(),
            "the stranger is closed to make room"
        );
        drop(stranger);
        assert!(!second.state.may_close());
    }

    /// Full, a new connection takes the place of the oldest one that never
    /// authenticated, which is told to close; authenticated ones stay.
    #[tokio::test]
    async fn a_full_gateway_closes_the_oldest_stranger_to_make_room() {
        let slots = ConnectionSlots::new(&ServeLimits {
            max_connections: 2,
            max_connections_per_source: 0,
            ..ServeLimits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let agent = slots.admit(a).unwrap();
        agent.state.trust("agent-1");
        let stranger = slots.admit(a).unwrap();
        let newcomer = slots.admit(a).expect("room is made");
        tokio::time::timeout(Duration::from_secs(1), stranger.state.closed())
            .await
            .expect("the stranger is told to close");
        drop(stranger);
        newcomer.state.trust("agent-2");
        assert!(
            slots.admit(a).is_none(),
            "nothing but authenticated connections: full"
        );
        drop(agent);
        assert!(slots.admit(a).is_some());
    }

    /// Attack (the network, over IPv6): the per-source connection cap is keyed by the
    /// exact address, while the rate limiter already knows that one host routinely holds
    /// a whole /64. An attacker with one /64 opens `max_connections_per_source`
    /// connections from each of as many addresses as it likes and holds every one of
    /// the gateway's `max_connections` slots: new connections — every agent's long-poll,
    /// heartbeat and report — are closed at once, and the fleet is locked out.
    #[test]
    fn an_ipv6_source_holds_at_most_its_share_whatever_address_of_its_64_it_uses() {
        let slots = ConnectionSlots::new(&ServeLimits {
            max_connections: 100,
            max_connections_per_source: 2,
            ..ServeLimits::default()
        });
        let mut held = Vec::new();
        for i in 1..=50u16 {
            let address: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            if let Some(slot) = slots.admit(address) {
                held.push(slot);
            }
        }
        assert!(
            held.len() <= 2,
            "one /64 holds {} connections, the cap per source is 2",
            held.len()
        );
    }
}
