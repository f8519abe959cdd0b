//! A byte-budgeted, load-once LRU cache with explicit leases: the one shape behind the
//! inference service's models and the compositor's avatars.
//!
//! - **Load once.** Concurrent requests for a key that is not loaded wait for one load
//!   (single flight). A load that fails stays failed, with its reason, until
//!   [`BudgetCache::forget_failure`] or an explicit reload; a load refused for lack of room is
//!   forgotten at once, so the next request tries again.
//! - **Budget.** Before loading, the loader's estimate is reserved against the budget; least
//!   recently used entries that are ready, idle (no lease) and not pinned are evicted until it
//!   fits. Once loaded, the entry is charged what it really holds.
//! - **Leases.** [`Lease`] is the only way to use a value: while one lives, its entry is
//!   never evicted. Unloading removes the entry at once; leases already out keep the value
//!   alive until they are dropped.
//! - **Shared budgets.** Caches of different values may also share one [`SharedBudget`] (a
//!   device's memory, held by models and tensors alike): room for an entry of one is made by
//!   evicting the least recently used idle entry of any of them.

use parking_lot::Mutex;
use std::collections::HashMap;
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
    /// Every entry that could make room is pinned or leased.
    NoRoom {
        need: u64,
        free: u64,
        budget: u64,
        shared: bool,
    },
    /// The loader (or its estimate) failed.
    Load(E),
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
    cell: OnceCell<Result<Arc<V>, CacheError<E>>>,
    /// Bytes charged to the budget: the estimate while loading, the real size once ready.
    reserved: AtomicU64,
    leases: AtomicUsize,
    last_used: AtomicU64,
}

impl<V, E> Default for Entry<V, E> {
    fn default() -> Self {
        Entry {
            cell: OnceCell::new(),
            reserved: AtomicU64::new(0),
            leases: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
        }
    }
}

impl<V, E> Entry<V, E> {
    fn ready(&self) -> Option<&Arc<V>> {
        match self.cell.get() {
            Some(Ok(v)) => Some(v),
            _ => None,
        }
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

type Pinned<V> = Box<dyn Fn(&str, &V) -> bool + Send + Sync>;

pub struct BudgetCache<V, E> {
    budget: Option<u64>,
    entries: Mutex<HashMap<String, Arc<Entry<V, E>>>>,
    pinned: Pinned<V>,
    events: Arc<dyn Events>,
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
    /// The least recently used entry that may be evicted, other than `except`: its last use
    /// and key.
    fn oldest(&self, except: Option<&str>) -> Option<(u64, String)>;
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
                    let (used, k) = m.oldest(mine.then_some(key))?;
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
            entries: Mutex::default(),
            pinned: Box::new(pinned),
            events,
            shared: OnceLock::new(),
        }
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
        let entries = self.entries.lock();
        let entry = entries.get(key)?;
        let value = entry.ready()?.clone();
        Some(self.lease(entry, value))
    }

    /// `key`'s value if it is loaded and ready, without a lease (for reading its description;
    /// use a lease to use it).
    pub fn peek(&self, key: &str) -> Option<Arc<V>> {
        self.entries.lock().get(key)?.ready().cloned()
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
        let entry = {
            let mut entries = self.entries.lock();
            let entry = entries.entry(key.to_string()).or_default();
            if let Some(value) = entry.ready() {
                let value = value.clone();
                return Ok(self.lease(entry, value));
            }
            entry.clone()
        };
        let result = entry
            .cell
            .get_or_init(|| self.load_entry(key, &entry, estimate, load))
            .await
            .clone();
        // The cell is set now: the counts include this load's outcome.
        self.publish();
        let mut entries = self.entries.lock();
        match result {
            Ok(value) => Ok(self.lease(&entry, value)),
            Err(e) => {
                if matches!(e, CacheError::NoRoom { .. } | CacheError::TooLarge { .. }) {
                    // Lack of room is transient: forget the attempt, so the next request
                    // tries again (not this very entry if another replaced it meanwhile).
                    if entries.get(key).is_some_and(|x| Arc::ptr_eq(x, &entry)) {
                        entries.remove(key);
                    }
                }
                Err(e)
            }
        }
    }

    async fn load_entry<Est, Load, Fut>(
        &self,
        key: &str,
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
        self.reserve(key, entry, need)?;
        match load(need).await {
            Ok((value, bytes)) => {
                if bytes > need {
                    // It holds more than estimated: room for all of it, by eviction if need
                    // be, or it is refused; the budget is never overrun.
                    entry.reserved.store(0, Ordering::Release);
                    if let Err(e) = self.reserve(key, entry, bytes) {
                        self.publish();
                        return Err(e);
                    }
                }
                entry.reserved.store(bytes, Ordering::Release);
                self.touch(entry);
                Ok(Arc::new(value))
            }
            Err(e) => {
                entry.reserved.store(0, Ordering::Release);
                Err(CacheError::Load(e))
            }
        }
    }

    /// Reserves `need` bytes for `entry`, evicting idle, unpinned, ready entries least
    /// recently used first until it fits this cache's budget and then the shared one (whose
    /// evictions may be of another cache's entries).
    fn reserve(&self, key: &str, entry: &Entry<V, E>, need: u64) -> Result<(), CacheError<E>> {
        let shared = self.shared.get();
        let _turn = shared.map(|s| s.turn.lock());
        {
            let mut entries = self.entries.lock();
            if let Some(budget) = self.budget {
                if need > budget {
                    return Err(CacheError::TooLarge {
                        need,
                        budget,
                        shared: false,
                    });
                }
                loop {
                    let used: u64 = entries
                        .values()
                        .map(|e| e.reserved.load(Ordering::Acquire))
                        .sum();
                    if used + need <= budget {
                        break;
                    }
                    // Leases are taken under this lock, so an idle entry stays idle until
                    // it is removed here.
                    let Some((_, victim)) = self.oldest_in(&entries, Some(key)) else {
                        return Err(CacheError::NoRoom {
                            need,
                            free: budget.saturating_sub(used),
                            budget,
                            shared: false,
                        });
                    };
                    let freed = entries
                        .remove(&victim)
                        .map_or(0, |e| e.reserved.load(Ordering::Acquire));
                    self.events.evicted(&victim, freed, &self.events.label(key));
                }
            }
            if shared.is_none() {
                entry.reserved.store(need, Ordering::Release);
            }
        }
        if let Some(s) = shared {
            let me = self as *const Self as *const ();
            s.make_room(me, key, &self.events.label(key), need)?;
            // Still under the turn: no other member reserves meanwhile.
            entry.reserved.store(need, Ordering::Release);
        }
        self.publish();
        Ok(())
    }

    /// The least recently used entry of `entries` that is ready, idle and unpinned, other
    /// than `except`.
    fn oldest_in(
        &self,
        entries: &HashMap<String, Arc<Entry<V, E>>>,
        except: Option<&str>,
    ) -> Option<(u64, String)> {
        entries
            .iter()
            .filter(|(k, e)| Some(k.as_str()) != except && e.leases.load(Ordering::Acquire) == 0)
            .filter_map(|(k, e)| {
                let v = e.ready()?;
                (!(self.pinned)(k, v)).then(|| (e.last_used.load(Ordering::Relaxed), k.clone()))
            })
            .min()
    }

    fn lease(&self, entry: &Arc<Entry<V, E>>, value: Arc<V>) -> Lease<V, E> {
        entry.leases.fetch_add(1, Ordering::AcqRel);
        self.touch(entry);
        Lease {
            value,
            entry: entry.clone(),
        }
    }

    fn touch(&self, entry: &Entry<V, E>) {
        entry
            .last_used
            .store(CLOCK.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Forgets a failed load of `key`, so the next request loads it again.
    pub fn forget_failure(&self, key: &str) {
        let mut entries = self.entries.lock();
        if entries
            .get(key)
            .and_then(|e| e.cell.get())
            .is_some_and(|r| r.is_err())
        {
            entries.remove(key);
        }
    }

    /// Removes `key` (loaded, loading or failed); false if it was not there. Leases already
    /// out keep the value until they are dropped.
    pub fn remove(&self, key: &str) -> bool {
        let removed = self.entries.lock().remove(key).is_some();
        if removed {
            self.publish();
        }
        removed
    }

    /// `key`'s state, if the cache knows it.
    pub fn state(&self, key: &str) -> Option<State<V, E>> {
        let entries = self.entries.lock();
        Some(state_of(entries.get(key)?))
    }

    /// Every ready value, by key.
    pub fn ready(&self) -> Vec<(String, Arc<V>)> {
        let entries = self.entries.lock();
        let mut v: Vec<_> = entries
            .iter()
            .filter_map(|(k, e)| Some((k.clone(), e.ready()?.clone())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Bytes reserved by loaded and loading entries.
    pub fn reserved(&self) -> u64 {
        self.totals().0
    }

    fn totals(&self) -> (u64, usize) {
        let entries = self.entries.lock();
        let reserved = entries
            .values()
            .map(|e| e.reserved.load(Ordering::Acquire))
            .sum();
        let ready = entries.values().filter(|e| e.ready().is_some()).count();
        (reserved, ready)
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

    fn oldest(&self, except: Option<&str>) -> Option<(u64, String)> {
        self.oldest_in(&self.entries.lock(), except)
    }

    fn evict(&self, key: &str, for_entry: &str) -> Option<u64> {
        let freed = {
            let mut entries = self.entries.lock();
            let entry = entries.get(key)?;
            let evictable = entry.leases.load(Ordering::Acquire) == 0
                && entry.ready().is_some_and(|v| !(self.pinned)(key, v));
            if !evictable {
                return None;
            }
            entries
                .remove(key)
                .map_or(0, |e| e.reserved.load(Ordering::Acquire))
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
}
