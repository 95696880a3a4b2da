//! The control socket's protocol, both ends: the command line sends one request as a JSON
//! line, the daemon answers with one JSON line and closes the connection. Both carry
//! [`VERSION`], so a command line and a daemon of different releases say so instead of
//! misreading each other.
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::analysis::explain::Question;

/// Bumped whenever a request or response changes shape.
pub const VERSION: u32 = 2;

/// Default path of the control socket (in its own directory, so a hardened service can be
/// given write access to it alone).
pub const DEFAULT_SOCKET: &str = "/run/firewall/control.sock";

/// Largest request accepted (an applied rule file travels inside).
pub const MAX_REQUEST_BYTES: u64 = crate::rules::files::MAX_RULE_FILE_BYTES + 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Re-read the rule file.
    Reload,
    /// Put a rule file in force. Its text travels in the request, so the daemon never needs
    /// to see the caller's file system (a hardened service has a private /tmp).
    Apply {
        /// Where the caller read it, for messages.
        name: String,
        text: String,
        /// Its set files as the caller resolved them from the file's own directory: the daemon
        /// resolves them from its rule file's directory and refuses the file if they differ.
        set_files: Vec<PathBuf>,
        /// On trial for this long, then rolled back unless confirmed; `None`: for good.
        confirm_seconds: Option<u64>,
    },
    /// Keep the rules on trial.
    Confirm,
    /// Which rule of those in force decides this packet.
    Explain { question: Question },
    /// Drop these sources (addresses, CIDR prefixes) before the rules, for `timeout_seconds`
    /// or until unbanned.
    /// With `set`, add them to that dynamic set instead.
    Ban {
        targets: Vec<String>,
        timeout_seconds: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<String>,
    },
    /// Lift the bans of exactly these addresses and prefixes (with `set`: remove them from
    /// that dynamic set).
    Unban {
        targets: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<String>,
    },
    /// The bans in force (with `set`: that dynamic set's members), as a table or JSON.
    Bans {
        json: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<String>,
    },
    /// What the daemon holds, as [`crate::report::status::DaemonStatus`] JSON.
    Status,
}

/// A request on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct RequestLine {
    version: u32,
    #[serde(flatten)]
    request: Request,
}

/// The daemon's answer: what it did, or why not.
#[derive(Debug, Serialize, Deserialize)]
struct ResponseLine {
    version: u32,
    ok: bool,
    message: String,
}

/// Sends `request` to the daemon listening on `socket`; returns its message, or its error.
pub fn send(socket: &Path, request: Request) -> Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "no firewall daemon answers on {} (is it running?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(&RequestLine {
        version: VERSION,
        request,
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let response = decode_response(&reply)?;
    if response.ok {
        Ok(response.message)
    } else {
        bail!("{}", response.message)
    }
}

fn decode_response(reply: &str) -> Result<ResponseLine> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let reply = reply.trim_end();
    match serde_json::from_str::<Versioned>(reply) {
        Ok(Versioned { version }) if version == VERSION => {
            Ok(serde_json::from_str(reply).context("reading the daemon's answer")?)
        }
        Ok(Versioned { version }) => bail!(
            "the daemon speaks control protocol {version}, this command {VERSION}: use the \
             firewall command of the daemon's release"
        ),
        // Releases before the JSON protocol answered `ok: ...` / `error: ...`.
        Err(_) => bail!(
            "the daemon answered in an older control protocol ({reply:?}): use the firewall \
             command of the daemon's release, or restart the daemon"
        ),
    }
}

/// The daemon's side: decodes one request line; `Err` is the message to answer with.
pub fn decode_request(line: &str) -> Result<Request, String> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    match serde_json::from_str::<Versioned>(line) {
        Ok(Versioned { version }) if version == VERSION => {
            serde_json::from_str::<RequestLine>(line)
                .map(|line| line.request)
                .map_err(|error| format!("bad request: {error}"))
        }
        Ok(Versioned { version }) => Err(format!(
            "this daemon speaks control protocol {VERSION}, the command {version}: use the \
             firewall command of the daemon's release"
        )),
        Err(_) => Err(format!(
            "not a control request of protocol {VERSION} (an older firewall command?): {:?}",
            line.chars().take(80).collect::<String>()
        )),
    }
}

/// The daemon's side: the answer line for a request's outcome.
pub fn encode_response(outcome: &Result<String, String>) -> String {
    let (ok, message) = match outcome {
        Ok(message) => (true, message.clone()),
        Err(message) => (false, message.clone()),
    };
    let mut line = serde_json::to_string(&ResponseLine {
        version: VERSION,
        ok,
        message,
    })
    .expect("a response serialises");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::model::Direction;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Reload,
            Request::Confirm,
            Request::Apply {
                name: "/tmp/new.toml".into(),
                text: "[defaults]\npolicy = \"deny\"\n".into(),
                set_files: vec!["/etc/firewall/block.netset".into()],
                confirm_seconds: Some(60),
            },
            Request::Ban {
                targets: vec!["192.0.2.7".into(), "2001:db8::/32".into()],
                timeout_seconds: Some(3600),
                set: None,
            },
            Request::Ban {
                targets: vec!["192.0.2.8".into()],
                timeout_seconds: None,
                set: Some("ops".into()),
            },
            Request::Unban {
                targets: vec!["192.0.2.7".into()],
                set: None,
            },
            Request::Bans {
                json: true,
                set: Some("ops".into()),
            },
            Request::Status,
            Request::Explain {
                question: Question {
                    proto: "tcp".into(),
                    from: "2001:db8::1".parse().unwrap(),
                    to: "2001:db8::2".parse().unwrap(),
                    port: Some(22),
                    icmp_type: None,
                    iface: None,
                    direction: Direction::Out,
                },
            },
            Request::Explain {
                question: Question {
                    proto: "icmpv6".into(),
                    from: "2001:db8::1".parse().unwrap(),
                    to: "2001:db8::2".parse().unwrap(),
                    port: None,
                    icmp_type: Some("echo-request".into()),
                    iface: Some("eth0".into()),
                    direction: Direction::In,
                },
            },
        ];
        for request in requests {
            let line = serde_json::to_string(&RequestLine {
                version: VERSION,
                request: request.clone(),
            })
            .unwrap();
            assert_eq!(decode_request(&line), Ok(request));
        }
    }

    #[test]
    fn other_versions_are_named() {
        let newer = format!("{{\"version\":{},\"request\":\"reload\"}}", VERSION + 1);
        let error = decode_request(&newer).unwrap_err();
        assert!(error.contains(&format!("protocol {VERSION}, the command {}", VERSION + 1)));
        assert!(decode_request("reload")
            .unwrap_err()
            .contains("an older firewall command"));
        let error = decode_response("ok: reloaded").unwrap_err().to_string();
        assert!(error.contains("older control protocol"), "{error}");
        let reply = encode_response(&Err("no rules are on trial".into()));
        let response = decode_response(&reply).unwrap();
        assert!(!response.ok);
        assert_eq!(response.message, "no rules are on trial");
    }
}
