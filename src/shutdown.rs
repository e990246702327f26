//! Shutdown as an explicit type (the mini-redis pattern): one [`Trigger`] fires, every task
//! holding a [`Shutdown`] sees it. Listeners stop accepting; queries already in flight are
//! answered, because each runs on the server's task tracker, which `Running::shutdown` waits on.

use tokio::sync::watch;

/// Fires the shutdown signal.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Listens for the shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown has been signalled (at once if it already was).
    pub async fn recv(&mut self) {
        // An error means the trigger is gone, which also means: stop.
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    /// True once shutdown was signalled or the trigger was dropped (a `Running` dropped
    /// without `shutdown()` must still let its receive threads end, or the runtime's drop
    /// would wait for them forever).
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}
