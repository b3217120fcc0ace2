//! A small per-thread pool of I/O buffers.
//!
//! Sessions give their buffers back whenever they go idle between commands, so a busy session
//! would otherwise allocate and free two buffers per query; the allocator then returns the
//! pages to the kernel and takes page faults to get them back. Recycling through a bounded pool
//! keeps idle sessions buffer-free without that cost.

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers kept per thread; beyond this, returned buffers are freed.
const MAX_POOLED: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least `size` bytes.
pub fn take(size: usize) -> BytesMut {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        match pool.iter().rposition(|b| b.capacity() >= size) {
            Some(i) => pool.swap_remove(i),
            None => BytesMut::with_capacity(size),
        }
    })
}

/// Returns a buffer for reuse. Buffers much larger than `size` (grown for one big packet) are
/// freed instead, so the pool never pins large allocations.
pub fn give(mut buf: BytesMut, size: usize) {
    buf.clear();
    if buf.capacity() > 4 * size || !buf.try_reclaim(size) {
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < MAX_POOLED {
            pool.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_returned_buffers() {
        let mut b = take(4096);
        b.extend_from_slice(b"hello");
        let ptr = b.as_ptr();
        give(b, 4096);
        let again = take(4096);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
    }

    #[test]
    fn oversized_buffers_are_not_pooled() {
        let big = BytesMut::with_capacity(1 << 20);
        let ptr = big.as_ptr();
        give(big, 4096);
        assert_ne!(take(4096).as_ptr(), ptr);
    }
}
