//! PROXY protocol v2: reading the optional header a load balancer puts in front of a client's
//! MySQL traffic, and writing one in front of ours to TiDB so it sees the real client address.
//!
//! Only v2 is supported, as in the reference TiProxy. Parsing and building are delegated to the
//! `ppp` crate; this module adds incremental framing (a header may arrive split across reads),
//! a size limit and the conversion to plain socket addresses.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use ppp::v2::{self, Addresses, Command, ParseError, Protocol, Version};

/// The 12-byte magic every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The largest header accepted, TLVs included. The format allows 64 KiB, but real load
/// balancers send well under 1 KiB; the cap keeps a hostile peer from making us buffer a lot
/// before the MySQL handshake has even started.
pub const MAX_HEADER_LEN: usize = 4096;

/// Signature, version/command, family/protocol and the 2-byte payload length.
const FIXED_LEN: usize = 16;
/// Type byte plus 2-byte length in front of every TLV value.
const TLV_HEADER_LEN: usize = 3;
const IPV4_ADDRESSES_LEN: usize = 12;
const IPV6_ADDRESSES_LEN: usize = 36;

/// The connection endpoints a PROXY header describes, plus its TLVs as `(type, value)` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// The outcome of looking at the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The stream does not start with a PROXY header; treat it as plain MySQL.
    NotProxy,
    /// The bytes so far are a valid beginning of a header; read more and try again.
    Incomplete,
    /// A complete header occupies the first `consumed` bytes. `header` is `None` when it carries
    /// no usable address (LOCAL command, UNSPEC or UNIX family): keep the socket's peer address.
    Header {
        header: Option<ProxyHeader>,
        consumed: usize,
    },
}

/// Why a stream that starts with the v2 signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("PROXY protocol header of {len} bytes exceeds the {MAX_HEADER_LEN}-byte limit")]
    TooLong { len: usize },
    #[error("malformed PROXY protocol v2 header: {0}")]
    Malformed(#[from] ParseError),
}

/// Inspects the start of a stream. Never panics, whatever `buf` holds.
pub fn decode(buf: &[u8]) -> Result<Decoded, ProxyProtocolError> {
    // Compare only what has arrived so that a signature split across reads is not mistaken for
    // MySQL traffic.
    let present = buf.len().min(V2_SIGNATURE.len());
    if buf[..present] != V2_SIGNATURE[..present] {
        return Ok(Decoded::NotProxy);
    }
    if buf.len() < FIXED_LEN {
        return Ok(Decoded::Incomplete);
    }
    // ppp validates the fixed part before it asks for the payload, so an oversized header is
    // refused here without waiting for (and buffering) its bytes.
    let parsed = match v2::Header::try_from(buf) {
        Ok(parsed) => parsed,
        Err(ParseError::Partial(_, payload)) => {
            return match FIXED_LEN + payload {
                len if len > MAX_HEADER_LEN => Err(ProxyProtocolError::TooLong { len }),
                _ => Ok(Decoded::Incomplete),
            };
        }
        Err(ParseError::Incomplete(_)) => return Ok(Decoded::Incomplete),
        Err(e) => return Err(e.into()),
    };
    if parsed.len() > MAX_HEADER_LEN {
        return Err(ProxyProtocolError::TooLong { len: parsed.len() });
    }

    // TLVs are validated even when the header is then ignored: a header whose framing does not
    // add up cannot be trusted to have told us where the MySQL bytes start.
    let tlvs = parsed
        .tlvs()
        .map(|tlv| tlv.map(|tlv| (tlv.kind, tlv.value.into_owned())))
        .collect::<Result<Vec<_>, _>>()?;

    let addresses = match (parsed.command, parsed.addresses) {
        (Command::Local, _) => None,
        (Command::Proxy, Addresses::IPv4(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        (Command::Proxy, Addresses::IPv6(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        (Command::Proxy, Addresses::Unspecified | Addresses::Unix(_)) => None,
    };
    Ok(Decoded::Header {
        header: addresses.map(|(source, destination)| ProxyHeader {
            source,
            destination,
            tlvs,
        }),
        consumed: parsed.len(),
    })
}

/// Builds a v2 PROXY-command header for a TCP stream.
///
/// The format has one address family per header, so a mixed IPv4/IPv6 pair is sent as two IPv6
/// addresses (the IPv4 one mapped). TLVs that would push the header past [`MAX_HEADER_LEN`] are
/// dropped: a header the receiver refuses (our own [`decode`] would) is worse than a missing TLV.
pub fn encode(header: &ProxyHeader) -> Vec<u8> {
    let (source, destination) = same_family(header.source, header.destination);
    let address_len = match source {
        SocketAddr::V4(_) => IPV4_ADDRESSES_LEN,
        SocketAddr::V6(_) => IPV6_ADDRESSES_LEN,
    };
    let mut room = MAX_HEADER_LEN - FIXED_LEN - address_len;
    let tlvs: Vec<v2::TypeLengthValue<'_>> = header
        .tlvs
        .iter()
        .filter(|(_, value)| {
            let len = TLV_HEADER_LEN + value.len();
            let fits = len <= room;
            if fits {
                room -= len;
            }
            fits
        })
        .map(|(kind, value)| v2::TypeLengthValue::new(*kind, value))
        .collect();
    v2::Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (source, destination),
    )
    .write_payloads(tlvs)
    .and_then(v2::Builder::build)
    .expect("ppp only refuses payloads over 64 KiB and this one fits in MAX_HEADER_LEN")
}

fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V6(_)) => (mapped(s), destination),
        (SocketAddr::V6(_), SocketAddr::V4(d)) => (source, mapped(d)),
        _ => (source, destination),
    }
}

fn mapped(addr: SocketAddrV4) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        addr.ip().to_ipv6_mapped(),
        addr.port(),
        0,
        0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header(source: &str, destination: &str, tlvs: Vec<(u8, Vec<u8>)>) -> ProxyHeader {
        ProxyHeader {
            source: addr(source),
            destination: addr(destination),
            tlvs,
        }
    }

    fn decode_full(bytes: &[u8]) -> (Option<ProxyHeader>, usize) {
        match decode(bytes).unwrap() {
            Decoded::Header { header, consumed } => (header, consumed),
            other => panic!("expected a header, got {other:?}"),
        }
    }

    #[test]
    fn signature_matches_ppp() {
        assert_eq!(V2_SIGNATURE.as_slice(), v2::PROTOCOL_PREFIX);
    }

    #[test]
    fn round_trips() {
        let tlvs = vec![
            (0x01, b"mysql".to_vec()),
            (0x04, Vec::new()),
            (0xE0, (0..=255).collect()),
        ];
        for h in [
            header("10.0.0.1:50000", "10.0.0.2:6000", Vec::new()),
            header("10.0.0.1:50000", "10.0.0.2:6000", tlvs.clone()),
            header("[2001:db8::1]:50000", "[2001:db8::2]:6000", Vec::new()),
            header("[2001:db8::1]:50000", "[::1]:6000", tlvs.clone()),
        ] {
            let bytes = encode(&h);
            assert_eq!(decode_full(&bytes), (Some(h), bytes.len()));
        }
    }

    #[test]
    fn mixed_families_become_ipv6() {
        let h = header(
            "192.0.2.7:4000",
            "[2001:db8::2]:6000",
            vec![(0x02, b"x".to_vec())],
        );
        let (decoded, _) = decode_full(&encode(&h));
        assert_eq!(
            decoded,
            Some(header(
                "[::ffff:192.0.2.7]:4000",
                "[2001:db8::2]:6000",
                vec![(0x02, b"x".to_vec())]
            ))
        );

        let h = header("[2001:db8::1]:4000", "192.0.2.8:6000", Vec::new());
        let (decoded, _) = decode_full(&encode(&h));
        assert_eq!(
            decoded.unwrap().destination,
            addr("[::ffff:192.0.2.8]:6000")
        );
    }

    #[test]
    fn oversized_tlvs_are_dropped() {
        let h = header(
            "10.0.0.1:1",
            "10.0.0.2:2",
            vec![(0xE1, vec![7; 5000]), (0xE2, vec![8; 10])],
        );
        let bytes = encode(&h);
        assert!(bytes.len() <= MAX_HEADER_LEN);
        let (decoded, _) = decode_full(&bytes);
        assert_eq!(decoded.unwrap().tlvs, vec![(0xE2, vec![8; 10])]);
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let bytes = encode(&header(
            "[2001:db8::1]:50000",
            "[2001:db8::2]:6000",
            vec![(0x01, b"mysql".to_vec())],
        ));
        for len in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..len]).unwrap(),
                Decoded::Incomplete,
                "len {len}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_not_consumed() {
        let mut bytes = encode(&header("10.0.0.1:1", "10.0.0.2:2", Vec::new()));
        let len = bytes.len();
        bytes.extend_from_slice(&[0x55, 0, 0, 1, 0x85, 0xa6]);
        assert_eq!(decode_full(&bytes).1, len);
    }

    #[test]
    fn mysql_traffic_is_not_proxy() {
        assert_eq!(
            decode(&[0x55, 0, 0, 1, 0x85, 0xa6]).unwrap(),
            Decoded::NotProxy
        );
        assert_eq!(
            decode(&[0x0D, 0x0A, 0x0D, 0x0B]).unwrap(),
            Decoded::NotProxy
        );
        assert_eq!(decode(b"PROXY TCP4 1.2.3.4").unwrap(), Decoded::NotProxy);
    }

    #[test]
    fn addressless_headers_keep_the_peer_address() {
        // LOCAL command, UNSPEC family: what a load balancer sends for its own health checks.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(decode_full(&local), (None, 16));

        // PROXY command, UNSPEC family.
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 3, 0x04, 0, 0]);
        assert_eq!(decode_full(&unspec), (None, 19));

        // PROXY command, UNIX stream: 2 x 108-byte paths.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0, 216]);
        unix.extend_from_slice(&[0; 216]);
        assert_eq!(decode_full(&unix), (None, 232));
    }

    #[test]
    fn garbage_after_the_signature_is_an_error() {
        let mut garbage = V2_SIGNATURE.to_vec();
        garbage.extend_from_slice(&[0xFF; 20]);
        assert!(matches!(
            decode(&garbage),
            Err(ProxyProtocolError::Malformed(_))
        ));

        // Declared length too short for the IPv4 addresses it announces.
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(matches!(
            decode(&short),
            Err(ProxyProtocolError::Malformed(_))
        ));

        // Two bytes after the addresses that do not form a TLV.
        let mut bytes = encode(&header("10.0.0.1:1", "10.0.0.2:2", Vec::new()));
        bytes[15] += 2;
        bytes.extend_from_slice(&[0x01, 0x00]);
        assert!(matches!(
            decode(&bytes),
            Err(ProxyProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_header_is_refused_before_it_arrives() {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        let err = decode(&bytes).unwrap_err();
        assert!(
            matches!(err, ProxyProtocolError::TooLong { len: 65551 }),
            "{err}"
        );
    }

    #[test]
    fn random_input_never_panics() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encode(&header(
            "10.0.0.1:50000",
            "10.0.0.2:6000",
            vec![(0x01, b"mysql".to_vec()), (0x04, vec![1, 2, 3])],
        ));
        for i in 0..10_000 {
            let buf: Vec<u8> = match i % 3 {
                // Pure noise: almost always NotProxy.
                0 => (0..next() % 64).map(|_| next() as u8).collect(),
                // The signature followed by noise, to reach the parser.
                1 => V2_SIGNATURE
                    .iter()
                    .copied()
                    .chain((0..next() % 80).map(|_| next() as u8))
                    .collect(),
                // A valid header with a few bytes flipped past the signature and a random cut.
                _ => {
                    let mut buf = valid.clone();
                    for _ in 0..1 + next() % 3 {
                        let at = 12 + (next() as usize) % (buf.len() - 12);
                        buf[at] = next() as u8;
                    }
                    buf.truncate((next() as usize) % (buf.len() + 1));
                    buf
                }
            };
            if let Ok(Decoded::Header { consumed, .. }) = decode(&buf) {
                assert!(consumed <= buf.len() && consumed <= MAX_HEADER_LEN);
            }
        }
    }
}
