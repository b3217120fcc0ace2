//! The compressed protocol (zlib or zstd). Each leg of a session negotiates compression on its
//! own, so the proxy decompresses what it reads into plain protocol bytes and compresses what it
//! writes; plain packets may span compressed frames in either direction.

use std::io::Read;

use bytes::{Buf, BufMut, BytesMut};

use super::MAX_PAYLOAD;

/// Frames smaller than this are sent uncompressed, as MySQL does.
const MIN_COMPRESS_LEN: usize = 50;
const FRAME_HEADER: usize = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Zlib,
    Zstd { level: i32 },
}

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("corrupt compressed frame: {0}")]
    Corrupt(String),
    #[error("compressed frame inflates to {actual} bytes, header says {declared}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("compression failed: {0}")]
    Encode(std::io::Error),
}

/// Compression state of one connection leg.
#[derive(Debug)]
pub struct Compression {
    algorithm: Algorithm,
    seq: u8,
}

impl Compression {
    pub fn new(algorithm: Algorithm) -> Self {
        Self { algorithm, seq: 0 }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The sequence number the next frame will carry.
    pub fn sequence(&self) -> u8 {
        self.seq
    }

    /// Compressed sequence numbers restart with every command.
    pub fn reset_sequence(&mut self) {
        self.seq = 0;
    }

    /// Moves every complete frame of `raw` into `plain`, decompressed.
    pub fn decode(
        &mut self,
        raw: &mut BytesMut,
        plain: &mut BytesMut,
    ) -> Result<(), CompressError> {
        while raw.len() >= FRAME_HEADER {
            let frame_len =
                usize::from(raw[0]) | usize::from(raw[1]) << 8 | usize::from(raw[2]) << 16;
            if raw.len() < FRAME_HEADER + frame_len {
                // Reserve once for the whole frame so the next reads do not reallocate piecemeal.
                raw.reserve(FRAME_HEADER + frame_len - raw.len());
                break;
            }
            self.seq = raw[3].wrapping_add(1);
            let declared =
                usize::from(raw[4]) | usize::from(raw[5]) << 8 | usize::from(raw[6]) << 16;
            let body = &raw[FRAME_HEADER..FRAME_HEADER + frame_len];
            if declared == 0 {
                plain.extend_from_slice(body);
            } else {
                self.inflate(body, declared, plain)?;
            }
            raw.advance(FRAME_HEADER + frame_len);
        }
        Ok(())
    }

    fn inflate(
        &self,
        body: &[u8],
        declared: usize,
        plain: &mut BytesMut,
    ) -> Result<(), CompressError> {
        let start = plain.len();
        plain.reserve(declared);
        // Never inflate past the declared size: a hostile frame cannot exhaust memory.
        let limit = declared as u64 + 1;
        match self.algorithm {
            Algorithm::Zlib => {
                let mut w = plain.writer();
                let mut decoder = flate2::read::ZlibDecoder::new(body).take(limit);
                std::io::copy(&mut decoder, &mut w)
                    .map_err(|e| CompressError::Corrupt(e.to_string()))?;
            }
            Algorithm::Zstd { .. } => {
                let mut w = plain.writer();
                let mut decoder = zstd::stream::read::Decoder::with_buffer(body)
                    .map_err(|e| CompressError::Corrupt(e.to_string()))?
                    .take(limit);
                std::io::copy(&mut decoder, &mut w)
                    .map_err(|e| CompressError::Corrupt(e.to_string()))?;
            }
        }
        let actual = plain.len() - start;
        if actual != declared {
            plain.truncate(start);
            return Err(CompressError::LengthMismatch { declared, actual });
        }
        Ok(())
    }

    /// Appends `plain` to `out` as one or more compressed frames.
    pub fn encode(&mut self, plain: &[u8], out: &mut BytesMut) -> Result<(), CompressError> {
        for chunk in plain.chunks(MAX_PAYLOAD) {
            let header_at = out.len();
            out.put_bytes(0, FRAME_HEADER);
            let (body_len, uncompressed_len) = if chunk.len() < MIN_COMPRESS_LEN {
                out.put_slice(chunk);
                (chunk.len(), 0)
            } else {
                let before = out.len();
                self.deflate(chunk, out)?;
                let compressed = out.len() - before;
                if compressed >= chunk.len() {
                    // Incompressible data goes as is.
                    out.truncate(before);
                    out.put_slice(chunk);
                    (chunk.len(), 0)
                } else {
                    (compressed, chunk.len())
                }
            };
            let h = &mut out[header_at..header_at + FRAME_HEADER];
            h[..3].copy_from_slice(&(body_len as u32).to_le_bytes()[..3]);
            h[3] = self.seq;
            h[4..7].copy_from_slice(&(uncompressed_len as u32).to_le_bytes()[..3]);
            self.seq = self.seq.wrapping_add(1);
        }
        Ok(())
    }

    fn deflate(&self, chunk: &[u8], out: &mut BytesMut) -> Result<(), CompressError> {
        let w = out.writer();
        match self.algorithm {
            Algorithm::Zlib => {
                let mut enc = flate2::write::ZlibEncoder::new(w, flate2::Compression::default());
                std::io::Write::write_all(&mut enc, chunk).map_err(CompressError::Encode)?;
                enc.finish().map_err(CompressError::Encode)?;
            }
            Algorithm::Zstd { level } => {
                let mut enc =
                    zstd::stream::write::Encoder::new(w, level).map_err(CompressError::Encode)?;
                std::io::Write::write_all(&mut enc, chunk).map_err(CompressError::Encode)?;
                enc.finish().map_err(CompressError::Encode)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(algorithm: Algorithm, data: &[u8]) {
        let mut tx = Compression::new(algorithm);
        let mut rx = Compression::new(algorithm);
        let mut wire = BytesMut::new();
        tx.encode(data, &mut wire).unwrap();
        // Feed the wire bytes in small pieces to exercise partial frames.
        let mut raw = BytesMut::new();
        let mut plain = BytesMut::new();
        for piece in wire.chunks(1000) {
            raw.extend_from_slice(piece);
            rx.decode(&mut raw, &mut plain).unwrap();
        }
        assert!(raw.is_empty());
        assert_eq!(&plain[..], data);
    }

    #[test]
    fn zlib_and_zstd_round_trip() {
        let big: Vec<u8> = (0..3 * MAX_PAYLOAD / 2).map(|i| (i % 251) as u8).collect();
        for algo in [Algorithm::Zlib, Algorithm::Zstd { level: 3 }] {
            round_trip(algo, b"short");
            round_trip(algo, &[7u8; 4096]);
            round_trip(algo, &big);
        }
    }

    #[test]
    fn sequence_numbers_advance_and_reset() {
        let mut c = Compression::new(Algorithm::Zlib);
        let mut out = BytesMut::new();
        c.encode(b"a", &mut out).unwrap();
        c.encode(b"b", &mut out).unwrap();
        assert_eq!(out[3], 0);
        assert_eq!(out[FRAME_HEADER + 1 + 3], 1);
        c.reset_sequence();
        let mut out = BytesMut::new();
        c.encode(b"c", &mut out).unwrap();
        assert_eq!(out[3], 0);
    }

    #[test]
    fn lying_length_is_rejected() {
        let mut tx = Compression::new(Algorithm::Zlib);
        let mut wire = BytesMut::new();
        tx.encode(&[1u8; 1000], &mut wire).unwrap();
        wire[4] = 10; // declare 10 bytes instead of 1000
        wire[5] = 0;
        wire[6] = 0;
        let mut plain = BytesMut::new();
        let err = Compression::new(Algorithm::Zlib).decode(&mut wire, &mut plain);
        assert!(matches!(err, Err(CompressError::LengthMismatch { .. })));
        let mut garbage = BytesMut::from(&[5u8, 0, 0, 0, 100, 0, 0, 1, 2, 3, 4, 5][..]);
        assert!(Compression::new(Algorithm::Zstd { level: 1 })
            .decode(&mut garbage, &mut plain)
            .is_err());
    }
}
