//! The cost of one tensor-cache registration as the cache fills with names: registration
//! must not grow with the number of names the cache holds (it once walked them all, 0.07 ms
//! at 1,000 names and 5.3 ms at 100,000).
//!
//! `cargo bench -p framecast-inference --bench tensor_registration`: for N in 1,000, 10,000
//! and 100,000 names held, the median time of registering (replacing) a name, and of
//! registering a new name that evicts the least recently used. Under `cargo test` it runs a
//! quick pass at 100 and 1,000 names.

use bytes::Bytes;
use framecast_inference::shared_memory::Owner;
use framecast_inference::tensor_cache::{TensorCache, TensorLimits, ENTRY_OVERHEAD};
use std::time::{Duration, Instant};

const CLIENT: &str = "bench";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full {
        &[1_000, 10_000, 100_000]
    } else {
        &[100, 1_000]
    };
    let rounds = if full { 2_000 } else { 50 };
    let row = Bytes::from(vec![7u8; 16]);
    let owner = Owner::anonymous();
    println!("names held  replace a name (us)  new name, evicting (us)");
    for &n in sizes {
        // Room for exactly n tensors: the next new name evicts the least recently used.
        let per = row.len() as u64 + ENTRY_OVERHEAD;
        let cache = TensorCache::unmetered(TensorLimits {
            budget: n as u64 * per,
            client_bytes: n as u64 * per,
            client_names: n + 1,
        });
        for i in 0..n {
            let name = format!("t{i}");
            cache
                .register(&owner, CLIENT, &name, "UINT8", vec![1, 16], 0, row.clone())
                .await
                .expect("filling the cache");
        }
        let mut replace = Vec::with_capacity(rounds);
        let mut fresh = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let name = format!("t{}", (i * 7919) % n);
            let t = Instant::now();
            cache
                .register(&owner, CLIENT, &name, "UINT8", vec![1, 16], 0, row.clone())
                .await
                .expect("replacing");
            replace.push(t.elapsed());
            let name = format!("new{i}");
            let t = Instant::now();
            cache
                .register(&owner, CLIENT, &name, "UINT8", vec![1, 16], 0, row.clone())
                .await
                .expect("a new name");
            fresh.push(t.elapsed());
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{n:>10}  {:>19.2}  {:>24.2}",
            us(median(replace)),
            us(median(fresh))
        );
    }
}
