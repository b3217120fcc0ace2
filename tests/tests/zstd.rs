//! zstd compression on the client leg, end to end. No MySQL client here speaks zstd (the mysql
//! CLI is MariaDB's, mysql_async and PyMySQL only do zlib), so the test is a small client built
//! from the proxy's own packet codec. Against TiDB both legs use zstd; against MariaDB (no zstd)
//! only the client leg does, which shows the legs are independent.

use std::net::SocketAddr;

use tiproxy::net::stream::Stream;
use tiproxy::protocol::capability as cap;
use tiproxy::protocol::compress::{Algorithm, Compression};
use tiproxy::protocol::conn::PacketConn;
use tiproxy::protocol::handshake::{Greeting, HandshakeResponse, NATIVE_PASSWORD};
use tiproxy::protocol::response::{ok_status, ErrPacket};
use tiproxy_tests::Backend;

/// Logs in as root (empty password) asking for zstd, then runs `sql` and returns the rows.
async fn zstd_query(addr: SocketAddr, sql: &str) -> Vec<Vec<Option<Vec<u8>>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut conn = PacketConn::new(Stream::Tcp(tcp), 32 * 1024);
    let (_, payload) = conn.read_packet(1 << 20).await.expect("greeting");
    let greeting = Greeting::parse(&payload).expect("parse greeting");
    assert!(
        greeting.capability & cap::ZSTD_COMPRESSION_ALGORITHM != 0,
        "proxy offers zstd"
    );
    let response = HandshakeResponse {
        capability: cap::PROTOCOL_41
            | cap::SECURE_CONNECTION
            | cap::PLUGIN_AUTH
            | cap::DEPRECATE_EOF
            | cap::ZSTD_COMPRESSION_ALGORITHM,
        max_packet_size: 1 << 24,
        collation: 46,
        user: "root".into(),
        auth_plugin: NATIVE_PASSWORD.into(),
        zstd_level: Some(3),
        ..Default::default()
    };
    conn.write_packet(1, &response.encode())
        .await
        .expect("response");
    // An empty password answers any auth switch with an empty scramble.
    loop {
        let (seq, packet) = conn.read_packet(1 << 20).await.expect("auth reply");
        match packet.first() {
            Some(0x00) => break,
            Some(0xFF) => panic!("login failed: {}", ErrPacket::parse(&packet).unwrap()),
            Some(0xFE) => {
                conn.write_packet(seq.wrapping_add(1), &[])
                    .await
                    .expect("auth switch reply");
            }
            other => panic!("unexpected auth packet {other:?}"),
        }
    }
    conn.set_compression(Some(Compression::new(Algorithm::Zstd { level: 3 })));
    conn.set_resequence(true);
    conn.reset_sequence();
    let mut request = vec![0x03];
    request.extend_from_slice(sql.as_bytes());
    conn.write_packet(0, &request).await.expect("query");
    let (_, first) = conn.read_packet(1 << 26).await.expect("column count");
    assert_ne!(
        first.first(),
        Some(&0xFF),
        "query failed: {:?}",
        ErrPacket::parse(&first)
    );
    let columns = usize::from(first[0]);
    for _ in 0..columns {
        conn.read_packet(1 << 20).await.expect("column definition");
    }
    let mut rows = Vec::new();
    loop {
        let (_, row) = conn.read_packet(1 << 26).await.expect("row");
        if row.first() == Some(&0xFE) && row.len() < 0xFF_FFFF {
            ok_status(&row).expect("terminating OK");
            return rows;
        }
        let mut r = tiproxy::protocol::codec::Reader::new(&row);
        let mut values = Vec::new();
        for _ in 0..columns {
            if r.clone().u8("value").unwrap() == 0xFB {
                r.u8("null").unwrap();
                values.push(None);
            } else {
                values.push(Some(r.lenenc_bytes("value").unwrap().to_vec()));
            }
        }
        rows.push(values);
    }
}

#[tokio::test]
async fn zstd_client_leg_matches_direct_results() {
    for backend in Backend::both() {
        let proxy = backend.proxy("");
        // Compressible and incompressible data, and a value bigger than one frame.
        let sql = "SELECT REPEAT('z', 3000000), MD5('x'), 42";
        let rows = zstd_query(proxy.addr(), sql).await;
        assert_eq!(rows.len(), 1, "{}", backend.name());
        let row = &rows[0];
        assert_eq!(
            row[0].as_deref().map(<[u8]>::len),
            Some(3_000_000),
            "{}",
            backend.name()
        );
        assert!(row[0].as_deref().unwrap().iter().all(|&b| b == b'z'));
        assert_eq!(
            row[1].as_deref(),
            Some(&b"9dd4e461268c8034f5c8564e155c67a6"[..])
        );
        assert_eq!(row[2].as_deref(), Some(&b"42"[..]));
        // Several rows in one compressed response.
        let again = zstd_query(proxy.addr(), "SELECT 1 AS n UNION ALL SELECT 2 ORDER BY n").await;
        assert_eq!(
            again,
            vec![vec![Some(b"1".to_vec())], vec![Some(b"2".to_vec())]]
        );
    }
}
