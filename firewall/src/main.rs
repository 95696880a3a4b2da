//! The `firewall` command: a host firewall on XDP.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use firewall::analysis::explain::{explain, Question};
use firewall::daemon::control::{self, Request};
use firewall::daemon::{self, RunOptions};
use firewall::dataplane::pins::{Pins, DEFAULT_PIN_DIR};
use firewall::dataplane::AttachMode;
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
    Run {
        /// Rule file (TOML).
        #[arg(long)]
        rules: PathBuf,
        /// Interface to filter: a name (waited for if absent), a pattern (`en*`, `wg?`) or
        /// `all` (every interface but lo, also those that appear later); repeat for several.
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// XDP attach mode: auto tries native, then skb (generic).
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: AttachMode,
        /// Control socket for `firewall reload`.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
        /// Accept rule and set files not owned by root or writable by group or others.
        #[arg(long)]
        insecure_files: bool,
        /// bpffs directory where programs' links and maps are pinned (bpffs is mounted on its
        /// parent if needed).
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// On SIGTERM/SIGINT, leave the programs filtering with the rules in force (for
        /// restarts and upgrades without a gap); `firewall detach` removes them.
        #[arg(long)]
        persist: bool,
        /// Audit mode: classify, count and log as usual, drop nothing (overrides the rule
        /// file's `[defaults] mode`).
        #[arg(long)]
        audit: bool,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9469); off by default.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
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
        /// Interface the packet arrives on.
        #[arg(long)]
        iface: Option<String>,
    },
}

/// `90s`, `5m`, `1h` or plain seconds; at least one second.
fn parse_seconds(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let Some(scale) = unit_seconds(unit) else {
        return Err(format!("{text:?}: use seconds, or a number with s, m or h"));
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n * u64::from(scale)),
        _ => Err(format!(
            "{text:?}: a positive number of seconds, minutes or hours"
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

/// `firewall apply`: checks the file here (its set files resolved from its own directory),
/// then sends its text: the daemon may not see this file system (a private /tmp).
fn apply(file: &Path, confirm: Option<u64>, socket: &Path) -> anyhow::Result<String> {
    let file = std::path::absolute(file)?;
    let (set, text) = load_rules_trusting(&file, Trust::Anyone)?;
    control::send(
        socket,
        Request::Apply {
            name: file.display().to_string(),
            text,
            set_files: set.set_files,
            confirm_seconds: confirm,
        },
    )
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
            iface,
        } => {
            let question = Question {
                proto,
                from,
                to,
                port,
                iface,
            };
            match rules {
                Some(rules) => load_rules(&rules).and_then(|set| explain(&set, &question)),
                None => control::send(&control, Request::Explain { question })
                    .map(|answer| answer + "\n"),
            }
            .map(|answer| print!("{answer}"))
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
        } => apply(&file, confirm, &control).map(|message| println!("{message}")),
        Command::Confirm { control } => {
            control::send(&control, Request::Confirm).map(|message| println!("{message}"))
        }
        Command::Exposure { rules } => load_rules(&rules).map(|set| {
            let listeners = firewall::host::sockets::listening();
            print!("{}", firewall::analysis::exposure::report(&set, &listeners));
        }),
        Command::Reload { control } => {
            control::send(&control, Request::Reload).map(|message| println!("{message}"))
        }
        Command::Run {
            rules,
            ifaces,
            xdp_mode,
            control,
            insecure_files,
            pin_dir,
            persist,
            audit,
            metrics,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                runtime.block_on(daemon::run(RunOptions {
                    rules,
                    ifaces,
                    mode: xdp_mode,
                    control,
                    insecure_files,
                    pin_dir,
                    persist,
                    audit,
                    metrics,
                }))
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
