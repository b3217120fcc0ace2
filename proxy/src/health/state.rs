//! Per-backend hysteresis: turns a stream of [`ProbeOutcome`]s into a [`BackendHealth`] that
//! does not flap.
//!
//! * `Draining` and `Down` take effect at once: a TiDB that says it is shutting down must lose
//!   its sessions within its `graceful-wait-before-shutdown`.
//! * `Slow` counts only after `slow_probes_to_unhealthy` slow probes in a row, so one slow
//!   answer of a busy TiDB never evicts its sessions (pingcap/tiproxy#282).
//! * Leaving `Unhealthy`/`Draining` takes `successes_to_recover` healthy probes in a row, so a
//!   flapping backend does not ping-pong sessions. Until a backend has been healthy once (proxy
//!   start-up, a newly discovered backend), a single healthy probe is enough.

use std::borrow::Cow;
use std::fmt;
use std::time::Instant;

use super::probe::{ProbeOutcome, DRAINING_REASON};
use super::HealthConfig;

/// The health of a backend as the router should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendHealth {
    Healthy,
    /// TiDB is shutting down (or starting): route nothing new, migrate sessions away.
    Draining {
        since: Instant,
    },
    /// Down, or slow for too long.
    Unhealthy {
        reason: String,
        since: Instant,
    },
}

impl BackendHealth {
    /// New sessions may go there and sessions there may stay.
    pub fn is_healthy(&self) -> bool {
        matches!(self, BackendHealth::Healthy)
    }

    /// A human-readable reason for the state.
    pub fn reason(&self) -> Cow<'_, str> {
        match self {
            BackendHealth::Healthy => Cow::Borrowed("healthy"),
            BackendHealth::Draining { .. } => Cow::Borrowed(DRAINING_REASON),
            BackendHealth::Unhealthy { reason, .. } => Cow::Borrowed(reason),
        }
    }

    /// When the backend entered this state (`None` for `Healthy`).
    pub fn since(&self) -> Option<Instant> {
        match self {
            BackendHealth::Healthy => None,
            BackendHealth::Draining { since } | BackendHealth::Unhealthy { since, .. } => {
                Some(*since)
            }
        }
    }

    /// `healthy`, `draining` or `unhealthy`.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendHealth::Healthy => "healthy",
            BackendHealth::Draining { .. } => "draining",
            BackendHealth::Unhealthy { .. } => "unhealthy",
        }
    }

    fn same_kind(&self, other: &BackendHealth) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

impl fmt::Display for BackendHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendHealth::Healthy => f.write_str("healthy"),
            other => write!(f, "{}: {}", other.kind(), other.reason()),
        }
    }
}

/// A change of [`BackendHealth`] kind, for logging and notifying the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// `None` on the first probe of a backend.
    pub from: Option<BackendHealth>,
    pub to: BackendHealth,
}

/// Hysteresis state of one backend.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    health: BackendHealth,
    slow_streak: u32,
    ok_streak: u32,
    ever_healthy: bool,
    probed: bool,
    last_outcome: Option<ProbeOutcome>,
    slow_probes_to_unhealthy: u32,
    successes_to_recover: u32,
}

impl HealthTracker {
    /// A tracker for a backend that has not been probed yet (`Unhealthy`, "not probed yet").
    pub fn new(cfg: &HealthConfig, now: Instant) -> Self {
        Self::with_thresholds(cfg.slow_probes_to_unhealthy, cfg.successes_to_recover, now)
    }

    /// Thresholds of 0 are taken as 1.
    pub fn with_thresholds(
        slow_probes_to_unhealthy: u32,
        successes_to_recover: u32,
        now: Instant,
    ) -> Self {
        Self {
            health: BackendHealth::Unhealthy {
                reason: "not probed yet".into(),
                since: now,
            },
            slow_streak: 0,
            ok_streak: 0,
            ever_healthy: false,
            probed: false,
            last_outcome: None,
            slow_probes_to_unhealthy: slow_probes_to_unhealthy.max(1),
            successes_to_recover: successes_to_recover.max(1),
        }
    }

    pub fn health(&self) -> &BackendHealth {
        &self.health
    }

    pub fn is_healthy(&self) -> bool {
        self.health.is_healthy()
    }

    /// The outcome of the latest probe.
    pub fn last_outcome(&self) -> Option<&ProbeOutcome> {
        self.last_outcome.as_ref()
    }

    /// Feeds one probe outcome. Returns the transition when the kind of health changed, and
    /// on the very first probe (so the caller can log the initial state).
    pub fn observe(&mut self, outcome: &ProbeOutcome, now: Instant) -> Option<Transition> {
        let before = self.health.clone();
        match outcome {
            ProbeOutcome::Healthy => {
                self.slow_streak = 0;
                self.ok_streak = self.ok_streak.saturating_add(1);
                if !self.health.is_healthy()
                    && (self.ok_streak >= self.successes_to_recover || !self.ever_healthy)
                {
                    self.health = BackendHealth::Healthy;
                }
            }
            ProbeOutcome::Draining => {
                self.slow_streak = 0;
                self.ok_streak = 0;
                if !matches!(self.health, BackendHealth::Draining { .. }) {
                    self.health = BackendHealth::Draining { since: now };
                }
            }
            ProbeOutcome::Down { reason } => {
                self.slow_streak = 0;
                self.ok_streak = 0;
                self.set_unhealthy(reason.clone(), now);
            }
            ProbeOutcome::Slow { reason } => {
                self.ok_streak = 0;
                self.slow_streak = self.slow_streak.saturating_add(1);
                let unhealthy = matches!(self.health, BackendHealth::Unhealthy { .. });
                if unhealthy || self.slow_streak >= self.slow_probes_to_unhealthy {
                    let n = self.slow_streak;
                    let reason = if n > 1 {
                        format!("{reason} ({n} slow probes in a row)")
                    } else {
                        reason.clone()
                    };
                    self.set_unhealthy(reason, now);
                }
            }
        }
        self.ever_healthy |= self.health.is_healthy();
        self.last_outcome = Some(outcome.clone());
        let first = !self.probed;
        self.probed = true;
        if first || !before.same_kind(&self.health) {
            Some(Transition {
                from: (!first).then_some(before),
                to: self.health.clone(),
            })
        } else {
            None
        }
    }

    /// Unhealthy with the latest reason; `since` is kept while it stays unhealthy.
    fn set_unhealthy(&mut self, reason: String, now: Instant) {
        let since = match &self.health {
            BackendHealth::Unhealthy { since, .. } if self.probed => *since,
            _ => now,
        };
        self.health = BackendHealth::Unhealthy { reason, since };
    }

    /// The state plus what is pending, for the API and logs, e.g.
    /// `healthy (1 of 3 slow probes: SQL port …)` or `unhealthy: … (recovering: 1 of 2 healthy
    /// probes)`.
    pub fn describe(&self) -> String {
        let mut s = self.health.to_string();
        match (&self.health, &self.last_outcome) {
            (BackendHealth::Healthy, Some(ProbeOutcome::Slow { reason })) => {
                s = format!(
                    "{s} ({} of {} slow probes: {reason})",
                    self.slow_streak, self.slow_probes_to_unhealthy
                );
            }
            (_, Some(ProbeOutcome::Healthy)) if !self.health.is_healthy() => {
                s = format!(
                    "{s} (recovering: {} of {} healthy probes)",
                    self.ok_streak, self.successes_to_recover
                );
            }
            _ => {}
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn slow() -> ProbeOutcome {
        ProbeOutcome::Slow {
            reason: "SQL port 127.0.0.1:4000: no answer within 2s (waiting for the greeting)"
                .into(),
        }
    }

    fn down(r: &str) -> ProbeOutcome {
        ProbeOutcome::Down { reason: r.into() }
    }

    struct Clock(Instant);
    impl Clock {
        fn tick(&mut self) -> Instant {
            self.0 += Duration::from_secs(3);
            self.0
        }
    }

    /// A tracker with default thresholds (3 slow, 2 to recover) that is already healthy.
    fn healthy_tracker() -> (HealthTracker, Clock) {
        let mut c = Clock(Instant::now());
        let mut t = HealthTracker::new(&HealthConfig::default(), c.0);
        t.observe(&ProbeOutcome::Healthy, c.tick());
        assert!(t.is_healthy());
        (t, c)
    }

    #[test]
    fn defaults_match_the_brief() {
        let cfg = HealthConfig::default();
        assert_eq!(cfg.slow_probes_to_unhealthy, 3);
        assert_eq!(cfg.successes_to_recover, 2);
    }

    #[test]
    fn starts_unhealthy_and_one_healthy_probe_is_enough_at_first() {
        let now = Instant::now();
        let mut t = HealthTracker::new(&HealthConfig::default(), now);
        assert_eq!(t.health().reason(), "not probed yet");
        assert!(!t.is_healthy());
        let tr = t.observe(&ProbeOutcome::Healthy, now).unwrap();
        assert_eq!(tr.from, None);
        assert_eq!(tr.to, BackendHealth::Healthy);
        assert!(t.observe(&ProbeOutcome::Healthy, now).is_none());
    }

    #[test]
    fn first_probe_down_is_reported_and_since_is_the_probe_time() {
        let t0 = Instant::now();
        let mut t = HealthTracker::new(&HealthConfig::default(), t0);
        let t1 = t0 + Duration::from_secs(1);
        let tr = t.observe(&down("refused"), t1).unwrap();
        assert_eq!(tr.from, None);
        assert_eq!(
            tr.to,
            BackendHealth::Unhealthy {
                reason: "refused".into(),
                since: t1
            }
        );
        // Never healthy yet: one healthy probe brings it in.
        assert!(t.observe(&ProbeOutcome::Healthy, t1).is_some());
        assert!(t.is_healthy());
    }

    #[test]
    fn first_probe_slow_stays_unhealthy_until_a_healthy_probe() {
        let t0 = Instant::now();
        let mut t = HealthTracker::new(&HealthConfig::default(), t0);
        t.observe(&slow(), t0);
        assert!(!t.is_healthy());
        assert!(t.health().reason().contains("no answer within"));
        t.observe(&ProbeOutcome::Healthy, t0);
        assert!(t.is_healthy());
    }

    #[test]
    fn down_is_immediate() {
        let (mut t, mut c) = healthy_tracker();
        let now = c.tick();
        let tr = t
            .observe(&down("SQL port x: connection refused"), now)
            .unwrap();
        assert_eq!(tr.from, Some(BackendHealth::Healthy));
        assert_eq!(
            tr.to,
            BackendHealth::Unhealthy {
                reason: "SQL port x: connection refused".into(),
                since: now
            }
        );
    }

    #[test]
    fn draining_is_immediate() {
        let (mut t, mut c) = healthy_tracker();
        let now = c.tick();
        let tr = t.observe(&ProbeOutcome::Draining, now).unwrap();
        assert_eq!(tr.to, BackendHealth::Draining { since: now });
        assert!(t.health().reason().contains("shutting down"));
        // Stays draining, `since` unchanged, no new transition.
        assert!(t.observe(&ProbeOutcome::Draining, c.tick()).is_none());
        assert_eq!(t.health(), &BackendHealth::Draining { since: now });
    }

    #[test]
    fn graceful_shutdown_sequence_draining_then_down() {
        let (mut t, mut c) = healthy_tracker();
        t.observe(&ProbeOutcome::Draining, c.tick()).unwrap();
        t.observe(&ProbeOutcome::Draining, c.tick());
        let now = c.tick();
        let tr = t
            .observe(&down("status port x: GET /status: connection refused"), now)
            .unwrap();
        assert!(matches!(tr.from, Some(BackendHealth::Draining { .. })));
        assert_eq!(tr.to.since(), Some(now));
        assert!(tr.to.reason().contains("connection refused"));
    }

    #[test]
    fn one_or_two_slow_probes_do_not_evict_issue_282() {
        let (mut t, mut c) = healthy_tracker();
        // A busy TiDB: slow, slow, ok, slow, ok, slow, slow, ok ... never 3 in a row.
        let pattern = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0];
        for &s in pattern.iter().cycle().take(pattern.len() * 7) {
            let o = if s == 1 {
                slow()
            } else {
                ProbeOutcome::Healthy
            };
            assert!(t.observe(&o, c.tick()).is_none(), "must not change state");
            assert!(t.is_healthy());
        }
        t.observe(&slow(), c.tick());
        let d = t.describe();
        assert!(
            d.starts_with("healthy (1 of 3 slow probes: SQL port"),
            "{d}"
        );
    }

    #[test]
    fn three_slow_probes_in_a_row_make_it_unhealthy() {
        let (mut t, mut c) = healthy_tracker();
        assert!(t.observe(&slow(), c.tick()).is_none());
        assert!(t.observe(&slow(), c.tick()).is_none());
        let now = c.tick();
        let tr = t.observe(&slow(), now).unwrap();
        assert_eq!(tr.from, Some(BackendHealth::Healthy));
        assert_eq!(tr.to.since(), Some(now));
        let r = tr.to.reason().into_owned();
        assert!(r.contains("no answer within 2s"), "{r}");
        assert!(r.ends_with("(3 slow probes in a row)"), "{r}");
        // Still slow: reason is updated, `since` kept, no transition.
        assert!(t.observe(&slow(), c.tick()).is_none());
        assert_eq!(t.health().since(), Some(now));
        assert!(t.health().reason().ends_with("(4 slow probes in a row)"));
    }

    #[test]
    fn down_resets_the_slow_streak_and_slow_after_down_stays_unhealthy() {
        let (mut t, mut c) = healthy_tracker();
        t.observe(&slow(), c.tick());
        t.observe(&slow(), c.tick());
        let now = c.tick();
        t.observe(&down("refused"), now).unwrap();
        // Slow while unhealthy keeps it unhealthy (a healthy streak is needed to recover).
        assert!(t.observe(&slow(), c.tick()).is_none());
        assert!(!t.is_healthy());
        assert_eq!(t.health().since(), Some(now));
        assert!(t.health().reason().contains("no answer within"));
    }

    #[test]
    fn recovery_needs_consecutive_successes() {
        let (mut t, mut c) = healthy_tracker();
        t.observe(&down("refused"), c.tick()).unwrap();
        assert!(t.observe(&ProbeOutcome::Healthy, c.tick()).is_none());
        assert!(!t.is_healthy());
        let d = t.describe();
        assert!(
            d.starts_with("unhealthy: refused (recovering: 1 of 2"),
            "{d}"
        );
        // A failure in between restarts the count.
        assert!(t.observe(&slow(), c.tick()).is_none());
        assert!(t.observe(&ProbeOutcome::Healthy, c.tick()).is_none());
        assert!(!t.is_healthy());
        let tr = t.observe(&ProbeOutcome::Healthy, c.tick()).unwrap();
        assert!(matches!(tr.from, Some(BackendHealth::Unhealthy { .. })));
        assert_eq!(tr.to, BackendHealth::Healthy);
        assert_eq!(t.describe(), "healthy");
    }

    #[test]
    fn recovery_from_draining_needs_consecutive_successes() {
        let (mut t, mut c) = healthy_tracker();
        t.observe(&ProbeOutcome::Draining, c.tick()).unwrap();
        assert!(t.observe(&ProbeOutcome::Healthy, c.tick()).is_none());
        assert!(t.observe(&ProbeOutcome::Draining, c.tick()).is_none());
        assert!(t.observe(&ProbeOutcome::Healthy, c.tick()).is_none());
        let tr = t.observe(&ProbeOutcome::Healthy, c.tick()).unwrap();
        assert_eq!(tr.to, BackendHealth::Healthy);
    }

    #[test]
    fn flapping_backend_does_not_ping_pong() {
        let (mut t, mut c) = healthy_tracker();
        t.observe(&down("reset"), c.tick()).unwrap();
        // Alternating ok/down never brings it back.
        for i in 0..20 {
            let o = if i % 2 == 0 {
                ProbeOutcome::Healthy
            } else {
                down("reset")
            };
            assert!(t.observe(&o, c.tick()).is_none());
            assert!(!t.is_healthy());
        }
    }

    #[test]
    fn unhealthy_to_draining_and_draining_to_unhealthy_by_slowness() {
        let (mut t, mut c) = healthy_tracker();
        t.observe(&down("refused"), c.tick()).unwrap();
        // A restarting TiDB answers 500 before it is ready.
        let tr = t.observe(&ProbeOutcome::Draining, c.tick()).unwrap();
        assert!(matches!(tr.to, BackendHealth::Draining { .. }));
        // A draining TiDB that stops answering altogether becomes unhealthy after 3 slow.
        assert!(t.observe(&slow(), c.tick()).is_none());
        assert!(t.observe(&slow(), c.tick()).is_none());
        let tr = t.observe(&slow(), c.tick()).unwrap();
        assert!(matches!(tr.to, BackendHealth::Unhealthy { .. }));
    }

    #[test]
    fn thresholds_of_zero_or_one_act_immediately() {
        let now = Instant::now();
        let mut t = HealthTracker::with_thresholds(0, 0, now);
        t.observe(&ProbeOutcome::Healthy, now);
        assert!(t.observe(&slow(), now).is_some());
        assert!(!t.is_healthy());
        assert!(t.observe(&ProbeOutcome::Healthy, now).is_some());
        assert!(t.is_healthy());
    }

    #[test]
    fn display() {
        let now = Instant::now();
        assert_eq!(BackendHealth::Healthy.to_string(), "healthy");
        assert_eq!(
            BackendHealth::Unhealthy {
                reason: "x".into(),
                since: now
            }
            .to_string(),
            "unhealthy: x"
        );
        assert!(BackendHealth::Draining { since: now }
            .to_string()
            .starts_with("draining: TiDB is shutting down"));
    }
}
