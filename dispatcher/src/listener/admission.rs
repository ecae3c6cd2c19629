//! Which TCP connections this replica keeps: the caps (overall and per client address, with
//! defaults derived from the descriptor limit), the admission decision, and the table of open
//! connections that carries it out.
//!
//! A connection with no request in flight (one that has not sent its first request yet, or a
//! keep-alive one between requests) holds a descriptor for nothing: when a cap is reached, the
//! one that has been so the longest is evicted to make room (from the same address when that
//! address is at its cap), so a flood of silent connections cannot lock out a prober or a
//! device. A connection serving a request (a device stream above all) is never evicted; when
//! every slot it could take serves one, a new connection is refused.
//!
//! Pure and synchronous: no sockets, no clock of its own (callers pass `now`). Eviction is a
//! cancelled token; the connection's task does the closing. Not here: timeouts (see
//! [`super::timing`]) and what a refusal writes (see [`super`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Descriptors kept out of the default overall cap: standard streams, the listener, the
/// runtime's own, the database pool (SQLite opens several files per connection), NATS, logs,
/// and the sockets accepted only to be refused or being evicted ([`MAX_REFUSING`],
/// [`MAX_EVICTING`]).
pub const RESERVED_DESCRIPTORS: u64 = 128;
/// The default overall cap never exceeds this, however high the descriptor limit: each
/// connection also costs memory (tens of KiB for a device stream).
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;
/// Connections evicted and not closed yet, at most: beyond it a new connection is refused.
pub const MAX_EVICTING: usize = 32;
/// Refused sockets being answered at once, at most; beyond it they are closed unanswered.
pub const MAX_REFUSING: usize = 32;

/// The caps in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Open connections at most, device streams included.
    pub total: usize,
    /// Open connections at most from one client address.
    pub per_address: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot serves a request, or too many evictions are under way.
    Total,
    /// The client address holds its cap already.
    PerAddress,
}

impl Refusal {
    /// The label of the `dispatcher_connections_refused_total` metric.
    pub fn label(self) -> &'static str {
        match self {
            Self::Total => "max_connections",
            Self::PerAddress => "max_connections_per_ip",
        }
    }

    /// The `error` of the 503 written on the refused socket.
    pub fn message(self) -> &'static str {
        match self {
            Self::Total => "too many connections to this replica; retry later",
            Self::PerAddress => "too many connections from this address; retry later",
        }
    }
}

/// The connections a new one from some address would join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Open connections, evicted ones not closed yet included.
    pub open: usize,
    /// Of them, evicted and not closed yet.
    pub evicting: usize,
    /// Of them, with no request in flight (and not evicted already).
    pub idle: usize,
    /// Open connections from the new one's address, and how many of them are idle.
    pub from_address: usize,
    pub idle_from_address: usize,
}

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Admit it and evict the connection idle the longest.
    EvictOldest,
    /// Admit it and evict the connection from its address idle the longest.
    EvictOldestFromAddress,
    Refuse(Refusal),
}

/// The admission decision.
pub fn decide(load: Load, caps: Caps) -> Admission {
    let may_evict = load.evicting < MAX_EVICTING;
    if load.from_address >= caps.per_address {
        return if may_evict && load.idle_from_address > 0 {
            Admission::EvictOldestFromAddress
        } else {
            Admission::Refuse(Refusal::PerAddress)
        };
    }
    if load.open < caps.total {
        Admission::Admit
    } else if may_evict && load.idle > 0 {
        Admission::EvictOldest
    } else {
        Admission::Refuse(Refusal::Total)
    }
}

/// The caps from the descriptor limit (`None`: unlimited) and the configured values, with a
/// warning when the configuration asks for more than the limit allows. The per-address cap
/// defaults to the overall one: behind a proxy or a load balancer that does not keep client
/// addresses, every connection has the proxy's address.
pub fn derive_caps(
    descriptor_limit: Option<u64>,
    total: Option<usize>,
    per_address: Option<usize>,
) -> (Caps, Option<String>) {
    let allowed = match descriptor_limit {
        // Even a tiny limit leaves half of it to connections; the warning says so.
        Some(limit) if limit < RESERVED_DESCRIPTORS * 2 => usize::try_from(limit / 2).unwrap_or(usize::MAX).max(1),
        Some(limit) => usize::try_from(limit - RESERVED_DESCRIPTORS).unwrap_or(usize::MAX),
        None => usize::MAX,
    };
    let mut warning = match descriptor_limit {
        Some(limit) if limit < RESERVED_DESCRIPTORS * 2 => Some(format!(
            "the descriptor limit ({limit}) is low: raise it (ulimit -n) to serve more than {allowed} connections"
        )),
        _ => None,
    };
    let total = match total {
        Some(total) => {
            if total > allowed {
                warning = Some(format!(
                    "--max-connections {total} is more than the descriptor limit ({}) allows ({allowed}, keeping \
                     {RESERVED_DESCRIPTORS} for the process): accepting will fail when descriptors run out; raise \
                     the limit (ulimit -n)",
                    descriptor_limit.map_or_else(|| "unlimited".to_owned(), |l| l.to_string()),
                ));
            }
            total
        }
        None => allowed.min(DEFAULT_MAX_CONNECTIONS),
    };
    let per_address = per_address.unwrap_or(total).min(total);
    (Caps { total, per_address }, warning)
}

/// What the timeouts need to know of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    pub accepted: Instant,
    /// Requests begun on it so far.
    pub requests: u64,
    pub in_flight: u32,
    /// Since when no request has been in flight (the accept, or the end of the last response).
    pub idle_since: Instant,
}

#[derive(Debug)]
struct Entry {
    address: IpAddr,
    activity: Activity,
    /// Its key in the eviction order while no request is in flight.
    idle_key: Option<u64>,
    evicted: bool,
    evict: CancellationToken,
    /// Woken when its last request in flight ends, so its idle timer starts then.
    idle: Arc<Notify>,
}

/// The connections of one client address.
#[derive(Debug, Default)]
struct Address {
    open: usize,
    /// Its connections with no request in flight, oldest first: idle key to id.
    idle: BTreeMap<u64, u64>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<u64, Entry>,
    addresses: HashMap<IpAddr, Address>,
    /// Connections with no request in flight, oldest first: idle key to id.
    idle: BTreeMap<u64, u64>,
    evicting: usize,
    next_id: u64,
    next_key: u64,
}

impl Inner {
    fn load(&self, address: IpAddr) -> Load {
        let from = self.addresses.get(&address);
        Load {
            open: self.entries.len(),
            evicting: self.evicting,
            idle: self.idle.len(),
            from_address: from.map_or(0, |a| a.open),
            idle_from_address: from.map_or(0, |a| a.idle.len()),
        }
    }

    fn mark_idle(&mut self, id: u64) {
        let Some(entry) = self.entries.get_mut(&id) else { return };
        if entry.idle_key.is_some() || entry.evicted {
            return;
        }
        let key = self.next_key;
        self.next_key += 1;
        entry.idle_key = Some(key);
        self.idle.insert(key, id);
        self.addresses.entry(entry.address).or_default().idle.insert(key, id);
    }

    fn mark_busy(&mut self, id: u64) {
        let Some(entry) = self.entries.get_mut(&id) else { return };
        if let Some(key) = entry.idle_key.take() {
            self.idle.remove(&key);
            if let Some(address) = self.addresses.get_mut(&entry.address) {
                address.idle.remove(&key);
            }
        }
    }

    /// Evicts the connection idle the longest, from `address` only when given.
    fn evict_oldest(&mut self, address: Option<IpAddr>) {
        let victim = match address {
            Some(address) => self.addresses.get(&address).and_then(|a| a.idle.first_key_value()),
            None => self.idle.first_key_value(),
        };
        let Some((_, &victim)) = victim else { return };
        self.mark_busy(victim);
        if let Some(entry) = self.entries.get_mut(&victim) {
            entry.evicted = true;
            entry.evict.cancel();
            self.evicting += 1;
        }
    }
}

/// The open connections of this replica.
#[derive(Debug)]
pub struct ConnectionTable {
    caps: Caps,
    inner: Mutex<Inner>,
}

/// An admitted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Admitted {
    table: Arc<ConnectionTable>,
    id: u64,
    evict: CancellationToken,
    idle: Arc<Notify>,
}

impl Admitted {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Cancelled when the connection is evicted: its task must close it.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evict
    }

    pub fn table(&self) -> &Arc<ConnectionTable> {
        &self.table
    }

    /// Notified when the connection's last request in flight ends (a permit is kept when no one
    /// waits): its task then times the idle period from that moment, not from its last look.
    pub fn became_idle(&self) -> &Arc<Notify> {
        &self.idle
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.table.release(self.id);
    }
}

impl ConnectionTable {
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self { caps, inner: Mutex::default() })
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Open connections, evicted ones not closed yet included.
    pub fn open(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Admits a connection from `address` (evicting the one idle the longest when the overall
    /// cap is reached), or says why not.
    pub fn admit(self: &Arc<Self>, address: IpAddr, now: Instant) -> Result<Admitted, Refusal> {
        let mut inner = self.inner.lock();
        match decide(inner.load(address), self.caps) {
            Admission::Refuse(refusal) => return Err(refusal),
            Admission::EvictOldest => inner.evict_oldest(None),
            Admission::EvictOldestFromAddress => inner.evict_oldest(Some(address)),
            Admission::Admit => {}
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let evict = CancellationToken::new();
        let idle = Arc::new(Notify::new());
        let activity = Activity { accepted: now, requests: 0, in_flight: 0, idle_since: now };
        let entry =
            Entry { address, activity, idle_key: None, evicted: false, evict: evict.clone(), idle: idle.clone() };
        inner.entries.insert(id, entry);
        inner.addresses.entry(address).or_default().open += 1;
        inner.mark_idle(id);
        Ok(Admitted { table: self.clone(), id, evict, idle })
    }

    /// A request began on connection `id`: it cannot be evicted until none is in flight.
    pub fn request_started(&self, id: u64, now: Instant) {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.entries.get_mut(&id) else { return };
        entry.activity.requests += 1;
        entry.activity.in_flight += 1;
        entry.activity.idle_since = now;
        inner.mark_busy(id);
    }

    /// A request on connection `id` ended (its response was sent, or given up).
    pub fn request_finished(&self, id: u64, now: Instant) {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.entries.get_mut(&id) else { return };
        entry.activity.in_flight = entry.activity.in_flight.saturating_sub(1);
        entry.activity.idle_since = now;
        if entry.activity.in_flight == 0 {
            entry.idle.notify_one();
            inner.mark_idle(id);
        }
    }

    pub fn activity(&self, id: u64) -> Option<Activity> {
        self.inner.lock().entries.get(&id).map(|entry| entry.activity)
    }

    fn release(&self, id: u64) {
        let mut inner = self.inner.lock();
        inner.mark_busy(id);
        let Some(entry) = inner.entries.remove(&id) else { return };
        if entry.evicted {
            inner.evicting -= 1;
        }
        if let Some(address) = inner.addresses.get_mut(&entry.address) {
            address.open -= 1;
            if address.open == 0 {
                inner.addresses.remove(&entry.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps { total: 10, per_address: 4 };

    #[test]
    fn decisions() {
        use Admission::*;
        let load = |open, evicting, idle, from_address, idle_from_address| Load {
            open,
            evicting,
            idle,
            from_address,
            idle_from_address,
        };
        let m = MAX_EVICTING;
        let cases = [
            // open, evicting, idle, from the address, idle from the address
            (load(0, 0, 0, 0, 0), Admit),
            (load(9, 0, 0, 3, 0), Admit),
            (load(9, 0, 9, 3, 3), Admit),
            // The address at its cap: its own idle connection goes, or it is refused.
            (load(5, 0, 5, 4, 1), EvictOldestFromAddress),
            (load(5, 0, 1, 4, 0), Refuse(Refusal::PerAddress)),
            (load(10, 0, 5, 4, 0), Refuse(Refusal::PerAddress)),
            // The replica at its cap: the oldest idle connection goes, or it is refused.
            (load(10, 0, 1, 0, 0), EvictOldest),
            (load(10, 0, 0, 2, 0), Refuse(Refusal::Total)),
            // Evictions under way are bounded.
            (load(10 + m - 1, m - 1, 1, 0, 0), EvictOldest),
            (load(10 + m, m, 1, 0, 0), Refuse(Refusal::Total)),
            (load(10 + m, m, 1, 4, 1), Refuse(Refusal::PerAddress)),
        ];
        for (load, expected) in cases {
            assert_eq!(decide(load, CAPS), expected, "{load:?}");
        }
    }

    #[test]
    fn caps_from_the_descriptor_limit() {
        // Descriptor limit, --max-connections, --max-connections-per-ip, caps, a warning?
        type Case = (Option<u64>, Option<usize>, Option<usize>, Caps, bool);
        let cases: [Case; 7] = [
            (Some(256), None, None, Caps { total: 128, per_address: 128 }, false),
            (Some(20_000), None, Some(100), Caps { total: 19_872, per_address: 100 }, false),
            (
                Some(1 << 20),
                None,
                None,
                Caps { total: DEFAULT_MAX_CONNECTIONS, per_address: DEFAULT_MAX_CONNECTIONS },
                false,
            ),
            (None, None, None, Caps { total: DEFAULT_MAX_CONNECTIONS, per_address: DEFAULT_MAX_CONNECTIONS }, false),
            (Some(100), None, None, Caps { total: 50, per_address: 50 }, true),
            (Some(256), Some(1000), None, Caps { total: 1000, per_address: 1000 }, true),
            (Some(256), Some(50), Some(80), Caps { total: 50, per_address: 50 }, false),
        ];
        for (limit, total, per_address, expected, warns) in cases {
            let (caps, warning) = derive_caps(limit, total, per_address);
            assert_eq!(caps, expected, "{limit:?} {total:?} {per_address:?}");
            assert_eq!(warning.is_some(), warns, "{limit:?} {total:?}: {warning:?}");
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn per_address_cap_and_release() {
        let table = ConnectionTable::new(CAPS);
        let now = Instant::now();
        let mut held: Vec<Admitted> = (0..4).map(|_| table.admit(ip(1), now).expect("admitted")).collect();
        for conn in &held {
            table.request_started(conn.id(), now);
        }
        assert_eq!(table.admit(ip(1), now).unwrap_err(), Refusal::PerAddress);
        let other = table.admit(ip(2), now).expect("another address is admitted");
        held.pop();
        let again = table.admit(ip(1), now).expect("a freed slot is reused");
        assert_eq!(table.open(), 5);
        drop((other, again));
        assert_eq!(table.open(), 3);
    }

    #[test]
    fn an_address_at_its_cap_gives_up_its_own_idle_connection() {
        let table = ConnectionTable::new(CAPS);
        let now = Instant::now();
        let others_idle = table.admit(ip(2), now).expect("admitted");
        let own_idle = table.admit(ip(1), now).expect("admitted");
        let busy: Vec<Admitted> = (0..3).map(|_| table.admit(ip(1), now).expect("admitted")).collect();
        for conn in &busy {
            table.request_started(conn.id(), now);
        }
        let newest = table.admit(ip(1), now).expect("admitted by evicting its own idle connection");
        assert!(own_idle.evicted().is_cancelled());
        assert!(!others_idle.evicted().is_cancelled(), "another address's connection is not touched");
        drop(own_idle);
        table.request_started(newest.id(), now);
        assert_eq!(table.admit(ip(1), now).unwrap_err(), Refusal::PerAddress);
    }

    #[test]
    fn full_table_evicts_the_longest_idle_never_a_busy_one() {
        let table = ConnectionTable::new(Caps { total: 3, per_address: 3 });
        let t0 = Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let stream = table.admit(ip(1), at(0)).expect("admitted");
        table.request_started(stream.id(), at(1));
        let older = table.admit(ip(2), at(2)).expect("admitted");
        let newer = table.admit(ip(3), at(3)).expect("admitted");
        // `newer` served a request since: it is now the most recently idle.
        table.request_started(newer.id(), at(4));
        table.request_finished(newer.id(), at(5));

        let fourth = table.admit(ip(4), at(6)).expect("admitted by evicting");
        assert!(older.evicted().is_cancelled(), "the connection idle the longest goes first");
        assert!(!newer.evicted().is_cancelled() && !stream.evicted().is_cancelled());
        assert_eq!(table.open(), 4, "the evicted one counts until it is closed");
        drop(older);
        assert_eq!(table.open(), 3);

        let fifth = table.admit(ip(5), at(7)).expect("admitted by evicting");
        assert!(newer.evicted().is_cancelled());
        drop(newer);
        // Busy connections only: the stream, and `fourth` and `fifth` serving requests.
        table.request_started(fourth.id(), at(8));
        table.request_started(fifth.id(), at(8));
        assert_eq!(table.admit(ip(6), at(9)).unwrap_err(), Refusal::Total);
        assert!(!stream.evicted().is_cancelled());
    }

    #[test]
    fn evictions_under_way_are_bounded() {
        let table = ConnectionTable::new(Caps { total: 1, per_address: 1000 });
        let now = Instant::now();
        let mut held = vec![table.admit(ip(1), now).expect("admitted")];
        for _ in 0..MAX_EVICTING {
            held.push(table.admit(ip(1), now).expect("admitted by evicting"));
        }
        assert_eq!(table.admit(ip(1), now).unwrap_err(), Refusal::Total, "evicted ones have not closed yet");
        held.remove(0);
        assert!(table.admit(ip(1), now).is_ok());
    }

    #[test]
    fn activity_follows_requests() {
        let table = ConnectionTable::new(CAPS);
        let t0 = Instant::now();
        let conn = table.admit(ip(1), t0).expect("admitted");
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        assert_eq!(
            table.activity(conn.id()),
            Some(Activity { accepted: t0, requests: 0, in_flight: 0, idle_since: t0 })
        );
        table.request_started(conn.id(), at(10));
        table.request_started(conn.id(), at(20));
        table.request_finished(conn.id(), at(30));
        let activity = table.activity(conn.id()).expect("open");
        assert_eq!((activity.requests, activity.in_flight), (2, 1));
        table.request_finished(conn.id(), at(40));
        assert_eq!(table.activity(conn.id()).map(|a| (a.in_flight, a.idle_since)), Some((0, at(40))));
        let id = conn.id();
        drop(conn);
        assert_eq!(table.activity(id), None);
        table.request_finished(id, at(50));
    }
}
