//! Hot reload of the config file: it is polled (inotify is unreliable with the symlink swaps
//! Kubernetes uses for mounted ConfigMaps) and, when its content changes and is valid, the
//! settings that can change at run time are applied; the others are reported as needing a
//! restart. An invalid file is logged and ignored: the proxy keeps its last good config.
//!
//! Every poll also gives the target a [`ReloadTarget::tick`], for files the config only names
//! (the API token) whose content can change while the config file stays the same.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use super::Config;

/// How often the file is read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a reload can change while the proxy runs.
pub trait ReloadTarget: Send + 'static {
    fn apply(&mut self, old: &Config, new: &Config);

    /// Called after every poll (after `apply`, when the config changed) with the config in
    /// force, whether or not it changed; for re-reading the files it names.
    fn tick(&mut self, _current: &Config) {}
}

/// Keys whose change needs a restart, as (key, old != new).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.proxy, &new.proxy);
    [
        ("proxy.addr", o.addr != n.addr),
        ("proxy.proxy-protocol", o.proxy_protocol != n.proxy_protocol),
        ("proxy.pd-addrs", o.pd_addrs != n.pd_addrs),
        (
            "proxy.conn-buffer-size",
            o.conn_buffer_size != n.conn_buffer_size,
        ),
        (
            "proxy.handshake-timeout",
            o.handshake_timeout != n.handshake_timeout,
        ),
        (
            "proxy.connect-timeout",
            o.connect_timeout != n.connect_timeout,
        ),
        ("proxy.server-version", o.server_version != n.server_version),
        (
            "proxy.graceful-wait-before-shutdown",
            o.graceful_wait_before_shutdown != n.graceful_wait_before_shutdown,
        ),
        (
            "proxy.graceful-close-conn-timeout",
            o.graceful_close_conn_timeout != n.graceful_close_conn_timeout,
        ),
        ("api.addr", old.api.addr != new.api.addr),
        ("security", old.security != new.security),
        ("log.format", old.log.format != new.log.format),
        ("balance", old.balance != new.balance),
        ("health", old.health != new.health),
        ("labels", old.labels != new.labels),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// Polls `path` until `stop` turns true, applying valid changes to `target`.
pub async fn watch_config_file(
    path: PathBuf,
    mut current: Config,
    mut target: impl ReloadTarget,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => if *stop.borrow() { return } else { continue },
        }
        if let Some(new) = read_changed(&path, &mut last_text).await {
            if new != current {
                let restart = restart_only_changes(&current, &new);
                if !restart.is_empty() {
                    tracing::warn!(keys = ?restart, "config changed; these keys take effect after a restart");
                }
                target.apply(&current, &new);
                tracing::info!(path = %path.display(), "config reloaded");
                current = new;
            }
        }
        target.tick(&current);
    }
}

/// The config in `path` when its text differs from `last_text` and is valid; `None` when it is
/// unchanged, unreadable or invalid (each logged once per change).
async fn read_changed(path: &Path, last_text: &mut String) -> Option<Config> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) => {
            if !last_text.is_empty() {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the config file; keeping the current config");
                last_text.clear();
            }
            return None;
        }
    };
    if text == *last_text {
        return None;
    }
    last_text.clone_from(&text);
    match Config::parse(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            let error = match e {
                super::ConfigError::Parse { message, .. } => message,
                other => other.to_string(),
            };
            tracing::error!(path = %path.display(), %error, "config file changed but is invalid; keeping the current config");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Config>>>, Arc<Mutex<Vec<u64>>>);

    impl ReloadTarget for Recorder {
        fn apply(&mut self, _old: &Config, new: &Config) {
            self.0.lock().unwrap().push(new.clone());
        }

        fn tick(&mut self, current: &Config) {
            self.1.lock().unwrap().push(current.proxy.max_connections);
        }
    }

    #[test]
    fn restart_only_keys_are_named() {
        let a = Config::default();
        let mut b = a.clone();
        b.proxy.addr = "127.0.0.1:1".into();
        b.proxy.max_connections = 5;
        assert_eq!(restart_only_changes(&a, &b), ["proxy.addr"]);

        // The API token and the readiness rule apply at once; only the listener needs a restart.
        let mut c = a.clone();
        c.api.token_file = "/run/secrets/token".into();
        c.api.ready_requires_backend = true;
        assert!(restart_only_changes(&a, &c).is_empty());
        c.api.addr = "127.0.0.1:1".into();
        assert_eq!(restart_only_changes(&a, &c), ["api.addr"]);
    }

    #[tokio::test(start_paused = true)]
    async fn applies_valid_changes_and_ignores_invalid_ones() {
        let path = std::env::temp_dir().join(format!("tiproxy-reload-{}.toml", std::process::id()));
        std::fs::write(&path, "[proxy]\nmax-connections = 1\n").unwrap();
        let initial = Config::load(&path).unwrap();
        let rec = Recorder::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watch_config_file(
            path.clone(),
            initial,
            rec.clone(),
            stop_rx,
        ));
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        assert!(rec.0.lock().unwrap().is_empty(), "nothing changed yet");
        std::fs::write(&path, "[proxy]\nmax-connections = 7\n").unwrap();
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        std::fs::write(&path, "[proxy]\nmax-connections = \"many\"\n").unwrap();
        tokio::time::sleep(POLL_INTERVAL * 2).await;
        let applied = rec.0.lock().unwrap().clone();
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].proxy.max_connections, 7);
        // Every poll ticks with the config in force, also while the file is unchanged or
        // invalid: that is what re-reads the token file.
        let ticks = rec.1.lock().unwrap().clone();
        assert!(ticks.len() >= 5, "{ticks:?}");
        assert_eq!(ticks.first(), Some(&1));
        assert_eq!(ticks.last(), Some(&7));
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let _ = std::fs::remove_file(path);
    }
}
