//! Header parsing: Ethernet (up to two VLAN tags), IPv4, IPv6 with extension headers, and
//! the destination port of TCP/UDP. Every read is bounds-checked against the frame end; every
//! length the packet declares is checked against the frame and the IP packet's own length.
use firewall_common::proto::{
    is_icmp_error, Echo, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_EXT_HEADERS, MAX_VLAN_TAGS, NEXTHDR_AUTH,
    NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING,
};
use firewall_common::{FlowKey, MAX_HEADER_OFFSET};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;

const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// Upper bound on any offset we compute ([`MAX_HEADER_OFFSET`]).
const MAX_OFFSET: usize = MAX_HEADER_OFFSET;

/// What the classifier needs of an IP packet. Addresses are kept as words in wire byte order
/// (an IPv4 address is word 0): word copies compile to plain loads and stores, where byte
/// arrays would call the slow byte-looping `memcpy`/`memset` of compiler-builtins.
///
/// Optional parts are a flag and a value, both always initialised, read through
/// [`Packet::dport`] and [`Packet::icmp`]: an `Option` field leaves its payload undefined
/// when `None`, and LLVM may then load that payload from a stack slot nothing wrote, which
/// kernels before 6.3 reject ("invalid read from stack"). The flow an ICMP error quotes is
/// read only when needed ([`quoted_flow`]): kept here, its twelve fields would stay live
/// through the whole program, costing registers and ~80 ns a packet.
pub struct Packet {
    pub v6: bool,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub proto: u8,
    /// Whether the TCP/UDP ports (and TCP flags) were read: not for other protocols and
    /// non-first fragments.
    has_ports: bool,
    dst_port: u16,
    /// Source port, valid when [`Packet::dport`] is.
    pub sport: u16,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04), when [`Packet::dport`] is valid.
    pub tcp_flags: u8,
    has_icmp: bool,
    icmp: Icmp,
    /// For ICMP errors: where the quoted packet starts (0: not an ICMP error) and where the
    /// error's IP packet ends.
    quote_at: usize,
    quote_end: usize,
}

#[derive(Clone, Copy)]
pub struct Icmp {
    pub kind: u8,
    /// Echo identifier (meaningful for echo requests and replies).
    pub id: u16,
}

impl Packet {
    pub const fn new() -> Self {
        Packet {
            v6: false,
            src: [0; 4],
            dst: [0; 4],
            proto: 0,
            has_ports: false,
            dst_port: 0,
            sport: 0,
            tcp_flags: 0,
            has_icmp: false,
            icmp: Icmp { kind: 0, id: 0 },
            quote_at: 0,
            quote_end: 0,
        }
    }

    /// Destination port, or `None` for non-TCP/UDP and non-first fragments.
    #[inline(always)]
    pub fn dport(&self) -> Option<u16> {
        if self.has_ports {
            Some(self.dst_port)
        } else {
            None
        }
    }

    /// The value the rules' port classes are looked up by: the destination port of TCP/UDP,
    /// the type of ICMP (of the packet's family), else `None` (class 0). The protocol set keeps
    /// port rules from ICMP packets and type rules from TCP/UDP.
    #[inline(always)]
    pub fn port_class_key(&self) -> Option<u16> {
        if self.has_ports {
            Some(self.dst_port)
        } else if self.has_icmp {
            Some(u16::from(self.icmp.kind))
        } else {
            None
        }
    }

    /// ICMP/ICMPv6 header of an unfragmented packet or first fragment, of the packet's family.
    #[inline(always)]
    pub fn icmp(&self) -> Option<Icmp> {
        if self.has_icmp {
            Some(self.icmp)
        } else {
            None
        }
    }

    /// Whether this is an ICMP error (of the packet's family) with a quote for
    /// [`quoted_flow`] to read.
    #[inline(always)]
    pub fn has_quote(&self) -> bool {
        self.quote_at != 0
    }
}

pub enum Parsed {
    NonIp,
    Malformed,
    /// The IP packet was written to the caller's [`Packet`].
    Ip,
}

/// Bounds-checked view of the frame.
struct Frame {
    start: usize,
    /// End of the bytes that can be read (for tc, the skb's linear part).
    end: usize,
    /// The packet's whole length, which IP lengths are checked against.
    wire_len: usize,
}

impl Frame {
    #[inline(always)]
    fn len(&self) -> usize {
        self.wire_len
    }

    /// Pointer to `N` bytes at `offset`, if they lie inside the frame.
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<&[u8; N]> {
        if offset > MAX_OFFSET {
            return None;
        }
        let at = self.start + offset;
        if at + N > self.end {
            return None;
        }
        // SAFETY: `at..at + N` was checked against the frame end just above.
        Some(unsafe { &*(at as *const [u8; N]) })
    }

    /// [`Frame::bytes`] for reads whose bounds LLVM can derive from earlier checks of the IP
    /// length against the frame: it would drop the pointer comparison as redundant, but the
    /// verifier trusts only that comparison. Hiding `end` from LLVM keeps it.
    #[inline(always)]
    fn bytes_checked<const N: usize>(&self, offset: usize) -> Option<&[u8; N]> {
        if offset > MAX_OFFSET {
            return None;
        }
        let at = self.start + offset;
        if at + N > core::hint::black_box(self.end) {
            return None;
        }
        // SAFETY: `at..at + N` was checked against the frame end just above.
        Some(unsafe { &*(at as *const [u8; N]) })
    }

    #[inline(always)]
    fn be16_at(&self, offset: usize) -> Option<u16> {
        self.bytes::<2>(offset).map(|b| u16::from_be_bytes(*b))
    }
}

/// A 4-byte address slice as a word in wire byte order.
#[inline(always)]
fn word(bytes: &[u8]) -> u32 {
    u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Parses the frame between `start` and `end` (packet pointers of an XDP or tc context).
/// `L3`: the frame starts at the IP header (tun, WireGuard, PPP, ipip), whose version
/// nibble tells IPv4 from IPv6; otherwise at an Ethernet header.
#[inline(always)]
pub fn parse<const L3: bool>(start: usize, end: usize, packet: &mut Packet) -> Parsed {
    parse_linear::<L3>(start, end, end - start, packet)
}

/// [`parse`] of a packet of `wire_len` bytes whose first `end - start` are readable: a tc
/// program's skb keeps its headers there, the payload of what the host sends may lie beyond
/// (in page fragments). `wire_len` must not be less than `end - start`.
#[inline(always)]
pub fn parse_linear<const L3: bool>(
    start: usize,
    end: usize,
    wire_len: usize,
    packet: &mut Packet,
) -> Parsed {
    let frame = Frame {
        start,
        end,
        wire_len,
    };
    let parsed = if L3 {
        parse_ip(&frame, packet)
    } else {
        parse_frame(&frame, packet)
    };
    match parsed {
        Some(parsed) => parsed,
        None => Parsed::Malformed,
    }
}

/// A frame that starts at the IP header. `None` means malformed: too short for an IP header,
/// or neither version 4 nor 6.
#[inline(always)]
fn parse_ip(frame: &Frame, packet: &mut Packet) -> Option<Parsed> {
    // Two bytes, not one: a one-byte bounds check compiles to a comparison the verifier
    // cannot use. Any frame that short is malformed anyway.
    match frame.bytes::<2>(0)?[0] >> 4 {
        4 => parse_ipv4(frame, 0, packet).map(|()| Parsed::Ip),
        6 => parse_ipv6(frame, 0, packet).map(|()| Parsed::Ip),
        _ => None,
    }
}

/// `None` means malformed.
#[inline(always)]
fn parse_frame(frame: &Frame, packet: &mut Packet) -> Option<Parsed> {
    let mut ethertype = frame.be16_at(12)?;
    let mut cursor = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = frame.be16_at(cursor + 2)?;
        cursor += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(frame, cursor, packet).map(|()| Parsed::Ip),
        ETH_P_IPV6 => parse_ipv6(frame, cursor, packet).map(|()| Parsed::Ip),
        // A third VLAN tag: we cannot tell what it carries.
        ETH_P_8021Q | ETH_P_8021AD => None,
        _ => Some(Parsed::NonIp),
    }
}

#[inline(always)]
fn parse_ipv4(frame: &Frame, l3: usize, packet: &mut Packet) -> Option<()> {
    let header = frame.bytes::<IPV4_MIN_HLEN>(l3)?;
    if header[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if hlen < IPV4_MIN_HLEN || total_len < hlen || l3 + total_len > frame.len() {
        return None;
    }
    let proto = header[9];
    packet.proto = proto;
    packet.src[0] = word(&header[12..16]);
    packet.dst[0] = word(&header[16..20]);
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    if fragment_offset == 0 {
        transport(frame, packet, l3 + hlen, l3 + total_len)?;
    }
    Some(())
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, l3: usize, packet: &mut Packet) -> Option<()> {
    let header = frame.bytes::<IPV6_HLEN>(l3)?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let ip_end = l3 + IPV6_HLEN + usize::from(u16::from_be_bytes([header[4], header[5]]));
    if ip_end > frame.len() {
        return None;
    }
    packet.v6 = true;
    packet.proto = header[6];
    for i in 0..4 {
        packet.src[i] = word(&header[8 + 4 * i..12 + 4 * i]);
        packet.dst[i] = word(&header[24 + 4 * i..28 + 4 * i]);
    }

    let mut offset = l3 + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        // Every extension header starts with its next-header and length bytes. (Reading them
        // together also keeps the verifier happy: one-byte bounds checks compile to a form it
        // cannot use for variable offsets.)
        let len = match packet.proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                (usize::from(frame.bytes::<2>(offset)?[1]) + 1) * 8
            }
            NEXTHDR_AUTH => (usize::from(frame.bytes::<2>(offset)?[1]) + 2) * 4,
            NEXTHDR_FRAGMENT => {
                let fragment = frame.bytes::<8>(offset)?;
                if offset + 8 > ip_end {
                    return None;
                }
                packet.proto = fragment[0];
                if u16::from_be_bytes([fragment[2], fragment[3]]) >> 3 != 0 {
                    // Non-first fragment: no upper-layer header here.
                    return Some(());
                }
                offset += 8;
                continue;
            }
            _ => {
                transport(frame, packet, offset, ip_end)?;
                return Some(());
            }
        };
        if offset + len > ip_end {
            return None;
        }
        // Checked again (LLVM would merge this read's check into the one above, which the
        // verifier cannot follow once the offset is recomputed).
        packet.proto = frame.bytes_checked::<2>(offset)?[0];
        offset += len;
    }
    match packet.proto {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => None,
        _ => {
            transport(frame, packet, offset, ip_end)?;
            Some(())
        }
    }
}

/// Every ICMP and ICMPv6 message starts with type, code, checksum and 4 more bytes.
const ICMP_HLEN: usize = 8;

/// Reads the transport header at `l4`: ports and TCP flags for TCP/UDP, type/code/identifier
/// for ICMP, and the quoted flow of an ICMP error. `None` when a TCP, UDP or ICMP header does
/// not fit in the IP packet.
#[inline(always)]
fn transport(frame: &Frame, packet: &mut Packet, l4: usize, ip_end: usize) -> Option<()> {
    let header_len = match packet.proto {
        IPPROTO_TCP => TCP_MIN_HLEN,
        IPPROTO_UDP => UDP_HLEN,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => ICMP_HLEN,
        _ => return Some(()),
    };
    if l4 + header_len > ip_end {
        return None;
    }
    // One read per header: a header must start within MAX_OFFSET.
    let header = frame.bytes::<8>(l4)?;
    match packet.proto {
        IPPROTO_TCP => {
            let tcp = frame.bytes::<TCP_MIN_HLEN>(l4)?;
            packet.has_ports = true;
            packet.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            packet.dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            packet.tcp_flags = tcp[13];
        }
        IPPROTO_UDP => {
            packet.has_ports = true;
            packet.sport = u16::from_be_bytes([header[0], header[1]]);
            packet.dst_port = u16::from_be_bytes([header[2], header[3]]);
        }
        // ICMP fields count only in their own family (ICMPv6 inside IPv4 is just a protocol).
        proto if (proto == IPPROTO_ICMPV6) == packet.v6 => {
            let icmp = Icmp {
                kind: header[0],
                id: u16::from_be_bytes([header[4], header[5]]),
            };
            packet.has_icmp = true;
            packet.icmp = icmp;
            if is_icmp_error(packet.v6, icmp.kind) {
                packet.quote_at = l4 + ICMP_HLEN;
                packet.quote_end = ip_end;
            }
        }
        _ => {}
    }
    Some(())
}

/// The flow an ICMP error quotes ([`Packet::has_quote`]), read from the frame between `start`
/// and `end` (the packet pointers `packet` was parsed from): the host's own packet (source =
/// local), as the key its replies would have. `None` when the quote is shorter than an IP
/// header plus 8 bytes, has IPv4 options, or is not TCP, UDP or an echo request. The quote is
/// read as one block at a fixed layout, which keeps the verifier's bounds tracking simple.
#[inline(always)]
pub fn quoted_flow(start: usize, end: usize, packet: &Packet) -> Option<FlowKey> {
    let frame = Frame {
        start,
        end,
        wire_len: end - start,
    };
    let (v6, inner, ip_end) = (packet.v6, packet.quote_at, packet.quote_end);
    let mut key = FlowKey::default();
    let transport: [u8; 8];
    if v6 {
        if inner + IPV6_HLEN + 8 > ip_end {
            return None;
        }
        let quote = frame.bytes_checked::<{ IPV6_HLEN + 8 }>(inner)?;
        if quote[0] >> 4 != 6 {
            return None;
        }
        key.v6 = 1;
        key.proto = quote[6];
        for i in 0..4 {
            key.local[i] = word(&quote[8 + 4 * i..12 + 4 * i]);
            key.remote[i] = word(&quote[24 + 4 * i..28 + 4 * i]);
        }
        transport = [
            quote[40], quote[41], quote[42], quote[43], quote[44], quote[45], quote[46], quote[47],
        ];
    } else {
        if inner + IPV4_MIN_HLEN + 8 > ip_end {
            return None;
        }
        let quote = frame.bytes_checked::<{ IPV4_MIN_HLEN + 8 }>(inner)?;
        if quote[0] != 0x45 {
            return None;
        }
        key.proto = quote[9];
        key.local[0] = word(&quote[12..16]);
        key.remote[0] = word(&quote[16..20]);
        transport = [
            quote[20], quote[21], quote[22], quote[23], quote[24], quote[25], quote[26], quote[27],
        ];
    }
    match key.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            key.local_port = u16::from_be_bytes([transport[0], transport[1]]);
            key.remote_port = u16::from_be_bytes([transport[2], transport[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if transport[0] == Echo::Request.kind(v6) => {
            key.local_port = u16::from_be_bytes([transport[4], transport[5]]);
        }
        _ => return None,
    }
    Some(key)
}
