//! A byte-budgeted, load-once LRU cache with explicit leases: the one shape behind the
//! inference service's models and tensors and the compositor's avatars.
//!
//! - **Load once.** Concurrent requests for a key that is not loaded wait for one load
//!   (single flight). A load that fails stays failed, with its reason, until
//!   [`BudgetCache::forget_failure`] or an explicit reload; a load refused for lack of room is
//!   forgotten at once, so the next request tries again.
//! - **Budget.** Before loading, the loader's estimate is reserved against the budget; least
//!   recently used entries that are ready, idle (no lease) and not pinned are evicted until it
//!   fits. Once loaded, the entry is charged what it really holds.
//! - **Leases.** [`Lease`] is the only way to use a value: while one lives, its entry is
//!   never evicted. Removing an entry takes it out of the cache at once, but leases already
//!   out keep the value alive, so its bytes stay charged to the budget (and to its tenant)
//!   until the last of them is dropped: replacing a value in use never lets memory outgrow
//!   the budget.
//! - **Tenants.** Entries loaded for a tenant ([`BudgetCache::get_or_load_for`]) count
//!   against that tenant's own limits ([`TenantLimits`]: bytes and entries); a tenant at a
//!   limit makes room among its own entries first. A tenant never evicts another tenant's
//!   entries while that tenant holds no more than its fair share (the budget divided by the
//!   tenants holding bytes), so one client cannot push the others out.
//! - **Shared budgets.** Caches of different values may also share one [`SharedBudget`] (a
//!   device's memory, held by models and tensors alike): room for an entry of one is made by
//!   evicting the least recently used idle entry of any of them.
//!
//! Bookkeeping is constant time per operation (running totals, and an index of entries by
//! last use); only making room walks entries, from the least recently used on.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use tokio::sync::OnceCell;

/// Use order across every cache of the process, so that caches sharing a budget compare
/// their entries' last uses on one clock.
static CLOCK: AtomicU64 = AtomicU64::new(1);

/// Why a value could not be had. `shared`: the budget that refused it is the
/// [`SharedBudget`], not the cache's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheError<E> {
    /// The value alone is larger than the whole budget.
    TooLarge {
        need: u64,
        budget: u64,
        shared: bool,
    },
    /// Every entry that could make room is pinned, leased, or another tenant's within its
    /// fair share.
    NoRoom {
        need: u64,
        free: u64,
        budget: u64,
        shared: bool,
    },
    /// The tenant's own byte limit: `used` of `limit` are held by its entries in use.
    TenantBytes { need: u64, used: u64, limit: u64 },
    /// The tenant holds `limit` entries, all in use.
    TenantEntries { limit: usize },
    /// The loader (or its estimate) failed.
    Load(E),
}

/// What one tenant may hold of a cache ([`BudgetCache::with_tenant_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// Bytes of its entries, those removed but still leased included.
    pub max_bytes: u64,
    /// Entries (ready or loading).
    pub max_entries: usize,
}

/// What the owner wants to hear about, for logs and metrics.
pub trait Events: Send + Sync {
    /// `key` was evicted to make room for `for_entry` (the [`Events::label`] of the entry
    /// that needed the room, perhaps of another cache sharing the budget), freeing `freed`
    /// bytes.
    fn evicted(&self, _key: &str, _freed: u64, _for_entry: &str) {}
    /// Bytes reserved or ready entries changed.
    fn changed(&self, _reserved: u64, _ready: usize) {}
    /// How `key` is named to others (logs of another cache that evicts for it): keys that
    /// hold something private (a credential) are named without it.
    fn label(&self, key: &str) -> String {
        key.to_string()
    }
}

/// No one listening.
pub struct Quiet;
impl Events for Quiet {}

/// An entry's state, as listings report it.
pub enum State<V, E> {
    Loading,
    Ready(Arc<V>),
    Failed(E),
}

struct Entry<V, E> {
    key: Arc<str>,
    tenant: Option<Arc<str>>,
    cell: OnceCell<Result<Arc<V>, CacheError<E>>>,
    /// Bytes charged to the budget: the estimate while loading, the real size once ready.
    /// Changed only under the table's lock, with the table's totals.
    reserved: AtomicU64,
    leases: AtomicUsize,
    /// The entry's place in its tenant's order ([`Table::orders`]).
    last_used: AtomicU64,
}

impl<V, E> Entry<V, E> {
    fn ready(&self) -> Option<&Arc<V>> {
        match self.cell.get() {
            Some(Ok(v)) => Some(v),
            _ => None,
        }
    }

    fn bytes(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    fn idle(&self) -> bool {
        self.leases.load(Ordering::Acquire) == 0
    }
}

/// What one tenant holds.
#[derive(Default, Clone, Copy)]
struct Usage {
    bytes: u64,
    entries: usize,
}

/// The entries and the running totals over them, under one lock.
struct Table<V, E> {
    map: HashMap<Arc<str>, Arc<Entry<V, E>>>,
    /// The entries of `map` by last use (the stamp in their `last_used`), one order per
    /// tenant (`None`: entries of no tenant), so that making room looks only at the
    /// tenants it may take from.
    orders: HashMap<Option<Arc<str>>, BTreeMap<u64, Arc<str>>>,
    /// Bytes reserved by the entries of `map`, and by `retired`.
    reserved: u64,
    /// Entries of `map` whose load succeeded.
    ready: usize,
    /// Entries removed while leased: their bytes stay counted until their last lease goes.
    retired: Vec<Arc<Entry<V, E>>>,
    tenants: HashMap<Arc<str>, Usage>,
}

impl<V, E> Default for Table<V, E> {
    fn default() -> Self {
        Table {
            map: HashMap::new(),
            orders: HashMap::new(),
            reserved: 0,
            ready: 0,
            retired: Vec::new(),
            tenants: HashMap::new(),
        }
    }
}

impl<V, E> Table<V, E> {
    fn holds(&self, entry: &Arc<Entry<V, E>>) -> bool {
        self.map
            .get(&entry.key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
    }

    fn tenant_usage(&self, tenant: &str) -> Usage {
        self.tenants.get(tenant).copied().unwrap_or_default()
    }

    /// Adds `delta` bytes (and `entries`) to `entry`'s tenant, if it has one.
    fn charge_tenant(&mut self, entry: &Entry<V, E>, bytes: i128, entries: isize) {
        let Some(t) = &entry.tenant else { return };
        let u = self.tenants.entry(t.clone()).or_default();
        u.bytes = (u.bytes as i128 + bytes).max(0) as u64;
        u.entries = (u.entries as isize + entries).max(0) as usize;
        if u.bytes == 0 && u.entries == 0 {
            self.tenants.remove(t);
        }
    }

    /// Sets what `entry` (held by `map`, or retired) is charged.
    fn set_reserved(&mut self, entry: &Entry<V, E>, bytes: u64) {
        let old = entry.reserved.swap(bytes, Ordering::AcqRel);
        self.reserved = self.reserved.saturating_sub(old) + bytes;
        self.charge_tenant(entry, bytes as i128 - old as i128, 0);
    }

    /// Drops the retired entries whose last lease has gone, and their bytes.
    fn prune(&mut self) {
        if self.retired.iter().all(|e| !e.idle()) {
            return;
        }
        let retired = std::mem::take(&mut self.retired);
        for e in retired {
            if e.idle() {
                self.set_reserved(&e, 0);
            } else {
                self.retired.push(e);
            }
        }
    }

    /// Takes `key` out of the cache; a leased entry stays charged until its leases go.
    fn remove(&mut self, key: &str) -> Option<Arc<Entry<V, E>>> {
        let e = self.map.remove(key)?;
        self.unorder(&e);
        if e.ready().is_some() {
            self.ready -= 1;
        }
        self.charge_tenant(&e, 0, -1);
        if e.idle() {
            self.set_reserved(&e, 0);
        } else {
            self.retired.push(e.clone());
        }
        Some(e)
    }

    fn touch(&mut self, entry: &Entry<V, E>) {
        let stamp = CLOCK.fetch_add(1, Ordering::Relaxed);
        if !self.holds_key(&entry.key, entry) {
            entry.last_used.store(stamp, Ordering::Relaxed);
            return;
        }
        self.unorder(entry);
        entry.last_used.store(stamp, Ordering::Relaxed);
        self.orders
            .entry(entry.tenant.clone())
            .or_default()
            .insert(stamp, entry.key.clone());
    }

    /// Takes `entry` out of its tenant's order.
    fn unorder(&mut self, entry: &Entry<V, E>) {
        let stamp = entry.last_used.load(Ordering::Relaxed);
        if let Some(order) = self.orders.get_mut(&entry.tenant) {
            order.remove(&stamp);
            if order.is_empty() {
                self.orders.remove(&entry.tenant);
            }
        }
    }

    fn holds_key(&self, key: &str, entry: &Entry<V, E>) -> bool {
        self.map
            .get(key)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), entry))
    }
}

/// The value of one entry, in use: never evicted while this lives.
pub struct Lease<V, E> {
    value: Arc<V>,
    entry: Arc<Entry<V, E>>,
}

impl<V, E> Lease<V, E> {
    /// The value itself, to keep past the lease (it may then be evicted from the cache).
    pub fn value(&self) -> &Arc<V> {
        &self.value
    }
}

impl<V, E> std::ops::Deref for Lease<V, E> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.value
    }
}

impl<V, E> Drop for Lease<V, E> {
    fn drop(&mut self) {
        self.entry.leases.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Room held in a cache's budget for a value not there yet (one arriving in parts), charged
/// to its tenant like an entry; given back when dropped.
pub struct Reservation<V, E> {
    entry: Arc<Entry<V, E>>,
}

impl<V, E> Reservation<V, E> {
    pub fn bytes(&self) -> u64 {
        self.entry.bytes()
    }
}

impl<V, E> Drop for Reservation<V, E> {
    fn drop(&mut self) {
        // Held as a lease on an entry of the retired list: pruned once released.
        self.entry.leases.fetch_sub(1, Ordering::AcqRel);
    }
}

type Pinned<V> = Box<dyn Fn(&str, &V) -> bool + Send + Sync>;

pub struct BudgetCache<V, E> {
    budget: Option<u64>,
    table: Mutex<Table<V, E>>,
    pinned: Pinned<V>,
    events: Arc<dyn Events>,
    tenant_limits: Option<TenantLimits>,
    /// The budget this cache shares with others, once it has joined one.
    shared: OnceLock<Arc<SharedBudget>>,
}

/// One budget several [`BudgetCache`]s share, besides any of their own: the bytes all their
/// entries reserve stay within it, and room for an entry of one is made by evicting the
/// least recently used idle, unpinned, ready entry of any of them.
pub struct SharedBudget {
    budget: u64,
    members: Mutex<Vec<Weak<dyn Member>>>,
    /// One reservation at a time across the members, so two never count the same free
    /// bytes.
    turn: Mutex<()>,
}

/// What a [`SharedBudget`] needs of each cache that shares it.
trait Member: Send + Sync {
    fn used(&self) -> u64;
    /// The least recently used entry that may be evicted for an entry of `for_tenant`, other
    /// than `except`: its last use and key.
    fn oldest(&self, except: Option<&str>, for_tenant: Option<&str>) -> Option<(u64, String)>;
    /// Evicts `key` for `for_entry` if it still may be; the bytes freed.
    fn evict(&self, key: &str, for_entry: &str) -> Option<u64>;
}

impl SharedBudget {
    pub fn new(budget: u64) -> Arc<SharedBudget> {
        Arc::new(SharedBudget {
            budget,
            members: Mutex::default(),
            turn: Mutex::default(),
        })
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes the members' entries reserve, all together.
    pub fn used(&self) -> u64 {
        self.members().iter().map(|m| m.used()).sum()
    }

    fn members(&self) -> Vec<Arc<dyn Member>> {
        let mut members = self.members.lock();
        members.retain(|m| m.strong_count() > 0);
        members.iter().filter_map(Weak::upgrade).collect()
    }

    /// Evicts until `need` more bytes fit, never `key` of the member at `me`; called with
    /// the turn held.
    fn make_room<E>(
        &self,
        me: *const (),
        key: &str,
        tenant: Option<&str>,
        label: &str,
        need: u64,
    ) -> Result<(), CacheError<E>> {
        if need > self.budget {
            return Err(CacheError::TooLarge {
                need,
                budget: self.budget,
                shared: true,
            });
        }
        loop {
            let members = self.members();
            let used: u64 = members.iter().map(|m| m.used()).sum();
            if used + need <= self.budget {
                return Ok(());
            }
            let victim = members
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    let mine = std::ptr::eq(Arc::as_ptr(m) as *const (), me);
                    // Tenants are a cache's own: another cache's entry needs room as itself.
                    let (used, k) = m.oldest(mine.then_some(key), tenant.filter(|_| mine))?;
                    Some((used, i, k))
                })
                .min();
            let Some((_, i, victim)) = victim else {
                return Err(CacheError::NoRoom {
                    need,
                    free: self.budget.saturating_sub(used),
                    budget: self.budget,
                    shared: true,
                });
            };
            // Leased since it was picked: the next round picks another.
            members[i].evict(&victim, label);
        }
    }
}

impl<V, E: Clone> BudgetCache<V, E> {
    /// A cache of at most `budget` bytes (`None`: unlimited); `pinned` entries are never
    /// evicted.
    pub fn new(
        budget: Option<u64>,
        pinned: impl Fn(&str, &V) -> bool + Send + Sync + 'static,
        events: Arc<dyn Events>,
    ) -> Self {
        BudgetCache {
            budget,
            table: Mutex::default(),
            pinned: Box::new(pinned),
            events,
            tenant_limits: None,
            shared: OnceLock::new(),
        }
    }

    /// The same cache, holding each tenant's entries to `limits`.
    pub fn with_tenant_limits(mut self, limits: TenantLimits) -> Self {
        self.tenant_limits = Some(limits);
        self
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// The budget this cache shares with others, if it joined one.
    pub fn shared(&self) -> Option<&Arc<SharedBudget>> {
        self.shared.get()
    }

    /// A lease on `key` if it is loaded and ready; never loads.
    pub fn lease_ready(&self, key: &str) -> Option<Lease<V, E>> {
        let mut table = self.table.lock();
        let entry = table.map.get(key)?.clone();
        let value = entry.ready()?.clone();
        Some(Self::lease(&mut table, &entry, value))
    }

    /// `key`'s value if it is loaded and ready, without a lease (for reading its description;
    /// use a lease to use it).
    pub fn peek(&self, key: &str) -> Option<Arc<V>> {
        self.table.lock().map.get(key)?.ready().cloned()
    }

    /// A lease on `key`, loading it first if it is not loaded: `estimate` gives the bytes to
    /// reserve before loading, `load` (given them) the value and the bytes it really holds
    /// (more than the estimate: room is made for the rest, or the value is refused). Concurrent
    /// callers for one key share one load. A failed load is returned as it was until
    /// [`BudgetCache::forget_failure`].
    pub async fn get_or_load<Est, Load, Fut>(
        &self,
        key: &str,
        estimate: Est,
        load: Load,
    ) -> Result<Lease<V, E>, CacheError<E>>
    where
        Est: FnOnce() -> Result<u64, E>,
        Load: FnOnce(u64) -> Fut,
        Fut: Future<Output = Result<(V, u64), E>>,
    {
        self.get_or_load_for(None, key, estimate, load).await
    }

    /// [`BudgetCache::get_or_load`], the entry (if it is loaded now) charged to `tenant`
    /// under the cache's [`TenantLimits`].
    pub async fn get_or_load_for<Est, Load, Fut>(
        &self,
        tenant: Option<&str>,
        key: &str,
        estimate: Est,
        load: Load,
    ) -> Result<Lease<V, E>, CacheError<E>>
    where
        Est: FnOnce() -> Result<u64, E>,
        Load: FnOnce(u64) -> Fut,
        Fut: Future<Output = Result<(V, u64), E>>,
    {
        let entry = {
            let mut table = self.table.lock();
            if let Some(entry) = table.map.get(key).cloned() {
                if let Some(value) = entry.ready() {
                    let value = value.clone();
                    return Ok(Self::lease(&mut table, &entry, value));
                }
                entry
            } else {
                self.insert(&mut table, key, tenant)?
            }
        };
        let result = entry
            .cell
            .get_or_init(|| self.load_entry(&entry, estimate, load))
            .await
            .clone();
        let mut table = self.table.lock();
        let outcome = match result {
            Ok(value) => Ok(Self::lease(&mut table, &entry, value)),
            Err(e) => {
                // Lack of room is transient: forget the attempt, so the next request tries
                // again (not this very entry if another replaced it meanwhile).
                if !matches!(e, CacheError::Load(_)) && table.holds(&entry) {
                    table.remove(key);
                }
                Err(e)
            }
        };
        drop(table);
        // The cell is set now: the counts include this load's outcome.
        self.publish();
        outcome
    }

    /// A new, loading entry for `key` in `table`, within `tenant`'s entry limit (its least
    /// recently used idle entry makes room if need be).
    fn insert(
        &self,
        table: &mut Table<V, E>,
        key: &str,
        tenant: Option<&str>,
    ) -> Result<Arc<Entry<V, E>>, CacheError<E>> {
        let tenant: Option<Arc<str>> = tenant.map(Arc::from);
        if let (Some(t), Some(limits)) = (&tenant, self.tenant_limits) {
            while table.tenant_usage(t).entries >= limits.max_entries {
                let Some((_, victim)) = self.oldest_of_tenant(table, t, None) else {
                    return Err(CacheError::TenantEntries {
                        limit: limits.max_entries,
                    });
                };
                self.evict_in(table, &victim, &self.events.label(key));
            }
        }
        let key: Arc<str> = Arc::from(key);
        let entry = Arc::new(Entry {
            key: key.clone(),
            tenant,
            cell: OnceCell::new(),
            reserved: AtomicU64::new(0),
            leases: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
        });
        table.map.insert(key, entry.clone());
        table.charge_tenant(&entry, 0, 1);
        table.touch(&entry);
        Ok(entry)
    }

    async fn load_entry<Est, Load, Fut>(
        &self,
        entry: &Arc<Entry<V, E>>,
        estimate: Est,
        load: Load,
    ) -> Result<Arc<V>, CacheError<E>>
    where
        Est: FnOnce() -> Result<u64, E>,
        Load: FnOnce(u64) -> Fut,
        Fut: Future<Output = Result<(V, u64), E>>,
    {
        let need = estimate().map_err(CacheError::Load)?;
        self.reserve(entry, need)?;
        match load(need).await {
            Ok((value, bytes)) => {
                // More than estimated: room for all of it, by eviction if need be, or it is
                // refused; the budget is never overrun.
                if bytes > need {
                    if let Err(e) = self.reserve(entry, bytes) {
                        self.table.lock().set_reserved(entry, 0);
                        self.publish();
                        return Err(e);
                    }
                }
                let mut table = self.table.lock();
                table.set_reserved(entry, bytes);
                if table.holds(entry) {
                    table.ready += 1;
                } else if bytes > 0 {
                    // Removed while it loaded: its caller still gets it, so it counts.
                    table.retired.push(entry.clone());
                }
                table.touch(entry);
                Ok(Arc::new(value))
            }
            Err(e) => {
                self.table.lock().set_reserved(entry, 0);
                Err(CacheError::Load(e))
            }
        }
    }

    /// Charges `need` bytes to `entry` (instead of what it was charged), evicting idle,
    /// unpinned, ready entries least recently used first until it fits its tenant's limit,
    /// this cache's budget and then the shared one (whose evictions may be of another
    /// cache's entries).
    fn reserve(&self, entry: &Entry<V, E>, need: u64) -> Result<(), CacheError<E>> {
        let key = &*entry.key;
        let tenant = entry.tenant.as_deref();
        let label = self.events.label(key);
        let shared = self.shared.get();
        let _turn = shared.map(|s| s.turn.lock());
        {
            let mut table = self.table.lock();
            table.prune();
            let mine = entry.bytes();
            if let (Some(t), Some(limits)) = (tenant, self.tenant_limits) {
                if need > limits.max_bytes {
                    let used = table.tenant_usage(t).bytes.saturating_sub(mine);
                    return Err(CacheError::TenantBytes {
                        need,
                        used,
                        limit: limits.max_bytes,
                    });
                }
                loop {
                    let used = table.tenant_usage(t).bytes.saturating_sub(mine);
                    if used + need <= limits.max_bytes {
                        break;
                    }
                    let Some((_, victim)) = self.oldest_of_tenant(&table, t, Some(key)) else {
                        return Err(CacheError::TenantBytes {
                            need,
                            used,
                            limit: limits.max_bytes,
                        });
                    };
                    self.evict_in(&mut table, &victim, &label);
                }
            }
            if let Some(budget) = self.budget {
                if need > budget {
                    return Err(CacheError::TooLarge {
                        need,
                        budget,
                        shared: false,
                    });
                }
                loop {
                    table.prune();
                    let used = table.reserved.saturating_sub(mine);
                    if used + need <= budget {
                        break;
                    }
                    // Leases are taken under this lock, so an idle entry stays idle until
                    // it is removed here.
                    let Some((_, victim)) = self.oldest_in(&table, Some(key), tenant) else {
                        return Err(CacheError::NoRoom {
                            need,
                            free: budget.saturating_sub(used),
                            budget,
                            shared: false,
                        });
                    };
                    self.evict_in(&mut table, &victim, &label);
                }
            }
            if shared.is_none() {
                table.set_reserved(entry, need);
            } else {
                // The shared budget counts this entry's new charge as the need.
                table.set_reserved(entry, 0);
            }
        }
        if let Some(s) = shared {
            let me = self as *const Self as *const ();
            s.make_room(me, key, tenant, &label, need)?;
            // Still under the turn: no other member reserves meanwhile.
            self.table.lock().set_reserved(entry, need);
        }
        self.publish();
        Ok(())
    }

    /// Removes `victim` to make room for `for_entry`, and says so.
    fn evict_in(&self, table: &mut Table<V, E>, victim: &str, for_entry: &str) {
        let freed = table.map.get(victim).map_or(0, |e| e.bytes());
        table.remove(victim);
        self.events.evicted(victim, freed, for_entry);
    }

    /// Whether `e` may be evicted at all: ready, idle, unpinned.
    fn evictable(&self, e: &Entry<V, E>) -> bool {
        e.idle() && e.ready().is_some_and(|v| !(self.pinned)(&e.key, v))
    }

    /// The least recently used entry of `table` that may be evicted for an entry of
    /// `for_tenant`, other than `except`: ready, idle, unpinned, and not another tenant's
    /// while that tenant holds no more than its fair share of the budget. Looks at the
    /// oldest of each tenant it may take from, not at every entry.
    fn oldest_in(
        &self,
        table: &Table<V, E>,
        except: Option<&str>,
        for_tenant: Option<&str>,
    ) -> Option<(u64, String)> {
        let fair = match (self.budget, for_tenant) {
            (Some(budget), Some(me)) => {
                let holders = table.tenants.iter().filter(|(_, u)| u.bytes > 0);
                let count = holders.clone().count() as u64
                    + u64::from(!holders.clone().any(|(t, _)| &**t == me));
                Some(budget / count.max(1))
            }
            _ => None,
        };
        table
            .orders
            .iter()
            .filter(|(tenant, _)| match (tenant, fair) {
                (Some(t), Some(fair)) => {
                    Some(&**t) == for_tenant || table.tenant_usage(t).bytes > fair
                }
                _ => true,
            })
            .filter_map(|(_, order)| self.oldest_of(table, order, except))
            .min()
    }

    /// The least recently used evictable entry of `tenant`, other than `except`.
    fn oldest_of_tenant(
        &self,
        table: &Table<V, E>,
        tenant: &str,
        except: Option<&str>,
    ) -> Option<(u64, String)> {
        let order = table.orders.get(&Some(Arc::from(tenant)))?;
        self.oldest_of(table, order, except)
    }

    /// The first evictable entry of `order`, other than `except`.
    fn oldest_of(
        &self,
        table: &Table<V, E>,
        order: &BTreeMap<u64, Arc<str>>,
        except: Option<&str>,
    ) -> Option<(u64, String)> {
        order.iter().find_map(|(&stamp, k)| {
            let e = table.map.get(k)?;
            (Some(&**k) != except && self.evictable(e)).then(|| (stamp, k.to_string()))
        })
    }

    fn lease(table: &mut Table<V, E>, entry: &Arc<Entry<V, E>>, value: Arc<V>) -> Lease<V, E> {
        entry.leases.fetch_add(1, Ordering::AcqRel);
        table.touch(entry);
        Lease {
            value,
            entry: entry.clone(),
        }
    }

    /// Holds `bytes` of the budget for `tenant` (a value that will arrive in parts, named
    /// `label` in logs of what is evicted for it), making room as a load would: the tenant's
    /// own limits first, then this cache's budget and the shared one.
    pub fn reserve_for(
        &self,
        tenant: Option<&str>,
        label: &str,
        bytes: u64,
    ) -> Result<Reservation<V, E>, CacheError<E>> {
        let entry = Arc::new(Entry {
            // Never a key of the map: a reservation is not an entry.
            key: Arc::from(format!("\0reservation {label}")),
            tenant: tenant.map(Arc::from),
            cell: OnceCell::new(),
            reserved: AtomicU64::new(0),
            leases: AtomicUsize::new(1),
            last_used: AtomicU64::new(0),
        });
        self.reserve(&entry, bytes)?;
        self.table.lock().retired.push(entry.clone());
        Ok(Reservation { entry })
    }

    /// Forgets a failed load of `key`, so the next request loads it again.
    pub fn forget_failure(&self, key: &str) {
        let mut table = self.table.lock();
        if table
            .map
            .get(key)
            .and_then(|e| e.cell.get())
            .is_some_and(|r| r.is_err())
        {
            table.remove(key);
        }
    }

    /// Removes `key` (loaded, loading or failed); false if it was not there. Leases already
    /// out keep the value, and its bytes stay charged, until they are dropped.
    pub fn remove(&self, key: &str) -> bool {
        let removed = self.table.lock().remove(key).is_some();
        if removed {
            self.publish();
        }
        removed
    }

    /// `key`'s state, if the cache knows it.
    pub fn state(&self, key: &str) -> Option<State<V, E>> {
        let table = self.table.lock();
        Some(state_of(table.map.get(key)?))
    }

    /// Every ready value, by key.
    pub fn ready(&self) -> Vec<(String, Arc<V>)> {
        let table = self.table.lock();
        let mut v: Vec<_> = table
            .map
            .iter()
            .filter_map(|(k, e)| Some((k.to_string(), e.ready()?.clone())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Bytes reserved by loaded and loading entries, and by removed ones still leased.
    pub fn reserved(&self) -> u64 {
        self.totals().0
    }

    /// Bytes and entries `tenant` holds (removed entries still leased count their bytes).
    pub fn tenant_usage(&self, tenant: &str) -> (u64, usize) {
        let mut table = self.table.lock();
        table.prune();
        let u = table.tenant_usage(tenant);
        (u.bytes, u.entries)
    }

    fn totals(&self) -> (u64, usize) {
        let mut table = self.table.lock();
        table.prune();
        (table.reserved, table.ready)
    }

    fn publish(&self) {
        let (reserved, ready) = self.totals();
        self.events.changed(reserved, ready);
    }
}

impl<V: Send + Sync + 'static, E: Clone + Send + Sync + 'static> BudgetCache<V, E> {
    /// Shares `budget` with the other caches that joined it, from now on (entries already
    /// held count at once). A cache joins one shared budget at most; false if it had.
    pub fn join(self: &Arc<Self>, budget: &Arc<SharedBudget>) -> bool {
        if self.shared.set(budget.clone()).is_err() {
            return false;
        }
        let me: Arc<dyn Member> = self.clone();
        budget.members.lock().push(Arc::downgrade(&me));
        true
    }
}

impl<V: Send + Sync + 'static, E: Clone + Send + Sync + 'static> Member for BudgetCache<V, E> {
    fn used(&self) -> u64 {
        self.reserved()
    }

    fn oldest(&self, except: Option<&str>, for_tenant: Option<&str>) -> Option<(u64, String)> {
        self.oldest_in(&self.table.lock(), except, for_tenant)
    }

    fn evict(&self, key: &str, for_entry: &str) -> Option<u64> {
        let freed = {
            let mut table = self.table.lock();
            let entry = table.map.get(key)?;
            if !self.evictable(entry) {
                return None;
            }
            let freed = entry.bytes();
            table.remove(key);
            freed
        };
        self.events.evicted(key, freed, for_entry);
        self.publish();
        Some(freed)
    }
}

fn state_of<V, E: Clone>(e: &Entry<V, E>) -> State<V, E> {
    match e.cell.get() {
        None => State::Loading,
        Some(Ok(v)) => State::Ready(v.clone()),
        Some(Err(CacheError::Load(e))) => State::Failed(e.clone()),
        // Refusals are forgotten as soon as they are returned.
        Some(Err(_)) => State::Loading,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    type Cache = BudgetCache<String, String>;

    fn cache(budget: Option<u64>) -> Cache {
        BudgetCache::new(
            budget,
            |k: &str, _: &String| k.starts_with("pin"),
            Arc::new(Quiet),
        )
    }

    /// Loads `key` as a value of `bytes` bytes.
    async fn get(
        c: &Cache,
        key: &str,
        bytes: u64,
    ) -> Result<Lease<String, String>, CacheError<String>> {
        let value = key.to_string();
        c.get_or_load(key, || Ok(bytes), |_| async move { Ok((value, bytes)) })
            .await
    }

    fn keys(c: &Cache) -> Vec<String> {
        c.ready().into_iter().map(|(k, _)| k).collect()
    }

    #[tokio::test]
    async fn the_least_recently_used_idle_entry_is_evicted_first() {
        let c = cache(Some(30));
        drop(get(&c, "a", 10).await.unwrap());
        drop(get(&c, "b", 10).await.unwrap());
        drop(get(&c, "c", 10).await.unwrap());
        drop(get(&c, "a", 10).await.unwrap()); // a is now the most recent
        drop(get(&c, "d", 10).await.unwrap());
        assert_eq!(keys(&c), ["a", "c", "d"]);
        assert_eq!(c.reserved(), 30);
    }

    #[tokio::test]
    async fn pinned_and_leased_entries_are_never_evicted() {
        let c = cache(Some(30));
        drop(get(&c, "pin-a", 10).await.unwrap());
        let held = get(&c, "b", 10).await.unwrap();
        drop(get(&c, "c", 10).await.unwrap());
        drop(get(&c, "d", 10).await.unwrap()); // only c can go
        assert_eq!(keys(&c), ["b", "d", "pin-a"]);
        let leased_d = get(&c, "d", 10).await.unwrap();
        let e = get(&c, "e", 10).await.err().unwrap();
        assert_eq!(
            e,
            CacheError::NoRoom {
                need: 10,
                free: 0,
                budget: 30,
                shared: false
            }
        );
        // The refusal is not remembered: with room made, the same key loads.
        drop(held);
        get(&c, "e", 10).await.unwrap();
        assert_eq!(keys(&c), ["d", "e", "pin-a"]);
        assert_eq!(*leased_d, "d");
    }

    /// A value larger than its estimate gets room for the rest by eviction, or is refused:
    /// the budget is never overrun.
    #[tokio::test]
    async fn a_value_larger_than_estimated_makes_room_or_is_refused() {
        let c = cache(Some(30));
        drop(get(&c, "a", 10).await.unwrap());
        let held = get(&c, "b", 10).await.unwrap();
        let value = "big".to_string();
        let big = c
            .get_or_load("big", || Ok(5), |_| async move { Ok((value, 20)) })
            .await
            .unwrap();
        assert_eq!(keys(&c), ["b", "big"], "a was evicted for the rest");
        assert_eq!(c.reserved(), 30);
        drop(big);
        let value = "bigger".to_string();
        let e = c
            .get_or_load("bigger", || Ok(5), |_| async move { Ok((value, 25)) })
            .await
            .err()
            .unwrap();
        assert!(matches!(e, CacheError::NoRoom { need: 25, .. }), "{e:?}");
        assert!(c.reserved() <= 30);
        assert!(c.state("bigger").is_none());
        drop(held);
    }

    #[tokio::test]
    async fn a_value_larger_than_the_budget_is_refused_as_too_large() {
        let c = cache(Some(30));
        let e = get(&c, "huge", 31).await.err().unwrap();
        assert_eq!(
            e,
            CacheError::TooLarge {
                need: 31,
                budget: 30,
                shared: false
            }
        );
        assert!(c.state("huge").is_none());
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let c = Arc::new(cache(None));
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, loads) = (c.clone(), loads.clone());
            tasks.push(tokio::spawn(async move {
                let lease = c
                    .get_or_load(
                        "m",
                        || Ok(1),
                        |_| async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok(("m".to_string(), 1))
                        },
                    )
                    .await
                    .unwrap();
                lease.value().clone()
            }));
        }
        let mut values = Vec::new();
        for t in tasks {
            values.push(t.await.unwrap());
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(values.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    }

    #[tokio::test]
    async fn a_failed_load_stays_failed_until_forgotten() {
        let c = cache(Some(30));
        let fail = |_| async { Err::<(String, u64), _>("corrupt".to_string()) };
        let e = c.get_or_load("x", || Ok(5), fail).await.err().unwrap();
        assert_eq!(e, CacheError::Load("corrupt".into()));
        assert!(matches!(c.state("x"), Some(State::Failed(r)) if r == "corrupt"));
        assert_eq!(c.reserved(), 0, "a failed load holds no budget");
        // Asked again, the failure is returned without a new load.
        let e = get(&c, "x", 5).await.err().unwrap();
        assert_eq!(e, CacheError::Load("corrupt".into()));
        c.forget_failure("x");
        assert_eq!(*get(&c, "x", 5).await.unwrap(), "x");
    }

    #[tokio::test]
    async fn removing_an_entry_in_use_keeps_the_value_for_its_leases() {
        let c = Arc::new(cache(Some(20)));
        let lease = get(&c, "a", 10).await.unwrap();
        assert!(c.remove("a"));
        assert!(!c.remove("a"));
        assert_eq!(*lease, "a");
        // Its bytes are still held by the lease, so they still count.
        assert_eq!(c.reserved(), 10);
        drop(lease);
        assert_eq!(c.reserved(), 0);
        // Concurrent gets and removes leave the cache consistent.
        let mut tasks = Vec::new();
        for i in 0..16 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("k{}", i % 3);
                if i % 2 == 0 {
                    let _ = get(&c, &key, 10).await;
                } else {
                    c.remove(&key);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let ready = c.ready().len() as u64;
        assert!(
            c.reserved() <= 20 && c.reserved() == ready * 10,
            "{}",
            c.reserved()
        );
    }

    /// Two caches of different values sharing one budget: each one's entries make room for
    /// the other's, least recently used first; leased and pinned entries stay; a refusal
    /// says it was the shared budget.
    #[tokio::test]
    async fn caches_sharing_a_budget_evict_each_others_entries() {
        let shared = SharedBudget::new(30);
        let models = Arc::new(cache(None));
        let tensors: Arc<BudgetCache<Vec<u8>, String>> =
            Arc::new(BudgetCache::new(Some(25), |_, _| false, Arc::new(Quiet)));
        assert!(models.join(&shared));
        assert!(tensors.join(&shared));
        assert!(!tensors.join(&shared), "a cache joins one shared budget");
        let tensor = |key: &'static str, bytes: u64| {
            let t = tensors.clone();
            async move {
                t.get_or_load(
                    key,
                    || Ok(bytes),
                    |_| async move { Ok((vec![0u8; 1], bytes)) },
                )
                .await
            }
        };
        drop(get(&models, "m1", 10).await.unwrap());
        drop(tensor("t1", 10).await.unwrap());
        drop(get(&models, "m2", 10).await.unwrap());
        assert_eq!(shared.used(), 30);
        // A tensor evicts the oldest entry of either cache: the model m1.
        drop(tensor("t2", 10).await.unwrap());
        assert_eq!(keys(&models), ["m2"]);
        assert_eq!(shared.used(), 30);
        // A model evicts the oldest: the tensor t1.
        let held = get(&models, "m3", 10).await.unwrap();
        assert!(tensors.state("t1").is_none() && tensors.state("t2").is_some());
        // Everything leased or pinned: the shared budget refuses, and says so.
        let pinned = get(&models, "pin-m", 0).await.unwrap();
        let m2 = get(&models, "m2", 10).await.unwrap();
        let t2 = tensor("t2", 10).await.unwrap();
        let e = tensor("t3", 10).await.err().unwrap();
        assert_eq!(
            e,
            CacheError::NoRoom {
                need: 10,
                free: 0,
                budget: 30,
                shared: true
            }
        );
        // The cache's own budget still holds on its own.
        let e = tensor("huge", 26).await.err().unwrap();
        assert!(
            matches!(e, CacheError::TooLarge { shared: false, .. }),
            "{e:?}"
        );
        drop((held, pinned, m2, t2));
        let e = get(&models, "huge", 31).await.err().unwrap();
        assert!(
            matches!(e, CacheError::TooLarge { shared: true, .. }),
            "{e:?}"
        );
        // A cache dropped leaves the budget.
        drop(tensor("t3", 10).await.unwrap());
        drop(tensors);
        assert_eq!(shared.used(), models.reserved());
    }

    /// Replacing a value while a lease still uses the old one keeps both counted: the budget
    /// bounds memory, not only what the cache still lists; the old bytes go with the last
    /// lease, and room that needs them waits for it.
    #[tokio::test]
    async fn a_replaced_value_in_use_stays_counted_until_its_last_lease_goes() {
        let c = cache(Some(30));
        let old = get(&c, "t", 20).await.unwrap();
        let also = c.lease_ready("t").unwrap();
        assert!(c.remove("t"));
        // The new "t" does not fit beside the old one, which is still in use.
        let e = get(&c, "t", 20).await.err().unwrap();
        assert!(
            matches!(
                e,
                CacheError::NoRoom {
                    need: 20,
                    free: 10,
                    ..
                }
            ),
            "{e:?}"
        );
        drop(old);
        assert_eq!(c.reserved(), 20, "one lease still holds it");
        drop(also);
        assert_eq!(c.reserved(), 0);
        drop(get(&c, "t", 20).await.unwrap());
        assert_eq!(c.reserved(), 20);
    }

    fn tenanted(budget: u64, max_bytes: u64, max_entries: usize) -> Cache {
        cache(Some(budget)).with_tenant_limits(TenantLimits {
            max_bytes,
            max_entries,
        })
    }

    async fn get_for(
        c: &Cache,
        tenant: &str,
        key: &str,
        bytes: u64,
    ) -> Result<Lease<String, String>, CacheError<String>> {
        let value = key.to_string();
        c.get_or_load_for(
            Some(tenant),
            key,
            || Ok(bytes),
            |_| async move { Ok((value, bytes)) },
        )
        .await
    }

    /// A tenant at its byte or entry limit makes room among its own entries (least recently
    /// used first), never another's; with its own all in use it is refused, naming its
    /// limit.
    #[tokio::test]
    async fn a_tenant_at_its_limit_evicts_its_own_entries_only() {
        let c = tenanted(100, 30, 3);
        drop(get_for(&c, "b", "b1", 10).await.unwrap());
        drop(get_for(&c, "a", "a1", 10).await.unwrap());
        drop(get_for(&c, "a", "a2", 10).await.unwrap());
        drop(get_for(&c, "a", "a3", 10).await.unwrap());
        // Bytes: a holds 30 of its 30; a4 takes a1's place, b1 (older) stays.
        drop(get_for(&c, "a", "a4", 10).await.unwrap());
        assert_eq!(keys(&c), ["a2", "a3", "a4", "b1"]);
        assert_eq!(c.tenant_usage("a"), (30, 3));
        // Entries: 3 of 3; a small one takes a2's place.
        drop(get_for(&c, "a", "a5", 1).await.unwrap());
        assert_eq!(keys(&c), ["a3", "a4", "a5", "b1"]);
        let held: Vec<_> = ["a3", "a4", "a5"]
            .iter()
            .map(|k| c.lease_ready(k).unwrap())
            .collect();
        let e = get_for(&c, "a", "a6", 1).await.err().unwrap();
        assert_eq!(e, CacheError::TenantEntries { limit: 3 });
        let e = get_for(&c, "a", "a3", 10).await;
        assert!(e.is_ok(), "a ready entry of its own is leased, not loaded");
        drop(held);
        let e = get_for(&c, "a", "big", 31).await.err().unwrap();
        assert!(
            matches!(
                e,
                CacheError::TenantBytes {
                    need: 31,
                    limit: 30,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(c.tenant_usage("b"), (10, 1));
    }

    /// With the budget full, a tenant evicts another only while that one holds more than
    /// its fair share (the budget over the tenants holding bytes); untenanted entries are
    /// fair game.
    #[tokio::test]
    async fn tenants_within_their_fair_share_are_not_evicted_by_others() {
        let c = tenanted(40, 40, 100);
        drop(get_for(&c, "victim", "v1", 10).await.unwrap());
        drop(get_for(&c, "greedy", "g1", 10).await.unwrap());
        drop(get_for(&c, "greedy", "g2", 10).await.unwrap());
        drop(get_for(&c, "greedy", "g3", 10).await.unwrap());
        // Full. greedy (30 of a fair 20) may evict only its own; v1 is the oldest but stays.
        drop(get_for(&c, "greedy", "g4", 10).await.unwrap());
        assert_eq!(keys(&c), ["g2", "g3", "g4", "v1"]);
        drop(c.lease_ready("v1"));
        // victim, under its share, takes from greedy, who is over it.
        drop(get_for(&c, "victim", "v2", 10).await.unwrap());
        assert_eq!(keys(&c), ["g3", "g4", "v1", "v2"]);
        // Now 20 and 20: each holds exactly its share, so neither evicts the other.
        let held = (c.lease_ready("g3").unwrap(), c.lease_ready("g4").unwrap());
        let e = get_for(&c, "greedy", "g5", 10).await.err().unwrap();
        assert!(matches!(e, CacheError::NoRoom { need: 10, .. }), "{e:?}");
        assert_eq!(keys(&c), ["g3", "g4", "v1", "v2"]);
        drop(held);
        // A third tenant lowers the fair share to 13: both are over it now, and the least
        // recently used of theirs goes.
        drop(get_for(&c, "third", "t1", 10).await.unwrap());
        assert_eq!(keys(&c), ["g3", "g4", "t1", "v2"]);
        // Untenanted entries (the operator's) are evicted for anyone.
        let d = tenanted(20, 20, 10);
        drop(get(&d, "operator", 10).await.unwrap());
        drop(get_for(&d, "x", "x1", 10).await.unwrap());
        drop(get_for(&d, "x", "x2", 10).await.unwrap());
        assert_eq!(keys(&d), ["x1", "x2"]);
    }

    /// A reservation holds room like an entry (evicting for it, counted to its tenant) until
    /// it is dropped.
    #[tokio::test]
    async fn a_reservation_holds_room_until_dropped() {
        let c = tenanted(30, 20, 10);
        drop(get_for(&c, "a", "a1", 10).await.unwrap());
        drop(get_for(&c, "b", "b1", 10).await.unwrap());
        // a1 goes for it (a's own, and a is within its limit only without it).
        let r = c.reserve_for(Some("a"), "parts", 15).unwrap();
        assert_eq!(r.bytes(), 15);
        assert_eq!(keys(&c), ["b1"]);
        assert_eq!(c.tenant_usage("a"), (15, 0));
        assert_eq!(c.reserved(), 25);
        let e = c.reserve_for(Some("a"), "more", 10).err().unwrap();
        assert!(
            matches!(
                e,
                CacheError::TenantBytes {
                    need: 10,
                    used: 15,
                    limit: 20
                }
            ),
            "{e:?}"
        );
        drop(r);
        assert_eq!(c.reserved(), 10);
        drop(get_for(&c, "a", "a2", 20).await.unwrap());
    }
}
