//! The `firewall` command: a host firewall on XDP.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use firewall::analysis::explain::{explain, Question};
use firewall::daemon::control::{self, Request};
use firewall::daemon::{self, RunOptions};
use firewall::dataplane::pins::{Pins, DEFAULT_PIN_DIR};
use firewall::rules::config::{load_rules, load_rules_trusting, summary};
use firewall::rules::files::Trust;
use firewall::rules::model::unit_seconds;

#[derive(Parser)]
#[command(
    version,
    about = "Host firewall on XDP: allow/deny rules from a TOML file"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the interfaces and filter until SIGINT/SIGTERM; SIGHUP reloads the rules.
    Run(RunOptions),
    /// Counters of the rules in force, per rule and per reason, from the pinned maps (with or
    /// without a running daemon).
    Stats {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach the pinned programs (left by `run --persist` or a daemon that died) and remove
    /// the pins.
    Detach {
        /// Only this interface (default: all).
        #[arg(long)]
        iface: Option<String>,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Ask the running daemon to reload its rule file; prints what it did or the error.
    Reload {
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Put a rule file in force in the running daemon; with --confirm, roll back to the rules
    /// from before unless `firewall confirm` arrives in time. Once in force for good, it is
    /// copied over the daemon's rule file.
    Apply {
        /// Rule file (TOML).
        file: PathBuf,
        /// Time to confirm in: `90s`, `5m` or seconds.
        #[arg(long, value_parser = parse_seconds)]
        confirm: Option<u64>,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Keep the rules put in force by `firewall apply --confirm`.
    Confirm {
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Validate a rule file and summarise what would be loaded.
    Check {
        /// Rule file (TOML).
        file: PathBuf,
    },
    /// The host's listening TCP and UDP sockets, and who the rules let reach each.
    Exposure {
        /// Rule file (TOML).
        #[arg(long)]
        rules: PathBuf,
    },
    /// Drop packets from these sources before the rules (also on connections they have),
    /// at once and without a reload, until the timeout or `firewall unban`. Kept over reloads
    /// and restarts. Without addresses, reads them from stdin (one or more per line).
    Ban {
        /// Addresses and CIDR prefixes (IPv4, IPv6).
        targets: Vec<String>,
        /// How long: `90s`, `30m`, `1h`, `7d` or seconds; default: until unbanned.
        #[arg(long, value_parser = parse_seconds)]
        timeout: Option<u64>,
        /// Ban even the address this SSH session comes from.
        #[arg(long)]
        force: bool,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Lift bans (exactly these addresses and prefixes); without any, reads them from stdin.
    Unban {
        targets: Vec<String>,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// The bans in force and the time each has left.
    Bans {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Which rule decides a packet, and why each rule before it does not match.
    Explain {
        /// Rule file (TOML); without it, the rules in force in the running daemon.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// The daemon's control socket, when there is no --rules.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
        /// tcp, udp, icmp, icmpv6 or an IP protocol number.
        #[arg(long)]
        proto: String,
        /// Source address.
        #[arg(long)]
        from: std::net::IpAddr,
        /// Destination address.
        #[arg(long)]
        to: std::net::IpAddr,
        /// Destination port (tcp, udp).
        #[arg(long)]
        port: Option<u16>,
        /// ICMP type (icmp, icmpv6): a name as nftables spells it (echo-request) or a number.
        #[arg(long)]
        icmp_type: Option<String>,
        /// Interface the packet arrives on.
        #[arg(long)]
        iface: Option<String>,
    },
}

/// `90s`, `5m`, `1h`, `2d` or plain seconds; at least one second.
fn parse_seconds(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    // Days, for bans; rule files stop at hours.
    let scale = if unit == "d" {
        Some(86_400)
    } else {
        unit_seconds(unit).map(u64::from)
    };
    let Some(scale) = scale else {
        return Err(format!(
            "{text:?}: use seconds, or a number with s, m, h or d"
        ));
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && n.checked_mul(scale).is_some_and(|s| s < 1 << 40) => Ok(n * scale),
        _ => Err(format!(
            "{text:?}: a positive number of seconds, minutes, hours or days"
        )),
    }
}

fn detach(pin_dir: &Path, iface: Option<&str>) -> anyhow::Result<()> {
    let pins = Pins::existing(pin_dir)?;
    let removed = pins.remove_links(iface)?;
    if removed.is_empty() {
        println!("nothing pinned for {}", iface.unwrap_or("any interface"));
    } else {
        println!("detached from {}", removed.join(", "));
    }
    if pins.remove_if_unused()? {
        println!("removed {}", pin_dir.display());
    }
    Ok(())
}

/// `firewall apply`'s request: checks the file here (its set files resolved from its own
/// directory), then sends its text: the daemon may not see this file system (a private /tmp).
fn apply_request(file: &Path, confirm: Option<u64>) -> anyhow::Result<Request> {
    let file = std::path::absolute(file)?;
    let (set, text) = load_rules_trusting(&file, Trust::Anyone)?;
    Ok(Request::Apply {
        name: file.display().to_string(),
        text,
        set_files: set.set_files,
        confirm_seconds: confirm,
    })
}

/// The targets of `ban`/`unban`, from the arguments or else stdin, checked here so that a bad
/// one changes nothing; `ban` refuses the SSH client it runs under unless forced.
fn ban_targets(targets: Vec<String>, banning: bool, force: bool) -> anyhow::Result<Vec<String>> {
    use firewall::daemon::bans::{parse_target, read_targets, ssh_client};
    let nets = if targets.is_empty() {
        read_targets(std::io::stdin().lock())?
    } else {
        targets
            .iter()
            .map(|text| parse_target(text).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    if nets.is_empty() {
        anyhow::bail!("no address or prefix given (as arguments or on stdin)");
    }
    if let Some(client) = ssh_client().filter(|_| banning && !force) {
        if let Some(net) = nets.iter().find(|net| net.contains(&client)) {
            anyhow::bail!(
                "{net} holds {client}, the address this SSH session comes from: banning it \
                 would cut this session (--force bans it anyway)"
            );
        }
    }
    Ok(nets.iter().map(ToString::to_string).collect())
}

/// Sends `request` to the daemon on `socket` and prints its answer.
fn ask(socket: &Path, request: Request) -> anyhow::Result<()> {
    control::send(socket, request).map(|message| println!("{message}"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { file } => load_rules(&file).map(|set| {
            print!("{}", summary(&set));
            for warning in firewall::rules::lint::warnings(&set) {
                eprintln!("warning: {}: {warning}", file.display());
            }
        }),
        Command::Explain {
            rules,
            control,
            proto,
            from,
            to,
            port,
            icmp_type,
            iface,
        } => {
            let question = Question {
                proto,
                from,
                to,
                port,
                icmp_type,
                iface,
            };
            match rules {
                Some(rules) => load_rules(&rules)
                    .and_then(|set| explain(&set, &question))
                    .map(|answer| print!("{answer}")),
                None => ask(&control, Request::Explain { question }),
            }
        }
        Command::Stats { pin_dir, json } => Pins::existing(&pin_dir)
            .and_then(|pins| firewall::report::stats::read(&pins))
            .and_then(|stats| {
                if json {
                    print!("{}", firewall::report::stats::json(&stats)?);
                } else {
                    print!("{}", firewall::report::stats::table(&stats));
                }
                Ok(())
            }),
        Command::Detach { iface, pin_dir } => detach(&pin_dir, iface.as_deref()),
        Command::Apply {
            file,
            confirm,
            control,
        } => apply_request(&file, confirm).and_then(|request| ask(&control, request)),
        Command::Confirm { control } => ask(&control, Request::Confirm),
        Command::Exposure { rules } => load_rules(&rules).map(|set| {
            let listeners = firewall::host::sockets::listening();
            print!("{}", firewall::analysis::exposure::report(&set, &listeners));
        }),
        Command::Reload { control } => ask(&control, Request::Reload),
        Command::Ban {
            targets,
            timeout,
            force,
            control,
        } => ban_targets(targets, true, force).and_then(|targets| {
            let request = Request::Ban {
                targets,
                timeout_seconds: timeout,
            };
            ask(&control, request)
        }),
        Command::Unban { targets, control } => ban_targets(targets, false, false)
            .and_then(|targets| ask(&control, Request::Unban { targets })),
        Command::Bans { json, control } => ask(&control, Request::Bans { json }),
        Command::Run(options) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(daemon::run(options))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
