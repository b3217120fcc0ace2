//! What the proxy knows about a session's server-side state, learned from the responses it
//! forwards: whether a transaction is open and which prepared statements hold state that cannot
//! move to another backend (an open cursor, or long data sent but not yet executed).

use std::collections::HashMap;

use crate::protocol::status;

const WAIT_EXECUTE: u8 = 1;
const WAIT_FETCH: u8 = 2;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// Server status of the last OK/EOF packet.
    status: u16,
    /// Statements with pending state, by statement id. Empty for most sessions.
    pending: HashMap<u32, u8>,
}

impl SessionState {
    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn in_transaction(&self) -> bool {
        self.status & status::IN_TRANS != 0
    }

    pub fn has_pending_statements(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A point where the session can move to another backend.
    pub fn is_safe_point(&self) -> bool {
        !self.in_transaction() && !self.has_pending_statements()
    }

    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    pub fn on_send_long_data(&mut self, stmt: u32) {
        *self.pending.entry(stmt).or_default() |= WAIT_EXECUTE;
    }

    /// After `COM_STMT_EXECUTE`: long data is consumed; a cursor may now be open.
    pub fn on_execute(&mut self, stmt: u32, final_status: Option<u16>) {
        let cursor = final_status.is_some_and(|s| s & status::CURSOR_EXISTS != 0);
        self.update(stmt, |flags| {
            let flags = flags & !WAIT_EXECUTE & !WAIT_FETCH;
            if cursor {
                flags | WAIT_FETCH
            } else {
                flags
            }
        });
    }

    /// After `COM_STMT_FETCH`: the cursor is exhausted once the last row was sent.
    pub fn on_fetch(&mut self, stmt: u32, final_status: Option<u16>) {
        if final_status.is_some_and(|s| s & status::LAST_ROW_SENT != 0) {
            self.update(stmt, |flags| flags & !WAIT_FETCH);
        }
    }

    /// `COM_STMT_CLOSE` and `COM_STMT_RESET` drop a statement's cursor and long data.
    pub fn on_close_or_reset(&mut self, stmt: u32) {
        self.pending.remove(&stmt);
    }

    /// `COM_RESET_CONNECTION` and `COM_CHANGE_USER` drop all statements.
    pub fn on_session_reset(&mut self) {
        self.pending.clear();
    }

    fn update(&mut self, stmt: u32, f: impl FnOnce(u8) -> u8) {
        let flags = f(self.pending.get(&stmt).copied().unwrap_or(0));
        if flags == 0 {
            self.pending.remove(&stmt);
        } else {
            self.pending.insert(stmt, flags);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_blocks_safe_point() {
        let mut s = SessionState::default();
        assert!(s.is_safe_point());
        s.set_status(status::IN_TRANS | status::AUTOCOMMIT);
        assert!(!s.is_safe_point());
        s.set_status(status::AUTOCOMMIT);
        assert!(s.is_safe_point());
    }

    #[test]
    fn cursor_lifecycle() {
        let mut s = SessionState::default();
        s.on_execute(1, Some(status::CURSOR_EXISTS));
        assert!(!s.is_safe_point());
        s.on_fetch(1, Some(status::CURSOR_EXISTS));
        assert!(!s.is_safe_point());
        s.on_fetch(1, Some(status::LAST_ROW_SENT));
        assert!(s.is_safe_point());
        s.on_execute(2, Some(status::CURSOR_EXISTS));
        s.on_close_or_reset(2);
        assert!(s.is_safe_point());
    }

    #[test]
    fn long_data_until_execute() {
        let mut s = SessionState::default();
        s.on_send_long_data(7);
        assert!(!s.is_safe_point());
        s.on_execute(7, Some(status::AUTOCOMMIT));
        assert!(s.is_safe_point());
        s.on_send_long_data(7);
        s.on_send_long_data(8);
        s.on_session_reset();
        assert!(s.is_safe_point());
    }
}
