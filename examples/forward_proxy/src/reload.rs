//! Hot reload: on request ([`ReloadHandle`], which the binary calls on SIGHUP), and when
//! the key file changes, read the keys again and hand them
//! to [`KeyPool::reload`]. Unchanged keys keep their state (cool-downs, counters, requests
//! in flight); removed keys finish what they carry and take nothing new. A new key list
//! that does not load is logged and the keys in force stay.
//!
//! The key file is polled once a second (a fingerprint of its content and of the secret
//! files it names) rather than watched with an inotify crate: polling works on every
//! platform and file system (network mounts, Kubernetes secret volumes that swap a
//! symlink, editors that write a new file and rename it over the old, which a watch on
//! the old file misses), needs no dependency, and a second is soon enough for keys.
//!
//! One edit is one reload, however it is noticed: a SIGHUP after the poller has read the
//! edit (or a poll after a SIGHUP has) finds the file as last read, and says so.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;
use tower_key_rotation::KeyPool;

use crate::handler::{self, KeyNames};
use crate::keys::{self, KeySource};

/// Counts reloads by result (`ok`, `failed`), for the metrics.
pub(crate) type ReloadCounter = Family<Vec<(&'static str, &'static str)>, Counter>;

/// Asks a running proxy to read its keys again, as the binary does on SIGHUP (the log
/// names the request SIGHUP). Cheap to clone; requests made while a reload runs, or
/// before the proxy serves, are folded into one.
#[derive(Debug, Clone, Default)]
pub struct ReloadHandle(Arc<Notify>);

impl ReloadHandle {
    /// Reads the keys again (for a key file: unless it has not changed since last read).
    pub fn reload(&self) {
        self.0.notify_one();
    }

    async fn requested(&self) {
        self.0.notified().await;
    }
}

/// Why the keys are read again.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Hangup,
    FileChanged,
}

/// Runs for the life of the proxy: reloads `pool` from `source` when `requests` asks
/// (SIGHUP) and, for a key
/// file, when it changes (looked at every `poll`; never if zero). `loaded` is the key
/// file's fingerprint taken before the keys in force were read (so that a change made
/// while they were read is not missed).
pub(crate) async fn run(
    pool: KeyPool,
    source: KeySource,
    loaded: Option<u64>,
    poll_every: Duration,
    requests: ReloadHandle,
    reloads: ReloadCounter,
    key_names: Arc<KeyNames>,
) {
    let file = match &source {
        KeySource::File(path) => Some(path.clone()),
        KeySource::Env { .. } => None,
    };
    let polled = file.as_ref().filter(|_| !poll_every.is_zero());
    // The fingerprint of the key file as last read: a SIGHUP after the poller has read an
    // edit (or a poll after a SIGHUP has) finds nothing new, so one edit is one reload.
    let mut last = loaded;
    let mut poll = tokio::time::interval(poll_every.max(Duration::from_millis(10)));
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            () = requests.requested() => Trigger::Hangup,
            _ = poll.tick(), if polled.is_some() => Trigger::FileChanged,
        };
        // Taken before the keys are read, so that a change made meanwhile is seen next time.
        let now = file.as_deref().and_then(keys::fingerprint);
        match trigger {
            // An unreadable file (mid-replace, or removed) is not a change: keep the keys in
            // force and look again.
            Trigger::FileChanged if now.is_none() || now == last => continue,
            Trigger::Hangup if now.is_some() && now == last => {
                tracing::info!(
                    "SIGHUP: {source} has not changed since it was last read; nothing to reload"
                );
                continue;
            }
            _ => {}
        }
        if now.is_some() {
            last = now;
        }
        reload(&pool, &source, trigger, &reloads);
        key_names.store(handler::key_names(&pool));
    }
}

fn reload(pool: &KeyPool, source: &KeySource, trigger: Trigger, reloads: &ReloadCounter) {
    let why = match trigger {
        Trigger::Hangup => "SIGHUP",
        Trigger::FileChanged => "key file changed",
    };
    if let KeySource::Env {
        var,
        from_dotenv: false,
    } = source
    {
        tracing::warn!(
            "{why}: nothing to reload: the keys come from the environment variable {var}, \
             which a running process cannot see change (use --keys-file, or .env, or restart)"
        );
        return;
    }
    match keys::load(source) {
        Ok(keys) => {
            let summary = pool.reload(keys);
            reloads.get_or_create(&vec![("result", "ok")]).inc();
            tracing::info!(
                "Reloaded keys from {source} ({why}): {} key(s); {summary}",
                pool.len()
            );
        }
        Err(error) => {
            reloads.get_or_create(&vec![("result", "failed")]).inc();
            tracing::warn!(
                "Reload failed ({why}); the {} key(s) in force stay: {error:#}",
                pool.len()
            );
        }
    }
}
