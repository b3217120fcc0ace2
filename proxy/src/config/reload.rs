//! Hot reload of the config file: it is polled (inotify is unreliable with the symlink swaps
//! Kubernetes uses for mounted ConfigMaps) and, when its content changes and is valid, the
//! settings that can change at run time are applied; the others are reported as needing a
//! restart. An invalid file is logged and ignored: the proxy keeps its last good config.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use super::Config;

/// How often the file is read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a reload can change while the proxy runs.
pub trait ReloadTarget: Send + 'static {
    fn apply(&mut self, old: &Config, new: &Config);
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
        ("api", old.api != new.api),
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
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                if !last_text.is_empty() {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the config file; keeping the current config");
                    last_text.clear();
                }
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        last_text.clone_from(&text);
        let new = match Config::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                let error = match e {
                    super::ConfigError::Parse { message, .. } => message,
                    other => other.to_string(),
                };
                tracing::error!(path = %path.display(), %error, "config file changed but is invalid; keeping the current config");
                continue;
            }
        };
        if new == current {
            continue;
        }
        let restart = restart_only_changes(&current, &new);
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "config changed; these keys take effect after a restart");
        }
        target.apply(&current, &new);
        tracing::info!(path = %path.display(), "config reloaded");
        current = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Config>>>);

    impl ReloadTarget for Recorder {
        fn apply(&mut self, _old: &Config, new: &Config) {
            self.0.lock().unwrap().push(new.clone());
        }
    }

    #[test]
    fn restart_only_keys_are_named() {
        let a = Config::default();
        let mut b = a.clone();
        b.proxy.addr = "127.0.0.1:1".into();
        b.proxy.max_connections = 5;
        assert_eq!(restart_only_changes(&a, &b), ["proxy.addr"]);
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
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let _ = std::fs::remove_file(path);
    }
}
