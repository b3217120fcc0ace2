//! Bounds-checked reading and writing of the protocol's primitive types. Every read from
//! network data goes through [`Reader`], so malformed input becomes an error, never a panic.

use bytes::BufMut;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed packet: {0}")]
pub struct Malformed(pub &'static str);

/// A cursor over a packet payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.bytes(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-encoded integer.
    pub fn lenenc(&mut self, what: &'static str) -> Result<u64, Malformed> {
        let first = self.u8(what)?;
        Ok(match first {
            0xFC => u64::from(self.u16(what)?),
            0xFD => {
                let b = self.bytes(3, what)?;
                u64::from(u32::from_le_bytes([b[0], b[1], b[2], 0]))
            }
            0xFE => {
                let b = self.bytes(8, what)?;
                u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }
            0xFB | 0xFF => return Err(Malformed(what)),
            n => u64::from(n),
        })
    }

    /// A length-encoded string.
    pub fn lenenc_bytes(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let len = self.lenenc(what)?;
        let len = usize::try_from(len).map_err(|_| Malformed(what))?;
        self.bytes(len, what)
    }

    /// A NUL-terminated string; a missing terminator takes the rest of the buffer, as servers do.
    pub fn nul_bytes(&mut self) -> &'a [u8] {
        match self.buf.iter().position(|&b| b == 0) {
            Some(i) => {
                let s = &self.buf[..i];
                self.buf = &self.buf[i + 1..];
                s
            }
            None => self.rest(),
        }
    }
}

pub fn put_lenenc(out: &mut impl BufMut, n: u64) {
    match n {
        0..=250 => out.put_u8(n as u8),
        251..=0xFFFF => {
            out.put_u8(0xFC);
            out.put_u16_le(n as u16);
        }
        0x1_0000..=0xFF_FFFF => {
            out.put_u8(0xFD);
            out.put_uint_le(n, 3);
        }
        _ => {
            out.put_u8(0xFE);
            out.put_u64_le(n);
        }
    }
}

pub fn put_lenenc_bytes(out: &mut impl BufMut, b: &[u8]) {
    put_lenenc(out, b.len() as u64);
    out.put_slice(b);
}

pub fn put_nul_bytes(out: &mut impl BufMut, b: &[u8]) {
    out.put_slice(b);
    out.put_u8(0);
}

/// The payload length from a 4-byte packet header.
pub fn payload_len(header: &[u8]) -> usize {
    usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenenc_round_trip() {
        for n in [
            0u64,
            1,
            250,
            251,
            0xFFFF,
            0x1_0000,
            0xFF_FFFF,
            0x100_0000,
            u64::MAX,
        ] {
            let mut v = Vec::new();
            put_lenenc(&mut v, n);
            let mut r = Reader::new(&v);
            assert_eq!(r.lenenc("n").unwrap(), n);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn truncated_input_is_an_error() {
        assert!(Reader::new(&[0xFC, 1]).lenenc("n").is_err());
        assert!(Reader::new(&[0xFB]).lenenc("n").is_err());
        assert!(Reader::new(&[5, b'a']).lenenc_bytes("s").is_err());
        assert!(Reader::new(&[1, 2, 3]).u32("u").is_err());
    }

    #[test]
    fn nul_string_without_terminator_takes_the_rest() {
        let mut r = Reader::new(b"abc\0def");
        assert_eq!(r.nul_bytes(), b"abc");
        assert_eq!(r.nul_bytes(), b"def");
        assert!(r.is_empty());
    }
}
