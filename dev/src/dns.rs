//! A minimal DNS A query, to wait until CoreDNS answers for cluster names.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The wire form of a recursive A query for `name` with transaction `id`.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; 1 question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// The first A record of a response to `a_query(id, ..)`, if any.
pub fn first_a_record(id: u16, resp: &[u8]) -> Option<Ipv4Addr> {
    if resp.len() < 12 || resp[0..2] != id.to_be_bytes() || resp[3] & 0x0f != 0 {
        return None;
    }
    let qd = u16::from_be_bytes([resp[4], resp[5]]);
    let an = u16::from_be_bytes([resp[6], resp[7]]);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(resp, i)? + 4;
    }
    for _ in 0..an {
        i = skip_name(resp, i)?;
        let rtype = u16::from_be_bytes([*resp.get(i)?, *resp.get(i + 1)?]);
        let rdlen = u16::from_be_bytes([*resp.get(i + 8)?, *resp.get(i + 9)?]) as usize;
        let data = resp.get(i + 10..i + 10 + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + rdlen;
    }
    None
}

fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *b.get(i)?;
        if len & 0xc0 == 0xc0 {
            return Some(i + 2);
        }
        if len == 0 {
            return Some(i + 1);
        }
        i += 1 + len as usize;
    }
}

/// Asks `server` for `name` once over UDP.
pub async fn resolve(server: SocketAddr, name: &str) -> Option<Ipv4Addr> {
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.ok()?;
    let id = (std::process::id() as u16) ^ 0x5a5a;
    sock.send_to(&a_query(id, name), server).await.ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    first_a_record(id, &buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_answer_with_a_compressed_name() {
        let mut resp = a_query(7, "kubernetes.default.svc.cluster.local");
        resp[2] = 0x81;
        resp[3] = 0x80;
        resp[7] = 1; // one answer
        resp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 1]);
        assert_eq!(first_a_record(7, &resp), Some(Ipv4Addr::new(10, 96, 0, 1)));
        assert_eq!(first_a_record(8, &resp), None);
    }
}
