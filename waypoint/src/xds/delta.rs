//! Delta ADS (`DeltaAggregatedResources`) over [`State`]: resources come
//! named and versioned, removals are explicit, subscriptions change by
//! `resource_names_subscribe` / `_unsubscribe`, and a new stream resumes
//! with `initial_resource_versions` (what the cache holds).

use anyhow::{anyhow, Context};
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::info;

use super::state::{named, Entry, State, Update};
use super::{rejected, XdsConfig, TYPES, WARMING_TICK};

type Tx = mpsc::Sender<DeltaDiscoveryRequest>;

async fn send(tx: &Tx, req: DeltaDiscoveryRequest) -> anyhow::Result<()> {
    tx.send(req)
        .await
        .map_err(|_| anyhow!("request channel closed"))
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
        // Empty for LDS and CDS: a wildcard subscription.
        let names = state.names(t);
        if named(t) && names.is_empty() {
            continue;
        }
        let req = DeltaDiscoveryRequest {
            node: first.then(|| cfg.node()),
            type_url: t.into(),
            resource_names_subscribe: names.iter().cloned().collect(),
            initial_resource_versions: state.versions(t),
            ..Default::default()
        };
        first = false;
        send(&tx, req).await?;
    }
    let req = cfg.request(ReceiverStream::new(rx))?;
    // A full response for a large mesh can pass tonic's 4 MiB default;
    // refusing it would fail the stream, and the next one, for good.
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .delta_aggregated_resources(req)
        .await
        .context("opening the delta ADS stream")?
        .into_inner();
    info!(address = %cfg.address, "xDS stream open (delta)");
    let mut tick = tokio::time::interval(WARMING_TICK);
    loop {
        tokio::select! {
            m = stream.message() => {
                let Some(resp) = m.context("reading the ADS stream")? else {
                    return Ok(());
                };
                *got_any = true;
                handle(&tx, state, resp).await?;
            }
            _ = tick.tick() => state.warming_expired(),
        }
    }
}

/// ACK or NACK, then the subscription changes the response led to.
async fn handle(tx: &Tx, state: &mut State, resp: DeltaDiscoveryResponse) -> anyhow::Result<()> {
    let update = Update {
        type_url: resp.type_url,
        resources: resp
            .resources
            .into_iter()
            .map(|r| Entry {
                name: Some(r.name),
                version: r.version,
                body: r.resource,
            })
            .collect(),
        removed: resp.removed_resources,
        replaces: false,
        version: resp.system_version_info,
    };
    let outcome = state.apply(&update);
    let ack = DeltaDiscoveryRequest {
        type_url: update.type_url,
        response_nonce: resp.nonce,
        error_detail: outcome.as_ref().err().map(|m| rejected(m)),
        ..Default::default()
    };
    send(tx, ack).await?;
    for r in outcome.unwrap_or_default() {
        let req = DeltaDiscoveryRequest {
            type_url: r.type_url.into(),
            resource_names_subscribe: r.subscribe,
            resource_names_unsubscribe: r.unsubscribe,
            ..Default::default()
        };
        send(tx, req).await?;
    }
    Ok(())
}
