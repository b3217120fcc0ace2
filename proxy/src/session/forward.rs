//! Streaming packets from one leg to the other while finding where a response ends.
//!
//! The forwarder scans packet headers in the source's read buffer and sends every scanned byte
//! to the destination in one write per read, so a result set of small rows costs one read and
//! one write per buffer-full, and a packet larger than the buffer is streamed through in pieces
//! without ever being held whole. Only the few packets whose contents decide framing (OK, EOF,
//! ERR, the first packet of a response) are looked at, and those are small.

use crate::protocol::codec::{payload_len, Malformed};
use crate::protocol::conn::{ConnError, PacketConn};
use crate::protocol::response::{eof_status, is_result_terminator, ok_status, ErrPacket};
use crate::protocol::{header, status, MAX_PAYLOAD};

/// Largest packet the framing logic will hold whole to inspect it. OK/EOF/ERR packets and
/// prepare responses are far smaller; anything bigger is a protocol violation.
const MAX_INSPECTED_PACKET: usize = 1 << 20;

/// What a framing state machine says after seeing a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Continue,
    Done,
    /// The backend asked for a LOCAL INFILE: the client's file must be relayed before the
    /// response continues.
    LocalInfile,
}

/// A response's framing rules.
pub trait Framing {
    /// Whether the packet whose first byte and length are given must be held whole and passed
    /// to [`Framing::on_packet`]. `first` is `None` for an empty packet.
    fn needs_payload(&self, first: Option<u8>, len: usize) -> bool;
    /// Sees one logical packet; `payload` is empty unless `needs_payload` said so.
    fn on_packet(
        &mut self,
        first: Option<u8>,
        len: usize,
        payload: &[u8],
    ) -> Result<Step, Malformed>;
}

/// Forwards packets from `src` to `dst` until `framing` says the response is done or needs a
/// LOCAL INFILE relay. Flushes `dst` before returning.
pub async fn forward<F: Framing>(
    src: &mut PacketConn,
    dst: &mut PacketConn,
    framing: &mut F,
) -> Result<Step, ConnError> {
    // Bytes at the front of src's buffer that are scanned and ready to send.
    let mut scanned = 0usize;
    let mut continuation = false;
    let mut pending = Step::Continue;
    loop {
        if src.buffered().len() < scanned + 5 {
            // Not even a header and a first byte: send what is scanned and read on. (An
            // empty packet, the only one shorter than 5 bytes, is then handled below.)
            let header_only =
                src.buffered().len() >= scanned + 4 && payload_len(&src.buffered()[scanned..]) == 0;
            if !header_only {
                send_scanned(src, dst, &mut scanned).await?;
                src.fill().await?;
                continue;
            }
        }
        let len = payload_len(&src.buffered()[scanned..]);
        if src.resequencing() {
            src.observe_read_seq(src.buffered()[scanned + 3]);
        }
        let total = 4 + len;
        let available = src.buffered().len() - scanned;
        let first = (len > 0 && !continuation).then(|| src.buffered()[scanned + 4]);
        let needs_payload = !continuation && framing.needs_payload(first, len);
        if needs_payload && len > MAX_INSPECTED_PACKET {
            return Err(Malformed("response packet too large to be a status packet").into());
        }
        // A packet that fits in the buffer is only handled once it is whole, so every write
        // carries whole packets and a packet split across reads costs no extra write.
        if available < total && (needs_payload || total <= src.buffer_size()) {
            send_scanned(src, dst, &mut scanned).await?;
            src.fill_to(total).await?;
            continue;
        }
        if !continuation {
            let payload: &[u8] = if needs_payload {
                &src.buffered()[scanned + 4..scanned + total]
            } else {
                &[]
            };
            pending = framing.on_packet(first, len, payload)?;
        }
        if available >= total {
            scanned += total;
        } else {
            // A packet bigger than the buffer streams through in buffer-sized pieces.
            scanned = src.buffered().len();
            send_scanned(src, dst, &mut scanned).await?;
            let mut remaining = total - available;
            while remaining > 0 {
                src.fill().await?;
                let n = remaining.min(src.buffered().len());
                dst.send_framed(&src.buffered()[..n]).await?;
                src.consume(n);
                remaining -= n;
            }
        }
        continuation = len == MAX_PAYLOAD;
        if !continuation && pending != Step::Continue {
            send_scanned(src, dst, &mut scanned).await?;
            dst.flush().await?;
            return Ok(pending);
        }
    }
}

async fn send_scanned(
    src: &mut PacketConn,
    dst: &mut PacketConn,
    scanned: &mut usize,
) -> Result<(), ConnError> {
    if *scanned > 0 {
        dst.send_framed(&src.buffered()[..*scanned]).await?;
        src.consume(*scanned);
        *scanned = 0;
    }
    Ok(())
}

/// Framing of responses to `COM_QUERY`, `COM_STMT_EXECUTE`, `COM_STMT_FETCH`,
/// `COM_FIELD_LIST` and `COM_PROCESS_INFO`: any number of OK packets and result sets chained
/// by `MORE_RESULTS_EXISTS`, an ERR ending everything, and LOCAL INFILE requests.
#[derive(Debug)]
pub struct ResultFraming {
    deprecate_eof: bool,
    phase: Phase,
    /// Status of the last OK/EOF seen.
    pub last_status: Option<u16>,
    /// The ERR that ended the response, if any.
    pub error: Option<ErrPacket>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Start of a response: OK, ERR, LOCAL INFILE or a column count.
    First,
    /// Column definitions, ended by an EOF (only without DEPRECATE_EOF).
    Columns,
    /// Rows (and, with DEPRECATE_EOF, column definitions), ended by an EOF/OK or an ERR.
    Rows,
}

impl ResultFraming {
    /// For commands whose response starts like a query's.
    pub fn query(deprecate_eof: bool) -> Self {
        Self {
            deprecate_eof,
            phase: Phase::First,
            last_status: None,
            error: None,
        }
    }

    /// For `COM_STMT_FETCH` and `COM_FIELD_LIST`: rows (or column definitions) only.
    pub fn rows(deprecate_eof: bool) -> Self {
        Self {
            phase: Phase::Rows,
            ..Self::query(deprecate_eof)
        }
    }

    fn after_status(&mut self, status_flags: u16) -> Step {
        self.last_status = Some(status_flags);
        if status_flags & status::MORE_RESULTS_EXISTS != 0 {
            self.phase = Phase::First;
            Step::Continue
        } else {
            Step::Done
        }
    }
}

impl Framing for ResultFraming {
    fn needs_payload(&self, first: Option<u8>, len: usize) -> bool {
        let Some(first) = first else { return false };
        match self.phase {
            Phase::First => matches!(first, header::OK | header::ERR | header::LOCAL_INFILE),
            Phase::Columns => first == header::EOF && len < 9,
            Phase::Rows => first == header::ERR || is_result_terminator(first, len),
        }
    }

    fn on_packet(
        &mut self,
        first: Option<u8>,
        len: usize,
        payload: &[u8],
    ) -> Result<Step, Malformed> {
        let Some(first) = first else {
            return Err(Malformed("empty packet in a response"));
        };
        Ok(match self.phase {
            Phase::First => match first {
                header::OK => self.after_status(ok_status(payload)?),
                header::ERR => {
                    self.error = Some(ErrPacket::parse(payload)?);
                    Step::Done
                }
                header::LOCAL_INFILE => Step::LocalInfile,
                _ => {
                    self.phase = if self.deprecate_eof {
                        Phase::Rows
                    } else {
                        Phase::Columns
                    };
                    Step::Continue
                }
            },
            Phase::Columns => {
                if first == header::EOF && len < 9 {
                    let s = eof_status(payload)?;
                    if s & status::CURSOR_EXISTS != 0 {
                        // A cursor was opened: rows come later through COM_STMT_FETCH.
                        self.last_status = Some(s);
                        return Ok(Step::Done);
                    }
                    self.phase = Phase::Rows;
                }
                Step::Continue
            }
            Phase::Rows => {
                if first == header::ERR {
                    self.error = Some(ErrPacket::parse(payload)?);
                    Step::Done
                } else if is_result_terminator(first, len) {
                    self.after_status(terminator_status(self.deprecate_eof, payload)?)
                } else {
                    Step::Continue
                }
            }
        })
    }
}

/// The status of a result-set terminator. Servers differ in whether a given terminator is a
/// classic EOF or a 0xFE-headed OK (e.g. after `COM_FIELD_LIST`), so the expected form is tried
/// first and the other one second.
fn terminator_status(deprecate_eof: bool, payload: &[u8]) -> Result<u16, Malformed> {
    if deprecate_eof {
        ok_status(payload).or_else(|_| eof_status(payload))
    } else {
        eof_status(payload).or_else(|_| ok_status(payload))
    }
}

/// Framing of the `COM_STMT_PREPARE` response: an OK that announces how many parameter and
/// column definitions follow (each group ended by an EOF without DEPRECATE_EOF), or an ERR.
#[derive(Debug)]
pub struct PrepareFraming {
    deprecate_eof: bool,
    remaining: Option<usize>,
    pub error: Option<ErrPacket>,
}

impl PrepareFraming {
    pub fn new(deprecate_eof: bool) -> Self {
        Self {
            deprecate_eof,
            remaining: None,
            error: None,
        }
    }
}

impl Framing for PrepareFraming {
    fn needs_payload(&self, _first: Option<u8>, _len: usize) -> bool {
        self.remaining.is_none()
    }

    fn on_packet(
        &mut self,
        first: Option<u8>,
        _len: usize,
        payload: &[u8],
    ) -> Result<Step, Malformed> {
        match self.remaining {
            None => match first {
                Some(header::OK) => {
                    let mut r = crate::protocol::codec::Reader::new(payload);
                    r.u8("prepare ok")?;
                    r.u32("statement id")?;
                    let columns = usize::from(r.u16("column count")?);
                    let params = usize::from(r.u16("param count")?);
                    let mut n = columns + params;
                    if !self.deprecate_eof {
                        n += usize::from(columns > 0) + usize::from(params > 0);
                    }
                    self.remaining = Some(n);
                    Ok(if n == 0 { Step::Done } else { Step::Continue })
                }
                Some(header::ERR) => {
                    self.error = Some(ErrPacket::parse(payload)?);
                    Ok(Step::Done)
                }
                _ => Err(Malformed("unexpected COM_STMT_PREPARE response")),
            },
            Some(n) => {
                let n = n.saturating_sub(1);
                self.remaining = Some(n);
                Ok(if n == 0 { Step::Done } else { Step::Continue })
            }
        }
    }
}

/// Exactly one packet; OK/EOF statuses and ERRs are recorded.
#[derive(Debug, Default)]
pub struct SinglePacket {
    pub last_status: Option<u16>,
    pub error: Option<ErrPacket>,
}

impl Framing for SinglePacket {
    fn needs_payload(&self, first: Option<u8>, len: usize) -> bool {
        matches!(first, Some(header::OK | header::ERR)) || first == Some(header::EOF) && len < 9
    }

    fn on_packet(
        &mut self,
        first: Option<u8>,
        len: usize,
        payload: &[u8],
    ) -> Result<Step, Malformed> {
        match first {
            Some(header::OK) => self.last_status = Some(ok_status(payload)?),
            Some(header::ERR) => self.error = Some(ErrPacket::parse(payload)?),
            Some(header::EOF) if len < 9 => {
                // Old-style EOF replies (e.g. COM_SET_OPTION) and DEPRECATE_EOF OKs.
                self.last_status = ok_status(payload).or_else(|_| eof_status(payload)).ok();
            }
            _ => {}
        }
        Ok(Step::Done)
    }
}

/// The client's side of LOAD DATA LOCAL INFILE: file packets until an empty one.
#[derive(Debug, Default)]
pub struct UntilEmptyPacket;

impl Framing for UntilEmptyPacket {
    fn needs_payload(&self, _first: Option<u8>, _len: usize) -> bool {
        false
    }

    fn on_packet(
        &mut self,
        _first: Option<u8>,
        len: usize,
        _payload: &[u8],
    ) -> Result<Step, Malformed> {
        Ok(if len == 0 { Step::Done } else { Step::Continue })
    }
}

/// One request packet (streamed, however large).
#[derive(Debug, Default)]
pub struct OnePacket;

impl Framing for OnePacket {
    fn needs_payload(&self, _first: Option<u8>, _len: usize) -> bool {
        false
    }

    fn on_packet(
        &mut self,
        _first: Option<u8>,
        _len: usize,
        _payload: &[u8],
    ) -> Result<Step, Malformed> {
        Ok(Step::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a framing over a sequence of (payload) packets; returns the step after each.
    fn run<F: Framing>(f: &mut F, packets: &[&[u8]]) -> Vec<Step> {
        packets
            .iter()
            .map(|p| {
                let first = p.first().copied();
                let payload: &[u8] = if f.needs_payload(first, p.len()) {
                    p
                } else {
                    &[]
                };
                f.on_packet(first, p.len(), payload).unwrap()
            })
            .collect()
    }

    const COLDEF: &[u8] = b"\x03def\x00\x00\x00\x01a\x00\x0c";
    const EOF_AUTOCOMMIT: &[u8] = &[0xFE, 0, 0, 0x02, 0];
    const OK_MORE: &[u8] = &[0, 0, 0, 0x0A, 0, 0, 0];
    const OK_DONE: &[u8] = &[0, 0, 0, 0x02, 0, 0, 0];

    #[test]
    fn classic_result_set() {
        let mut f = ResultFraming::query(false);
        let steps = run(
            &mut f,
            &[
                &[1],
                COLDEF,
                EOF_AUTOCOMMIT,
                b"\x011",
                b"\x012",
                EOF_AUTOCOMMIT,
            ],
        );
        assert_eq!(steps.last(), Some(&Step::Done));
        assert!(steps[..5].iter().all(|s| *s == Step::Continue));
        assert_eq!(f.last_status, Some(0x02));
    }

    #[test]
    fn deprecate_eof_multi_results() {
        let mut f = ResultFraming::query(true);
        let ok_fe_more = [0xFE, 0, 0, 0x0A, 0, 0, 0];
        let ok_fe_done = [0xFE, 0, 0, 0x03, 0, 0, 0];
        let steps = run(
            &mut f,
            &[
                OK_MORE,
                &[1],
                COLDEF,
                b"\x011",
                &ok_fe_more,
                &[1],
                COLDEF,
                &ok_fe_done,
            ],
        );
        assert_eq!(steps.iter().filter(|s| **s == Step::Done).count(), 1);
        assert_eq!(steps.last(), Some(&Step::Done));
        assert_eq!(f.last_status, Some(0x03));
    }

    #[test]
    fn error_ends_multi_statement() {
        let mut f = ResultFraming::query(true);
        let err = ErrPacket::new(1064, "42000", "syntax").encode();
        let steps = run(&mut f, &[OK_MORE, &err]);
        assert_eq!(steps, [Step::Continue, Step::Done]);
        assert_eq!(f.error.as_ref().map(|e| e.code), Some(1064));
    }

    #[test]
    fn cursor_without_deprecate_eof_stops_after_columns() {
        let mut f = ResultFraming::query(false);
        let eof_cursor = [0xFE, 0, 0, 0x42, 0];
        let steps = run(&mut f, &[&[1], COLDEF, &eof_cursor]);
        assert_eq!(steps.last(), Some(&Step::Done));
        assert_eq!(f.last_status, Some(0x42));
    }

    #[test]
    fn local_infile_then_ok() {
        let mut f = ResultFraming::query(true);
        assert_eq!(run(&mut f, &[b"\xFB/tmp/x"]), [Step::LocalInfile]);
        assert_eq!(run(&mut f, &[OK_DONE]), [Step::Done]);
    }

    #[test]
    fn binary_rows_starting_with_zero_are_rows() {
        let mut f = ResultFraming::rows(true);
        let steps = run(&mut f, &[&[0, 0, 1, 2], &[0xFE, 0, 0, 0x82, 0, 0, 0]]);
        assert_eq!(steps, [Step::Continue, Step::Done]);
        assert_eq!(f.last_status, Some(0x82));
    }

    #[test]
    fn prepare_counts_definitions() {
        let mut ok = vec![0u8, 1, 0, 0, 0];
        ok.extend_from_slice(&2u16.to_le_bytes()); // columns
        ok.extend_from_slice(&1u16.to_le_bytes()); // params
        ok.extend_from_slice(&[0, 0, 0]);
        let mut f = PrepareFraming::new(false);
        let steps = run(
            &mut f,
            &[&ok, COLDEF, EOF_AUTOCOMMIT, COLDEF, COLDEF, EOF_AUTOCOMMIT],
        );
        assert_eq!(steps.last(), Some(&Step::Done));
        assert_eq!(steps.iter().filter(|s| **s == Step::Done).count(), 1);
        let mut f = PrepareFraming::new(true);
        let steps = run(&mut f, &[&ok, COLDEF, COLDEF, COLDEF]);
        assert_eq!(steps.last(), Some(&Step::Done));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut f = ResultFraming::query(true);
        assert!(f.on_packet(Some(0), 1, &[0]).is_err());
        let mut f = PrepareFraming::new(true);
        assert!(f.on_packet(Some(0), 2, &[0, 1]).is_err());
        assert!(f.on_packet(Some(7), 1, &[7]).is_err());
    }
}
