//! State-of-the-world ADS (`StreamAggregatedResources`) over [`State`].
//!
//! Every request for a type carries the whole list of names wanted (empty
//! for the LDS and CDS wildcards; for RDS and EDS an empty list asks for
//! nothing, though some servers answer it with everything, which the
//! cache ignores), the last version accepted and the last nonce seen. An
//! LDS or CDS response is the whole set: what it leaves out is removed.
//! RDS and EDS responses carry named resources; one leaves the cache when
//! nothing refers to it any more. Resources come bare (named by their own
//! `name` / `cluster_name`) or wrapped in a `Resource`. ACK: the
//! response's `version_info` and nonce; NACK: the previous `version_info`,
//! the nonce and `error_detail`. There is no resume: a new stream asks for
//! the current names with no version, and the server sends everything.

use std::collections::HashMap;

use anyhow::{anyhow, Context};
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DiscoveryRequest, DiscoveryResponse, Resource};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use super::state::{named, Entry, State, Update};
use super::{rejected, XdsConfig, TYPES, WARMING_TICK};

/// `Resource` as a SotW response's element (Envoy accepts either).
const RESOURCE: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// Per type: the last version accepted and the last nonce seen, which
/// every request for the type carries.
#[derive(Default)]
struct Seen {
    version: HashMap<String, String>,
    nonce: HashMap<String, String>,
}

struct Stream<'a> {
    tx: mpsc::Sender<DiscoveryRequest>,
    state: &'a mut State,
    seen: Seen,
}

impl Stream<'_> {
    /// The request for `t`: its current names, the last accepted version.
    async fn request(
        &self,
        t: &str,
        error_detail: Option<mesh_proto::rpc::Status>,
    ) -> anyhow::Result<()> {
        let req = DiscoveryRequest {
            version_info: self.seen.version.get(t).cloned().unwrap_or_default(),
            type_url: t.into(),
            resource_names: self.state.names(t).iter().cloned().collect(),
            response_nonce: self.seen.nonce.get(t).cloned().unwrap_or_default(),
            error_detail,
            ..Default::default()
        };
        self.tx
            .send(req)
            .await
            .map_err(|_| anyhow!("request channel closed"))
    }

    /// ACK or NACK, then requests for the types whose names changed.
    async fn handle(&mut self, resp: DiscoveryResponse) -> anyhow::Result<()> {
        let t = resp.type_url;
        self.seen.nonce.insert(t.clone(), resp.nonce);
        let entries: Result<Vec<Entry>, String> = resp
            .resources
            .into_iter()
            .map(|a| entry(a, &resp.version_info))
            .collect();
        let outcome = match entries {
            Ok(resources) => self.state.apply(&Update {
                type_url: t.clone(),
                resources,
                removed: Vec::new(),
                replaces: !named(&t),
                version: resp.version_info.clone(),
            }),
            Err(e) => {
                let msg = format!("{} response: {e}", short(&t));
                warn!(type_url = %t, error = %msg,
                      "xDS update rejected (NACK); the previous configuration stays in force");
                Err(msg)
            }
        };
        match outcome {
            Ok(changes) => {
                self.seen.version.insert(t.clone(), resp.version_info);
                self.request(&t, None).await?;
                for c in changes {
                    self.request(c.type_url, None).await?;
                }
            }
            Err(msg) => self.request(&t, Some(rejected(&msg))).await?,
        }
        Ok(())
    }
}

/// One element of a SotW response: the resource itself, or a `Resource`
/// wrapping it (with its name and version).
fn entry(a: prost_types::Any, version: &str) -> Result<Entry, String> {
    if a.type_url != RESOURCE {
        return Ok(Entry {
            name: None,
            version: version.to_string(),
            body: Some(a),
        });
    }
    let r = Resource::decode(a.value.as_slice())
        .map_err(|e| format!("cannot decode a Resource: {e}"))?;
    Ok(Entry {
        name: (!r.name.is_empty()).then_some(r.name),
        version: if r.version.is_empty() {
            version.to_string()
        } else {
            r.version
        },
        body: r.resource,
    })
}

/// `Listener` for its type URL, for messages.
fn short(t: &str) -> &str {
    t.rsplit('.').next().unwrap_or(t)
}

/// One stream, until it ends; `got_any` is set once a response arrived.
pub(super) async fn session(
    cfg: &XdsConfig,
    state: &mut State,
    got_any: &mut bool,
) -> anyhow::Result<()> {
    let channel = cfg.channel()?;
    let (tx, rx) = mpsc::channel(16);
    state.connect();
    let mut first = true;
    for t in TYPES {
        let names = state.names(t);
        if named(t) && names.is_empty() {
            continue;
        }
        let req = DiscoveryRequest {
            node: first.then(|| cfg.node()),
            type_url: t.into(),
            resource_names: names.iter().cloned().collect(),
            ..Default::default()
        };
        first = false;
        tx.send(req)
            .await
            .map_err(|_| anyhow!("request channel closed"))?;
    }
    let req = cfg.request(ReceiverStream::new(rx))?;
    // A full response for a large mesh can pass tonic's 4 MiB default;
    // refusing it would fail the stream, and the next one, for good.
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .stream_aggregated_resources(req)
        .await
        .context("opening the ADS stream")?
        .into_inner();
    info!(address = %cfg.address, "xDS stream open (state of the world)");
    let mut s = Stream {
        tx,
        state,
        seen: Seen::default(),
    };
    let mut tick = tokio::time::interval(WARMING_TICK);
    loop {
        tokio::select! {
            m = stream.message() => {
                let Some(resp) = m.context("reading the ADS stream")? else {
                    return Ok(());
                };
                *got_any = true;
                s.handle(resp).await?;
            }
            _ = tick.tick() => s.state.warming_expired(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::type_url;

    fn any(t: &str, m: &impl Message) -> prost_types::Any {
        prost_types::Any {
            type_url: t.into(),
            value: m.encode_to_vec(),
        }
    }

    #[test]
    fn bare_resources_take_the_response_version_and_their_own_name() {
        let l = mesh_proto::envoy::config::listener::v3::Listener {
            name: "waypoint".into(),
            ..Default::default()
        };
        let e = entry(any(type_url::LISTENER, &l), "7").unwrap();
        assert_eq!(e.name, None);
        assert_eq!(e.version, "7");
        assert_eq!(e.body.unwrap().type_url, type_url::LISTENER);
    }

    #[test]
    fn wrapped_resources_are_unwrapped_with_their_name_and_version() {
        let l = mesh_proto::envoy::config::listener::v3::Listener {
            name: "waypoint".into(),
            ..Default::default()
        };
        let r = Resource {
            name: "waypoint".into(),
            version: "abc".into(),
            resource: Some(any(type_url::LISTENER, &l)),
            ..Default::default()
        };
        let e = entry(any(RESOURCE, &r), "7").unwrap();
        assert_eq!(e.name.as_deref(), Some("waypoint"));
        assert_eq!(e.version, "abc");
        assert_eq!(e.body.unwrap().value, l.encode_to_vec());
        let bad = prost_types::Any {
            type_url: RESOURCE.into(),
            value: vec![0xff],
        };
        assert!(entry(bad, "7")
            .unwrap_err()
            .contains("cannot decode a Resource"));
    }
}
