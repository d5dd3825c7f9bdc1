//! Who may hold the gateway's connections. Every open connection holds a
//! [`ConnectionSlot`]; there are only so many, in all and per source. When the gateway is
//! full, a new connection takes the place of one that may be closed:
//!
//! - a *stranger's* (it never authenticated) that is not in the middle of a request, or
//! - one beyond an agent's share of authenticated connections.
//!
//! Of those, the first to go is the oldest that has had time to authenticate and did not
//! (a stranger past the grace period, or an agent's connection beyond its share); while
//! none has, the oldest of the source holding the most of them, so a flooder makes room
//! at its own expense. Hosts behind one NAT that connect together thus keep their fresh
//! connections while strangers that sit idle, one per source, are closed; strangers
//! holding sockets cannot lock the agents out, nor can one agent's credential.
//!
//! Choosing takes O(log n): the closable connections are indexed by age and by source,
//! and kept current on every change (a request starts or ends, a connection
//! authenticates or closes), all under one lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::serve::ServeLimits;

/// Authenticated connections of one agent that are never closed to make room, at most.
const MAX_PROTECTED_PER_AGENT: usize = 4;

/// Open connections, in all and per source, and which of them may be closed.
pub struct ConnectionSlots {
    state: Mutex<SlotsState>,
    max: usize,
    max_per_source: usize,
    /// Authenticated connections an agent may hold before more of them may be closed.
    max_per_agent: usize,
    /// How long a stranger's connection is given to authenticate before it is closed
    /// ahead of younger ones.
    grace: Duration,
}

#[derive(Default)]
struct SlotsState {
    per_source: HashMap<IpAddr, usize>,
    open: usize,
    /// Connections told to close to make room, not yet gone.
    evicting: usize,
    next_id: u64,
    connections: HashMap<u64, Entry>,
    closable: Closable,
    per_agent: HashMap<String, AgentConnections>,
}

struct Entry {
    source: IpAddr,
    opened: Instant,
    role: Role,
    /// When a request on it last authenticated.
    authenticated: Option<Instant>,
    /// Requests being served on it.
    in_flight: usize,
    connection: Arc<ConnectionState>,
}

#[derive(Clone, PartialEq, Eq)]
enum Role {
    /// Never authenticated.
    Stranger,
    /// Authenticated as this agent, within its share.
    Agent(String),
    /// Authenticated as this agent, beyond its share.
    Beyond(String),
    /// Told to close to make room.
    Evicted,
}

impl Entry {
    fn closable(&self) -> bool {
        match self.role {
            Role::Stranger => self.in_flight == 0,
            Role::Beyond(_) => true,
            Role::Agent(_) | Role::Evicted => false,
        }
    }
}

/// One agent's authenticated connections.
#[derive(Default)]
struct AgentConnections {
    within: usize,
    /// Beyond the share, oldest first: the first moves in when a place comes free.
    beyond: BTreeSet<u64>,
}

/// The connections that may be closed, by age and by source.
#[derive(Default)]
struct Closable {
    /// Connection ids grow with time: the first is the oldest.
    by_age: BTreeMap<u64, (IpAddr, Instant)>,
    by_source: HashMap<IpAddr, BTreeSet<u64>>,
    /// (how many closable connections, source): the last holds the most.
    by_count: BTreeSet<(usize, IpAddr)>,
}

impl Closable {
    fn insert(&mut self, id: u64, source: IpAddr, opened: Instant) {
        if self.by_age.insert(id, (source, opened)).is_some() {
            return;
        }
        let ids = self.by_source.entry(source).or_default();
        self.by_count.remove(&(ids.len(), source));
        ids.insert(id);
        self.by_count.insert((ids.len(), source));
    }

    fn remove(&mut self, id: u64) {
        let Some((source, _)) = self.by_age.remove(&id) else {
            return;
        };
        let Some(ids) = self.by_source.get_mut(&source) else {
            return;
        };
        self.by_count.remove(&(ids.len(), source));
        ids.remove(&id);
        if ids.is_empty() {
            self.by_source.remove(&source);
        } else {
            self.by_count.insert((ids.len(), source));
        }
    }

    /// The connection to close: the oldest, if it has had `grace` to authenticate; else
    /// the oldest of the source with the most.
    fn victim(&self, now: Instant, grace: Duration) -> Option<u64> {
        let (&oldest, &(_, opened)) = self.by_age.first_key_value()?;
        if now.saturating_duration_since(opened) >= grace {
            return Some(oldest);
        }
        let &(_, source) = self.by_count.last()?;
        self.by_source.get(&source)?.first().copied()
    }
}

impl SlotsState {
    /// Brings the index in line with the connection's state.
    fn refresh(&mut self, id: u64) {
        let Some(entry) = self.connections.get(&id) else {
            self.closable.remove(id);
            return;
        };
        if entry.closable() {
            self.closable.insert(id, entry.source, entry.opened);
        } else {
            self.closable.remove(id);
        }
    }

    fn evict(&mut self, id: u64) {
        let Some(entry) = self.connections.get_mut(&id) else {
            return;
        };
        let role = std::mem::replace(&mut entry.role, Role::Evicted);
        let was_stranger = role == Role::Stranger;
        if let Role::Beyond(agent) = role
            && let Some(held) = self.per_agent.get_mut(&agent)
        {
            held.beyond.remove(&id);
            if held.within == 0 && held.beyond.is_empty() {
                self.per_agent.remove(&agent);
            }
        }
        // A stranger's has no request in progress: gone at once (a graceful close would
        // wait for a request it may never finish). One beyond its agent's share may be
        // in the middle of one, which is answered first.
        if was_stranger {
            entry.connection.close_now();
        } else {
            entry.connection.close();
        }
        self.evicting += 1;
        self.closable.remove(id);
    }
}

/// What a connection's handlers tell its slot, and how the slot tells them to close.
pub struct ConnectionState {
    id: u64,
    slots: std::sync::Weak<ConnectionSlots>,
    closing: AtomicBool,
    /// Closing without finishing the request in progress.
    abrupt: AtomicBool,
    close: tokio::sync::Notify,
}

impl ConnectionState {
    /// A request on this connection authenticated as `agent`: within the agent's share
    /// of connections it is never closed to make room.
    pub fn trust(&self, agent: &str) {
        let Some(slots) = self.slots.upgrade() else {
            return;
        };
        let mut state = slots.state.lock();
        let state = &mut *state;
        let Some(entry) = state.connections.get_mut(&self.id) else {
            return;
        };
        entry.authenticated = Some(Instant::now());
        if entry.role != Role::Stranger {
            return;
        }
        let held = state.per_agent.entry(agent.to_string()).or_default();
        if held.within < slots.max_per_agent {
            held.within += 1;
            entry.role = Role::Agent(agent.to_string());
        } else {
            held.beyond.insert(self.id);
            entry.role = Role::Beyond(agent.to_string());
        }
        state.refresh(self.id);
    }

    /// Marks a request in progress until the guard is dropped: a stranger's connection
    /// in the middle of a request (a registration waiting for the caches, say) is not
    /// closed to make room.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.count_request(1);
        Busy(self.clone())
    }

    fn count_request(&self, change: isize) {
        let Some(slots) = self.slots.upgrade() else {
            return;
        };
        let mut state = slots.state.lock();
        if let Some(entry) = state.connections.get_mut(&self.id) {
            entry.in_flight = entry.in_flight.saturating_add_signed(change);
            state.refresh(self.id);
        }
    }

    /// Tells the connection to close: at once when idle, after the request in progress
    /// otherwise (within a grace period, see `serve`).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.close.notify_waiters();
    }

    /// Tells the connection to close at once, whatever it is doing.
    pub fn close_now(&self) {
        self.abrupt.store(true, Ordering::Release);
        self.close();
    }

    /// Whether it was told to close at once.
    pub fn abrupt(&self) -> bool {
        self.abrupt.load(Ordering::Acquire)
    }

    /// Resolves when the connection must close (at once if it already must). Any number
    /// of waiters: the connection's server and long-polling handlers.
    pub async fn closing(&self) {
        let notified = self.close.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    /// Whether a request on it authenticated within the last `window`.
    pub fn authenticated_within(&self, window: Duration) -> bool {
        let Some(slots) = self.slots.upgrade() else {
            return false;
        };
        let state = slots.state.lock();
        state
            .connections
            .get(&self.id)
            .and_then(|entry| entry.authenticated)
            .is_some_and(|at| at.elapsed() <= window)
    }
}

/// A request in progress on a connection (see [`ConnectionState::busy`]).
pub struct Busy(Arc<ConnectionState>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.count_request(-1);
    }
}

/// One admitted connection; dropping it frees the slot.
pub struct ConnectionSlot {
    pub state: Arc<ConnectionState>,
    slots: Arc<ConnectionSlots>,
}

impl ConnectionSlots {
    pub fn new(limits: &ServeLimits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotsState::default()),
            max: limits.max_connections,
            max_per_source: limits.max_connections_per_source,
            // An agent needs a few at once (a long-poll, a heartbeat, a report); a few
            // are protected, so a token's worth of agents cannot pin the gateway.
            max_per_agent: (limits.max_connections / 64).clamp(1, MAX_PROTECTED_PER_AGENT),
            grace: limits.authentication_grace,
        })
    }

    /// A slot for a connection from `source`, or `None` when the source holds its share
    /// or nothing may be closed to make room. Sources are counted as the rate limits
    /// count them: an IPv6 address by its /64.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<ConnectionSlot> {
        let source = super::limits::bucket_of(source);
        let now = Instant::now();
        let mut state = self.state.lock();
        let held = state.per_source.get(&source).copied().unwrap_or(0);
        if self.max_per_source > 0 && held >= self.max_per_source {
            return None;
        }
        if state.open - state.evicting >= self.max {
            let victim = state.closable.victim(now, self.grace)?;
            state.evict(victim);
        }
        *state.per_source.entry(source).or_insert(0) += 1;
        state.open += 1;
        let id = state.next_id;
        state.next_id += 1;
        let connection = Arc::new(ConnectionState {
            id,
            slots: Arc::downgrade(self),
            closing: AtomicBool::new(false),
            abrupt: AtomicBool::new(false),
            close: tokio::sync::Notify::new(),
        });
        state.connections.insert(
            id,
            Entry {
                source,
                opened: now,
                role: Role::Stranger,
                authenticated: None,
                in_flight: 0,
                connection: connection.clone(),
            },
        );
        state.refresh(id);
        Some(ConnectionSlot {
            state: connection,
            slots: self.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.lock().open
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut state = self.slots.state.lock();
        let state = &mut *state;
        let id = self.state.id;
        state.closable.remove(id);
        let Some(entry) = state.connections.remove(&id) else {
            return;
        };
        if let Some(held) = state.per_source.get_mut(&entry.source) {
            *held -= 1;
            if *held == 0 {
                state.per_source.remove(&entry.source);
            }
        }
        state.open -= 1;
        let agent = match entry.role {
            Role::Evicted => {
                state.evicting -= 1;
                return;
            }
            Role::Stranger => return,
            Role::Agent(agent) => {
                if let Some(held) = state.per_agent.get_mut(&agent) {
                    held.within -= 1;
                    // A place within the agent's share came free: its oldest connection
                    // beyond the share takes it, so its last is never left closable.
                    if let Some(next) = held.beyond.pop_first() {
                        held.within += 1;
                        if let Some(moved) = state.connections.get_mut(&next) {
                            moved.role = Role::Agent(agent.clone());
                        }
                        state.refresh(next);
                    }
                }
                agent
            }
            Role::Beyond(agent) => {
                if let Some(held) = state.per_agent.get_mut(&agent) {
                    held.beyond.remove(&id);
                }
                agent
            }
        };
        if state
            .per_agent
            .get(&agent)
            .is_some_and(|held| held.within == 0 && held.beyond.is_empty())
        {
            state.per_agent.remove(&agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(max: usize, per_source: usize) -> Arc<ConnectionSlots> {
        ConnectionSlots::new(&ServeLimits {
            max_connections: max,
            max_connections_per_source: per_source,
            ..ServeLimits::default()
        })
    }

    fn closing(slot: &ConnectionSlot) -> bool {
        slot.state.closing.load(Ordering::Acquire)
    }

    #[test]
    fn slots_cap_connections_in_all_and_per_source() {
        let slots = slots(3, 2);
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
        let slots = slots(2, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let first = slots.admit(a).unwrap();
        first.state.trust("web-1");
        let second = slots.admit(a).unwrap();
        second.state.trust("web-1");
        drop(first);
        let stranger = slots.admit(a).expect("room for one more");
        let newcomer = slots.admit(a).expect("the stranger is closed to make room");
        assert!(closing(&stranger) && !closing(&second));
        newcomer.state.trust("web-2");
        assert!(
            slots.admit(a).is_none(),
            "web-1's remaining connection is within its share: nothing may be closed"
        );
    }

    /// Full, a new connection takes the place of a stranger's, which is told to close;
    /// authenticated ones stay.
    #[tokio::test]
    async fn a_full_gateway_closes_a_stranger_to_make_room() {
        let slots = slots(2, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let agent = slots.admit(a).unwrap();
        agent.state.trust("agent-1");
        let stranger = slots.admit(a).unwrap();
        let newcomer = slots.admit(a).expect("room is made");
        tokio::time::timeout(Duration::from_secs(1), stranger.state.closing())
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

    /// A stranger's connection with a request in progress is not closed to make room.
    #[test]
    fn a_stranger_in_the_middle_of_a_request_stays() {
        let slots = slots(1, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let registering = slots.admit(a).unwrap();
        let busy = registering.state.busy();
        assert!(slots.admit(a).is_none(), "the only connection is busy");
        drop(busy);
        assert!(slots.admit(a).is_some(), "idle again, it makes room");
        assert!(closing(&registering));
    }

    /// Attack (the network, over IPv6): one host routinely holds a whole /64, and the
    /// per-source cap counts it as one source whatever address of it connects.
    #[test]
    fn an_ipv6_source_holds_at_most_its_share_whatever_address_of_its_64_it_uses() {
        let slots = slots(100, 2);
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

    /// Attack (the network, many sources): a full gateway closed the oldest connection
    /// of the source holding the most closable ones. Strangers that each hold one idle
    /// connection from their own address are never that source: hosts behind one NAT,
    /// whose fresh connections are strangers for the moment before their first request
    /// authenticates, are. Each host connecting closed its neighbour's fresh
    /// connection, never an idle stranger's, and the fleet behind the NAT could not
    /// get a request through for as long as the strangers held on. Strangers that have
    /// had time to authenticate and did not must go first.
    #[test]
    fn hosts_behind_one_nat_are_not_closed_before_idle_strangers() {
        let slots = ConnectionSlots::new(&ServeLimits {
            max_connections: 8,
            max_connections_per_source: 0,
            authentication_grace: Duration::from_millis(50),
            ..ServeLimits::default()
        });
        let strangers: Vec<_> = (1..=8u8)
            .map(|i| slots.admit(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let nat = IpAddr::from([192, 0, 2, 1]);
        let hosts: Vec<_> = (0..4).map(|_| slots.admit(nat).unwrap()).collect();
        for (i, host) in hosts.iter().enumerate() {
            assert!(
                !closing(host),
                "host {i} behind the NAT was closed while idle strangers held on"
            );
        }
        assert_eq!(strangers.iter().filter(|s| closing(s)).count(), 4);
    }

    /// Attack (the network, no credential): choosing what to close scanned every open
    /// connection under the slots' lock, taking each connection's own lock too — on
    /// every accept once the gateway is full. With 16 384 connections held (the
    /// default cap), each new connection cost some 16 000 lock round trips on the
    /// accept loop's thread while every request's bookkeeping waited on the same lock;
    /// a few thousand connects a second kept the gateway's accept loop and its lock
    /// busy full time. Choosing must not depend on how many connections are open. (A
    /// bound on the work, far from both: 30 000 evictions among 30 000 connections
    /// take milliseconds indexed and about a minute scanned.)
    #[test]
    fn making_room_does_not_scan_every_connection() {
        const OPEN: usize = 30_000;
        let slots = slots(OPEN, 0);
        let mut held: Vec<_> = (0..OPEN)
            .map(|i| {
                let slot = slots
                    .admit(IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]))
                    .unwrap();
                if i % 2 == 0 {
                    slot.state.trust(&format!("agent-{i}"));
                }
                slot
            })
            .collect();
        let started = Instant::now();
        for i in 0..OPEN {
            held.push(
                slots
                    .admit(IpAddr::from([10, 2, (i / 256) as u8, (i % 256) as u8]))
                    .unwrap(),
            );
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "{OPEN} connections made room among {OPEN} in {took:?}"
        );
    }

    /// Attack (a bootstrap-token holder): a multi-use token registers up to 1000 hosts
    /// (`max-registrations`' default), and each registered agent's first 16
    /// authenticated connections (`max_connections / 64`, at most 16) are never closed
    /// to make room. 1000 agents × 16 = 16 000 of the default 16 384 slots, held with
    /// one request per connection every 25 s; the fleet's own hosts hold the rest. From
    /// then on a real host whose connection drops (a restart, a network blip) cannot
    /// get back in: the gateway is full and nothing may be closed — and revoking the
    /// token's agents does not free their slots either. While the gateway is full, an
    /// agent holding more than one connection must give one up before another agent is
    /// refused its first.
    #[test]
    fn a_tokens_worth_of_agents_cannot_lock_every_other_agent_out() {
        let slots = ConnectionSlots::new(&ServeLimits {
            max_connections_per_source: 0,
            ..ServeLimits::default()
        });
        let max = ServeLimits::default().max_connections;
        let mut held = Vec::with_capacity(max);
        for agent in 0..1000u32 {
            for _ in 0..16 {
                let slot = slots
                    .admit(IpAddr::from([
                        10,
                        9,
                        (agent / 256) as u8,
                        (agent % 256) as u8,
                    ]))
                    .expect("room");
                slot.state.trust(&format!("squatter-{agent}"));
                held.push(slot);
            }
        }
        for host in 0..(max - held.len()) {
            let slot = slots
                .admit(IpAddr::from([
                    10,
                    1,
                    (host / 256) as u8,
                    (host % 256) as u8,
                ]))
                .expect("room for the fleet");
            slot.state.trust(&format!("web-{host}"));
            held.push(slot);
        }
        let returning = slots.admit(IpAddr::from([192, 0, 2, 7]));
        assert!(
            returning.is_some(),
            "a host of the fleet cannot connect: 1000 agents of one token hold 16 000 slots none of which may be closed"
        );
    }
}
