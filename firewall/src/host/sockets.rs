//! The host's open connections, read from /proc/net at start-up, so that a firewall started
//! under default deny does not cut the flows that already exist (a download in progress, an
//! idle SSH session whose peer speaks next). The kernel's tc program only learns flows from
//! packets the host sends after it is attached.
use std::fs;

use firewall_common::proto::{IPPROTO_TCP, IPPROTO_UDP};
use firewall_common::FlowKey;

const TCP_LISTEN: u8 = 0x0a;
const TCP_CLOSE: u8 = 0x07;

/// Flow keys (as replies look) of the connected TCP and UDP sockets of this network namespace.
pub fn open_flows() -> Vec<FlowKey> {
    socket_table(parse_line)
}

/// `parse` applied to every socket line of /proc/net/{tcp,tcp6,udp,udp6}, keeping the hits.
fn socket_table<T>(parse: impl Fn(&str, u8) -> Option<T>) -> Vec<T> {
    let mut found = Vec::new();
    for (file, proto) in [
        ("/proc/net/tcp", IPPROTO_TCP),
        ("/proc/net/tcp6", IPPROTO_TCP),
        ("/proc/net/udp", IPPROTO_UDP),
        ("/proc/net/udp6", IPPROTO_UDP),
    ] {
        let Ok(table) = fs::read_to_string(file) else {
            continue;
        };
        found.extend(table.lines().skip(1).filter_map(|line| parse(line, proto)));
    }
    found
}

/// A socket waiting for others: a listening TCP socket or an unconnected UDP one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub proto: u8,
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub inode: u64,
    /// `name[pid]` of a process holding it, where readable.
    pub process: Option<String>,
}

/// The listening sockets of this network namespace, IPv4 and IPv6, sorted.
pub fn listening() -> Vec<Listener> {
    let mut listeners = socket_table(parse_listener);
    let owners = socket_owners();
    for listener in &mut listeners {
        listener.process = owners.get(&listener.inode).cloned();
    }
    listeners.sort_by_key(|l| (l.proto, l.port, l.addr));
    listeners.dedup_by_key(|l| (l.proto, l.port, l.addr));
    listeners
}

fn parse_listener(line: &str, proto: u8) -> Option<Listener> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, port) = endpoint(fields.get(1)?)?;
    let (_, remote_port) = endpoint(fields.get(2)?)?;
    let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
    let waiting = match proto {
        IPPROTO_TCP => state == TCP_LISTEN,
        _ => remote_port == 0,
    };
    if !waiting {
        return None;
    }
    let addr = match unmap_v4(local) {
        Some(words) if fields[1].len() == 13 => firewall_common::words_address(&words, false),
        _ => firewall_common::words_address(&local, true),
    };
    Some(Listener {
        proto,
        addr,
        port,
        inode: fields.get(9)?.parse().ok()?,
        process: None,
    })
}

/// Socket inode -> `name[pid]`, from the fds of every process we can read.
fn socket_owners() -> std::collections::HashMap<u64, String> {
    let mut owners = std::collections::HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return owners;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let name = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse().ok())
            {
                owners
                    .entry(inode)
                    .or_insert_with(|| format!("{}[{pid}]", name.trim()));
            }
        }
    }
    owners
}

/// One socket line: `sl local rem st ...`, addresses as `HEX:PORT`.
fn parse_line(line: &str, proto: u8) -> Option<FlowKey> {
    let mut fields = line.split_whitespace().skip(1);
    let (local, local_port) = endpoint(fields.next()?)?;
    let (remote, remote_port) = endpoint(fields.next()?)?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    // Listening and unconnected sockets have no remote port.
    let unconnected = remote_port == 0;
    if unconnected || (proto == IPPROTO_TCP && matches!(state, TCP_LISTEN | TCP_CLOSE)) {
        return None;
    }
    let (local, remote, v6) = match (unmap_v4(local), unmap_v4(remote)) {
        (Some(local), Some(remote)) => (local, remote, false),
        _ => (local, remote, true),
    };
    Some(FlowKey {
        remote,
        local,
        remote_port,
        local_port,
        proto,
        v6: u8::from(v6),
        _pad: [0; 2],
    })
}

/// `0100007F:0016` (IPv4) or 32 hex digits (IPv6): each 8-digit group is a word as the
/// kernel stores it, which is the word layout of `FlowKey`.
fn endpoint(field: &str) -> Option<([u32; 4], u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut words = [0u32; 4];
    match addr.len() {
        8 => words[3] = u32::from_str_radix(addr, 16).ok()?,
        32 => {
            for (word, chunk) in words.iter_mut().zip(addr.as_bytes().chunks(8)) {
                *word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
            }
        }
        _ => return None,
    }
    // IPv4 lines were put in the last word so that the mapped-address check covers both.
    if addr.len() == 8 {
        words[2] = V4_MAPPED_MARK;
    }
    Some((words, port))
}

/// Word 2 of `::ffff:a.b.c.d` in the kernel's layout.
const V4_MAPPED_MARK: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// IPv4 (plain or IPv4-mapped IPv6) addresses in `FlowKey`'s IPv4 layout (word 0).
fn unmap_v4(words: [u32; 4]) -> Option<[u32; 4]> {
    (words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_MARK).then_some([words[3], 0, 0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    #[test]
    fn parses_connected_sockets_only() {
        let established = "   1: 0100000A:C001 0700000A:01BB 01 00000000:00000000 00:00000000 00000000     0        0 1 1";
        let key = parse_line(established, IPPROTO_TCP).unwrap();
        assert_eq!(key.local, v4([10, 0, 0, 1]));
        assert_eq!(key.remote, v4([10, 0, 0, 7]));
        assert_eq!((key.local_port, key.remote_port, key.v6), (0xc001, 443, 0));
        let listening = "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1";
        assert!(parse_line(listening, IPPROTO_TCP).is_none());
        let unconnected_udp = "  5: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2";
        assert!(parse_line(unconnected_udp, IPPROTO_UDP).is_none());
    }

    #[test]
    fn listeners_with_their_addresses() {
        let tcp = "   0: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1";
        let listener = parse_listener(tcp, IPPROTO_TCP).unwrap();
        assert_eq!(listener.addr.to_string(), "127.0.0.1");
        assert_eq!((listener.port, listener.inode), (631, 4242));
        let connected = "   1: 0100000A:C001 0700000A:01BB 01 00000000:00000000 00:00000000 00000000     0        0 7 1";
        assert!(parse_listener(connected, IPPROTO_TCP).is_none());
        let udp6 = "  9: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2";
        let listener = parse_listener(udp6, IPPROTO_UDP).unwrap();
        assert_eq!(
            (listener.addr.to_string(), listener.port),
            ("::".to_string(), 5353)
        );
    }

    #[test]
    fn ipv6_and_mapped_ipv4() {
        let v6 = "  0: 00000000000000000000000001000000:0016 B80D0120000000000000000007000000:D431 01 0 0 0 0 0 1";
        let key = parse_line(v6, IPPROTO_TCP).unwrap();
        assert_eq!(key.v6, 1);
        let local: std::net::Ipv6Addr = "::1".parse().unwrap();
        let expect: Vec<u32> = local
            .octets()
            .chunks(4)
            .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(key.local.to_vec(), expect);
        let mapped = "  0: 0000000000000000FFFF00000100000A:0016 0000000000000000FFFF00000700000A:D431 01 0 0 0 0 0 1";
        let key = parse_line(mapped, IPPROTO_TCP).unwrap();
        assert_eq!(
            (key.v6, key.local, key.remote),
            (0, v4([10, 0, 0, 1]), v4([10, 0, 0, 7]))
        );
    }
}
