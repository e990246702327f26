//! DNS cookies for the answers flatdns writes itself (RFC 7873, server cookies as RFC 9018).
//!
//! A cached or shared answer must not carry another client's cookie (R24), so those options
//! are stripped when an answer is prepared for sharing. A client that sent a cookie then gets
//! flatdns's own server cookie, as it would from BIND: version 1, three reserved octets, a
//! timestamp, and SipHash-2-4 over the client cookie, those fields and the client address,
//! keyed with a secret drawn at start-up.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use siphasher::sip::SipHasher24;

use crate::wire;

/// Length of the COOKIE option data flatdns sends: client cookie (8) + server cookie (16).
const OPTION_LEN: u16 = 24;

pub struct CookieSecret {
    key: [u8; 16],
}

impl CookieSecret {
    pub fn random() -> CookieSecret {
        CookieSecret {
            key: rand::random(),
        }
    }

    /// The RFC 9018 server cookie for `client` at `now` (seconds since the epoch).
    pub fn server_cookie(&self, client: &[u8; 8], ip: IpAddr, now: u32) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0] = 1; // version
        out[4..8].copy_from_slice(&now.to_be_bytes());
        // On the stack: this runs on cache hits, which allocate nothing but the reply.
        let mut input = [0u8; 8 + 8 + 16];
        input[..8].copy_from_slice(client);
        input[8..16].copy_from_slice(&out[..8]);
        let len = match ip {
            IpAddr::V4(v4) => {
                input[16..20].copy_from_slice(&v4.octets());
                20
            }
            IpAddr::V6(v6) => {
                input[16..32].copy_from_slice(&v6.octets());
                32
            }
        };
        let input = &input[..len];
        let hash = SipHasher24::new_with_key(&self.key).hash(input);
        out[8..].copy_from_slice(&hash.to_be_bytes());
        out
    }

    /// Appends a COOKIE option to the OPT record that ends `reply` (its RDLENGTH at
    /// `rdlen_pos`), unless that would make the reply longer than `limit`.
    pub fn append(
        &self,
        reply: &mut Vec<u8>,
        rdlen_pos: usize,
        client: &[u8; 8],
        ip: IpAddr,
        limit: usize,
    ) {
        if reply.len() + 4 + OPTION_LEN as usize > limit {
            return;
        }
        let Some(rdlen) = wire::u16_at(reply, rdlen_pos) else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        let server = self.server_cookie(client, ip, now);
        wire::put_u16(reply, rdlen_pos, rdlen + 4 + OPTION_LEN);
        reply.extend_from_slice(&wire::OPT_COOKIE.to_be_bytes());
        reply.extend_from_slice(&OPTION_LEN.to_be_bytes());
        reply.extend_from_slice(client);
        reply.extend_from_slice(&server);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_cookie_depends_on_client_address_and_secret() {
        let s = CookieSecret::random();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = s.server_cookie(b"12345678", ip, 1000);
        assert_eq!(a, s.server_cookie(b"12345678", ip, 1000));
        assert_eq!(&a[..8], &[1, 0, 0, 0, 0, 0, 3, 232]);
        assert_ne!(a, s.server_cookie(b"12345679", ip, 1000));
        assert_ne!(
            a,
            s.server_cookie(b"12345678", "192.0.2.2".parse().unwrap(), 1000)
        );
        assert_ne!(
            a,
            CookieSecret::random().server_cookie(b"12345678", ip, 1000)
        );
    }
}
