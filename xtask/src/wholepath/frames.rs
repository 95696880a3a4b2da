//! The generator's frames: Ethernet + IPv6 + UDP with a valid checksum (the stack drops IPv6
//! UDP without one before any socket or counter of interest sees it).

use std::net::Ipv6Addr;

pub type Mac = [u8; 6];

const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const PAYLOAD: &[u8] = b"wholepath!";

/// A UDP datagram from `src`:`sport` to `dst`:`dport`, framed from `src_mac` to `dst_mac`.
pub fn udp6(
    dst_mac: Mac,
    src_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let udp_len = (8 + PAYLOAD.len()) as u16;
    let mut frame = Vec::with_capacity(14 + 40 + udp_len as usize);
    frame.extend(dst_mac);
    frame.extend(src_mac);
    frame.extend(ETHERTYPE_IPV6.to_be_bytes());
    // Version 6, no traffic class or flow label; payload length, next header, hop limit.
    frame.extend([0x60, 0, 0, 0]);
    frame.extend(udp_len.to_be_bytes());
    frame.extend([IPPROTO_UDP, 64]);
    frame.extend(src.octets());
    frame.extend(dst.octets());
    let udp_start = frame.len();
    frame.extend(sport.to_be_bytes());
    frame.extend(dport.to_be_bytes());
    frame.extend(udp_len.to_be_bytes());
    frame.extend([0, 0]);
    frame.extend(PAYLOAD);
    let checksum = udp6_checksum(src, dst, &frame[udp_start..]);
    frame[udp_start + 6..udp_start + 8].copy_from_slice(&checksum.to_be_bytes());
    frame
}

/// The one's-complement sum over the IPv6 pseudo-header and the UDP datagram (RFC 8200 8.1);
/// 0 is sent as 0xffff.
fn udp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, datagram: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((datagram.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, IPPROTO_UDP]);
    let checksum = !fold(ones_sum(&pseudo) + ones_sum(datagram));
    if checksum == 0 {
        0xffff
    } else {
        checksum
    }
}

fn ones_sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_verifies_and_fields_sit_where_parsers_look() {
        let src: Ipv6Addr = "2001:db8:f000::1234".parse().unwrap();
        let dst: Ipv6Addr = "fd00:b0::2".parse().unwrap();
        let frame = udp6([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], src, dst, 40000, 9);
        assert_eq!(frame.len(), 14 + 40 + 8 + PAYLOAD.len());
        assert_eq!(&frame[12..14], &[0x86, 0xdd]);
        assert_eq!(&frame[22..38], &src.octets());
        assert_eq!(&frame[56..58], &9u16.to_be_bytes());
        // A receiver sums pseudo-header and datagram, checksum included, to all ones.
        let datagram = &frame[54..];
        let sum_from = |src: Ipv6Addr| {
            let mut pseudo = Vec::new();
            pseudo.extend(src.octets());
            pseudo.extend(dst.octets());
            pseudo.extend((datagram.len() as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, IPPROTO_UDP]);
            fold(ones_sum(&pseudo) + ones_sum(datagram))
        };
        assert_eq!(sum_from(src), 0xffff);
        // And a changed source breaks it.
        assert_ne!(sum_from("2001:db8:f000::1235".parse().unwrap()), 0xffff);
    }
}
