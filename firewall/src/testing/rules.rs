//! Rule files the unit tests share: one server's rules that `explain` and `exposure` are both
//! asked about.

/// A server behind default deny: a blocklist set, web from anywhere, SSH from two networks,
/// DNS on one address.
pub const SERVER: &str = r#"
[defaults]
policy = "deny"

[sets.bad]
cidrs = ["203.0.113.0/24"]

[[rules]]
name = "blocklist"
action = "deny"
from = ["@bad"]

[[rules]]
name = "web"
action = "allow"
proto = "tcp"
ports = [80, 443]

[[rules]]
name = "ssh"
action = "allow"
proto = "tcp"
ports = [22]
from = ["10.0.0.0/8", "198.51.100.0/24"]

[[rules]]
name = "dns"
action = "allow"
proto = "udp"
ports = [53]
to = ["192.0.2.53"]
"#;
