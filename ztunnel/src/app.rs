//! The one place where ztunnel is wired together.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tracing::info;

use crate::admin;
use crate::config::Config;
use crate::identity::{CaClient, Identity, LocalCa, SecretManager};
use crate::inpod;
use crate::metrics::Metrics;
use crate::proxy::{
    ConnectionTracker, Drain, ListenAddrs, Listeners, Pool, ProxyInputs, SocketOriginalDst,
};
use crate::state::{self, Store};
use crate::xds::{self, ControlPlane, RemoteCa};

/// Starts everything and runs until SIGINT or SIGTERM, then drains.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let store = Store::new();
    let state_status = Arc::new(Mutex::new(None));
    if let Some(path) = &cfg.local_state {
        state::watch_file(
            path.clone(),
            cfg.trust_domain.clone(),
            store.clone(),
            state_status.clone(),
        )
        .await?;
    }

    let control_plane = |address: &str| -> anyhow::Result<ControlPlane> {
        Ok(ControlPlane {
            address: address.to_string(),
            root_cert: Some(
                cfg.xds_root_cert
                    .clone()
                    .or_else(|| cfg.ca_cert.clone())
                    .context("the control plane needs --xds-root-cert (or --ca-cert)")?,
            ),
            server_name: cfg.xds_server_name.clone(),
            token_file: cfg.xds_token_file.clone(),
        })
    };
    // Readiness waits for the first full xDS sync.
    let (synced_tx, synced_rx) = tokio::sync::watch::channel(cfg.xds_address.is_none());
    if let Some(addr) = &cfg.xds_address {
        xds::spawn(
            control_plane(addr)?,
            xds::ClientNode::ztunnel(&cfg.node),
            cfg.trust_domain.clone(),
            store.clone(),
            synced_tx,
        )?;
    }
    let ca: Arc<dyn CaClient> = match &cfg.ca_address {
        Some(addr) => Arc::new(RemoteCa::new(control_plane(addr)?)?),
        None => Arc::new(
            LocalCa::load_or_generate(
                cfg.ca_cert.as_deref(),
                cfg.ca_key.as_deref(),
                &cfg.trust_domain,
            )
            .context("setting up the local CA")?,
        ),
    };
    let secrets = SecretManager::new(ca, cfg.cert_ttl);
    tokio::spawn(keep_local_certificates(
        store.clone(),
        secrets.clone(),
        cfg.node.clone(),
    ));

    let tracker = Arc::new(ConnectionTracker::default());
    tokio::spawn(tracker.clone().run(store.clone()));

    let pi = Arc::new(ProxyInputs {
        node: cfg.node.clone(),
        store: store.clone(),
        secrets: secrets.clone(),
        metrics: Arc::new(Metrics::new()),
        pool: Pool::new(
            secrets,
            cfg.socket_mark,
            cfg.pool_max_streams,
            cfg.pool_idle_timeout,
        ),
        tracker,
        orig_dst: Arc::new(SocketOriginalDst),
        mark: cfg.socket_mark,
        hbone_port: cfg.hbone_port,
        max_streams: cfg.pool_max_streams,
        drain: Drain::default(),
        netns: None,
    });

    let listeners = Listeners::bind(
        &ListenAddrs {
            outbound: Some(cfg.outbound_addr),
            inbound_plaintext: Some(cfg.inbound_plaintext_addr),
            inbound: Some(cfg.inbound_addr),
            socks5: cfg.socks5_addr,
        },
        cfg.transparent,
    )?;
    let ready = Arc::new(AtomicBool::new(false));
    admin::serve(
        admin::bind(cfg.admin_addr, "admin").await?,
        admin::admin_handler(pi.clone(), state_status),
    );
    admin::serve(
        admin::bind(cfg.metrics_addr, "metrics").await?,
        admin::metrics_handler(pi.clone()),
    );
    admin::serve(
        admin::bind(cfg.readiness_addr, "readiness").await?,
        admin::readiness_handler(ready.clone()),
    );
    listeners.spawn(pi.clone());
    let _inpod = match &cfg.inpod_socket {
        Some(socket) => Some(
            inpod::Manager::start(
                inpod::InPodConfig {
                    socket: socket.clone(),
                    bpf_dir: cfg.inpod_bpf_dir.clone(),
                    state_dir: cfg.inpod_state_dir.clone(),
                    exempt: cfg.inpod_exempt.clone(),
                },
                pi.clone(),
            )
            .await
            .context("starting in-pod mode")?,
        ),
        None => None,
    };
    let mut synced = synced_rx;
    let ready2 = ready.clone();
    let node = cfg.node.clone();
    tokio::spawn(async move {
        if synced.wait_for(|s| *s).await.is_ok() {
            ready2.store(true, Ordering::Release);
            info!(%node, "ztunnel ready");
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Drain: report not ready so traffic moves elsewhere, stop accepting,
    // let open connections finish (HBONE peers get GOAWAY), then exit.
    ready.store(false, Ordering::Release);
    info!(open = pi.drain.connections.len(), timeout = ?cfg.drain_timeout, "draining");
    let left = pi.drain.run(cfg.drain_timeout).await;
    if left > 0 {
        info!(
            closed = left,
            "drain timeout: closing the remaining connections"
        );
    }
    info!("shut down");
    Ok(())
}

/// Fetches certificates for identities as their first workload lands on
/// this node, and drops them when their last one leaves.
async fn keep_local_certificates(store: Arc<Store>, secrets: Arc<SecretManager>, node: String) {
    let mut rx = store.subscribe();
    loop {
        let wanted: HashSet<Identity> = store.snapshot().local_identities(&node);
        secrets.retain(&wanted);
        if rx.changed().await.is_err() {
            return;
        }
    }
}
