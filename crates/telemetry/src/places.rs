//! Places under a limit that clients share: a gateway's sessions, a compositor's Render
//! streams. A place is taken in one step against both the total and the client's share
//! ([`framecast_proto::client`]), so two arrivals together cannot both take the last place,
//! and one client cannot take them all; it is held (and counted) until dropped.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub struct Places {
    max: usize,
    per_client: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_client: HashMap<String, usize>,
}

/// Why no place was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every place is taken.
    Full { max: usize },
    /// The client holds its share.
    ClientFull { max: usize },
}

/// A place held, given back when dropped.
pub struct Place {
    places: Arc<Places>,
    client: String,
}

impl Places {
    /// `max` places in all, `per_client` of them (at most) for one client.
    pub fn new(max: usize, per_client: usize) -> Arc<Places> {
        Arc::new(Places {
            max,
            per_client: per_client.clamp(1, max.max(1)),
            held: Mutex::default(),
        })
    }

    /// A place for `client`, if both the total and its share leave one.
    pub fn take(self: &Arc<Self>, client: &str) -> Result<Place, Refused> {
        let mut held = self.held.lock();
        if held.total >= self.max {
            return Err(Refused::Full { max: self.max });
        }
        let mine = held.by_client.get(client).copied().unwrap_or(0);
        if mine >= self.per_client {
            return Err(Refused::ClientFull {
                max: self.per_client,
            });
        }
        held.total += 1;
        held.by_client.insert(client.to_string(), mine + 1);
        Ok(Place {
            places: self.clone(),
            client: client.to_string(),
        })
    }

    /// Places held now.
    pub fn held(&self) -> usize {
        self.held.lock().total
    }

    /// The most places in all, and for one client.
    pub fn limits(&self) -> (usize, usize) {
        (self.max, self.per_client)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self.places.held.lock();
        held.total -= 1;
        if let Some(n) = held.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                held.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_its_share_and_places_come_back() {
        let p = Places::new(3, 2);
        let a1 = p.take("a").unwrap();
        let _a2 = p.take("a").unwrap();
        assert_eq!(p.take("a").err(), Some(Refused::ClientFull { max: 2 }));
        let _b1 = p.take("b").unwrap();
        assert_eq!(p.take("c").err(), Some(Refused::Full { max: 3 }));
        drop(a1);
        assert_eq!(p.held(), 2);
        let _c1 = p.take("c").unwrap();
        assert!(p.take("a").is_err());
    }
}
