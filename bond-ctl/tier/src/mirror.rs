//! The registry followed without taking part (a director): a read, then a
//! watch, published as a whole [`View`] after each change. A broken
//! watch is started again from a fresh read, from whichever member
//! answers; meanwhile the last view stands.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use tokio::sync::watch;

use crate::{Layout, View};

/// The registry as last read, and whether the watch on it is live.
#[derive(Debug, Clone, Default)]
pub struct Mirrored {
    pub view: Arc<View>,
    pub live: bool,
}

/// Starts following the registry; the task ends when every receiver is
/// gone.
pub fn follow(etcd: crate::Etcd, layout: Layout) -> watch::Receiver<Mirrored> {
    let (tx, rx) = watch::channel(Mirrored::default());
    tokio::spawn(async move {
        let mut fails = 0u32;
        while !tx.is_closed() {
            let start = tokio::time::Instant::now();
            if let Err(e) = session(&etcd, &layout, &tx).await {
                if start.elapsed() > Duration::from_secs(10) {
                    fails = 0;
                }
                let wait = Duration::from_millis(100 << fails.min(4));
                fails += 1;
                tracing::warn!("registry: {e:#}; trying again in {wait:?}");
                tx.send_modify(|m| m.live = false);
                tokio::time::sleep(wait).await;
            }
        }
    });
    rx
}

async fn session(etcd: &crate::Etcd, layout: &Layout, tx: &watch::Sender<Mirrored>) -> Result<()> {
    let mut client = crate::connect(etcd).await?;
    let (mut view, mut stream) = crate::follow_from_now(&mut client, layout).await?;
    tx.send_replace(Mirrored {
        view: Arc::new(view.clone()),
        live: true,
    });
    loop {
        tokio::select! {
            () = tx.closed() => return Ok(()),
            m = stream.message() => {
                crate::node::apply(&mut view, layout, m)?;
                crate::node::apply_queued(&mut view, layout, &mut stream).await?;
                tx.send_replace(Mirrored { view: Arc::new(view.clone()), live: true });
            }
        }
    }
}
