//! Talking to systemd: readiness (Type=notify), stopping, and the watchdog. Every call is a
//! no-op when the process was not started by systemd (no NOTIFY_SOCKET).

use std::time::Duration;

use sd_notify::NotifyState;

/// The node is serving: store open, role applied, listeners bound.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!("cannot notify systemd of readiness: {e}");
    }
}

/// The node began a graceful stop.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// With `WatchdogSec=` set, pings systemd at half the interval from a runtime task, so a
/// wedged runtime stops the pings and systemd restarts the node.
pub fn spawn_watchdog() {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(100));
    tracing::info!("systemd watchdog: pinging every {every:?}");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
    });
}
