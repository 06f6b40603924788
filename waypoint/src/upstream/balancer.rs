//! Choosing an endpoint: power of two choices on an EWMA latency estimate,
//! with outlier ejection.
//!
//! Each endpoint keeps an exponentially weighted moving average of its
//! response latency and its number of requests in flight. A pick draws two
//! distinct endpoints at random and takes the one with the lower cost
//! `ewma * (in_flight + 1)`, which steers load away from slow or busy
//! endpoints without the herding of "always the fastest". A new endpoint
//! starts at cost zero, so it gets tried at once; an estimate decays towards
//! zero while its endpoint gets no traffic (time constant `DECAY`, as
//! tower's PeakEwma does), so an endpoint once slow is tried again.
//!
//! An endpoint whose last `consecutive_5xx` results were failures (a 5xx,
//! a connect failure or a reset) is ejected for `base_ejection_time` times
//! the number of times it has been ejected, then re-admitted; at most
//! `max_ejection_percent` of a cluster (but at least one endpoint) is out
//! at once. If every endpoint is out, all are used (Envoy's panic mode).
//!
//! State is keyed by (cluster, address) and survives configuration
//! reloads, so a reload does not reset what was learned. Each cluster of a
//! configuration looks its endpoints' state up once, on first use
//! (`ClusterConfig::balancer_state`), so a pick takes no shared lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::runtime::{ClusterConfig, EndpointConfig};
use crate::metrics::PeerLabels;

/// How much a new latency sample moves the average.
const EWMA_WEIGHT: f64 = 0.3;
/// Time constant of the decay of an estimate without new samples.
const DECAY: Duration = Duration::from_secs(2);
const MAX_EJECTION_MULTIPLIER: u32 = 10;

pub struct EndpointState {
    pub config: EndpointConfig,
    /// How metrics name this endpoint.
    pub labels: PeerLabels,
    in_flight: AtomicUsize,
    stats: Mutex<Stats>,
}

impl EndpointState {
    fn new(config: &EndpointConfig) -> Arc<Self> {
        Arc::new(EndpointState {
            labels: PeerLabels::destination(
                config.workload.as_deref(),
                config.namespace.as_deref(),
                config.identity.as_ref(),
            ),
            config: config.clone(),
            in_flight: AtomicUsize::new(0),
            stats: Mutex::default(),
        })
    }
}

#[derive(Default)]
struct Stats {
    ewma_us: f64,
    /// When `ewma_us` last took a sample.
    sampled: Option<Instant>,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

impl EndpointState {
    fn cost(&self, now: Instant) -> f64 {
        let s = self.stats.lock().expect("stats lock");
        let idle = s
            .sampled
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        let ewma = s.ewma_us * (-idle / DECAY.as_secs_f64()).exp();
        ewma * (self.in_flight.load(Ordering::Relaxed) as f64 + 1.0)
    }

    fn ejected(&self, now: Instant) -> bool {
        let mut s = self.stats.lock().expect("stats lock");
        match s.ejected_until {
            Some(t) if t > now => true,
            Some(_) => {
                // Back in: give it a clean slate.
                s.ejected_until = None;
                s.consecutive_failures = 0;
                false
            }
            None => false,
        }
    }
}

/// An endpoint picked for one attempt; counts as in flight until dropped.
pub struct Picked {
    pub endpoint: Arc<EndpointState>,
    started: Instant,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an attempt went, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

#[derive(Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<(String, SocketAddr), Arc<EndpointState>>>,
}

#[derive(Serialize)]
pub struct EndpointDump {
    pub cluster: String,
    pub address: SocketAddr,
    pub in_flight: usize,
    pub ewma_ms: f64,
    pub consecutive_failures: u32,
    pub ejected: bool,
    pub ejections: u32,
}

impl Balancer {
    fn states(&self, cluster: &ClusterConfig) -> Vec<Arc<EndpointState>> {
        let mut map = self.endpoints.lock().expect("endpoints lock");
        cluster
            .endpoints
            .iter()
            .map(|e| {
                let key = (cluster.name.clone(), e.address);
                let st = map.entry(key).or_insert_with(|| EndpointState::new(e));
                if st.config != *e {
                    // Same address, new metadata (identity...): start over.
                    *st = EndpointState::new(e);
                }
                st.clone()
            })
            .collect()
    }

    /// Forgets endpoints no longer in any cluster of `clusters`.
    pub fn retain<'a>(&self, clusters: impl Iterator<Item = &'a ClusterConfig>) {
        let keep: std::collections::HashSet<(String, SocketAddr)> = clusters
            .flat_map(|c| c.endpoints.iter().map(|e| (c.name.clone(), e.address)))
            .collect();
        self.endpoints
            .lock()
            .expect("endpoints lock")
            .retain(|k, _| keep.contains(k));
    }

    /// Picks an endpoint of `cluster`, avoiding `avoid` (the one a retry
    /// just failed on) when there is a choice.
    pub fn pick(&self, cluster: &ClusterConfig, avoid: Option<SocketAddr>) -> Option<Picked> {
        let all = cluster.balancer_state.get_or_init(|| self.states(cluster));
        if let [only] = all.as_slice() {
            // No choice to make (ejected or not: it is all there is).
            only.in_flight.fetch_add(1, Ordering::Relaxed);
            return Some(Picked {
                endpoint: only.clone(),
                started: Instant::now(),
            });
        }
        let now = Instant::now();
        let mut live: Vec<_> = all.iter().filter(|e| !e.ejected(now)).cloned().collect();
        if live.is_empty() {
            live = all.clone();
        }
        if live.len() > 1 {
            if let Some(a) = avoid {
                live.retain(|e| e.config.address != a);
            }
        }
        let chosen = match live.len() {
            0 => return None,
            1 => live[0].clone(),
            n => {
                let i = fastrand::usize(..n);
                let mut j = fastrand::usize(..n - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (&live[i], &live[j]);
                if b.cost(now) < a.cost(now) {
                    b.clone()
                } else {
                    a.clone()
                }
            }
        };
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            endpoint: chosen,
            started: Instant::now(),
        })
    }

    /// Records the result of an attempt on `picked`.
    pub fn record(&self, cluster: &ClusterConfig, picked: &Picked, outcome: Outcome) {
        let now = Instant::now();
        let elapsed_us = now.duration_since(picked.started).as_secs_f64() * 1e6;
        let eject = {
            let mut s = picked.endpoint.stats.lock().expect("stats lock");
            s.ewma_us = if s.ewma_us == 0.0 {
                elapsed_us
            } else {
                s.ewma_us * (1.0 - EWMA_WEIGHT) + elapsed_us * EWMA_WEIGHT
            };
            s.sampled = Some(now);
            match outcome {
                Outcome::Success => {
                    s.consecutive_failures = 0;
                    false
                }
                Outcome::Failure => {
                    s.consecutive_failures += 1;
                    s.ejected_until.is_none()
                        && s.consecutive_failures >= cluster.consecutive_failures
                }
            }
        };
        if eject && self.may_eject(cluster) {
            let mut s = picked.endpoint.stats.lock().expect("stats lock");
            s.ejections += 1;
            let factor = s.ejections.min(MAX_EJECTION_MULTIPLIER);
            let period: Duration = cluster.base_ejection_time * factor;
            s.ejected_until = Some(Instant::now() + period);
            tracing::warn!(
                cluster = %cluster.name,
                endpoint = %picked.endpoint.config.address,
                failures = s.consecutive_failures,
                ejected_for = ?period,
                "endpoint ejected"
            );
        }
    }

    fn may_eject(&self, cluster: &ClusterConfig) -> bool {
        let all = cluster.balancer_state.get_or_init(|| self.states(cluster));
        let now = Instant::now();
        let out = all.iter().filter(|e| e.ejected(now)).count();
        let limit = (all.len() * cluster.max_ejection_percent as usize / 100).max(1);
        // Never the last live endpoint: there would be nothing left to use.
        out < limit && out + 1 < all.len()
    }

    pub fn dump(&self) -> Vec<EndpointDump> {
        let now = Instant::now();
        let map = self.endpoints.lock().expect("endpoints lock");
        let mut out: Vec<EndpointDump> = map
            .iter()
            .map(|((c, a), e)| {
                let s = e.stats.lock().expect("stats lock");
                EndpointDump {
                    cluster: c.clone(),
                    address: *a,
                    in_flight: e.in_flight.load(Ordering::Relaxed),
                    ewma_ms: s.ewma_us / 1000.0,
                    consecutive_failures: s.consecutive_failures,
                    ejected: s.ejected_until.is_some_and(|t| t > now),
                    ejections: s.ejections,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.cluster, a.address).cmp(&(&b.cluster, b.address)));
        out
    }
}
