//! Protocol facts from the RFCs and IANA registries that the XDP program, the map compiler,
//! the reference evaluator and the frame builder all read: link-layer EtherTypes, IP protocol
//! and IPv6 extension header numbers, TCP flags and the ICMP/ICMPv6 message types the firewall
//! treats specially. Constants and `#[inline(always)]` functions only, so the XDP program
//! compiles them to the same immediates as literals.

/// EtherTypes of the frames the parser reads.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// VLAN tags: 802.1Q (customer) and 802.1ad (service, QinQ).
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
/// VLAN tags read before a frame counts as malformed.
pub const MAX_VLAN_TAGS: usize = 2;

/// IP protocol numbers (IPv6: next header values).
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// IPv6 extension headers the parser walks past.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before an IPv6 packet counts as malformed.
pub const MAX_EXT_HEADERS: usize = 8;

/// TCP flags (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// ICMP (IPv4) echo types.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMPv6 echo types.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// Destination unreachable, time exceeded, parameter problem (and IPv6 packet too big): the
/// messages that quote the packet they are about.
#[inline(always)]
pub fn is_icmp_error(v6: bool, kind: u8) -> bool {
    if v6 {
        matches!(kind, 1..=4)
    } else {
        matches!(kind, 3 | 11 | 12)
    }
}

/// ICMPv6 that IPv6 needs to work: packet too big (2, path MTU discovery), multicast listener
/// discovery (130-132, 143) and neighbour discovery (133-137: router and neighbour
/// solicitation and advertisement, redirect).
#[inline(always)]
pub fn is_essential_icmpv6(kind: u8) -> bool {
    matches!(kind, 2 | 130..=137 | 143)
}

/// The two ICMP echo messages, whose type numbers differ between ICMP and ICMPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    Request,
    Reply,
}

impl Echo {
    /// The message's type in ICMPv6 if `v6`, else in ICMP.
    #[inline(always)]
    pub fn kind(self, v6: bool) -> u8 {
        match (self, v6) {
            (Echo::Request, false) => ICMP_ECHO_REQUEST,
            (Echo::Reply, false) => ICMP_ECHO_REPLY,
            (Echo::Request, true) => ICMPV6_ECHO_REQUEST,
            (Echo::Reply, true) => ICMPV6_ECHO_REPLY,
        }
    }
}

/// ICMP (IPv4) message types by the names nftables gives them (`nft describe icmp_type`), as
/// rule files write them in `icmp_types`.
pub const ICMP_TYPE_NAMES: &[(&str, u8)] = &[
    ("echo-reply", ICMP_ECHO_REPLY),
    ("destination-unreachable", 3),
    ("source-quench", 4),
    ("redirect", 5),
    ("echo-request", ICMP_ECHO_REQUEST),
    ("router-advertisement", 9),
    ("router-solicitation", 10),
    ("time-exceeded", 11),
    ("parameter-problem", 12),
    ("timestamp-request", 13),
    ("timestamp-reply", 14),
    ("info-request", 15),
    ("info-reply", 16),
    ("address-mask-request", 17),
    ("address-mask-reply", 18),
];

/// ICMPv6 message types by the names nftables gives them (`nft describe icmpv6_type`;
/// `mld-listener-reduction` is another name of `mld-listener-done`).
pub const ICMPV6_TYPE_NAMES: &[(&str, u8)] = &[
    ("destination-unreachable", 1),
    ("packet-too-big", 2),
    ("time-exceeded", 3),
    ("parameter-problem", 4),
    ("echo-request", ICMPV6_ECHO_REQUEST),
    ("echo-reply", ICMPV6_ECHO_REPLY),
    ("mld-listener-query", 130),
    ("mld-listener-report", 131),
    ("mld-listener-done", 132),
    ("mld-listener-reduction", 132),
    ("nd-router-solicit", 133),
    ("nd-router-advert", 134),
    ("nd-neighbor-solicit", 135),
    ("nd-neighbor-advert", 136),
    ("nd-redirect", 137),
    ("router-renumbering", 138),
    ("ind-neighbor-solicit", 141),
    ("ind-neighbor-advert", 142),
    ("mld2-listener-report", 143),
];

/// The names of ICMPv6 types if `v6`, else of ICMP types.
pub fn icmp_type_names(v6: bool) -> &'static [(&'static str, u8)] {
    if v6 {
        ICMPV6_TYPE_NAMES
    } else {
        ICMP_TYPE_NAMES
    }
}
