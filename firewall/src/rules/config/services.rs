//! Port names in `ports` (`"ssh"`, `"https"`), looked up in `/etc/services` as it reads when
//! the rule file is loaded: the file is read at most once per load, and only if a rule names
//! a port.
use std::cell::OnceCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::rules::model::Proto;

/// Where service names are looked up.
pub const SERVICES_PATH: &str = "/etc/services";

/// Largest services file read (Debian's is 13 KB).
const MAX_SERVICES_BYTES: u64 = 4 << 20;

/// (name or alias, protocol as the file writes it) -> port.
type ServiceTable = HashMap<(String, String), u16>;

/// `/etc/services` (or a stand-in), read on first use.
pub struct Services {
    path: PathBuf,
    /// The table, or why the file could not be read.
    table: OnceCell<Result<ServiceTable, String>>,
}

impl Services {
    pub fn new(path: &Path) -> Services {
        Services {
            path: path.to_path_buf(),
            table: OnceCell::new(),
        }
    }

    /// The port of service `name` for a rule of protocol `proto` (only TCP and UDP have
    /// ports; a rule without a protocol means both, so the name must be known for both, with
    /// the same port). `Err` is the message for the name's position.
    pub fn port(&self, name: &str, proto: Proto) -> Result<u16, String> {
        let table = self
            .table
            .get_or_init(|| read_services(&self.path))
            .as_ref()
            .map_err(|error| {
                format!(
                    "cannot look up service name {name:?}: {}: {error}",
                    self.path.display()
                )
            })?;
        let find = |proto: &str| table.get(&(name.to_string(), proto.to_string())).copied();
        let (tcp, udp) = (find("tcp"), find("udp"));
        let path = self.path.display();
        let only = |known: &str| {
            format!(
                "service name {name:?} is {known} only in {path}: a rule without `proto` means tcp \
                 and udp; set proto = \"{known}\" or give the port number"
            )
        };
        match (proto, tcp, udp) {
            (_, None, None) => Err(format!("unknown service name {name:?} (not in {path})")),
            (Proto::Tcp, Some(port), _) | (Proto::Udp, _, Some(port)) => Ok(port),
            (Proto::Tcp, None, Some(_)) => Err(format!(
                "service name {name:?} is udp only in {path}, and this rule is tcp"
            )),
            (Proto::Udp, Some(_), None) => Err(format!(
                "service name {name:?} is tcp only in {path}, and this rule is udp"
            )),
            (_, Some(tcp), Some(udp)) if tcp == udp => Ok(tcp),
            (_, Some(tcp), Some(udp)) => Err(format!(
                "service name {name:?} is tcp port {tcp} but udp port {udp} in {path}: set \
                 `proto` or give the port number"
            )),
            (_, Some(_), None) => Err(only("tcp")),
            (_, None, Some(_)) => Err(only("udp")),
        }
    }
}

fn read_services(path: &Path) -> Result<ServiceTable, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|error| error.to_string())?;
    let mut text = String::new();
    file.take(MAX_SERVICES_BYTES)
        .read_to_string(&mut text)
        .map_err(|error| error.to_string())?;
    Ok(parse_services(&text))
}

/// `name port/proto [aliases...] [# comment]` lines; the first entry of a name and protocol
/// wins (as `getservbyname`); lines that do not parse are skipped.
pub fn parse_services(text: &str) -> ServiceTable {
    let mut table = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let (Some(name), Some(port_proto)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((port, proto)) = port_proto.split_once('/') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        for alias in std::iter::once(name).chain(fields) {
            table
                .entry((alias.to_string(), proto.to_string()))
                .or_insert(port);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = "\
# comment line
ssh\t\t22/tcp\t\t\t\t# SSH Remote Login Protocol
domain\t\t53/tcp
domain\t\t53/udp
http\t\t80/tcp\t\twww\t\t# WorldWideWeb HTTP
ntp\t\t123/udp
odd\t\t1000/tcp
odd\t\t1001/udp
ssh\t\t2222/tcp\t# a later entry does not win
broken\t\tnotaport/tcp
amqp\t\t5672/sctp
";

    fn services() -> (Services, PathBuf) {
        let path = std::env::temp_dir().join(format!("fw-services-{}", std::process::id()));
        std::fs::write(&path, FIXTURE).unwrap();
        (Services::new(&path), path)
    }

    #[test]
    fn names_resolve_for_the_rules_protocol() {
        let (services, path) = services();
        assert_eq!(services.port("ssh", Proto::Tcp), Ok(22));
        assert_eq!(services.port("www", Proto::Tcp), Ok(80));
        assert_eq!(services.port("domain", Proto::Udp), Ok(53));
        assert_eq!(services.port("domain", Proto::Any), Ok(53));
        assert_eq!(services.port("ntp", Proto::Udp), Ok(123));
        let error = |name, proto| services.port(name, proto).unwrap_err();
        assert!(error("ssh", Proto::Udp).contains("tcp only"));
        assert!(error("ntp", Proto::Tcp).contains("udp only"));
        assert!(error("ssh", Proto::Any).contains("set proto = \"tcp\""));
        assert!(error("odd", Proto::Any).contains("tcp port 1000 but udp port 1001"));
        assert!(error("amqp", Proto::Tcp).starts_with("unknown service name \"amqp\""));
        assert!(error("broken", Proto::Tcp).starts_with("unknown service name"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_missing_file_is_reported_at_the_first_name() {
        let services = Services::new(Path::new("/nonexistent/services"));
        let error = services.port("ssh", Proto::Tcp).unwrap_err();
        assert!(
            error.starts_with("cannot look up service name \"ssh\": /nonexistent/services:"),
            "{error}"
        );
    }

    /// The host's own file (Debian: netbase, which `cargo xtask test` installs).
    #[test]
    fn the_real_services_file_names_common_ports() {
        let services = Services::new(Path::new(SERVICES_PATH));
        assert_eq!(services.port("ssh", Proto::Tcp), Ok(22));
        assert_eq!(services.port("https", Proto::Tcp), Ok(443));
        assert_eq!(services.port("domain", Proto::Any), Ok(53));
        assert_eq!(services.port("ntp", Proto::Udp), Ok(123));
    }
}
