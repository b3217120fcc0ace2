//! The proxy's own text-protocol queries on a backend (`SHOW SESSION_STATES`,
//! `SET SESSION_STATES`, `COMMIT`), with a minimal result-set reader.

use bytes::BytesMut;

use crate::protocol::codec::{Malformed, Reader};
use crate::protocol::conn::{ConnError, PacketConn};
use crate::protocol::response::{is_result_terminator, ok_status, ErrPacket};
use crate::protocol::{command, header};

/// Results of the proxy's own queries are small; a bigger one is refused.
const MAX_RESULT_PACKET: usize = 16 << 20;

#[derive(Debug, Default)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<Vec<u8>>>>,
    /// Status of the final OK/EOF.
    pub status: u16,
}

impl QueryResult {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&[u8]> {
        let i = self
            .columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(column))?;
        self.rows.first()?.get(i)?.as_deref()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("{0}")]
    Server(ErrPacket),
}

impl From<Malformed> for QueryError {
    fn from(m: Malformed) -> Self {
        QueryError::Conn(ConnError::Malformed(m))
    }
}

/// Runs `sql` as a new command and reads its whole (single) result.
pub async fn run_query(
    conn: &mut PacketConn,
    sql: &str,
    deprecate_eof: bool,
) -> Result<QueryResult, QueryError> {
    conn.reset_sequence();
    let mut request = BytesMut::with_capacity(1 + sql.len());
    request.extend_from_slice(&[command::QUERY]);
    request.extend_from_slice(sql.as_bytes());
    conn.write_packet(0, &request).await?;
    let (_, first) = conn.read_packet(MAX_RESULT_PACKET).await?;
    match first.first().copied() {
        Some(header::OK) => {
            return Ok(QueryResult {
                status: ok_status(&first)?,
                ..Default::default()
            })
        }
        Some(header::ERR) => return Err(QueryError::Server(ErrPacket::parse(&first)?)),
        None => return Err(Malformed("empty response").into()),
        _ => {}
    }
    let count = Reader::new(&first).lenenc("column count")?;
    let mut result = QueryResult::default();
    for _ in 0..count {
        let (_, def) = conn.read_packet(MAX_RESULT_PACKET).await?;
        let mut r = Reader::new(&def);
        for what in ["catalog", "schema", "table", "org_table"] {
            r.lenenc_bytes(what)?;
        }
        result
            .columns
            .push(String::from_utf8_lossy(r.lenenc_bytes("column name")?).into_owned());
    }
    if !deprecate_eof {
        conn.read_packet(MAX_RESULT_PACKET).await?;
    }
    loop {
        let (_, row) = conn.read_packet(MAX_RESULT_PACKET).await?;
        match row.first().copied() {
            Some(header::ERR) => return Err(QueryError::Server(ErrPacket::parse(&row)?)),
            Some(first) if is_result_terminator(first, row.len()) => {
                result.status = if deprecate_eof {
                    ok_status(&row)?
                } else {
                    crate::protocol::response::eof_status(&row)?
                };
                return Ok(result);
            }
            _ => {
                let mut r = Reader::new(&row);
                let mut values = Vec::with_capacity(result.columns.len());
                for _ in 0..result.columns.len() {
                    if r.clone().u8("value")? == 0xFB {
                        r.u8("null")?;
                        values.push(None);
                    } else {
                        values.push(Some(r.lenenc_bytes("value")?.to_vec()));
                    }
                }
                result.rows.push(values);
            }
        }
    }
}

/// Quotes `s` as a string literal (backslash escapes, as TiDB's default SQL mode reads them).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Whether a `COM_QUERY` text starts a transaction (`BEGIN`, `START TRANSACTION`), skipping
/// leading whitespace and comments.
pub fn starts_transaction(sql: &[u8]) -> bool {
    let mut s = sql;
    loop {
        s = s.trim_ascii_start();
        if let Some(rest) = s.strip_prefix(b"/*") {
            // An executable comment (/*! ... */) is SQL, not a comment.
            if rest.first() == Some(&b'!') {
                return false;
            }
            match rest.windows(2).position(|w| w == b"*/") {
                Some(end) => s = &rest[end + 2..],
                None => return false,
            }
        } else if s.starts_with(b"-- ") || s.starts_with(b"#") {
            match s.iter().position(|&b| b == b'\n') {
                Some(end) => s = &s[end + 1..],
                None => return false,
            }
        } else {
            break;
        }
    }
    let word_end = |s: &[u8], n: usize| {
        s.get(n)
            .is_none_or(|b| !b.is_ascii_alphanumeric() && *b != b'_')
    };
    let lower: Vec<u8> = s.iter().take(32).map(|b| b.to_ascii_lowercase()).collect();
    if lower.starts_with(b"begin") && word_end(&lower, 5) {
        return true;
    }
    if lower.starts_with(b"start") && word_end(&lower, 5) {
        let rest = lower[5..].trim_ascii_start();
        return rest.starts_with(b"transaction") && word_end(rest, 11);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(quote(r#"{"k":"v"}"#), r#"'{"k":"v"}'"#);
    }

    #[test]
    fn transaction_starts() {
        for yes in [
            "BEGIN",
            " begin;",
            "/* c */ Begin PESSIMISTIC",
            "start  transaction read only",
            "-- x\nBEGIN",
            "#x\nstart transaction",
        ] {
            assert!(starts_transaction(yes.as_bytes()), "{yes}");
        }
        for no in [
            "BEGINNING",
            "select 1",
            "start",
            "starting transaction",
            "/*! BEGIN */",
            "commit",
            "",
        ] {
            assert!(!starts_transaction(no.as_bytes()), "{no}");
        }
    }
}
