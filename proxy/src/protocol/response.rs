//! The response packets whose contents the proxy reads (OK, EOF, ERR) and the ERR packets it
//! writes itself.

use bytes::{BufMut, BytesMut};

use super::codec::{Malformed, Reader};
use super::header;

/// The server status of an OK packet (header 0x00, or 0xFE when it ends a result set).
pub fn ok_status(payload: &[u8]) -> Result<u16, Malformed> {
    let mut r = Reader::new(payload);
    r.u8("ok header")?;
    r.lenenc("ok affected rows")?;
    r.lenenc("ok last insert id")?;
    r.u16("ok status")
}

/// The server status of a classic EOF packet.
pub fn eof_status(payload: &[u8]) -> Result<u16, Malformed> {
    let mut r = Reader::new(payload);
    r.u8("eof header")?;
    r.u16("eof warnings")?;
    r.u16("eof status")
}

/// Whether a packet that starts with 0xFE terminates a result set rather than being a row whose
/// first column has an 8-byte length prefix (such a row fills a whole physical packet).
pub fn is_result_terminator(first: u8, len: usize) -> bool {
    first == header::EOF && len < super::MAX_PAYLOAD
}

/// A decoded ERR packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    pub state: String,
    pub message: String,
}

impl ErrPacket {
    pub fn new(code: u16, state: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            state: state.into(),
            message: message.into(),
        }
    }

    pub fn parse(payload: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(payload);
        if r.u8("err header")? != header::ERR {
            return Err(Malformed("not an ERR packet"));
        }
        let code = r.u16("err code")?;
        let mut state = String::from("HY000");
        if r.remaining() >= 6 && r.clone().u8("marker")? == b'#' {
            r.u8("marker")?;
            state = String::from_utf8_lossy(r.bytes(5, "sql state")?).into_owned();
        }
        Ok(Self {
            code,
            state,
            message: String::from_utf8_lossy(r.rest()).into_owned(),
        })
    }

    pub fn encode(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(9 + self.message.len());
        out.put_u8(header::ERR);
        out.put_u16_le(self.code);
        out.put_u8(b'#');
        let state = self.state.as_bytes();
        let mut fixed = [b'0'; 5];
        let n = state.len().min(5);
        fixed[..n].copy_from_slice(&state[..n]);
        out.put_slice(&fixed);
        out.put_slice(self.message.as_bytes());
        out
    }
}

impl std::fmt::Display for ErrPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ERROR {} ({}): {}", self.code, self.state, self.message)
    }
}

/// A minimal OK packet with the given status (used for proxy-generated replies).
pub fn ok_packet(status: u16) -> BytesMut {
    let mut out = BytesMut::with_capacity(7);
    out.put_u8(header::OK);
    out.put_u8(0);
    out.put_u8(0);
    out.put_u16_le(status);
    out.put_u16_le(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_round_trip() {
        let e = ErrPacket::new(1045, "28000", "Access denied");
        assert_eq!(ErrPacket::parse(&e.encode()).unwrap(), e);
        // Pre-4.1 style without a state marker.
        let mut old = vec![0xFF, 0x15, 0x04];
        old.extend_from_slice(b"denied");
        let p = ErrPacket::parse(&old).unwrap();
        assert_eq!(
            (p.code, p.state.as_str(), p.message.as_str()),
            (1045, "HY000", "denied")
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(ok_status(&ok_packet(0x0003)).unwrap(), 0x0003);
        assert_eq!(eof_status(&[0xFE, 0, 0, 0x41, 0]).unwrap(), 0x41);
        assert!(ok_status(&[0]).is_err());
        assert!(is_result_terminator(0xFE, 7));
        assert!(!is_result_terminator(0xFE, super::super::MAX_PAYLOAD));
        assert!(!is_result_terminator(0x00, 7));
    }
}
