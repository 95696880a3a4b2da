//! Table-driven packet tests through BPF_PROG_TEST_RUN on the real kernel: a frame in, the
//! expected verdict out, for every header the parser handles and every way it can be cut short.
use firewall::analysis::reference::{evaluate, evaluate_layer, FlowTable, Reason, Verdict};
use firewall::dataplane::Kernel;
use firewall::host::link::LinkLayer;
use firewall::rules::compile::compile;
use firewall::rules::config::parse_rules;
use firewall::rules::model::RuleSet;
use firewall::testing::packet::*;
use firewall_common::{STAT_DEFAULT_DENY, STAT_MALFORMED, STAT_NON_IP, STAT_RATE_LIMITED};

/// Allows SSH from 10/8 and 2001:db8::/32, web from anywhere, ICMP echo; denies the rest.
const RULES: &str = include_str!("fixtures/packets.toml");

fn rule_set() -> RuleSet {
    parse_rules("packets.toml", RULES).unwrap()
}

fn kernel() -> Kernel {
    let mut kernel = Kernel::load().expect("load the XDP program");
    kernel.apply(&compile(&rule_set()).unwrap()).unwrap();
    kernel
}

/// A kernel with `set` in force.
fn kernel_with(set: &RuleSet) -> Kernel {
    let mut kernel = Kernel::load().expect("load the XDP program");
    kernel.apply(&compile(set).unwrap()).unwrap();
    kernel
}

fn verdict(kernel: &Kernel, frame: &[u8]) -> u32 {
    kernel.test_run(frame, 1).expect("test run").0
}

/// Runs the table; each row also checks the reference evaluator agrees.
fn check(rows: &[(&str, Vec<u8>, u32)]) {
    let kernel = kernel();
    let set = rule_set();
    for (name, frame, want) in rows {
        let got = verdict(&kernel, frame);
        assert_eq!(
            got, *want,
            "{name}: kernel gave XDP action {got}, expected {want}"
        );
        let reference = xdp_action(evaluate(&set, frame).verdict);
        assert_eq!(
            reference, *want,
            "{name}: the reference evaluator disagrees"
        );
    }
}

/// Runs every cut of valid packets (from 14 bytes, the least BPF_PROG_TEST_RUN takes for
/// XDP) through the program of `layer`: the reference evaluator must agree, and only cuts may
/// be malformed (the full packets are well-formed), and more than 100 are. Without a link
/// header the VLAN tag goes.
fn check_truncations(layer: LinkLayer) {
    let build = match layer {
        LinkLayer::Ethernet => Frame::build,
        LinkLayer::Ip => Frame::build_ip,
    };
    let frames = [
        tcp4("10.1.2.3", 22)
            .ipv4_options(8)
            .vlan(TPID_8021Q, 3)
            .payload(4),
        tcp6("2001:db8::1", 22)
            .ext_header(EXT_HOP_BY_HOP, 8)
            .ext_header(EXT_AUTH, 12)
            .payload(4),
        Frame::v4("192.0.2.9", "10.0.0.1", L4::Udp { dport: 80 }),
        Frame::v6("2001:db9::7", "fd00::1", L4::Icmpv6),
    ]
    .map(|frame| build(&frame));
    let mut kernel = kernel();
    kernel.load_layer(layer).unwrap();
    let set = rule_set();
    let want = |frame: &[u8]| {
        let decision = evaluate_layer(&set, layer, frame, None, &FlowTable::default());
        (xdp_action(decision.verdict), decision.reason)
    };
    let mut malformed = 0;
    for frame in &frames {
        for len in 14..=frame.len() {
            let cut = &frame[..len];
            let (expected, reason) = want(cut);
            let (got, _) = kernel.test_run_on(layer, cut, 1).expect("test run");
            assert_eq!(
                got,
                expected,
                "{layer:?}: cut to {len} of {} bytes",
                frame.len()
            );
            if reason == Reason::Malformed {
                malformed += 1;
                assert!(len < frame.len());
            }
        }
        assert_ne!(want(frame).1, Reason::Malformed);
    }
    assert!(
        malformed > 100,
        "truncations counted as malformed: {malformed}"
    );
}

fn tcp4(src: &str, dport: u16) -> Frame {
    Frame::v4(src, "10.0.0.1", L4::Tcp { dport })
}

fn tcp6(src: &str, dport: u16) -> Frame {
    Frame::v6(src, "fd00::1", L4::Tcp { dport })
}

/// Packets of every protocol and family with the verdict of [`RULES`], the same on both
/// link layers.
fn protocol_rows() -> Vec<(&'static str, Frame, u32)> {
    let v4 = |src, l4| Frame::v4(src, "10.0.0.1", l4);
    let v6 = |src, l4| Frame::v6(src, "fd00::1", l4);
    vec![
        ("tcp4 ssh from lan", tcp4("10.1.2.3", 22), XDP_PASS),
        ("tcp4 ssh from outside", tcp4("192.0.2.9", 22), XDP_DROP),
        ("tcp4 denied port", tcp4("10.1.2.3", 23), XDP_DROP),
        ("tcp4 web", tcp4("192.0.2.9", 80), XDP_PASS),
        ("tcp4 range start", tcp4("192.0.2.9", 8000), XDP_PASS),
        ("tcp4 inside range", tcp4("192.0.2.9", 8080), XDP_PASS),
        ("tcp4 range end", tcp4("192.0.2.9", 8100), XDP_PASS),
        ("tcp4 past range", tcp4("192.0.2.9", 8101), XDP_DROP),
        ("udp4 web", v4("192.0.2.9", L4::Udp { dport: 80 }), XDP_PASS),
        (
            "udp4 ssh port from lan: rule is tcp",
            v4("10.1.1.1", L4::Udp { dport: 22 }),
            XDP_DROP,
        ),
        ("icmp4", v4("192.0.2.9", L4::Icmp), XDP_PASS),
        (
            "gre4 to endpoint",
            Frame::v4("192.0.2.9", "192.0.2.1", L4::Other(47)),
            XDP_PASS,
        ),
        (
            "gre4 elsewhere",
            Frame::v4("192.0.2.9", "192.0.2.2", L4::Other(47)),
            XDP_DROP,
        ),
        (
            "ipv4 options",
            tcp4("192.0.2.9", 22).ipv4_options(12),
            XDP_DROP,
        ),
        ("tcp6 ssh from lan", tcp6("2001:db8::7", 22), XDP_PASS),
        ("tcp6 ssh from outside", tcp6("2001:db9::7", 22), XDP_DROP),
        (
            "tcp6 behind extension headers",
            tcp6("2001:db8::1", 22)
                .ext_header(EXT_HOP_BY_HOP, 8)
                .ext_header(EXT_AUTH, 12),
            XDP_PASS,
        ),
        (
            "udp6 web",
            v6("2001:db9::7", L4::Udp { dport: 8050 }),
            XDP_PASS,
        ),
        (
            "udp6 denied",
            v6("2001:db9::7", L4::Udp { dport: 53 }),
            XDP_DROP,
        ),
        ("icmpv6", v6("2001:db9::7", L4::Icmpv6), XDP_PASS),
        (
            "icmp (v4 proto number) in IPv6",
            v6("2001:db9::7", L4::Icmp),
            XDP_PASS,
        ),
        (
            "first match: bad host on web port",
            tcp4("10.6.6.6", 80),
            XDP_DROP,
        ),
        (
            "first match: bad host on ssh",
            tcp4("10.6.6.6", 22),
            XDP_PASS,
        ),
        (
            "v4 rule never matches v6: to 192.0.2.1 only",
            Frame::v6("::1", "::2", L4::Other(47)),
            XDP_DROP,
        ),
    ]
}

/// Packets whose IP headers lie about their lengths (or version), the same on both link
/// layers; and one with bytes after it, which is fine.
fn bad_length_rows() -> Vec<(&'static str, Frame, u32)> {
    let good = tcp4("10.1.2.3", 22);
    vec![
        ("IP version 5", good.clone().version_nibble(5), XDP_DROP),
        ("IHL below 5", good.clone().ihl(4), XDP_DROP),
        (
            "total length beyond frame",
            good.clone().length_field(2000),
            XDP_DROP,
        ),
        (
            "total length below header",
            good.clone().length_field(10),
            XDP_DROP,
        ),
        (
            "TCP header beyond total length",
            good.clone().length_field(30),
            XDP_DROP,
        ),
        (
            "IPv6 payload length beyond frame",
            tcp6("2001:db8::1", 22).length_field(500),
            XDP_DROP,
        ),
        (
            "trailing bytes after the packet",
            good.trailer(12),
            XDP_PASS,
        ),
    ]
}

/// `rows` with their frames built by `build` ([`Frame::build`] or [`Frame::build_ip`]).
fn built(
    rows: Vec<(&'static str, Frame, u32)>,
    build: fn(&Frame) -> Vec<u8>,
) -> Vec<(&'static str, Vec<u8>, u32)> {
    rows.into_iter()
        .map(|(name, frame, want)| (name, build(&frame), want))
        .collect()
}

#[test]
fn ipv4_and_ipv6_by_protocol() {
    check(&built(protocol_rows(), Frame::build));
}

#[test]
fn non_ip_frames_pass() {
    let mut lldp = arp_request();
    lldp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    let mut tagged_arp = arp_request();
    tagged_arp.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    check(&[
        ("arp", arp_request(), XDP_PASS),
        ("lldp", lldp, XDP_PASS),
        ("arp in vlan", tagged_arp, XDP_PASS),
    ]);
}

#[test]
fn vlan_tags_are_seen_through() {
    check(&[
        (
            "802.1Q",
            tcp4("10.1.2.3", 22).vlan(TPID_8021Q, 10).build(),
            XDP_PASS,
        ),
        (
            "802.1Q denied",
            tcp4("192.0.2.9", 22).vlan(TPID_8021Q, 10).build(),
            XDP_DROP,
        ),
        (
            "802.1ad+802.1Q",
            tcp6("2001:db8::1", 22)
                .vlan(TPID_8021AD, 1)
                .vlan(TPID_8021Q, 2)
                .build(),
            XDP_PASS,
        ),
        (
            "three tags: malformed",
            tcp4("10.1.2.3", 22)
                .vlan(TPID_8021AD, 1)
                .vlan(TPID_8021Q, 2)
                .vlan(TPID_8021Q, 3)
                .build(),
            XDP_DROP,
        ),
    ]);
}

#[test]
fn ipv4_options_move_the_transport_header() {
    let rows: Vec<_> = [4, 8, 20, 40]
        .into_iter()
        .flat_map(|bytes| {
            [
                (
                    format!("{bytes} option bytes, allowed"),
                    tcp4("10.1.2.3", 22),
                    XDP_PASS,
                ),
                (
                    format!("{bytes} option bytes, denied"),
                    tcp4("192.0.2.9", 22),
                    XDP_DROP,
                ),
            ]
            .map(|(name, frame, want)| (name, frame.ipv4_options(bytes).build(), want))
        })
        .collect();
    let rows: Vec<(&str, Vec<u8>, u32)> = rows
        .iter()
        .map(|(name, frame, want)| (name.as_str(), frame.clone(), *want))
        .collect();
    check(&rows);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let chain = |frame: Frame, kinds: &[(u8, usize)]| {
        kinds
            .iter()
            .fold(frame, |frame, &(kind, len)| frame.ext_header(kind, len))
    };
    let eight: Vec<(u8, usize)> = [EXT_HOP_BY_HOP, EXT_DEST_OPTS, EXT_ROUTING, EXT_AUTH]
        .into_iter()
        .cycle()
        .take(8)
        .map(|kind| (kind, if kind == EXT_AUTH { 12 } else { 16 }))
        .collect();
    let mut nine = eight.clone();
    nine.push((EXT_DEST_OPTS, 8));
    check(&[
        (
            "hop-by-hop",
            chain(tcp6("2001:db8::1", 22), &[(EXT_HOP_BY_HOP, 8)]).build(),
            XDP_PASS,
        ),
        (
            "routing+destopts",
            chain(
                tcp6("2001:db9::1", 22),
                &[(EXT_ROUTING, 24), (EXT_DEST_OPTS, 8)],
            )
            .build(),
            XDP_DROP,
        ),
        (
            "AH (length in 4-byte units)",
            chain(tcp6("2001:db8::1", 22), &[(EXT_AUTH, 12)]).build(),
            XDP_PASS,
        ),
        (
            "AH then denied port",
            chain(tcp6("2001:db8::1", 23), &[(EXT_AUTH, 24)]).build(),
            XDP_DROP,
        ),
        (
            "eight headers",
            chain(tcp6("2001:db8::1", 22), &eight).build(),
            XDP_PASS,
        ),
        (
            "nine headers: malformed",
            chain(tcp6("2001:db8::1", 22), &nine).build(),
            XDP_DROP,
        ),
        (
            "first fragment has ports",
            tcp6("2001:db8::1", 22).fragment(0, true).build(),
            XDP_PASS,
        ),
    ]);
}

#[test]
fn later_fragments_match_only_rules_without_ports() {
    check(&[
        // The ssh and web rules need ports: a later fragment falls to the default (deny)...
        (
            "v4 later fragment of ssh",
            tcp4("10.1.2.3", 22).fragment(100, false).build(),
            XDP_DROP,
        ),
        (
            "v6 later fragment of ssh",
            tcp6("2001:db8::1", 22).fragment(100, true).build(),
            XDP_DROP,
        ),
        // ...unless a port-less rule matches it.
        (
            "v4 later fragment to endpoint",
            Frame::v4("192.0.2.9", "192.0.2.1", L4::Udp { dport: 9 })
                .fragment(7, true)
                .build(),
            XDP_PASS,
        ),
        (
            "v4 first fragment",
            tcp4("10.1.2.3", 22).fragment(0, true).build(),
            XDP_PASS,
        ),
        (
            "icmp later fragment",
            Frame::v4("192.0.2.9", "10.0.0.1", L4::Icmp)
                .fragment(3, false)
                .build(),
            XDP_PASS,
        ),
    ]);
}

/// Echo requests allowed by `icmp_types`, other types denied; ports equal to ICMP types (a TCP
/// rule's port 8, a proto-less rule's ports 13 and 129) never match ICMP messages.
const ICMP_TYPE_RULES: &str = r#"
[defaults]
policy = "deny"

[[rules]]
name = "ping"
action = "allow"
proto = "icmp"
icmp_types = ["echo-request"]

[[rules]]
name = "ping6"
action = "allow"
proto = "icmpv6"
icmp_types = ["echo-request", "destination-unreachable"]

[[rules]]
name = "tcp-ports-like-types"
action = "allow"
proto = "tcp"
ports = [8, 128]

[[rules]]
name = "tcp-and-udp-ports-like-types"
action = "allow"
ports = [13, 129]
"#;

#[test]
fn icmp_types_select_messages_and_ports_never_match_them() {
    let set = parse_rules("icmp.toml", ICMP_TYPE_RULES).unwrap();
    let mut without_essentials = set.clone();
    without_essentials.essentials = false;
    let v4 = |l4| Frame::v4("192.0.2.9", "10.0.0.1", l4);
    let v6 = |l4| Frame::v6("2001:db9::7", "fd00::1", l4);
    let rows = [
        ("icmp echo-request", v4(L4::Icmp), XDP_PASS, XDP_PASS),
        (
            "icmp echo-reply",
            v4(L4::Icmp).icmp_type(0),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "icmp destination-unreachable",
            v4(L4::Icmp).icmp_type(3),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "icmp timestamp-request (a tcp/udp port)",
            v4(L4::Icmp).icmp_type(13),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "icmp type 128 (a tcp port)",
            v4(L4::Icmp).icmp_type(128),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "icmp echo-request, later fragment",
            v4(L4::Icmp).fragment(3, false),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "icmp echo-request, first fragment",
            v4(L4::Icmp).fragment(0, true),
            XDP_PASS,
            XDP_PASS,
        ),
        ("icmpv6 echo-request", v6(L4::Icmpv6), XDP_PASS, XDP_PASS),
        (
            "icmpv6 destination-unreachable",
            v6(L4::Icmpv6).icmp_type(1),
            XDP_PASS,
            XDP_PASS,
        ),
        (
            "icmpv6 echo-reply (a tcp/udp port)",
            v6(L4::Icmpv6).icmp_type(129),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "icmpv6 type 8 (a tcp port)",
            v6(L4::Icmpv6).icmp_type(8),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "icmpv6 type 13 (a tcp/udp port)",
            v6(L4::Icmpv6).icmp_type(13),
            XDP_DROP,
            XDP_DROP,
        ),
        // Essential ICMPv6 passes before the rules; without essentials the rules drop it.
        (
            "icmpv6 nd-neighbor-solicit",
            v6(L4::Icmpv6).icmp_type(135),
            XDP_PASS,
            XDP_DROP,
        ),
        (
            "icmpv6 packet-too-big",
            v6(L4::Icmpv6).icmp_type(2),
            XDP_PASS,
            XDP_DROP,
        ),
        (
            "icmpv6 mld2-listener-report",
            v6(L4::Icmpv6).icmp_type(143),
            XDP_PASS,
            XDP_DROP,
        ),
        // ICMP fields count only in their own family.
        (
            "icmp (v4) echo-request in IPv6",
            v6(L4::Icmp),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "icmpv6 echo-request in IPv4",
            v4(L4::Icmpv6),
            XDP_DROP,
            XDP_DROP,
        ),
        (
            "tcp to port 8",
            v4(L4::Tcp { dport: 8 }),
            XDP_PASS,
            XDP_PASS,
        ),
        (
            "udp to port 13",
            v4(L4::Udp { dport: 13 }),
            XDP_PASS,
            XDP_PASS,
        ),
        (
            "udp6 to port 129",
            v6(L4::Udp { dport: 129 }),
            XDP_PASS,
            XDP_PASS,
        ),
        (
            "udp to port 8: the rule is tcp",
            v4(L4::Udp { dport: 8 }),
            XDP_DROP,
            XDP_DROP,
        ),
    ];
    for (set, essentials) in [(&set, true), (&without_essentials, false)] {
        let mut kernel = Kernel::load().expect("load the XDP program");
        kernel.load_layer(LinkLayer::Ip).unwrap();
        kernel.apply(&compile(set).unwrap()).unwrap();
        for (name, frame, with, without) in &rows {
            let want = if essentials { *with } else { *without };
            for layer in [LinkLayer::Ethernet, LinkLayer::Ip] {
                let bytes = match layer {
                    LinkLayer::Ethernet => frame.build(),
                    LinkLayer::Ip => frame.build_ip(),
                };
                let (got, _) = kernel.test_run_on(layer, &bytes, 1).expect("test run");
                assert_eq!(
                    got, want,
                    "{name} ({layer:?}, essentials {essentials}): kernel gave {got}"
                );
                let reference = evaluate_layer(set, layer, &bytes, None, &FlowTable::default());
                assert_eq!(
                    xdp_action(reference.verdict),
                    want,
                    "{name} ({layer:?}, essentials {essentials}): the reference disagrees"
                );
            }
        }
    }
}

/// Every prefix of valid frames: the kernel must give the reference's verdict for each length
/// (headers cut short are malformed and dropped; a cut in the payload is not).
#[test]
fn every_truncation_is_handled() {
    check_truncations(LinkLayer::Ethernet);
}

#[test]
fn bad_lengths_are_malformed() {
    check(&built(bad_length_rows(), Frame::build));
}

#[test]
fn counters_record_each_reason() {
    let kernel = kernel();
    let before = kernel.counters().unwrap();
    let runs = [
        (arp_request(), STAT_NON_IP),
        (tcp4("192.0.2.9", 23).build(), STAT_DEFAULT_DENY),
        (tcp4("10.1.2.3", 22).build()[..40].to_vec(), STAT_MALFORMED),
    ];
    for (frame, _) in &runs {
        kernel.test_run(frame, 3).unwrap();
    }
    let after = kernel.counters().unwrap();
    for (frame, slot) in &runs {
        let delta = after[*slot as usize].packets - before[*slot as usize].packets;
        assert_eq!(delta, 3, "slot {slot} for a {}-byte frame", frame.len());
    }
    // The matched rule's own counter: ssh-from-lan is rule 0 of the live generation.
    let gen = kernel.active_generation().unwrap() as usize;
    let slot = gen * firewall_common::MAX_RULES;
    kernel.test_run(&tcp4("10.1.2.3", 22).build(), 5).unwrap();
    let counted = kernel.counters().unwrap()[slot];
    assert_eq!(counted.packets, 5);
    assert_eq!(counted.bytes, 5 * tcp4("10.1.2.3", 22).build().len() as u64);
}

#[test]
fn audit_mode_counts_what_it_would_drop_and_drops_nothing() {
    let mut set = rule_set();
    set.audit = true;
    let mut kernel = Kernel::load().expect("load the XDP program");
    kernel.apply(&compile(&set).unwrap()).unwrap();
    let denied = tcp4("192.0.2.9", 23).build();
    let malformed = tcp4("10.1.2.3", 22).build()[..40].to_vec();
    let before = kernel.counters().unwrap();
    for frame in [&denied, &malformed] {
        assert_eq!(verdict(&kernel, frame), XDP_PASS);
        assert_eq!(evaluate(&set, frame).verdict, Verdict::Pass);
    }
    let after = kernel.counters().unwrap();
    for slot in [STAT_DEFAULT_DENY, STAT_MALFORMED] {
        let delta = after[slot as usize].packets - before[slot as usize].packets;
        assert_eq!(delta, 1, "slot {slot}");
    }
    // Back to enforcing: the same frames are dropped.
    set.audit = false;
    kernel.apply(&compile(&set).unwrap()).unwrap();
    for frame in [&denied, &malformed] {
        assert_eq!(verdict(&kernel, frame), XDP_DROP);
    }
}

#[test]
fn rate_limits_count_per_source() {
    let set = parse_rules(
        "limit.toml",
        "[defaults]\npolicy = \"deny\"\n\n[[rules]]\nname = \"ssh\"\naction = \"allow\"\n\
         proto = \"tcp\"\nports = [22]\nlimit = \"2/s\"\nburst = 3\n",
    )
    .unwrap();
    let mut kernel = Kernel::load().expect("load the XDP program");
    kernel.apply(&compile(&set).unwrap()).unwrap();
    let syn = |src: &str| tcp4(src, 22).build();
    let before = kernel.counters().unwrap()[STAT_RATE_LIMITED as usize].packets;
    // A burst of three, then the source is over its rate.
    for _ in 0..3 {
        assert_eq!(verdict(&kernel, &syn("198.51.100.1")), XDP_PASS);
    }
    assert_eq!(verdict(&kernel, &syn("198.51.100.1")), XDP_DROP);
    // Another source has a bucket of its own; IPv6 too.
    assert_eq!(verdict(&kernel, &syn("198.51.100.2")), XDP_PASS);
    assert_eq!(verdict(&kernel, &tcp6("2001:db8::1", 22).build()), XDP_PASS);
    // 2/s: after 0.6 s one more token, not two.
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(verdict(&kernel, &syn("198.51.100.1")), XDP_PASS);
    assert_eq!(verdict(&kernel, &syn("198.51.100.1")), XDP_DROP);
    let after = kernel.counters().unwrap()[STAT_RATE_LIMITED as usize].packets;
    assert_eq!(after - before, 2);
}

#[test]
fn log_lines_are_rate_limited_and_the_refused_ones_counted() {
    let set = parse_rules(
        "log.toml",
        "[defaults]\npolicy = \"deny\"\n\n[log]\nlines_per_second = 1\nburst = 5\n\n\
         [[rules]]\nname = \"ssh\"\naction = \"allow\"\nproto = \"tcp\"\nports = [22]\n",
    )
    .unwrap();
    let kernel = kernel_with(&set);
    let denied = tcp4("192.0.2.9", 23).build();
    // One run of 1,000 on one CPU, well within a second: the burst of five lines is written,
    // the rest refused (a sixth line if the run straddles a line's due time).
    kernel.test_run(&denied, 1_000).unwrap();
    let refused = kernel.refused_log_lines().unwrap();
    assert!((994..=995).contains(&refused), "{refused} lines refused");
    // Allowed packets are not logged, so they neither take lines nor count as refused.
    kernel.test_run(&tcp4("10.1.2.3", 22).build(), 100).unwrap();
    assert_eq!(kernel.refused_log_lines().unwrap(), refused);
    // No line is refused once a second has passed (one more line is due).
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    kernel.test_run(&denied, 1).unwrap();
    assert_eq!(kernel.refused_log_lines().unwrap(), refused);
}

#[test]
fn reload_swaps_rules_and_keeps_counting_from_zero() {
    let mut kernel = kernel();
    let ssh = tcp4("10.1.2.3", 22).build();
    assert_eq!(verdict(&kernel, &ssh), XDP_PASS);
    let deny_all = parse_rules("deny.toml", "[defaults]\npolicy = \"deny\"\n").unwrap();
    kernel.apply(&compile(&deny_all).unwrap()).unwrap();
    assert_eq!(verdict(&kernel, &ssh), XDP_DROP);
    kernel.apply(&compile(&rule_set()).unwrap()).unwrap();
    assert_eq!(verdict(&kernel, &ssh), XDP_PASS);
    // Many swaps in a row exercise both generations' diffs.
    for round in 0..20 {
        let set = if round % 2 == 0 {
            &deny_all
        } else {
            &rule_set()
        };
        kernel.apply(&compile(set).unwrap()).unwrap();
        let want = if round % 2 == 0 { XDP_DROP } else { XDP_PASS };
        assert_eq!(verdict(&kernel, &ssh), want, "round {round}");
    }
}

mod state {
    use super::*;
    use firewall::analysis::reference::{evaluate_with_flows, outbound_flow, parse_frame, Parsed};
    use firewall::dataplane::monotonic_now_ns;
    use firewall_common::{FlowKey, FlowState, FLOW_CLOSING};

    const HOST: &str = "10.0.0.1";
    const PEER: &str = "198.51.100.7";

    fn deny_all(extra: &str) -> Kernel {
        let text = format!(
            "[defaults]\npolicy = \"deny\"\n{extra}\n[state]\nicmp_timeout = 3\ntcp_timeout = 6\n"
        );
        kernel_with(&parse_rules("t.toml", &text).unwrap())
    }

    /// The flow the host starts by sending `frame`, last seen `age_secs` ago. Flows cannot
    /// be older than the machine (its monotonic clock), so on a machine that has just booted
    /// (a test VM) this first waits for the clock to pass the age.
    pub(super) fn track(kernel: &mut Kernel, frame: &[u8], age_secs: u64) -> FlowKey {
        let age_ns = age_secs * 1_000_000_000;
        while monotonic_now_ns() <= age_ns {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let Parsed::Ip(packet) = parse_frame(frame) else {
            panic!("not IP")
        };
        let key = outbound_flow(&packet).expect("a trackable packet");
        let last_seen_ns = monotonic_now_ns() - age_ns;
        kernel
            .set_flows(&[(
                key,
                FlowState {
                    last_seen_ns,
                    flags: 0,
                    _pad: 0,
                },
            )])
            .unwrap();
        key
    }

    /// An ICMP(v6) error of `kind` from the peer quoting `quoted` (an IP packet).
    fn icmp_error(v6: bool, kind: u8, quoted: &[u8]) -> Vec<u8> {
        let frame = if v6 {
            Frame::v6("2001:db8::7", "fd00::1", L4::Icmpv6)
        } else {
            Frame::v4(PEER, HOST, L4::Icmp)
        };
        frame.icmp_type(kind).payload_data(quoted).build()
    }

    #[test]
    fn replies_to_the_hosts_flows_pass() {
        let mut kernel = deny_all("");
        let out = Frame::v4(HOST, PEER, L4::Tcp { dport: 443 }).build();
        let reply_frame = Frame::v4(PEER, HOST, L4::Tcp { dport: SOURCE_PORT })
            .sport(443)
            .tcp_flags(TCP_ACK);
        let reply = reply_frame.build();
        assert_eq!(verdict(&kernel, &reply), XDP_DROP, "no flow yet");
        track(&mut kernel, &out, 0);
        assert_eq!(
            verdict(&kernel, &reply),
            XDP_PASS,
            "reply to a tracked flow"
        );
        let other_port = reply_frame.clone().sport(444).build();
        assert_eq!(
            verdict(&kernel, &other_port),
            XDP_DROP,
            "another port of the peer"
        );
        let syn = reply_frame.tcp_flags(TCP_SYN).build();
        assert_eq!(verdict(&kernel, &syn), XDP_DROP, "a SYN never replies");
        track(&mut kernel, &out, 3);
        assert_eq!(verdict(&kernel, &reply), XDP_PASS, "within tcp_timeout");
        track(&mut kernel, &out, 12);
        assert_eq!(verdict(&kernel, &reply), XDP_DROP, "expired");
    }

    #[test]
    fn echo_replies_and_icmp_errors_about_tracked_flows_pass() {
        let mut kernel = deny_all("");
        let ping = Frame::v4(HOST, PEER, L4::Icmp).build();
        let echo_reply = Frame::v4(PEER, HOST, L4::Icmp).icmp_type(0).build();
        assert_eq!(verdict(&kernel, &echo_reply), XDP_DROP);
        track(&mut kernel, &ping, 0);
        assert_eq!(verdict(&kernel, &echo_reply), XDP_PASS);
        track(&mut kernel, &ping, 8);
        assert_eq!(verdict(&kernel, &echo_reply), XDP_DROP, "past icmp_timeout");

        let udp = Frame::v4(HOST, PEER, L4::Udp { dport: 53 }).build();
        let unreachable = icmp_error(false, 3, &udp[14..]);
        let time_exceeded = icmp_error(false, 11, &udp[14..]);
        assert_eq!(verdict(&kernel, &unreachable), XDP_DROP, "no flow");
        track(&mut kernel, &udp, 0);
        assert_eq!(
            verdict(&kernel, &unreachable),
            XDP_PASS,
            "unreachable quoting the flow"
        );
        assert_eq!(
            verdict(&kernel, &time_exceeded),
            XDP_PASS,
            "time exceeded quoting the flow"
        );
        let other = Frame::v4(HOST, PEER, L4::Udp { dport: 54 }).build();
        assert_eq!(
            verdict(&kernel, &icmp_error(false, 3, &other[14..])),
            XDP_DROP
        );

        let udp6 = Frame::v6("fd00::1", "2001:db8::7", L4::Udp { dport: 53 }).build();
        let too_big = icmp_error(true, 2, &udp6[14..]);
        let unreachable6 = icmp_error(true, 1, &udp6[14..]);
        assert_eq!(verdict(&kernel, &unreachable6), XDP_DROP, "no flow");
        assert_eq!(
            verdict(&kernel, &too_big),
            XDP_PASS,
            "packet too big is essential"
        );
        track(&mut kernel, &udp6, 0);
        assert_eq!(
            verdict(&kernel, &unreachable6),
            XDP_PASS,
            "v6 unreachable quoting the flow"
        );
    }

    #[test]
    fn essentials_pass_unless_switched_off() {
        let neighbour_solicitation = |kernel: &Kernel| {
            let frame = Frame::v6("fe80::1", "ff02::1:ff00:1", L4::Icmpv6).icmp_type(135);
            verdict(kernel, &frame.build())
        };
        assert_eq!(neighbour_solicitation(&deny_all("")), XDP_PASS);
        assert_eq!(
            neighbour_solicitation(&deny_all("essentials = false")),
            XDP_DROP
        );
        let echo6 = Frame::v6("fe80::1", "fd00::1", L4::Icmpv6)
            .icmp_type(128)
            .build();
        assert_eq!(
            verdict(&deny_all(""), &echo6),
            XDP_DROP,
            "echo is not essential"
        );
        assert_eq!(
            verdict(&deny_all(""), &arp_request()),
            XDP_PASS,
            "ARP always passes"
        );
    }

    /// The peer's FIN or RST, whatever its sequence number, leaves the flow on its long
    /// timeout (it could be an off-path sender's guess); the host's own FIN, seen by the
    /// egress program, switches it to the closing timeout. The reference evaluator agrees
    /// at every step, given the flows the kernel holds.
    #[test]
    fn only_the_hosts_fin_or_rst_starts_the_closing_timeout() {
        let text = "[defaults]\npolicy = \"deny\"\n[state]\ntcp_closing_timeout = 1\n";
        let set = parse_rules("t.toml", text).unwrap();
        let kernel = kernel_with(&set);
        let host_ack = Frame::v4(HOST, PEER, L4::Tcp { dport: 443 })
            .tcp_flags(TCP_ACK)
            .tcp_seq_ack(1000, 5000);
        let from_peer = |flags: u8, seq: u32| {
            Frame::v4(PEER, HOST, L4::Tcp { dport: SOURCE_PORT })
                .sport(443)
                .tcp_flags(flags)
                .tcp_seq_ack(seq, 1000)
                .build()
        };
        let data = from_peer(TCP_ACK, 5000);
        let Parsed::Ip(host_packet) = parse_frame(&host_ack.build()) else {
            panic!("not IP")
        };
        let key = outbound_flow(&host_packet).unwrap();
        let state_of = |kernel: &Kernel| {
            let flows = kernel.flows().unwrap();
            let (_, state) = flows.into_iter().find(|(k, _)| *k == key).expect("tracked");
            state
        };
        // The kernel's verdict on `frame`, checked against the reference's on the kernel's
        // flows.
        let judge = |kernel: &Kernel, frame: &[u8], what: &str| {
            let table = FlowTable {
                flows: kernel.flows().unwrap().into_iter().collect(),
                now_ns: monotonic_now_ns(),
                ..Default::default()
            };
            let got = verdict(kernel, frame);
            let reference = xdp_action(evaluate_with_flows(&set, frame, &table).verdict);
            assert_eq!(got, reference, "{what}: kernel and reference disagree");
            got
        };

        // The host sends `frame`: the egress program's flags must be the reference's.
        let mut modelled = FlowTable::default();
        let mut send = |kernel: &Kernel, frame: &[u8]| {
            assert_eq!(kernel.test_run_egress(frame).unwrap(), 0);
            let Parsed::Ip(packet) = parse_frame(frame) else {
                panic!("not IP")
            };
            modelled.record_outbound(&packet);
            assert_eq!(state_of(kernel).flags, modelled.flows[&key].flags);
            state_of(kernel).flags
        };

        assert_eq!(send(&kernel, &host_ack.build()), 0);
        assert_eq!(judge(&kernel, &data, "data"), XDP_PASS);
        // Off by a window and more from the host's last ACK (5000).
        let blind_rst = from_peer(TCP_RST, 0x9e37_79b9);
        let blind_fin = from_peer(TCP_FIN | TCP_ACK, 0x0bad_f00d);
        for (what, frame) in [("blind RST", &blind_rst), ("blind FIN", &blind_fin)] {
            // It passes (a reply's ports): the host's stack judges its sequence number.
            assert_eq!(judge(&kernel, frame, what), XDP_PASS, "{what}");
            assert_eq!(state_of(&kernel).flags, 0, "{what} started the closing");
        }
        std::thread::sleep(std::time::Duration::from_millis(1_500));
        assert_eq!(
            judge(&kernel, &data, "data 1.5 s after the blind RST"),
            XDP_PASS,
            "a blind RST cut the flow to the 1 s closing timeout"
        );

        let host_fin = host_ack.clone().tcp_flags(TCP_FIN | TCP_ACK).build();
        assert_eq!(send(&kernel, &host_fin), FLOW_CLOSING, "the host's FIN");
        let peer_fin = from_peer(TCP_FIN | TCP_ACK, 5000);
        assert_eq!(judge(&kernel, &peer_fin, "peer's FIN"), XDP_PASS);
        std::thread::sleep(std::time::Duration::from_millis(1_500));
        assert_eq!(
            judge(&kernel, &data, "data 1.5 s after the host's FIN"),
            XDP_DROP,
            "past the closing timeout"
        );
        // A new connection on the same ports (the host's SYN) ends the closing.
        let host_syn = host_ack.tcp_flags(TCP_SYN).build();
        assert_eq!(send(&kernel, &host_syn), 0, "the host's SYN reopens");
        assert_eq!(judge(&kernel, &data, "data after the SYN"), XDP_PASS);
    }

    #[test]
    fn stateless_mode_ignores_flows() {
        let mut kernel = deny_all("established = false");
        let out = Frame::v4(HOST, PEER, L4::Udp { dport: 53 }).build();
        let reply = Frame::v4(PEER, HOST, L4::Udp { dport: SOURCE_PORT })
            .sport(53)
            .build();
        track(&mut kernel, &out, 0);
        assert_eq!(verdict(&kernel, &reply), XDP_DROP);
    }
}

/// A blocklist set file referenced as `@set`: members are denied, everything else allowed,
/// in both families, also with 20,000 entries.
#[test]
fn blocklist_sets_from_files() {
    let dir = std::env::temp_dir().join(format!("fw-sets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut list = String::from("# generated blocklist\n2001:db8:bad::/48\n");
    for i in 0..20_000u32 {
        list += &format!("100.{}.{}.0/24\n", 64 + i / 256 % 64, i % 256);
    }
    std::fs::write(dir.join("block.netset"), list).unwrap();
    std::fs::write(
        dir.join("rules.toml"),
        "[sets.block]\nfiles = [\"block.netset\"]\ncidrs = [\"192.0.2.0/24\"]\n\n[[rules]]\naction = \"deny\"\nfrom = [\"@block\"]\n",
    )
    .unwrap();
    let set = firewall::rules::config::load_rules(&dir.join("rules.toml")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let mut kernel = Kernel::load().unwrap();
    kernel.apply(&compile(&set).unwrap()).unwrap();
    let cases = [
        ("192.0.2.9", XDP_DROP),
        ("100.64.0.1", XDP_DROP),
        ("100.127.255.200", XDP_DROP),
        ("100.128.0.1", XDP_PASS),
        ("198.51.100.1", XDP_PASS),
    ];
    for (src, want) in cases {
        assert_eq!(verdict(&kernel, &tcp4(src, 80).build()), want, "{src}");
    }
    assert_eq!(
        verdict(&kernel, &tcp6("2001:db8:bad::1", 80).build()),
        XDP_DROP
    );
    assert_eq!(
        verdict(&kernel, &tcp6("2001:db8:bad:1::1", 80).build()),
        XDP_DROP
    );
    assert_eq!(
        verdict(&kernel, &tcp6("2001:db8:bae::1", 80).build()),
        XDP_PASS
    );
    // 20,000 adjacent /24s merge into one /10 before they reach the kernel.
    let from = set.rules[0].from.as_ref().unwrap();
    assert_eq!(from.len(), 3, "{from:?}");
}

/// After a write into the idle generation failed half-way, the next apply clears that
/// generation first: nothing of the rule set it held two reloads ago survives.
#[test]
fn an_interrupted_write_leaves_nothing_behind() {
    let mut kernel = Kernel::load().unwrap();
    let rules = |text: &str| compile(&parse_rules("t.toml", text).unwrap()).unwrap();
    let deny_lan = rules(
        "[[rules]]\naction = \"deny\"\nfrom = [\"10.0.0.0/8\", \"10.1.2.3\"]\nports = [22]\n",
    );
    let allow_all = rules("");
    let deny_other = rules("[[rules]]\naction = \"deny\"\nfrom = [\"192.0.2.0/24\"]\n");
    let from_lan = tcp4("10.1.2.3", 22).build();
    kernel.apply(&deny_lan).unwrap(); // generation 1
    kernel.apply(&allow_all).unwrap(); // generation 0
    assert_eq!(verdict(&kernel, &from_lan), XDP_PASS);
    kernel.forget_idle_generation().unwrap(); // generation 1: contents unknown
    kernel.apply(&deny_other).unwrap(); // generation 1 again, cleared first
    assert_eq!(
        verdict(&kernel, &from_lan),
        XDP_PASS,
        "a trie or host entry of the old rule set survived"
    );
    assert_eq!(verdict(&kernel, &tcp4("192.0.2.9", 22).build()), XDP_DROP);
}

/// Frames of interfaces without a link header (tun, WireGuard, PPP, ipip) through the
/// L3 program: the same rules, the version nibble instead of an EtherType.
mod l3 {
    use super::*;
    use firewall::analysis::reference::{outbound_flow, parse_frame_on, Parsed};
    use firewall::dataplane::monotonic_now_ns;
    use firewall_common::{FlowState, STAT_ESTABLISHED};

    /// The kernel of the tests above, with the L3 programs loaded too.
    fn kernel() -> Kernel {
        let mut kernel = super::kernel();
        kernel.load_layer(LinkLayer::Ip).unwrap();
        kernel
    }

    fn kernel_with(set: &RuleSet) -> Kernel {
        let mut kernel = super::kernel_with(set);
        kernel.load_layer(LinkLayer::Ip).unwrap();
        kernel
    }

    fn verdict_l3(kernel: &Kernel, frame: &[u8]) -> u32 {
        kernel
            .test_run_on(LinkLayer::Ip, frame, 1)
            .expect("test run")
            .0
    }

    fn want(set: &RuleSet, frame: &[u8], flows: &FlowTable) -> (u32, Reason) {
        let decision = evaluate_layer(set, LinkLayer::Ip, frame, None, flows);
        (xdp_action(decision.verdict), decision.reason)
    }

    /// Like [`check`], through the L3 program; the reference evaluator must agree.
    fn check_l3(rows: &[(&str, Vec<u8>, u32)]) {
        let kernel = kernel();
        let set = rule_set();
        for (name, frame, expected) in rows {
            let got = verdict_l3(&kernel, frame);
            assert_eq!(got, *expected, "{name}: kernel gave XDP action {got}");
            let (reference, _) = want(&set, frame, &FlowTable::default());
            assert_eq!(reference, *expected, "{name}: the reference disagrees");
        }
    }

    #[test]
    fn ipv4_and_ipv6_by_protocol() {
        check_l3(&built(protocol_rows(), Frame::build_ip));
    }

    #[test]
    fn the_version_nibble_decides_and_anything_else_is_malformed() {
        let kernel = kernel();
        let before = kernel.counters().unwrap()[STAT_MALFORMED as usize].packets;
        let good = tcp4("10.1.2.3", 22).build_ip();
        let mut rows = Vec::new();
        for version in [0u8, 1, 5, 7, 15] {
            let mut frame = good.clone();
            frame[0] = version << 4 | 5;
            rows.push((format!("version {version}"), frame));
        }
        // An IPv6 header under a version-4 nibble, and the other way round.
        let mut v6_as_v4 = tcp6("2001:db8::1", 22).build_ip();
        v6_as_v4[0] = 0x45;
        rows.push(("v6 header, version 4".into(), v6_as_v4));
        let mut v4_as_v6 = good.clone();
        v4_as_v6[0] = 0x65;
        rows.push(("v4 header, version 6".into(), v4_as_v6));
        // What the Ethernet program would have read as a header: an ARP frame is no IP.
        rows.push(("arp bytes".into(), arp_request()));
        // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, so a frame too
        // short for a version nibble is the reference's alone.)
        assert_eq!(
            want(&rule_set(), &[], &FlowTable::default()),
            (XDP_DROP, Reason::Malformed)
        );
        let set = rule_set();
        for (name, frame) in &rows {
            assert_eq!(verdict_l3(&kernel, frame), XDP_DROP, "{name}");
            assert_eq!(
                want(&set, frame, &FlowTable::default()),
                (XDP_DROP, Reason::Malformed),
                "{name}"
            );
        }
        let after = kernel.counters().unwrap()[STAT_MALFORMED as usize].packets;
        assert_eq!(after - before, rows.len() as u64, "counted as malformed");
        // The Ethernet program reads the same bytes differently: an L3 SYN to a denied port
        // is not IP to it (the IP header's bytes 12-13 are no EtherType) and passes.
        let syn = tcp4("192.0.2.9", 23).build_ip();
        assert_eq!(verdict(&kernel, &syn), XDP_PASS);
        assert_eq!(verdict_l3(&kernel, &syn), XDP_DROP);
    }

    /// Every prefix of valid packets: cut headers are malformed, cut payload is not.
    #[test]
    fn every_truncation_is_handled() {
        check_truncations(LinkLayer::Ip);
    }

    #[test]
    fn bad_lengths_are_malformed() {
        check_l3(&built(bad_length_rows(), Frame::build_ip));
    }

    /// Replies to the host's flows and ICMP errors quoting them pass before the rules, as on
    /// Ethernet.
    #[test]
    fn connection_state() {
        let text = "[defaults]\npolicy = \"deny\"\n[state]\nudp_timeout = 5\n";
        let set = parse_rules("t.toml", text).unwrap();
        let mut kernel = kernel_with(&set);
        let (host, peer) = ("10.0.0.1", "198.51.100.7");
        let out = Frame::v4(host, peer, L4::Udp { dport: 53 }).build_ip();
        let reply = Frame::v4(peer, host, L4::Udp { dport: SOURCE_PORT })
            .sport(53)
            .build_ip();
        let unreachable = Frame::v4(peer, host, L4::Icmp)
            .icmp_type(3)
            .payload_data(&out)
            .build_ip();
        let out6 = Frame::v6("fd00::1", "2001:db8::7", L4::Tcp { dport: 443 }).build_ip();
        let reply6_frame = Frame::v6("2001:db8::7", "fd00::1", L4::Tcp { dport: SOURCE_PORT })
            .sport(443)
            .tcp_flags(TCP_ACK);
        let reply6 = reply6_frame.build_ip();
        let replies = [&reply, &unreachable, &reply6];
        for frame in replies {
            assert_eq!(verdict_l3(&kernel, frame), XDP_DROP, "no flow yet");
        }
        let now = monotonic_now_ns();
        let mut table = FlowTable {
            now_ns: now,
            ..Default::default()
        };
        for frame in [&out, &out6] {
            let Parsed::Ip(packet) = parse_frame_on(LinkLayer::Ip, frame) else {
                panic!("not IP")
            };
            let state = FlowState {
                last_seen_ns: now,
                flags: 0,
                _pad: 0,
            };
            table.flows.insert(outbound_flow(&packet).unwrap(), state);
        }
        let flows: Vec<_> = table.flows.iter().map(|(k, v)| (*k, *v)).collect();
        kernel.set_flows(&flows).unwrap();
        let before = kernel.counters().unwrap()[STAT_ESTABLISHED as usize].packets;
        for frame in replies {
            assert_eq!(
                verdict_l3(&kernel, frame),
                XDP_PASS,
                "reply to a tracked flow"
            );
            assert_eq!(want(&set, frame, &table), (XDP_PASS, Reason::Established));
        }
        let after = kernel.counters().unwrap()[STAT_ESTABLISHED as usize].packets;
        assert_eq!(after - before, 3);
        let syn6 = reply6_frame.tcp_flags(TCP_SYN).build_ip();
        assert_eq!(verdict_l3(&kernel, &syn6), XDP_DROP, "a SYN never replies");
    }
}

/// DHCP replies pass before the rules on an interface where the host sent a DHCP request in
/// the last minute. The test runs of both programs see the namespace's loopback as their
/// interface.
mod dhcp {
    use super::*;
    use firewall::dataplane::monotonic_now_ns;
    use firewall_common::STAT_DHCP;

    const TC_ACT_OK: u32 = 0;
    const SECOND: u64 = 1_000_000_000;

    fn deny_all(extra: &str) -> Kernel {
        let text = format!("[defaults]\npolicy = \"deny\"\n{extra}\n");
        kernel_with(&parse_rules("t.toml", &text).unwrap())
    }

    /// A UDP frame from `src`:`sport` to `dst`:`dport`.
    fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
        let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
        Frame::new(src, dst, L4::Udp { dport })
            .sport(sport)
            .payload(32)
            .build()
    }

    fn discover() -> Vec<u8> {
        udp("0.0.0.0", "255.255.255.255", 68, 67)
    }
    fn offer() -> Vec<u8> {
        udp("10.0.0.254", "10.0.0.77", 67, 68)
    }
    fn solicit() -> Vec<u8> {
        udp("fe80::1", "ff02::1:2", 546, 547)
    }
    fn advertise() -> Vec<u8> {
        udp("fe80::2", "fe80::1", 547, 546)
    }

    fn loopback_index() -> u32 {
        // SAFETY: a NUL-terminated string.
        unsafe { libc::if_nametoindex(c"lo".as_ptr()) }
    }

    /// The egress program records a request sent on the test run's interface, and then the
    /// replies pass, counted as DHCP; replies of the other family need their own request.
    #[test]
    fn replies_pass_after_the_hosts_request() {
        let mut kernel = deny_all("");
        kernel.set_dhcp_requests(&[]).unwrap();
        assert_eq!(verdict(&kernel, &offer()), XDP_DROP, "no request yet");
        assert_eq!(verdict(&kernel, &advertise()), XDP_DROP, "no request yet");
        let before = monotonic_now_ns();
        assert_eq!(kernel.test_run_egress(&discover()).unwrap(), TC_ACT_OK);
        let recorded = kernel.dhcp_requests().unwrap();
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        assert_eq!(recorded[0].0, loopback_index());
        assert!(recorded[0].1 >= before && recorded[0].1 <= monotonic_now_ns());
        let counted = |kernel: &Kernel| kernel.counters().unwrap()[STAT_DHCP as usize].packets;
        let dhcp_before = counted(&kernel);
        assert_eq!(verdict(&kernel, &offer()), XDP_PASS, "DHCPv4 offer");
        let broadcast_offer = udp("10.0.0.254", "255.255.255.255", 67, 68);
        assert_eq!(
            verdict(&kernel, &broadcast_offer),
            XDP_PASS,
            "broadcast offer"
        );
        assert_eq!(counted(&kernel) - dhcp_before, 2);
        // One interface table for both families: a DHCPv4 request opens DHCPv6 replies too,
        // but only replies: other UDP, other ports, TCP stay judged by the rules.
        let not_replies = [
            (
                "server port to another port",
                udp("10.0.0.254", "10.0.0.77", 67, 69),
            ),
            (
                "another port to the client port",
                udp("10.0.0.254", "10.0.0.77", 1067, 68),
            ),
            (
                "a request inbound",
                udp("10.0.0.254", "255.255.255.255", 68, 67),
            ),
            ("v6 ports in IPv4", udp("10.0.0.254", "10.0.0.77", 547, 546)),
            ("v4 ports in IPv6", udp("fe80::2", "fe80::1", 67, 68)),
            (
                "TCP to the client port",
                Frame::v4("10.0.0.254", "10.0.0.77", L4::Tcp { dport: 68 }).build(),
            ),
        ];
        for (name, frame) in &not_replies {
            assert_eq!(verdict(&kernel, frame), XDP_DROP, "{name}");
        }

        kernel.set_dhcp_requests(&[]).unwrap();
        assert_eq!(kernel.test_run_egress(&solicit()).unwrap(), TC_ACT_OK);
        assert_eq!(kernel.dhcp_requests().unwrap().len(), 1);
        assert_eq!(verdict(&kernel, &advertise()), XDP_PASS, "DHCPv6 advertise");
        // Outbound traffic that is no request records nothing.
        kernel.set_dhcp_requests(&[]).unwrap();
        for frame in [
            udp("10.0.0.77", "10.0.0.254", 68, 68),
            udp("10.0.0.77", "10.0.0.254", 1068, 67),
            udp("fe80::1", "ff02::1:2", 547, 546),
            offer(),
        ] {
            assert_eq!(kernel.test_run_egress(&frame).unwrap(), TC_ACT_OK);
        }
        assert_eq!(kernel.dhcp_requests().unwrap(), vec![]);
    }

    /// Without a recent request on the interface, or with the switch off, replies are judged
    /// by the rules (and the reference evaluator agrees).
    #[test]
    fn stale_foreign_or_switched_off_replies_are_judged_by_the_rules() {
        use firewall::analysis::reference::evaluate_on;
        // A machine up for less than the ages below (a test VM) waits.
        while monotonic_now_ns() < 70 * SECOND {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let lo = loopback_index();
        // Requests as (ifindex, age in seconds).
        let cases = [
            ("fresh", "", vec![(lo, 5)], XDP_PASS),
            ("55 s old", "", vec![(lo, 55)], XDP_PASS),
            ("65 s old", "", vec![(lo, 65)], XDP_DROP),
            ("other interface", "", vec![(lo + 4242, 0)], XDP_DROP),
            ("none", "", vec![], XDP_DROP),
            ("switched off", "dhcp = false", vec![(lo, 0)], XDP_DROP),
            (
                "switched off, a rule allows it",
                "dhcp = false\n[[rules]]\naction = \"allow\"\nproto = \"udp\"\nports = [68, 546]",
                vec![(lo, 0)],
                XDP_PASS,
            ),
        ];
        for (name, extra, ages, want) in cases {
            let mut kernel = deny_all(extra);
            let now = monotonic_now_ns();
            let requests: Vec<(u32, u64)> = ages
                .iter()
                .map(|&(index, age)| (index, now - age * SECOND))
                .collect();
            kernel.set_dhcp_requests(&requests).unwrap();
            let text = format!("[defaults]\npolicy = \"deny\"\n{extra}\n");
            let set = parse_rules("t.toml", &text).unwrap();
            let table = FlowTable {
                now_ns: now,
                dhcp_requests: requests
                    .iter()
                    .map(|&(index, sent)| {
                        let name = if index == lo { "lo" } else { "elsewhere" };
                        (name.to_string(), sent)
                    })
                    .collect(),
                ..Default::default()
            };
            for frame in [offer(), advertise()] {
                assert_eq!(verdict(&kernel, &frame), want, "{name}");
                let reference = xdp_action(evaluate_on(&set, &frame, Some("lo"), &table).verdict);
                assert_eq!(reference, want, "{name}: the reference disagrees");
            }
        }
    }

    /// Through the L3 program too (PPP and tun links get their addresses by DHCP less often,
    /// but the check is the same code).
    #[test]
    fn replies_on_l3_links() {
        use firewall::host::link::LinkLayer;
        let mut kernel = deny_all("");
        kernel.load_layer(LinkLayer::Ip).unwrap();
        kernel
            .set_dhcp_requests(&[(loopback_index(), monotonic_now_ns())])
            .unwrap();
        let offer = offer()[14..].to_vec();
        let run = |frame: &[u8]| kernel.test_run_on(LinkLayer::Ip, frame, 1).unwrap().0;
        assert_eq!(run(&offer), XDP_PASS);
        kernel.set_dhcp_requests(&[]).unwrap();
        let run = |frame: &[u8]| kernel.test_run_on(LinkLayer::Ip, frame, 1).unwrap().0;
        assert_eq!(run(&offer), XDP_DROP);
    }
}

/// The flow table filled to capacity, a quarter of it expired (closing TCP flows past the
/// closing timeout): the count that `stats`, the metrics and the daemon's check make finds
/// every entry and tells the live ones apart, and the daemon's alarm goes off. Prints how
/// long one count of the full table takes (it sets the daemon's check period).
#[test]
fn a_full_flow_table_is_counted() {
    use firewall::dataplane::monotonic_now_ns;
    use firewall::report::flows::FillAlarm;
    use firewall_common::proto::IPPROTO_TCP;
    use firewall_common::{FlowKey, FlowState, FLOW_CLOSING, MAX_FLOWS};

    const SECOND: u64 = 1_000_000_000;
    // Closing flows 20 s old are past the default 10 s closing timeout; flows cannot be older
    // than the machine.
    while monotonic_now_ns() < 30 * SECOND {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut kernel = kernel();
    let now = monotonic_now_ns();
    let table: Vec<(FlowKey, FlowState)> = (0..MAX_FLOWS)
        .map(|i| {
            let expired = i % 4 == 0;
            let key = FlowKey {
                remote: [
                    u32::from_be_bytes([198, 51, (i >> 16) as u8, (i >> 8) as u8]),
                    0,
                    0,
                    0,
                ],
                local: [u32::from_be_bytes([10, 0, 0, 1]), 0, 0, 0],
                remote_port: 443,
                local_port: i as u16,
                proto: IPPROTO_TCP,
                v6: 0,
                _pad: [0; 2],
            };
            let state = FlowState {
                last_seen_ns: if expired { now - 20 * SECOND } else { now },
                flags: if expired { FLOW_CLOSING } else { 0 },
                _pad: 0,
            };
            (key, state)
        })
        .collect();
    kernel.set_flows(&table).unwrap();
    let held = kernel.flows().unwrap();
    let held_live = held.iter().filter(|(_, state)| state.flags == 0).count() as u64;

    let started = std::time::Instant::now();
    let fill = kernel.flow_fill().unwrap();
    let took = started.elapsed();
    eprintln!(
        "flow table: {} entries, {} live of {}; one count took {took:?}",
        fill.entries, fill.live, fill.capacity
    );
    assert_eq!(fill.capacity, u64::from(MAX_FLOWS));
    assert_eq!(fill.entries, held.len() as u64);
    assert_eq!(fill.live, held_live);
    // An LRU map may evict a little before it is full (per-CPU free lists).
    assert!(
        fill.entries > u64::from(MAX_FLOWS) * 99 / 100,
        "only {} entries of {MAX_FLOWS} stayed",
        fill.entries
    );
    assert!(fill.live > u64::from(MAX_FLOWS) * 74 / 100);
    assert!(
        FillAlarm::default().check(&fill).is_none(),
        "75 % live is under the threshold"
    );

    // All live now: the alarm goes off.
    let live: Vec<_> = held
        .into_iter()
        .map(|(key, state)| {
            let fresh = FlowState {
                last_seen_ns: now,
                flags: 0,
                ..state
            };
            (key, fresh)
        })
        .collect();
    kernel.set_flows(&live).unwrap();
    let held = kernel.flows().unwrap().len() as u64;
    let fill = kernel.flow_fill().unwrap();
    assert_eq!((fill.entries, fill.live), (held, held));
    assert!(held > u64::from(MAX_FLOWS) * 99 / 100, "only {held} stayed");
    let warning = FillAlarm::default().check(&fill);
    assert!(warning.is_some(), "no warning at {fill:?}");
    eprintln!("{}", warning.unwrap());
}

/// Runtime bans (`firewall ban`): judged after the essentials and DHCP, before the
/// connection state and the rules.
mod bans {
    use super::*;
    use firewall::dataplane::monotonic_now_ns;
    use firewall_common::STAT_BANNED;
    use ipnet::IpNet;

    fn nets(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|text| text.parse().unwrap()).collect()
    }

    fn web(src: &str) -> Vec<u8> {
        if src.contains(':') {
            Frame::v6(src, "fd00::1", L4::Tcp { dport: 80 }).build()
        } else {
            Frame::v4(src, "10.0.0.1", L4::Tcp { dport: 80 }).build()
        }
    }

    fn banned_count(kernel: &Kernel) -> u64 {
        kernel.counters().unwrap()[STAT_BANNED as usize].packets
    }

    #[test]
    fn banned_hosts_and_prefixes_are_dropped_whatever_the_rules_say() {
        let mut kernel = kernel();
        let banned = [
            "203.0.113.9",
            "2001:db8:77::9",
            "198.51.100.44",
            "2001:db8:99::1",
        ];
        let spared = [
            "203.0.113.10",
            "2001:db8:77::8",
            "198.51.101.1",
            "2001:db8:98::1",
        ];
        for src in banned.iter().chain(&spared) {
            assert_eq!(
                verdict(&kernel, &web(src)),
                XDP_PASS,
                "{src} before any ban"
            );
        }
        let targets = nets(&[
            "203.0.113.9/32",
            "2001:db8:77::9/128",
            "198.51.100.0/24",
            "2001:db8:99::/48",
        ]);
        kernel.ban(&targets, 0).unwrap();
        for src in banned {
            assert_eq!(verdict(&kernel, &web(src)), XDP_DROP, "{src} banned");
        }
        for src in spared {
            assert_eq!(verdict(&kernel, &web(src)), XDP_PASS, "{src} not banned");
        }
        assert_eq!(banned_count(&kernel), 4);
        let mut listed: Vec<IpNet> = kernel.bans().unwrap().iter().map(|b| b.net).collect();
        listed.sort();
        let mut want = targets.clone();
        want.sort();
        assert_eq!(listed, want);

        // Unbanning takes exactly the nets named: a host inside a banned prefix is no ban.
        assert_eq!(kernel.unban(&nets(&["198.51.100.44/32"])).unwrap(), 0);
        assert_eq!(verdict(&kernel, &web("198.51.100.44")), XDP_DROP);
        assert_eq!(
            kernel
                .unban(&nets(&["203.0.113.9/32", "198.51.100.0/24"]))
                .unwrap(),
            2
        );
        assert_eq!(verdict(&kernel, &web("203.0.113.9")), XDP_PASS);
        assert_eq!(verdict(&kernel, &web("198.51.100.44")), XDP_PASS);
        assert_eq!(verdict(&kernel, &web("2001:db8:77::9")), XDP_DROP);
        kernel
            .unban(&nets(&["2001:db8:77::9/128", "2001:db8:99::/48"]))
            .unwrap();
        assert!(kernel.bans().unwrap().is_empty());
        assert_eq!(verdict(&kernel, &web("2001:db8:99::1")), XDP_PASS);
    }

    /// The kernel compares each ban's end with its clock: an ended ban drops nothing before
    /// the daemon's sweep deletes it, and a host whose own ban ended may still sit in a
    /// banned prefix.
    #[test]
    fn bans_end_by_themselves() {
        let mut kernel = kernel();
        let now = monotonic_now_ns();
        // Ended a second ago: the kernel's coarse clock lags this one by up to a tick.
        kernel
            .ban(&nets(&["203.0.113.9/32"]), now - 1_000_000_000)
            .unwrap();
        kernel
            .ban(&nets(&["2001:db8:77::9/128"]), now + 3_600_000_000_000)
            .unwrap();
        assert_eq!(verdict(&kernel, &web("203.0.113.9")), XDP_PASS, "ended");
        assert_eq!(
            verdict(&kernel, &web("2001:db8:77::9")),
            XDP_DROP,
            "an hour left"
        );
        kernel
            .ban(&nets(&["203.0.113.0/24"]), now + 3_600_000_000_000)
            .unwrap();
        assert_eq!(
            verdict(&kernel, &web("203.0.113.9")),
            XDP_DROP,
            "its own ban ended, its prefix's holds"
        );
        assert_eq!(kernel.sweep_bans(monotonic_now_ns()).unwrap(), 1);
        assert_eq!(kernel.bans().unwrap().len(), 2);
        // A ban of a second ends a second later, by the kernel's clock alone.
        kernel
            .ban(
                &nets(&["198.51.100.7/32"]),
                monotonic_now_ns() + 1_000_000_000,
            )
            .unwrap();
        assert_eq!(verdict(&kernel, &web("198.51.100.7")), XDP_DROP);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(verdict(&kernel, &web("198.51.100.7")), XDP_PASS);
    }

    /// A ban cuts the connections the source has with the host, as fail2ban's chain at the
    /// top of INPUT does; neighbour discovery from a banned address still passes.
    #[test]
    fn a_ban_cuts_established_flows_but_not_the_essentials() {
        let set = parse_rules("t.toml", "[defaults]\npolicy = \"deny\"\n").unwrap();
        let mut kernel = kernel_with(&set);
        let out = Frame::v4("10.0.0.1", "198.51.100.7", L4::Tcp { dport: 443 }).build();
        let reply = Frame::v4("198.51.100.7", "10.0.0.1", L4::Tcp { dport: SOURCE_PORT })
            .sport(443)
            .tcp_flags(TCP_ACK)
            .build();
        super::state::track(&mut kernel, &out, 0);
        assert_eq!(verdict(&kernel, &reply), XDP_PASS, "a reply before the ban");
        let solicitation = Frame::v6("fe80::7", "ff02::1:ff00:1", L4::Icmpv6)
            .icmp_type(135)
            .build();
        kernel
            .ban(&nets(&["198.51.100.7/32", "fe80::7/128"]), 0)
            .unwrap();
        assert_eq!(verdict(&kernel, &reply), XDP_DROP, "a reply after the ban");
        assert_eq!(
            verdict(&kernel, &solicitation),
            XDP_PASS,
            "essential ICMPv6"
        );
    }

    #[test]
    fn audit_mode_counts_banned_packets_and_passes_them() {
        let mut set = rule_set();
        set.audit = true;
        let mut kernel = kernel_with(&set);
        kernel.ban(&nets(&["203.0.113.9/32"]), 0).unwrap();
        assert_eq!(verdict(&kernel, &web("203.0.113.9")), XDP_PASS);
        assert_eq!(banned_count(&kernel), 1);
    }
}

/// Outbound rules: the tc egress program's verdicts (each checked against the reference
/// evaluator's, on the kernel's own flow table) and the flows both programs record.
mod outbound {
    use super::*;
    use firewall::analysis::reference::{accepted_flow, evaluate_egress, parse_frame, Parsed};
    use firewall::dataplane::monotonic_now_ns;
    use firewall_common::{
        FlowKey, FlowState, FLOW_ACCEPTED, MAX_RULES, STAT_ESTABLISHED, STAT_OUT_DEFAULT_DENY,
        STAT_OUT_ESTABLISHED,
    };

    const TC_ACT_OK: u32 = 0;
    const TC_ACT_SHOT: u32 = 2;
    const HOST: &str = "10.0.0.1";
    const PEER: &str = "198.51.100.7";
    const OTHER: &str = "203.0.113.9";
    /// Rule indices of fixtures/outbound.toml.
    const HTTPS_OUT: usize = 2;

    fn outbound_rules() -> RuleSet {
        parse_rules("outbound.toml", include_str!("fixtures/outbound.toml")).unwrap()
    }

    /// The host sends `frame`: the kernel's tc action, which must be the reference's given
    /// the flows the kernel holds; the kernel's flows afterwards must be the reference's too
    /// (timestamps aside).
    fn send(kernel: &Kernel, set: &RuleSet, frame: &[u8]) -> u32 {
        let mut flows = FlowTable {
            flows: kernel.flows().unwrap().into_iter().collect(),
            now_ns: monotonic_now_ns(),
            ..Default::default()
        };
        let expected = evaluate_egress(set, LinkLayer::Ethernet, frame, Some("lo"), &mut flows);
        let got = kernel.test_run_egress(frame).unwrap();
        let want = match expected.verdict {
            Verdict::Pass => TC_ACT_OK,
            Verdict::Drop => TC_ACT_SHOT,
        };
        assert_eq!(got, want, "kernel and reference ({expected:?}) disagree");
        let flags = |table: Vec<(FlowKey, FlowState)>| {
            let mut flags: Vec<_> = table.into_iter().map(|(k, s)| (k, s.flags)).collect();
            flags.sort_by_key(|(key, _)| format!("{key:?}"));
            flags
        };
        assert_eq!(
            flags(kernel.flows().unwrap()),
            flags(flows.flows.into_iter().collect()),
            "the flows the host's packet left"
        );
        got
    }

    fn key_of(frame: &[u8], key: fn(&Parsed) -> Option<FlowKey>) -> FlowKey {
        key(&parse_frame(frame)).expect("a flow")
    }

    fn accepted(parsed: &Parsed) -> Option<FlowKey> {
        match parsed {
            Parsed::Ip(packet) => accepted_flow(packet),
            _ => None,
        }
    }

    #[test]
    fn out_rules_then_the_outbound_default_judge_what_the_host_sends() {
        let set = outbound_rules();
        let kernel = kernel_with(&set);
        let tcp = |dst: &str, dport| Frame::v4(HOST, dst, L4::Tcp { dport }).build();
        let udp = |dport| Frame::v4(HOST, PEER, L4::Udp { dport }).build();
        let rows = [
            ("https to the allowed network", tcp(PEER, 443), TC_ACT_OK),
            ("another port", tcp(PEER, 8080), TC_ACT_SHOT),
            ("https elsewhere", tcp(OTHER, 443), TC_ACT_SHOT),
            ("an in rule's port (22)", tcp(PEER, 22), TC_ACT_SHOT),
            ("DNS, denied before the udp rule", udp(53), TC_ACT_SHOT),
            ("other UDP", udp(123), TC_ACT_OK),
            (
                "IPv6 https: the rule's `to` is IPv4 only",
                Frame::v6("fd00::1", "2001:db8::7", L4::Tcp { dport: 443 }).build(),
                TC_ACT_SHOT,
            ),
        ];
        for (name, frame, want) in &rows {
            assert_eq!(send(&kernel, &set, frame), *want, "{name}");
        }
        let counters = kernel.counters().unwrap();
        // Generation 0 or 1 holds the rules: their counters are the sum of both.
        let rule_hits = |rule: usize| counters[rule].packets + counters[MAX_RULES + rule].packets;
        assert_eq!(rule_hits(HTTPS_OUT), 1);
        assert_eq!(counters[STAT_OUT_DEFAULT_DENY as usize].packets, 4);
        // Out rules are not in rules: https arriving is denied by the inbound default.
        let inbound = Frame::v4(PEER, HOST, L4::Tcp { dport: 443 }).build();
        assert_eq!(verdict(&kernel, &inbound), XDP_DROP);
        assert_eq!(evaluate(&set, &inbound).reason, Reason::Default);
    }

    #[test]
    fn essentials_dhcp_requests_and_non_ip_pass_malformed_is_dropped() {
        let set = outbound_rules();
        let kernel = kernel_with(&set);
        let neighbour_solicitation = Frame::v6("fd00::1", "ff02::1:ff00:7", L4::Icmpv6)
            .icmp_type(135)
            .build();
        let discover = Frame::v4("0.0.0.0", "255.255.255.255", L4::Udp { dport: 67 })
            .sport(68)
            .build();
        let solicit = Frame::v6("fe80::1", "ff02::1:2", L4::Udp { dport: 547 })
            .sport(546)
            .build();
        let mut truncated = Frame::v4(HOST, PEER, L4::Tcp { dport: 443 }).build();
        truncated.truncate(40);
        let malformed_before = kernel.counters().unwrap()[STAT_MALFORMED as usize].packets;
        for (name, frame, want) in [
            ("neighbour solicitation", neighbour_solicitation, TC_ACT_OK),
            ("DHCPv4 discover", discover, TC_ACT_OK),
            ("DHCPv6 solicit", solicit, TC_ACT_OK),
            ("ARP", arp_request(), TC_ACT_OK),
            ("truncated TCP", truncated, TC_ACT_SHOT),
        ] {
            assert_eq!(send(&kernel, &set, &frame), want, "{name}");
        }
        assert_eq!(kernel.dhcp_requests().unwrap().len(), 1, "recorded as ever");
        let malformed = kernel.counters().unwrap()[STAT_MALFORMED as usize].packets;
        assert_eq!(malformed - malformed_before, 1);
    }

    #[test]
    fn the_hosts_own_flows_pass_while_alive() {
        let text = format!(
            "{}\n[state]\ntcp_timeout = 6\n",
            include_str!("fixtures/outbound.toml")
        );
        let set = parse_rules("t.toml", &text).unwrap();
        let mut kernel = kernel_with(&set);
        // Port 8080 of the peer: no out rule allows it, an earlier flow does.
        let out = Frame::v4(HOST, PEER, L4::Tcp { dport: 8080 })
            .tcp_flags(TCP_ACK)
            .build();
        assert_eq!(send(&kernel, &set, &out), TC_ACT_SHOT, "no flow");
        let key = super::state::track(&mut kernel, &out, 0);
        assert_eq!(send(&kernel, &set, &out), TC_ACT_OK, "a live flow");
        let counted = kernel.counters().unwrap()[STAT_OUT_ESTABLISHED as usize].packets;
        assert_eq!(counted, 1);
        super::state::track(&mut kernel, &out, 12);
        assert_eq!(send(&kernel, &set, &out), TC_ACT_SHOT, "expired");
        assert_eq!(kernel.flows().unwrap()[0].0, key);
    }

    #[test]
    fn replies_to_connections_the_rules_accepted_pass_out() {
        let set = outbound_rules();
        let kernel = kernel_with(&set);
        let syn = Frame::v4(PEER, HOST, L4::Tcp { dport: 22 })
            .sport(40000)
            .tcp_flags(TCP_SYN)
            .build();
        let syn_ack = Frame::v4(HOST, PEER, L4::Tcp { dport: 40000 })
            .sport(22)
            .tcp_flags(TCP_SYN | TCP_ACK)
            .build();
        let ack = Frame::v4(PEER, HOST, L4::Tcp { dport: 22 })
            .sport(40000)
            .tcp_flags(TCP_ACK)
            .build();
        assert_eq!(
            send(&kernel, &set, &syn_ack),
            TC_ACT_SHOT,
            "nothing accepted"
        );
        let denied = Frame::v4(PEER, HOST, L4::Tcp { dport: 23 })
            .sport(40000)
            .tcp_flags(TCP_SYN)
            .build();
        assert_eq!(verdict(&kernel, &denied), XDP_DROP);
        assert_eq!(
            kernel.flows().unwrap(),
            vec![],
            "a denied SYN records nothing"
        );

        assert_eq!(verdict(&kernel, &syn), XDP_PASS);
        let flows = kernel.flows().unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].0, key_of(&syn, accepted));
        assert_eq!(flows[0].1.flags, FLOW_ACCEPTED);
        // Accepted but unanswered: the peer's next packets are judged by the rules, not
        // passed as established.
        let established =
            |kernel: &Kernel| kernel.counters().unwrap()[STAT_ESTABLISHED as usize].packets;
        let before = established(&kernel);
        assert_eq!(verdict(&kernel, &ack), XDP_PASS);
        assert_eq!(established(&kernel), before);

        assert_eq!(send(&kernel, &set, &syn_ack), TC_ACT_OK, "the host's reply");
        assert_eq!(kernel.flows().unwrap()[0].1.flags, 0, "now the host's flow");
        assert_eq!(verdict(&kernel, &ack), XDP_PASS);
        assert_eq!(established(&kernel), before + 1, "and now established");
    }

    #[test]
    fn an_accepted_flow_does_not_count_inbound() {
        // A flow to port 5555, which the rules deny inbound: as the host's own it lets the
        // peer's packets in; merely accepted (which the rules would never have done) it
        // does not.
        let set = outbound_rules();
        let mut kernel = kernel_with(&set);
        let inbound = Frame::v4(PEER, HOST, L4::Tcp { dport: 5555 })
            .sport(40000)
            .tcp_flags(TCP_ACK)
            .build();
        let key = key_of(&inbound, accepted);
        for (flags, want) in [(0, XDP_PASS), (FLOW_ACCEPTED, XDP_DROP)] {
            let state = FlowState {
                last_seen_ns: monotonic_now_ns(),
                flags,
                _pad: 0,
            };
            kernel.set_flows(&[(key, state)]).unwrap();
            assert_eq!(verdict(&kernel, &inbound), want, "flags {flags}");
            let mut table = FlowTable {
                now_ns: monotonic_now_ns(),
                ..Default::default()
            };
            table.flows.insert(key, state);
            let reference = evaluate_layer(&set, LinkLayer::Ethernet, &inbound, None, &table);
            assert_eq!(
                xdp_action(reference.verdict),
                want,
                "reference, flags {flags}"
            );
        }
    }

    #[test]
    fn echo_replies_answer_allowed_pings_only() {
        let set = outbound_rules();
        let kernel = kernel_with(&set);
        let request = Frame::v4(PEER, HOST, L4::Icmp).build();
        let reply = Frame::v4(HOST, PEER, L4::Icmp).icmp_type(0).build();
        let reply_elsewhere = Frame::v4(HOST, OTHER, L4::Icmp).icmp_type(0).build();
        assert_eq!(send(&kernel, &set, &reply), TC_ACT_SHOT, "no ping yet");
        assert_eq!(verdict(&kernel, &request), XDP_PASS);
        assert_eq!(send(&kernel, &set, &reply), TC_ACT_OK, "answers the ping");
        assert_eq!(send(&kernel, &set, &reply), TC_ACT_OK, "and the next one");
        assert_eq!(send(&kernel, &set, &reply_elsewhere), TC_ACT_SHOT);
        // The entry stays an accepted one: the peer's echo replies are judged by the rules.
        let flows = kernel.flows().unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].1.flags, FLOW_ACCEPTED);
        let peer_reply = Frame::v4(PEER, HOST, L4::Icmp).icmp_type(0).build();
        assert_eq!(verdict(&kernel, &peer_reply), XDP_DROP);
    }

    #[test]
    fn without_outbound_filtering_egress_is_as_before() {
        // No out rule, outbound allowed: egress passes everything and records every flow;
        // XDP records no accepted connection.
        let set = rule_set();
        assert!(!set.filters_outbound());
        let kernel = kernel_with(&set);
        let syn = Frame::v4("10.1.1.1", "10.0.0.1", L4::Tcp { dport: 22 })
            .tcp_flags(TCP_SYN)
            .build();
        assert_eq!(verdict(&kernel, &syn), XDP_PASS);
        assert_eq!(kernel.flows().unwrap(), vec![]);
        let mut truncated = Frame::v4(HOST, PEER, L4::Tcp { dport: 443 }).build();
        truncated.truncate(40);
        let reply_to_nothing = Frame::v4(HOST, PEER, L4::Icmp).icmp_type(0).build();
        for frame in [
            Frame::v4(HOST, PEER, L4::Tcp { dport: 8080 }).build(),
            Frame::v4(HOST, PEER, L4::Udp { dport: 53 }).build(),
            reply_to_nothing,
            truncated,
        ] {
            assert_eq!(send(&kernel, &set, &frame), TC_ACT_OK);
        }
        assert_eq!(
            kernel.flows().unwrap().len(),
            2,
            "TCP and UDP, not the echo reply"
        );
        let counters = kernel.counters().unwrap();
        for slot in [STAT_OUT_DEFAULT_DENY, STAT_OUT_ESTABLISHED, STAT_MALFORMED] {
            assert_eq!(counters[slot as usize].packets, 0, "slot {slot}");
        }
    }
}
