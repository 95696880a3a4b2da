//! Builds Ethernet frames for tests and benchmarks: IPv4 (with options and fragments), IPv6
//! (with extension-header chains), TCP, UDP, ICMP, ICMPv6, VLAN tags, ARP; and the same
//! packets without a link header ([`Frame::build_ip`]).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use firewall_common::proto::{
    ETH_P_8021AD as TPID_8021AD, ETH_P_8021Q as TPID_8021Q, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use firewall_common::proto::{
    ETH_P_IP, ETH_P_IPV6, ICMPV6_ECHO_REQUEST, ICMP_ECHO_REQUEST, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP,
};
/// IPv6 extension header numbers.
pub use firewall_common::proto::{
    NEXTHDR_AUTH as EXT_AUTH, NEXTHDR_DEST as EXT_DEST_OPTS, NEXTHDR_FRAGMENT as EXT_FRAGMENT,
    NEXTHDR_HOP as EXT_HOP_BY_HOP, NEXTHDR_ROUTING as EXT_ROUTING,
};

use crate::analysis::reference::Verdict;

/// Source port of built TCP and UDP packets, unless [`Frame::sport`] sets another.
pub const SOURCE_PORT: u16 = 0xc001;

/// The XDP actions the tests expect (`enum xdp_action`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The XDP action of a verdict of the reference evaluator.
pub fn xdp_action(verdict: Verdict) -> u32 {
    match verdict {
        Verdict::Pass => XDP_PASS,
        Verdict::Drop => XDP_DROP,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        dport: u16,
    },
    Udp {
        dport: u16,
    },
    Icmp,
    Icmpv6,
    /// Any other protocol number, with a few bytes of payload.
    Other(u8),
}

impl L4 {
    fn proto(self) -> u8 {
        match self {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Icmp => IPPROTO_ICMP,
            L4::Icmpv6 => IPPROTO_ICMPV6,
            L4::Other(proto) => proto,
        }
    }

    /// The upper-layer header, from the frame's settings.
    fn bytes(self, frame: &Frame) -> Vec<u8> {
        let ports = |dport: u16| [frame.sport.to_be_bytes(), dport.to_be_bytes()].concat();
        // ICMP: type, code, checksum, identifier, sequence.
        let icmp =
            |echo_request: u8| vec![frame.icmp_type.unwrap_or(echo_request), 0, 0, 0, 0, 1, 0, 1];
        match self {
            L4::Tcp { dport } => {
                let mut tcp = ports(dport);
                tcp.extend_from_slice(&frame.tcp_seq.to_be_bytes());
                tcp.extend_from_slice(&frame.tcp_ack.to_be_bytes());
                tcp.extend_from_slice(&[0x50, frame.tcp_flags, 0xff, 0xff]);
                tcp.extend_from_slice(&[0, 0, 0, 0]);
                tcp
            }
            L4::Udp { dport } => {
                let mut udp = ports(dport);
                udp.extend_from_slice(&[0, 8, 0, 0]);
                udp
            }
            // Echo request unless `Frame::icmp_type` sets another type.
            L4::Icmp => icmp(ICMP_ECHO_REQUEST),
            L4::Icmpv6 => icmp(ICMPV6_ECHO_REQUEST),
            L4::Other(_) => vec![0; 8],
        }
    }
}

/// A frame under construction; `build` lays it out with consistent lengths.
#[derive(Clone, Debug)]
pub struct Frame {
    vlan_tags: Vec<(u16, u16)>,
    src: IpAddr,
    dst: IpAddr,
    l4: L4,
    ipv4_options: usize,
    /// Fragment offset in 8-byte units, and the more-fragments flag.
    fragment: Option<(u16, bool)>,
    /// IPv6 extension headers before the upper layer: (kind, length in bytes).
    ext_headers: Vec<(u8, usize)>,
    /// What follows the upper-layer header.
    payload: Vec<u8>,
    tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers.
    tcp_seq: u32,
    tcp_ack: u32,
    sport: u16,
    /// The ICMP(v6) type; `None`: an echo request.
    icmp_type: Option<u8>,
    lies: Lies,
}

/// IP header fields that contradict the packet, and bytes after it: for malformed-packet
/// tests. Written after the header checksum, as a corrupted packet has them.
#[derive(Clone, Debug, Default)]
struct Lies {
    version: Option<u8>,
    ihl: Option<u8>,
    /// IPv4 total length or IPv6 payload length.
    length: Option<u16>,
    /// Zero bytes after the IP packet (Ethernet padding, say).
    trailer: usize,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Frame {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "one address family per packet"
        );
        Frame {
            vlan_tags: Vec::new(),
            src,
            dst,
            l4,
            ipv4_options: 0,
            fragment: None,
            ext_headers: Vec::new(),
            payload: Vec::new(),
            tcp_flags: TCP_SYN,
            tcp_seq: 1,
            tcp_ack: 0,
            sport: SOURCE_PORT,
            icmp_type: None,
            lies: Lies::default(),
        }
    }

    pub fn v4(src: &str, dst: &str, l4: L4) -> Frame {
        Frame::new(
            IpAddr::V4(src.parse::<Ipv4Addr>().expect("IPv4 address")),
            IpAddr::V4(dst.parse::<Ipv4Addr>().expect("IPv4 address")),
            l4,
        )
    }

    pub fn v6(src: &str, dst: &str, l4: L4) -> Frame {
        Frame::new(
            IpAddr::V6(src.parse::<Ipv6Addr>().expect("IPv6 address")),
            IpAddr::V6(dst.parse::<Ipv6Addr>().expect("IPv6 address")),
            l4,
        )
    }

    /// Adds an outer-to-inner VLAN tag.
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Frame {
        self.vlan_tags.push((tpid, vid));
        self
    }

    /// IPv4 options of `bytes` (a multiple of 4, at most 40).
    pub fn ipv4_options(mut self, bytes: usize) -> Frame {
        assert!(bytes.is_multiple_of(4) && bytes <= 40);
        self.ipv4_options = bytes;
        self
    }

    /// Makes the packet a fragment (`offset` in 8-byte units). For IPv6 this adds a fragment
    /// header after the other extension headers.
    pub fn fragment(mut self, offset: u16, more: bool) -> Frame {
        self.fragment = Some((offset, more));
        self
    }

    /// Appends an IPv6 extension header of `len` bytes (a multiple of 8; of 4 for AH).
    pub fn ext_header(mut self, kind: u8, len: usize) -> Frame {
        self.ext_headers.push((kind, len));
        self
    }

    /// TCP flags (default [`TCP_SYN`]).
    pub fn tcp_flags(mut self, flags: u8) -> Frame {
        self.tcp_flags = flags;
        self
    }

    /// TCP sequence and acknowledgement numbers (default 1 and 0).
    pub fn tcp_seq_ack(mut self, seq: u32, ack: u32) -> Frame {
        self.tcp_seq = seq;
        self.tcp_ack = ack;
        self
    }

    /// Source port of TCP and UDP (default [`SOURCE_PORT`]).
    pub fn sport(mut self, port: u16) -> Frame {
        self.sport = port;
        self
    }

    /// ICMP or ICMPv6 type (default: echo request).
    pub fn icmp_type(mut self, kind: u8) -> Frame {
        self.icmp_type = Some(kind);
        self
    }

    /// The IP version nibble, whatever the header is.
    pub fn version_nibble(mut self, version: u8) -> Frame {
        self.lies.version = Some(version);
        self
    }

    /// The IPv4 header length field (in 32-bit words), whatever the header's length is.
    pub fn ihl(mut self, words: u8) -> Frame {
        self.lies.ihl = Some(words);
        self
    }

    /// The IPv4 total length or IPv6 payload length field, whatever the packet's length is.
    pub fn length_field(mut self, length: u16) -> Frame {
        self.lies.length = Some(length);
        self
    }

    /// `bytes` zero bytes after the IP packet, outside its length.
    pub fn trailer(mut self, bytes: usize) -> Frame {
        self.lies.trailer = bytes;
        self
    }

    /// `bytes` of filler after the upper-layer header.
    pub fn payload(mut self, bytes: usize) -> Frame {
        self.payload = vec![0x5a; bytes];
        self
    }

    /// `data` after the upper-layer header: what an ICMP error quotes, say.
    pub fn payload_data(mut self, data: &[u8]) -> Frame {
        self.payload = data.to_vec();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        for &(tpid, vid) in &self.vlan_tags {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&vid.to_be_bytes());
        }
        // A non-first fragment carries payload, not the upper-layer header.
        let later_fragment = matches!(self.fragment, Some((offset, _)) if offset != 0);
        let mut upper = if later_fragment {
            vec![0xab; 16]
        } else {
            self.l4.bytes(self)
        };
        upper.extend_from_slice(&self.payload);
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
                frame.extend(self.ipv4(src, dst, &upper));
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                frame.extend(self.ipv6(src, dst, &upper));
            }
            _ => unreachable!("checked in Frame::new"),
        }
        frame.extend(std::iter::repeat_n(0, self.lies.trailer));
        frame
    }

    /// Writes the lying fields into `ip`, whose length field is at `length_at`.
    fn lie(&self, ip: &mut [u8], length_at: usize) {
        if let Some(version) = self.lies.version {
            ip[0] = version << 4 | ip[0] & 0x0f;
        }
        if let Some(words) = self.lies.ihl {
            ip[0] = ip[0] & 0xf0 | words;
        }
        if let Some(length) = self.lies.length {
            ip[length_at..length_at + 2].copy_from_slice(&length.to_be_bytes());
        }
    }

    /// The packet as an interface without a link header carries it (tun, WireGuard, PPP,
    /// ipip): from the IP header on. VLAN tags are left out.
    pub fn build_ip(&self) -> Vec<u8> {
        let mut frame = self.build();
        frame.drain(..14 + 4 * self.vlan_tags.len());
        frame
    }

    fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, upper: &[u8]) -> Vec<u8> {
        let header_len = 20 + self.ipv4_options;
        let total_len = (header_len + upper.len()) as u16;
        let fragment = match self.fragment {
            Some((offset, more)) => offset | if more { 0x2000 } else { 0 },
            None => 0x4000, // don't fragment
        };
        let mut ip = vec![0x40 | (header_len / 4) as u8, 0];
        ip.extend_from_slice(&total_len.to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34]);
        ip.extend_from_slice(&fragment.to_be_bytes());
        ip.extend_from_slice(&[64, self.l4.proto(), 0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        // Options: NOPs ending with end-of-list.
        ip.extend(std::iter::repeat_n(
            1u8,
            self.ipv4_options.saturating_sub(1),
        ));
        if self.ipv4_options > 0 {
            ip.push(0);
        }
        let checksum = internet_checksum(&ip);
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        self.lie(&mut ip, 2);
        ip.extend_from_slice(upper);
        ip
    }

    fn ipv6(&self, src: Ipv6Addr, dst: Ipv6Addr, upper: &[u8]) -> Vec<u8> {
        let mut chain = self.ext_headers.clone();
        if self.fragment.is_some() {
            chain.push((EXT_FRAGMENT, 8));
        }
        let mut payload = Vec::new();
        for (index, &(kind, len)) in chain.iter().enumerate() {
            let next = chain
                .get(index + 1)
                .map_or(self.l4.proto(), |&(kind, _)| kind);
            let mut header = vec![0u8; len];
            header[0] = next;
            match kind {
                EXT_FRAGMENT => {
                    let (offset, more) = self.fragment.unwrap_or((0, false));
                    let field = offset << 3 | u16::from(more);
                    header[2..4].copy_from_slice(&field.to_be_bytes());
                    header[4..8].copy_from_slice(&0x0bad_cafe_u32.to_be_bytes());
                }
                EXT_AUTH => header[1] = (len / 4 - 2) as u8,
                _ => header[1] = (len / 8 - 1) as u8,
            }
            payload.extend(header);
        }
        payload.extend_from_slice(upper);
        let first = chain.first().map_or(self.l4.proto(), |&(kind, _)| kind);
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[first, 64]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend(payload);
        self.lie(&mut ip, 4);
        ip
    }
}

/// An ARP request for 10.0.0.2 from 10.0.0.1.
pub fn arp_request() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 10, 0, 0, 1]);
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    frame
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The benchmark's packet mix: traffic a server sees, allowed and denied, v4 and v6.
pub fn bench_mix() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "tcp4 :443",
            Frame::v4("10.1.2.3", "10.0.0.1", L4::Tcp { dport: 443 }).build(),
        ),
        (
            "udp6 :443",
            Frame::v6("fd00::5", "fd00::1", L4::Udp { dport: 443 }).build(),
        ),
        (
            "tcp4 :22",
            Frame::v4("198.51.100.7", "10.0.0.1", L4::Tcp { dport: 22 }).build(),
        ),
        (
            "tcp6+ext :80",
            Frame::v6("2001:db8:ffff::9", "fd00::1", L4::Tcp { dport: 80 })
                .ext_header(EXT_HOP_BY_HOP, 8)
                .ext_header(EXT_DEST_OPTS, 16)
                .build(),
        ),
        (
            "icmp4",
            Frame::v4("203.0.113.9", "10.0.0.1", L4::Icmp).build(),
        ),
        (
            "vlan udp4 :53",
            Frame::v4("10.9.9.9", "10.0.0.1", L4::Udp { dport: 53 })
                .vlan(TPID_8021Q, 7)
                .build(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::reference::{parse_frame, PacketInfo, Parsed};

    fn info(frame: &[u8]) -> PacketInfo {
        match parse_frame(frame) {
            Parsed::Ip(info) => info,
            other => panic!("not an IP packet: {other:?}"),
        }
    }

    #[test]
    fn built_frames_parse_back() {
        let tcp = info(&Frame::v4("10.0.0.1", "10.0.0.2", L4::Tcp { dport: 22 }).build());
        assert_eq!((tcp.proto, tcp.dport), (6, Some(22)));
        assert_eq!(tcp.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        let udp = info(&Frame::v6("2001:db8::1", "2001:db8::2", L4::Udp { dport: 53 }).build());
        assert_eq!((udp.proto, udp.dport), (17, Some(53)));
        let options = Frame::v4("10.0.0.1", "10.0.0.2", L4::Udp { dport: 9 }).ipv4_options(40);
        assert_eq!(info(&options.build()).dport, Some(9));
        let tagged = Frame::v6("::1", "::2", L4::Icmpv6)
            .vlan(TPID_8021AD, 1)
            .vlan(TPID_8021Q, 2)
            .build();
        assert_eq!((info(&tagged).proto, info(&tagged).dport), (58, None));
        let chain = Frame::v6("::1", "::2", L4::Tcp { dport: 80 })
            .ext_header(EXT_HOP_BY_HOP, 8)
            .ext_header(EXT_ROUTING, 24)
            .ext_header(EXT_AUTH, 12)
            .ext_header(EXT_DEST_OPTS, 8)
            .fragment(0, true)
            .build();
        assert_eq!((info(&chain).proto, info(&chain).dport), (6, Some(80)));
        let later = Frame::v6("::1", "::2", L4::Tcp { dport: 80 })
            .fragment(3, true)
            .build();
        assert_eq!((info(&later).proto, info(&later).dport), (6, None));
    }

    #[test]
    fn ip_frames_start_at_the_ip_header() {
        use crate::analysis::reference::parse_frame_on;
        use crate::host::link::LinkLayer;
        let frame = Frame::v4("10.0.0.1", "10.0.0.2", L4::Udp { dport: 53 }).vlan(TPID_8021Q, 3);
        let ip = frame.build_ip();
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip.len() + 18, frame.build().len());
        match parse_frame_on(LinkLayer::Ip, &ip) {
            Parsed::Ip(info) => assert_eq!(info.dport, Some(53)),
            other => panic!("{other:?}"),
        }
        let v6 = Frame::v6("::1", "::2", L4::Icmpv6).build_ip();
        assert_eq!(v6[0] >> 4, 6);
        assert!(matches!(parse_frame_on(LinkLayer::Ip, &v6), Parsed::Ip(_)));
    }

    #[test]
    fn setters_land_in_their_fields() {
        let tcp = Frame::v4("10.0.0.1", "10.0.0.2", L4::Tcp { dport: 80 }).sport(443);
        assert_eq!(tcp.build()[34..36], 443u16.to_be_bytes());
        assert_eq!(tcp.build_ip()[20..22], 443u16.to_be_bytes());
        let echo = Frame::v4("10.0.0.1", "10.0.0.2", L4::Icmp).build();
        assert_eq!(echo[34], ICMP_ECHO_REQUEST);
        let quoted = [0x45, 1, 2, 3];
        let error = Frame::v6("::1", "::2", L4::Icmpv6)
            .icmp_type(1)
            .payload_data(&quoted)
            .build();
        assert_eq!(error[54], 1);
        assert_eq!(error[54 + 8..], quoted);
        assert_eq!(u16::from_be_bytes([error[18], error[19]]), 8 + 4);
    }

    #[test]
    fn ipv4_checksum_verifies() {
        let frame = Frame::v4("10.0.0.1", "10.0.0.2", L4::Icmp)
            .ipv4_options(8)
            .build();
        assert_eq!(internet_checksum(&frame[14..14 + 28]), 0);
    }
}
