//! Session tokens recently returned by `SHOW SESSION_STATES`, per user and issuing TiDB.
//!
//! A token proves its user's identity to every TiDB that shares the issuer's signing cert, for
//! one minute after it was signed, whichever session it came from. A migration that finds a fresh
//! token of its user from its own current TiDB logs in to the target with it while that TiDB is
//! still exporting the session, which takes the login off the pause the client sees. Keying by
//! the issuer makes the early login prove exactly what the session's own token would: a token
//! from another TiDB could come from another cluster, where the same user name is another
//! account. A token is reused for at most 30 s, half its life, so that clock differences between
//! TiDB servers cannot expire it in flight.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

const REUSE_FOR: Duration = Duration::from_secs(30);
/// (user, issuer) pairs remembered at most (expired entries are dropped first when it is
/// reached).
const MAX_ENTRIES: usize = 4096;

type Key = (String, String);

#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<Key, (Bytes, Instant)>>,
}

impl TokenCache {
    /// A token of `user` that the TiDB at `issuer` signed less than 30 s ago, if any.
    pub fn fresh(&self, user: &str, issuer: &str) -> Option<Bytes> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(&key(user, issuer))
            .filter(|(_, at)| at.elapsed() < REUSE_FOR)
            .map(|(token, _)| token.clone())
    }

    pub fn remember(&self, user: &str, issuer: &str, token: Bytes) {
        let key = key(user, issuer);
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.len() >= MAX_ENTRIES && !tokens.contains_key(&key) {
            tokens.retain(|_, (_, at)| at.elapsed() < REUSE_FOR);
            if tokens.len() >= MAX_ENTRIES {
                return;
            }
        }
        tokens.insert(key, (token, Instant::now()));
    }

    /// Drops `token` (a TiDB refused it), unless a newer one replaced it meanwhile.
    pub fn forget(&self, user: &str, issuer: &str, token: &Bytes) {
        let key = key(user, issuer);
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.get(&key).is_some_and(|(t, _)| t == token) {
            tokens.remove(&key);
        }
    }
}

fn key(user: &str, issuer: &str) -> Key {
    (user.to_owned(), issuer.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_token_per_user_and_issuer_until_forgotten() {
        let cache = TokenCache::default();
        assert_eq!(cache.fresh("app", "a:4000"), None);
        cache.remember("app", "a:4000", Bytes::from_static(b"t1"));
        cache.remember("app", "a:4000", Bytes::from_static(b"t2"));
        cache.remember("other", "a:4000", Bytes::from_static(b"o1"));
        assert_eq!(cache.fresh("app", "a:4000").as_deref(), Some(&b"t2"[..]));
        assert_eq!(cache.fresh("app", "b:4000"), None, "another issuer");
        cache.forget("app", "a:4000", &Bytes::from_static(b"t1"));
        assert_eq!(cache.fresh("app", "a:4000").as_deref(), Some(&b"t2"[..]));
        cache.forget("app", "a:4000", &Bytes::from_static(b"t2"));
        assert_eq!(cache.fresh("app", "a:4000"), None);
        assert_eq!(cache.fresh("other", "a:4000").as_deref(), Some(&b"o1"[..]));
    }

    #[test]
    fn stale_tokens_are_not_reused() {
        let Some(signed_long_ago) = Instant::now().checked_sub(REUSE_FOR) else {
            return; // the clock's origin is younger than 30 s: nothing can be stale yet
        };
        let cache = TokenCache::default();
        cache.tokens.lock().unwrap().insert(
            key("app", "a:4000"),
            (Bytes::from_static(b"old"), signed_long_ago),
        );
        assert_eq!(cache.fresh("app", "a:4000"), None);
    }

    #[test]
    fn the_number_of_entries_is_bounded() {
        let cache = TokenCache::default();
        for i in 0..MAX_ENTRIES + 10 {
            cache.remember(&format!("u{i}"), "a:4000", Bytes::from_static(b"t"));
        }
        assert_eq!(cache.tokens.lock().unwrap().len(), MAX_ENTRIES);
        assert!(cache.fresh("u0", "a:4000").is_some());
    }
}
