//! One leg of a session (client or backend) at the packet level.
//!
//! A `PacketConn` owns a read buffer of plain protocol bytes (decompressed when the leg is
//! compressed) and a write buffer. Buffers are allocated on first use, grow only as far as the
//! largest packet that must be held whole, and are dropped while the connection is idle, so an
//! idle session holds no buffer memory at all.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::buffer_pool;
use super::codec::payload_len;
use super::compress::{CompressError, Compression};
use super::MAX_PAYLOAD;
use crate::net::stream::Stream;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed by peer")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Compress(#[from] CompressError),
    #[error("packet of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Malformed(#[from] super::codec::Malformed),
}

impl ConnError {
    /// True when the peer simply went away (not worth a warning).
    pub fn is_disconnect(&self) -> bool {
        match self {
            ConnError::Closed => true,
            ConnError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// Reads smaller than this much spare room trigger a reserve, to avoid tiny reads.
const MIN_READ_ROOM: usize = 2048;

pub struct PacketConn {
    stream: Stream,
    /// Plain protocol bytes read but not yet consumed.
    rbuf: BytesMut,
    /// Compressed bytes read but not yet decoded (compressed legs only).
    raw: BytesMut,
    /// Plain bytes waiting to be written.
    wbuf: BytesMut,
    compression: Option<Compression>,
    buffer_size: usize,
    /// Set when either leg of the session is compressed: packet sequence numbers must then be
    /// renumbered for this leg (see [`PacketConn::set_resequence`]).
    resequence: bool,
    /// The next packet sequence number on this leg (maintained in resequence mode).
    seq: u8,
    /// Payload bytes of the packet being written that are still to come.
    out_remaining: usize,
}

impl PacketConn {
    pub fn new(stream: Stream, buffer_size: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
            raw: BytesMut::new(),
            wbuf: BytesMut::new(),
            compression: None,
            buffer_size,
            resequence: false,
            seq: 0,
            out_remaining: 0,
        }
    }

    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// Takes the stream out, e.g. to upgrade it to TLS, with any bytes already read from it
    /// and not consumed.
    pub fn into_parts(self) -> (Stream, bytes::Bytes) {
        (self.stream, self.rbuf.freeze())
    }

    pub fn set_compression(&mut self, compression: Option<Compression>) {
        self.compression = compression;
    }

    pub fn is_compressed(&self) -> bool {
        self.compression.is_some()
    }

    /// Sequence numbers of the two legs only agree while neither is compressed: a compressed
    /// peer resynchronises its packet numbers with the frame numbers at every frame. When either
    /// leg is compressed, every packet written to this leg is renumbered as this leg's peer
    /// expects, continuing from the last packet read from it.
    pub fn set_resequence(&mut self, on: bool) {
        self.resequence = on;
    }

    /// Called before the proxy sends a new command on this leg: sequence numbers restart.
    pub fn reset_sequence(&mut self) {
        self.seq = 0;
        self.out_remaining = 0;
        if let Some(c) = &mut self.compression {
            c.reset_sequence();
        }
    }

    /// Records the sequence number of a packet read from this leg.
    pub fn observe_read_seq(&mut self, seq: u8) {
        self.seq = seq.wrapping_add(1);
    }

    pub fn resequencing(&self) -> bool {
        self.resequence
    }

    /// Plain bytes buffered and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.rbuf
    }

    pub fn consume(&mut self, n: usize) {
        self.rbuf.advance(n);
    }

    /// Reads at least one more plain byte into the read buffer.
    pub async fn fill(&mut self) -> Result<(), ConnError> {
        let before = self.rbuf.len();
        loop {
            match &mut self.compression {
                None => {
                    reserve_room(&mut self.rbuf, self.buffer_size);
                    if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                        return Err(ConnError::Closed);
                    }
                }
                Some(c) => {
                    reserve_room(&mut self.raw, self.buffer_size);
                    if self.stream.read_buf(&mut self.raw).await? == 0 {
                        return Err(ConnError::Closed);
                    }
                    c.decode(&mut self.raw, &mut self.rbuf)?;
                }
            }
            if self.rbuf.len() > before {
                return Ok(());
            }
        }
    }

    /// Fills until at least `n` plain bytes are buffered.
    pub async fn fill_to(&mut self, n: usize) -> Result<(), ConnError> {
        if self.rbuf.len() < n {
            self.rbuf.reserve(n - self.rbuf.len());
        }
        while self.rbuf.len() < n {
            self.fill().await?;
        }
        Ok(())
    }

    /// Waits until the peer sends something (or closes), without holding a buffer while
    /// waiting on a plain socket.
    pub async fn wait_readable(&mut self) -> Result<(), ConnError> {
        if !self.rbuf.is_empty() {
            return Ok(());
        }
        if let Stream::Tcp(tcp) = &self.stream {
            tcp.readable().await?;
        }
        self.fill().await
    }

    /// Reads one logical packet (joining continuation packets) of at most `limit` bytes.
    /// Returns the sequence number of its last physical packet and the payload.
    pub async fn read_packet(&mut self, limit: usize) -> Result<(u8, BytesMut), ConnError> {
        let mut payload = BytesMut::new();
        loop {
            self.fill_to(4).await?;
            let len = payload_len(&self.rbuf);
            let seq = self.rbuf[3];
            if payload.len() + len > limit {
                return Err(ConnError::TooLarge {
                    size: payload.len() + len,
                    limit,
                });
            }
            self.fill_to(4 + len).await?;
            self.seq = seq.wrapping_add(1);
            self.rbuf.advance(4);
            if payload.is_empty() && len < MAX_PAYLOAD {
                return Ok((seq, self.rbuf.split_to(len)));
            }
            payload.extend_from_slice(&self.rbuf[..len]);
            self.rbuf.advance(len);
            if len < MAX_PAYLOAD {
                return Ok((seq, payload));
            }
        }
    }

    /// Queues one logical packet, split into physical packets as needed. Returns the sequence
    /// number the next packet should use.
    pub fn queue_packet(&mut self, mut seq: u8, payload: &[u8]) -> u8 {
        let mut rest = payload;
        loop {
            let n = rest.len().min(MAX_PAYLOAD);
            self.wbuf.reserve(4 + n);
            self.wbuf.put_uint_le(n as u64, 3);
            self.wbuf.put_u8(seq);
            self.wbuf.put_slice(&rest[..n]);
            seq = seq.wrapping_add(1);
            rest = &rest[n..];
            if n < MAX_PAYLOAD {
                return seq;
            }
        }
    }

    /// Queues one packet and flushes it.
    pub async fn write_packet(&mut self, seq: u8, payload: &[u8]) -> Result<u8, ConnError> {
        let next = self.queue_packet(seq, payload);
        self.flush().await?;
        Ok(next)
    }

    /// Sends already-framed plain bytes (forwarded packets). Uncompressed legs with nothing
    /// queued write straight from the caller's buffer, avoiding a copy.
    pub async fn send_framed(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        if self.compression.is_none() && self.wbuf.is_empty() && !self.resequence {
            self.stream.write_all(bytes).await?;
            return Ok(());
        }
        self.wbuf.extend_from_slice(bytes);
        if self.wbuf.len() >= self.buffer_size {
            self.write_queued().await?;
        }
        Ok(())
    }

    async fn write_queued(&mut self) -> Result<(), ConnError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        if self.resequence {
            self.renumber_queued();
        }
        match &mut self.compression {
            None => self.stream.write_all(&self.wbuf).await?,
            Some(c) => {
                let mut framed = BytesMut::with_capacity(self.wbuf.len() / 2 + 16);
                c.encode(&self.wbuf, &mut framed)?;
                self.stream.write_all(&framed).await?;
                // As MySQL does: after a frame, packet numbers continue from frame numbers.
                self.seq = c.sequence();
            }
        }
        self.wbuf.clear();
        Ok(())
    }

    /// Rewrites the sequence number of every packet header in the write buffer. Writers only
    /// ever queue whole headers, so a header never straddles two flushes.
    fn renumber_queued(&mut self) {
        let mut pos = self.out_remaining.min(self.wbuf.len());
        self.out_remaining -= pos;
        while pos + 4 <= self.wbuf.len() {
            let len = payload_len(&self.wbuf[pos..]);
            self.wbuf[pos + 3] = self.seq;
            self.seq = self.seq.wrapping_add(1);
            pos += 4;
            let here = len.min(self.wbuf.len() - pos);
            pos += here;
            self.out_remaining = len - here;
        }
    }

    /// Writes everything queued and flushes TLS records.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        self.write_queued().await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Gives back buffers that hold nothing, so idle sessions cost no buffer memory.
    pub fn release_idle_buffers(&mut self) {
        for buf in [&mut self.rbuf, &mut self.raw, &mut self.wbuf] {
            if buf.is_empty() && buf.capacity() > 0 {
                buffer_pool::give(std::mem::take(buf), self.buffer_size);
            }
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

fn reserve_room(buf: &mut BytesMut, buffer_size: usize) {
    if buf.capacity() == 0 {
        *buf = buffer_pool::take(buffer_size.max(MIN_READ_ROOM));
    } else if buf.capacity() - buf.len() < MIN_READ_ROOM {
        buf.reserve(buffer_size.max(MIN_READ_ROOM));
    }
}
