//! Rule files: TOML text -> validated [`RuleSet`], with every mistake reported as
//! `FILE:LINE:COL: message` at the value that is wrong. The sections are checked one at a
//! time ([`validate`], sets in [`sets`]), their values by [`values`].
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::rules::files::{self, Trust, MAX_RULE_FILE_BYTES};
use crate::rules::model::{Action, Direction, DynamicUse, ListStyle, Position, RuleSet};

mod services;
mod sets;
mod validate;
mod values;

pub use services::SERVICES_PATH;
pub use sets::{parse_set_file, MAX_SET_FILE_ENTRIES};

/// A mistake in a rule file, with its 1-based position (column in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `FILE:LINE:COL: message`, or `FILE:LINE: message` for set files (column 0).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.col == 0 {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            let (file, line, col) = (&self.file, self.line, self.col);
            write!(f, "{file}:{line}:{col}: {}", self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    defaults: Option<validate::RawDefaults>,
    state: Option<validate::RawState>,
    log: Option<validate::RawLog>,
    limits: Option<validate::RawLimits>,
    sets: Option<std::collections::BTreeMap<String, Spanned<sets::RawSet>>>,
    rules: Option<Vec<Spanned<validate::RawRule>>>,
}

/// A message and the byte range it is about.
type Located = (Range<usize>, String);

/// Parses and validates a rule file's text; `file` only names it in messages, and set files
/// are looked up relative to the current directory.
pub fn parse_rules(file: &str, text: &str) -> Result<RuleSet, ConfigError> {
    parse_rules_in(file, text, Path::new("."))
}

/// Like [`parse_rules`], with set files relative to `dir`, read whoever wrote them.
pub fn parse_rules_in(file: &str, text: &str, dir: &Path) -> Result<RuleSet, ConfigError> {
    parse_rules_with(file, text, dir, Trust::Anyone)
}

/// Like [`parse_rules_in`], with set files read only if `trust` accepts them.
pub fn parse_rules_with(
    file: &str,
    text: &str,
    dir: &Path,
    trust: Trust,
) -> Result<RuleSet, ConfigError> {
    parse_rules_using(file, text, dir, trust, Path::new(SERVICES_PATH))
}

/// Like [`parse_rules_with`], with port names looked up in `services` (read once, and only if
/// a rule names a port) instead of `/etc/services`.
pub fn parse_rules_using(
    file: &str,
    text: &str,
    dir: &Path,
    trust: Trust,
    services: &Path,
) -> Result<RuleSet, ConfigError> {
    let located = |(span, message): Located| {
        let (line, col) = line_col(text, span.start);
        ConfigError {
            file: file.to_string(),
            line,
            col,
            message,
        }
    };
    let raw: RawFile = toml::from_str(text).map_err(|error| {
        let span = error.span().unwrap_or(0..0);
        located((span, readable(error.message())))
    })?;
    // Section by section, the first mistake reported; a section the file leaves out keeps
    // the defaults of `RuleSet::new`.
    let mut set = RuleSet::new(Action::Allow, Vec::new());
    let sets = sets::resolve_sets(
        raw.sets.unwrap_or_default(),
        dir,
        trust,
        &located,
        &mut set.set_files,
        &mut set.dynamic_sets,
    )?;
    validate::defaults(&mut set, raw.defaults).map_err(located)?;
    validate::timeouts(&mut set.timeouts, raw.state).map_err(located)?;
    let raw_rules = raw.rules.unwrap_or_default();
    let dynamic = validate::dynamic_names(&raw_rules, &set.dynamic_sets);
    let services = services::Services::new(services);
    let (rules, spans) = validate::rules(raw_rules, &sets, &services).map_err(located)?;
    set.dynamic_uses = dynamic
        .into_iter()
        .map(|(rule, to, sets)| {
            let field = if to {
                &rules[rule].to
            } else {
                &rules[rule].from
            };
            DynamicUse {
                rule,
                to,
                sets,
                fixed: field.clone().unwrap_or_default(),
            }
        })
        .collect();
    validate::limits(raw.limits, &rules, &spans).map_err(located)?;
    validate::log_rate(&mut set.log_rate, raw.log).map_err(located)?;
    set.rules = rules;
    set.rule_positions = spans
        .iter()
        .map(|span| {
            let (line, col) = line_col(text, span.start);
            Position { line, col }
        })
        .collect();
    Ok(set)
}

/// Default and hard cap of `[limits] max_entries`: distinct networks in all rules' `from`
/// and `to` after merging, which is what the kernel's address tries hold.
pub const DEFAULT_MAX_ENTRIES: i64 = 1_000_000;

/// Reads and parses a rule file, whoever wrote it and its set files.
pub fn load_rules(path: &Path) -> anyhow::Result<RuleSet> {
    load_rules_trusting(path, Trust::Anyone).map(|(set, _)| set)
}

/// Reads and parses a rule file and its set files if `trust` accepts them; also returns the
/// rule file's text as read.
pub fn load_rules_trusting(path: &Path, trust: Trust) -> anyhow::Result<(RuleSet, String)> {
    let text = files::read(path, MAX_RULE_FILE_BYTES, trust)
        .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let set = parse_rules_with(&path.display().to_string(), &text, dir, trust)?;
    Ok((set, text))
}

/// Makes serde's messages speak of keys rather than fields.
fn readable(message: &str) -> String {
    message
        .trim()
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
}

/// 1-based line and character column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

/// A short description of what a rule set would load, for `firewall check`: the settings,
/// then a line a rule.
pub fn summary(set: &RuleSet) -> String {
    let on_off = |on: bool| if on { "on" } else { "off" };
    let mut out = format!(
        "{} rules, default policy {}, outbound {}, established {}, essentials {}, dhcp {}{}\n",
        set.rules.len(),
        set.default_policy.name(),
        set.outbound_policy.name(),
        on_off(set.established),
        on_off(set.essentials),
        on_off(set.dhcp),
        if set.audit {
            ", audit mode (nothing is dropped)"
        } else {
            ""
        },
    );
    for (index, rule) in set.rules.iter().enumerate() {
        let text = rule.text(ListStyle::TABLE);
        let iface = match &rule.iface {
            Some(names) => format!(" on {}", names.join(",")),
            None => String::new(),
        };
        let limit = match &rule.limit {
            Some(limit) => format!(
                " limit {}/{} burst {}",
                limit.count,
                limit.unit(),
                limit.burst
            ),
            None => String::new(),
        };
        let types = match &text.icmp_types {
            Some(types) => format!(" types {types}"),
            None => String::new(),
        };
        let log = if rule.log { " log" } else { "" };
        let direction = match rule.direction {
            Direction::In => "",
            Direction::Out => " out",
        };
        let comment = match &rule.comment {
            Some(comment) => format!("  # {comment}"),
            None => String::new(),
        };
        out += &format!(
            "{:>4}  {:<20} {:<5} proto {:<6} from {} to {} ports {}{types}{iface}{limit}{log}{comment}\n",
            index + 1,
            rule.name,
            format!("{}{direction}", text.action),
            text.proto,
            text.from,
            text.to,
            text.ports,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::model::{Proto, MAX_COMMENT_CHARS};
    use firewall_common::MAX_RULES;

    fn error(text: &str) -> ConfigError {
        parse_rules("t.toml", text).expect_err("should be rejected")
    }

    #[test]
    fn bad_inputs_are_reported_at_their_position() {
        let cases: &[(&str, usize, usize, &str)] = &[
            ("polcy = 1\n", 1, 1, "unknown key `polcy`"),
            ("[defaults]\npolicy = \"drop\"\n", 2, 10, "invalid policy \"drop\""),
            ("[defaults]\nmood = \"x\"\n", 2, 1, "unknown key `mood`"),
            ("[[rules]]\naction = \"allow\"\nprot = \"tcp\"\n", 3, 1, "unknown key `prot`"),
            ("[[rules]]\nproto = \"tcp\"\n", 1, 1, "has no `action`"),
            ("[[rules]]\naction = \"permit\"\n", 2, 10, "invalid action \"permit\""),
            ("[[rules]]\naction = \"allow\"\nproto = \"sctp\"\n", 3, 9, "invalid proto \"sctp\""),
            ("[[rules]]\naction = \"allow\"\nfrom = \"10.0.0.0/8\"\n", 3, 8, "invalid type"),
            ("[[rules]]\naction = \"allow\"\nfrom = [10]\n", 3, 9, "invalid type"),
            ("[[rules]]\naction = \"allow\"\nfrom = [\"10.0.0.300\"]\n", 3, 9, "invalid address \"10.0.0.300\""),
            ("[[rules]]\naction = \"allow\"\nto = [\"10.0.0.0/33\"]\n", 3, 7, "prefix length 33 exceeds 32"),
            ("[[rules]]\naction = \"allow\"\nto = [\"2001:db8::/129\"]\n", 3, 7, "exceeds 128"),
            ("[[rules]]\naction = \"allow\"\nfrom = [\"10.0.0.1/8\"]\n", 3, 9, "did you mean 10.0.0.0/8?"),
            ("[[rules]]\naction = \"allow\"\nfrom = []\n", 3, 8, "empty address list"),
            ("[[rules]]\naction = \"allow\"\nports = []\n", 3, 9, "empty port list"),
            ("[[rules]]\naction = \"allow\"\nports = [0]\n", 3, 10, "port 0"),
            ("[[rules]]\naction = \"allow\"\nports = [22, 65536]\n", 3, 14, "out of range"),
            ("[[rules]]\naction = \"allow\"\nports = [-1]\n", 3, 10, "out of range"),
            ("[[rules]]\naction = \"allow\"\nports = [\"9000-8000\"]\n", 3, 10, "reversed port range"),
            ("[[rules]]\naction = \"allow\"\nports = [\"80-\"]\n", 3, 10, "invalid port range"),
            ("[[rules]]\naction = \"allow\"\nports = [8.5]\n", 3, 10, "invalid port 8.5"),
            ("[[rules]]\naction = \"allow\"\nports = [true]\n", 3, 10, "invalid port true"),
            ("[[rules]]\naction = \"allow\"\nproto = \"icmp\"\nports = [22]\n", 4, 9, "only apply to tcp and udp"),
            ("[[rules]]\naction = \"allow\"\nname = 7\n", 3, 8, "invalid type"),
            ("[[rules]]\naction = \"allow\"\ncomment = 7\n", 3, 11, "invalid type"),
            ("[[rules]]\naction = \"allow\"\ncomment = \"a\\nb\"\n", 3, 11, "comment must be one line"),
            ("[[rules]]\naction = \"allow\"\nicmp_types = [8]\n", 3, 14, "apply to rules with proto = \"icmp\""),
            ("[[rules]]\naction = \"allow\"\nproto = \"tcp\"\nicmp_types = [\"echo-request\"]\n", 4, 14, "apply to rules with proto"),
            ("[[rules]]\naction = \"allow\"\nproto = \"icmp\"\nicmp_types = []\n", 4, 14, "empty icmp type list"),
            ("[[rules]]\naction = \"allow\"\nproto = \"icmp\"\nicmp_types = [8, 256]\n", 4, 18, "icmp type 256 is out of range"),
            ("[[rules]]\naction = \"allow\"\nproto = \"icmp\"\nicmp_types = [\"echo\"]\n", 4, 15, "unknown icmp type \"echo\""),
            ("[[rules]]\naction = \"allow\"\nproto = \"icmp\"\nicmp_types = [\"nd-neighbor-solicit\"]\n", 4, 15, "is an icmpv6 type, and this rule is icmp"),
            ("[[rules]]\naction = \"allow\"\nproto = \"icmpv6\"\nicmp_types = [true]\n", 4, 15, "invalid icmpv6 type true"),
            ("[[rules]]\nname = \"a\"\naction = \"allow\"\n[[rules]]\nname = \"a\"\naction = \"deny\"\n", 5, 8, "duplicate rule name \"a\""),
            ("rules = 5\n", 1, 9, "invalid type"),
            ("[[rules]]\naction = \"allow\"\niface = []\n", 3, 9, "empty interface list"),
            ("[[rules]]\naction = \"allow\"\niface = [\"a very long name0\"]\n", 3, 10, "invalid interface name"),
            ("[defaults]\nestablished = \"yes\"\n", 2, 15, "invalid type"),
            ("[defaults]\ndhcp = \"on\"\n", 2, 8, "invalid type"),
            ("[defaults]\ndhcp = 1\n", 2, 8, "invalid type"),
            ("[defaults]\nmode = \"watch\"\n", 2, 8, "mode must be"),
            ("[defaults]\noutbound = \"drop\"\n", 2, 12, "invalid outbound \"drop\""),
            ("[[rules]]\naction = \"allow\"\ndirection = \"up\"\n", 3, 13, "invalid direction \"up\""),
            ("[[rules]]\naction = \"allow\"\ndirection = \"out\"\nlimit = \"5/s\"\n", 4, 9, "`limit` applies to inbound rules"),
            ("[[rules]]\naction = \"allow\"\nlimit = \"5/d\"\n", 3, 9, "invalid limit \"5/d\""),
            ("[[rules]]\naction = \"allow\"\nlimit = \"0/s\"\n", 3, 9, "invalid limit"),
            ("[[rules]]\naction = \"deny\"\nlimit = \"5/s\"\n", 3, 9, "applies to allow rules"),
            ("[[rules]]\naction = \"allow\"\nburst = 5\n", 3, 9, "`burst` needs a `limit`"),
            ("[[rules]]\naction = \"allow\"\nlimit = \"5/s\"\nburst = 0\n", 4, 9, "burst must be"),
            ("[log]\nlines_per_second = -1\n", 2, 20, "must be 0 to 10000"),
            ("[state]\nudp_timeout = 0\n", 2, 15, "timeout must be 1"),
            ("[state]\ntcp = 5\n", 2, 1, "unknown key `tcp`"),
            ("[[rules]\naction = \"allow\"\n", 1, 8, "invalid table header"),
            ("[[rules]]\naction = \"allow\nproto = \"tcp\"\n", 2, 16, "invalid basic string"),
            ("[[rules]]\n  name = \"é\"  ; action = \"allow\"\n", 2, 15, "expected newline"),
            // Sets and limits, read relative to an empty directory.
            ("[[rules]]\naction = \"deny\"\nfrom = [\"@nope\"]\n", 3, 9, "unknown set @nope"),
            ("[sets.s]\nfiles = [\"missing.txt\"]\n", 2, 10, "cannot read set file"),
            ("[sets.s]\ncidrs = [\"10.0.0.0/33\"]\n", 2, 10, "exceeds 32"),
            ("[sets.s]\ncidr = []\n", 2, 1, "unknown key `cidr`"),
            ("[sets.\"a b\"]\ncidrs = [\"10.0.0.0/8\"]\n", 1, 1, "invalid set name"),
            ("[sets.s]\ncidrs = []\n", 1, 1, "is empty"),
            ("[sets.s]\ndynamic = true\ncidrs = [\"10.0.0.0/8\"]\n", 1, 1, "is dynamic"),
            ("[limits]\nmax_entries = 0\n", 2, 15, "max_entries must be"),
            (
                "[limits]\nmax_entries = 2\n[[rules]]\naction = \"deny\"\nfrom = [\"10.0.0.1\", \"10.0.0.3\", \"10.0.0.5\"]\n",
                3,
                1,
                "past 2 address entries",
            ),
        ];
        let dir = std::env::temp_dir().join(format!("fw-config-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for &(text, line, col, message) in cases {
            let error = parse_rules_in("t.toml", text, &dir).expect_err("should be rejected");
            assert_eq!(
                (error.line, error.col),
                (line, col),
                "position of {error} for input {text:?}"
            );
            assert!(
                error.message.contains(message),
                "message {:?} lacks {message:?}",
                error.message
            );
            assert!(error
                .to_string()
                .starts_with(&format!("t.toml:{line}:{col}: ")));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A rule file and set files in a fresh directory.
    fn with_files(files: &[(&str, &str)], rules: &str) -> Result<RuleSet, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "fw-config-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let result = parse_rules_in("r.toml", rules, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::SeqCst)
    }

    fn nets(set: &RuleSet, rule: usize) -> Vec<String> {
        set.rules[rule]
            .from
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    #[test]
    fn set_files_that_are_not_regular_files_are_errors_not_hangs() {
        let rules =
            "[sets.s]\nfiles = [\"fifo\"]\n\n[[rules]]\naction = \"deny\"\nfrom = [\"@s\"]\n";
        let dir = std::env::temp_dir().join(format!("fw-config-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let error = parse_rules_in("r.toml", rules, &dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((error.line, error.col), (2, 10));
        assert!(
            error.message.ends_with("fifo: a FIFO, not a regular file"),
            "{error}"
        );
        // A device: /dev/zero would never end.
        let rules = rules.replace("fifo", "/dev/zero");
        let error = parse_rules_in("r.toml", &rules, Path::new("/")).unwrap_err();
        assert!(
            error.message.ends_with("a device, not a regular file"),
            "{error}"
        );
    }

    /// A dynamic set parses empty (its rules match none of it) and is filled in later,
    /// next to the field's other entries; filling again replaces the members.
    #[test]
    fn dynamic_sets_are_filled_in_next_to_fixed_entries() {
        let text = "[sets.ops]\ndynamic = true\n\n[[rules]]\naction = \"allow\"\n\
                    from = [\"@ops\", \"192.0.2.0/24\"]\n\n[[rules]]\naction = \"deny\"\n";
        let mut set = parse_rules("t.toml", text).unwrap();
        assert_eq!(set.dynamic_sets, vec!["ops".to_string()]);
        assert_eq!(nets(&set, 0), vec!["192.0.2.0/24"]);
        let members = |list: &'static [&'static str]| {
            move |name: &str| -> Vec<ipnet::IpNet> {
                assert_eq!(name, "ops");
                list.iter().map(|net| net.parse().unwrap()).collect()
            }
        };
        set.fill_dynamic(members(&["198.51.100.7/32"]));
        assert_eq!(nets(&set, 0), vec!["192.0.2.0/24", "198.51.100.7/32"]);
        set.fill_dynamic(members(&["203.0.113.0/24"]));
        assert_eq!(nets(&set, 0), vec!["192.0.2.0/24", "203.0.113.0/24"]);
        // A field naming only an empty dynamic set matches nothing (not everything).
        let only = parse_rules(
            "t.toml",
            "[sets.ops]\ndynamic = true\n\n[[rules]]\naction = \"allow\"\nfrom = [\"@ops\"]\n",
        )
        .unwrap();
        assert_eq!(only.rules[0].from, Some(vec![]));
    }

    #[test]
    fn sets_from_inline_lists_and_files_are_merged() {
        let set = with_files(
            &[
                (
                    "drop.netset",
                    "# FireHOL style\n10.0.0.0/25\n\n10.0.0.128/25  # adjacent\n192.0.2.7\n",
                ),
                ("more.txt", "10.0.0.5\n2001:db8::/32\n2001:db8:1::/48\n"),
            ],
            r#"
            [sets.bad]
            cidrs = ["198.51.100.0/24", "198.51.100.0/25"]
            files = ["drop.netset", "more.txt"]

            [[rules]]
            action = "deny"
            from = ["@bad", "203.0.113.1"]

            [[rules]]
            action = "deny"
            to = ["@bad"]
            "#,
        )
        .unwrap();
        assert_eq!(
            nets(&set, 0),
            [
                "10.0.0.0/24",
                "192.0.2.7/32",
                "198.51.100.0/24",
                "203.0.113.1/32",
                "2001:db8::/32"
            ]
        );
        assert_eq!(set.rules[1].to.as_ref().unwrap().len(), 4);
    }

    #[test]
    fn set_mistakes_are_reported() {
        let error = with_files(
            &[("l.txt", "10.0.0.0/8\n# ok\n10.0.0.1/8\n")],
            "[sets.s]\nfiles = [\"l.txt\"]\n",
        )
        .unwrap_err();
        assert!(error.file.ends_with("l.txt"));
        assert_eq!((error.line, error.col), (3, 0));
        assert!(
            error.to_string().contains("l.txt:3: host bits set"),
            "{error}"
        );
    }

    #[test]
    fn too_many_rules_are_rejected() {
        let text = "[[rules]]\naction = \"allow\"\n".repeat(MAX_RULES + 1);
        let error = error(&text);
        assert_eq!(error.line, 2 * MAX_RULES + 1);
        assert!(error.message.contains("too many rules"));
    }

    #[test]
    fn a_full_rule_parses() {
        let set = parse_rules(
            "t.toml",
            r#"
            [defaults]
            policy = "deny"

            [[rules]]
            name = "ssh-from-lan"
            action = "allow"
            proto = "tcp"
            from = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
            to = ["198.51.100.0/24"]
            ports = [22, "8000-8100", "443"]
            iface = ["eth0", "wg0"]

            [[rules]]
            action = "deny"
            "#,
        )
        .unwrap();
        assert_eq!(set.default_policy, Action::Deny);
        let rule = &set.rules[0];
        assert_eq!(rule.name, "ssh-from-lan");
        assert_eq!((rule.action, rule.proto), (Action::Allow, Proto::Tcp));
        let from: Vec<String> = rule
            .from
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect();
        // Merged lists come out sorted, IPv4 first.
        assert_eq!(from, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        assert_eq!(rule.ports, Some(vec![22..=22, 8000..=8100, 443..=443]));
        assert_eq!(
            rule.iface,
            Some(vec!["eth0".to_string(), "wg0".to_string()])
        );
        let second = &set.rules[1];
        assert_eq!(second.name, "rule 2");
        assert_eq!(
            (second.proto, &second.from, &second.ports),
            (Proto::Any, &None, &None)
        );
        assert_eq!(
            (rule.direction, second.direction),
            (Direction::In, Direction::In)
        );
        assert_eq!(set.outbound_policy, Action::Allow);
        assert!(!set.filters_outbound());
    }

    #[test]
    fn out_rules_and_the_outbound_default_parse() {
        let text = "[defaults]\noutbound = \"deny\"\n[[rules]]\naction = \"allow\"\n\
                    direction = \"out\"\nproto = \"tcp\"\nports = [443]\n";
        let set = parse_rules("t.toml", text).unwrap();
        assert_eq!(set.outbound_policy, Action::Deny);
        assert_eq!(set.rules[0].direction, Direction::Out);
        assert!(set.filters_outbound());
        assert!(summary(&set).contains("outbound deny"));
        assert!(summary(&set).contains("allow out"));
        // An out rule alone turns outbound filtering on (with the outbound default allow).
        let one_rule = text.replace("outbound = \"deny\"", "");
        assert!(parse_rules("t.toml", &one_rule).unwrap().filters_outbound());
    }

    /// Rules naming ports, parsed against a services file of the test's own.
    fn with_services(rules: &str) -> Result<RuleSet, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "fw-config-services-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let services = dir.join("services");
        std::fs::write(
            &services,
            "ssh 22/tcp\nhttps 443/tcp\nhttps 443/udp\nntp 123/udp\nhttp 80/tcp www\n",
        )
        .unwrap();
        let result = parse_rules_using("r.toml", rules, &dir, Trust::Anyone, &services);
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    #[test]
    fn port_names_are_looked_up_for_the_rules_protocol() {
        let set = with_services(
            "[[rules]]\naction = \"allow\"\nproto = \"tcp\"\nports = [\"ssh\", \"www\", 8080, \"9000-9001\"]\n\
             [[rules]]\naction = \"allow\"\nports = [\"https\"]\n\
             [[rules]]\naction = \"allow\"\nproto = \"udp\"\nports = [\" ntp \"]\n",
        )
        .unwrap();
        assert_eq!(
            set.rules[0].ports,
            Some(vec![22..=22, 80..=80, 8080..=8080, 9000..=9001])
        );
        assert_eq!(set.rules[1].ports, Some(vec![443..=443]));
        assert_eq!(set.rules[2].ports, Some(vec![123..=123]));

        let cases: &[(&str, usize, usize, &str)] = &[
            (
                "[[rules]]\naction = \"allow\"\nproto = \"tcp\"\nports = [22, \"foo\"]\n",
                4,
                14,
                "unknown service name \"foo\" (not in ",
            ),
            (
                "[[rules]]\naction = \"allow\"\nproto = \"udp\"\nports = [\"ssh\"]\n",
                4,
                10,
                "\"ssh\" is tcp only",
            ),
            (
                "[[rules]]\naction = \"allow\"\nports = [\"ssh\"]\n",
                3,
                10,
                "set proto = \"tcp\"",
            ),
            (
                "[[rules]]\naction = \"allow\"\nproto = \"tcp\"\nports = [\"ssh-https\"]\n",
                4,
                10,
                "unknown service name \"ssh-https\"",
            ),
        ];
        for &(text, line, col, message) in cases {
            let error = with_services(text).expect_err(text);
            assert_eq!((error.line, error.col), (line, col), "{error}");
            assert!(error.message.contains(message), "{error}");
        }
    }

    #[test]
    fn port_names_come_from_etc_services_by_default() {
        let set = parse_rules(
            "t.toml",
            "[[rules]]\naction = \"allow\"\nproto = \"tcp\"\nports = [\"ssh\", \"https\"]\n",
        )
        .unwrap();
        assert_eq!(set.rules[0].ports, Some(vec![22..=22, 443..=443]));
        let error = error(
            "[[rules]]\naction = \"allow\"\nproto = \"tcp\"\nports = [\"no-such-service\"]\n",
        );
        assert_eq!(
            error.to_string(),
            "t.toml:4:10: unknown service name \"no-such-service\" (not in /etc/services)"
        );
    }

    #[test]
    fn icmp_types_take_nftables_names_and_numbers() {
        let set = parse_rules(
            "t.toml",
            r#"
            [[rules]]
            action = "allow"
            proto = "icmp"
            icmp_types = ["echo-request", "destination-unreachable", 3, 200]

            [[rules]]
            action = "allow"
            proto = "icmpv6"
            icmp_types = ["nd-neighbor-solicit", "echo-request", "mld-listener-reduction"]
            "#,
        )
        .unwrap();
        assert_eq!(set.rules[0].icmp_types, Some(vec![3, 8, 200]));
        assert_eq!(set.rules[1].icmp_types, Some(vec![128, 132, 135]));
        assert_eq!(set.rules[0].ports, None);
        let summary = summary(&set);
        assert!(
            summary.contains("types destination-unreachable,echo-request,200"),
            "{summary}"
        );
        assert!(
            summary.contains("types echo-request,mld-listener-done,nd-neighbor-solicit"),
            "{summary}"
        );
    }

    #[test]
    fn comments_are_kept_shown_and_limited() {
        let set = parse_rules(
            "t.toml",
            "[[rules]]\nname = \"ssh\"\naction = \"allow\"\ncomment = \"admins only — ticket 42\"\n\
             [[rules]]\naction = \"deny\"\n",
        )
        .unwrap();
        assert_eq!(
            set.rules[0].comment.as_deref(),
            Some("admins only — ticket 42")
        );
        assert_eq!(set.rules[1].comment, None);
        let summary = summary(&set);
        let line = summary.lines().nth(1).unwrap();
        assert!(line.ends_with("  # admins only — ticket 42"), "{summary}");
        // The limit counts characters, not bytes.
        let longest = "é".repeat(MAX_COMMENT_CHARS);
        let text = format!("[[rules]]\naction = \"allow\"\ncomment = \"{longest}\"\n");
        assert!(parse_rules("t.toml", &text).is_ok());
        let text = format!("[[rules]]\naction = \"allow\"\ncomment = \"{longest}x\"\n");
        let error = error(&text);
        assert_eq!((error.line, error.col), (3, 11));
        assert_eq!(
            error.message,
            format!("comment is 257 characters long; at most {MAX_COMMENT_CHARS}")
        );
    }

    #[test]
    fn an_empty_file_allows_everything() {
        let set = parse_rules("t.toml", "").unwrap();
        assert_eq!(set.default_policy, Action::Allow);
        assert!(set.rules.is_empty());
    }

    #[test]
    fn the_example_rule_files_parse_and_compile() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../rules");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let set = load_rules(&path).unwrap_or_else(|e| panic!("{e:#}"));
                crate::rules::compile::compile(&set)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                checked += 1;
            }
        }
        assert!(checked >= 4);
    }
}
