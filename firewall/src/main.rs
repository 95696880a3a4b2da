//! The `firewall` command: a host firewall on XDP.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use firewall::analysis::explain::{explain, Question};
use firewall::daemon::control::{self, Request};
use firewall::daemon::{self, RunOptions};
use firewall::dataplane::pins::{Pins, DEFAULT_PIN_DIR};
use firewall::rules::config::{load_rules, load_rules_trusting, summary};
use firewall::rules::files::Trust;
use firewall::rules::model::{unit_seconds, Direction};

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
    /// What is in force: the daemon (pid, uptime, interfaces and how XDP runs there, rule
    /// file, a trial), the default policies, the rules with their counters, bans and flows.
    /// Without a daemon, says so and shows what the pins still hold.
    Status {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
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
    /// Validate a rule file and summarise what would be loaded; warn about rules that can
    /// never match and about a default deny that shuts out SSH.
    Check {
        /// Rule file (TOML); the same as --rules.
        #[arg(conflicts_with = "rules")]
        file: Option<PathBuf>,
        /// Rule file (TOML).
        #[arg(long, default_value = daemon::DEFAULT_RULES)]
        rules: PathBuf,
        /// Exit non-zero when there is any warning (for CI).
        #[arg(long)]
        strict: bool,
    },
    /// The host's listening TCP and UDP sockets, and who the rules let reach each.
    Exposure {
        /// Rule file (TOML).
        #[arg(long, default_value = daemon::DEFAULT_RULES)]
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
        /// Add them to this dynamic set (`[sets.NAME] dynamic = true`) instead of banning.
        #[arg(long)]
        set: Option<String>,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Lift bans (exactly these addresses and prefixes); without any, reads them from stdin.
    Unban {
        targets: Vec<String>,
        /// Remove them from this dynamic set instead.
        #[arg(long)]
        set: Option<String>,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// The bans in force and the time each has left.
    Bans {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// This dynamic set's members instead.
        #[arg(long)]
        set: Option<String>,
        /// The daemon's control socket.
        #[arg(long, default_value = daemon::DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Which rule decides a packet, and why each rule before it does not match.
    Explain {
        /// Rule file (TOML); without it, the rules in force in the running daemon, or
        /// /etc/firewall/rules.toml when no daemon has its control socket.
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
        /// Interface the packet arrives on (or, with --direction out, leaves by).
        #[arg(long)]
        iface: Option<String>,
        /// `in`: a packet arriving (in rules); `out`: one this host sends (out rules).
        #[arg(long, default_value = "in", value_parser = parse_direction)]
        direction: Direction,
    },
    /// Print the shell completion script (bash, zsh, fish, ...) generated from this command
    /// line's definition; for packaging.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (firewall.8 and firewall-SUBCOMMAND.8) into DIR; for packaging.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

/// Man pages in section 8 (system administration) for the command and each visible
/// subcommand, into `dir`; returns the files written.
fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn pages(
        command: &clap::Command,
        dir: &Path,
        written: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        let man = clap_mangen::Man::new(command.clone())
            .section("8")
            .manual("System Administration");
        written.push(man.generate_to(dir)?);
        for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
            pages(sub, dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut command = Cli::command().disable_help_subcommand(true);
    // Builds the subcommands' display names (`firewall-run`), which name their pages.
    command.build();
    let mut written = Vec::new();
    pages(&command, dir, &mut written)?;
    Ok(written)
}

/// `90s`, `5m`, `1h`, `2d` or plain seconds; at least one second.
/// `in` or `out`, for `explain --direction`.
fn parse_direction(text: &str) -> Result<Direction, String> {
    Direction::from_name(text).ok_or_else(|| format!("{text:?}: expected \"in\" or \"out\""))
}

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

/// The rule file `explain` reads: `--rules`, else none (the daemon's rules in force are
/// asked for) while a daemon's control socket exists, else the default file.
fn explained_file(rules: Option<PathBuf>, control: &Path) -> Option<PathBuf> {
    rules.or_else(|| (!control.exists()).then(|| PathBuf::from(daemon::DEFAULT_RULES)))
}

/// `firewall check`: the summary, then the warnings; with `strict`, any warning fails.
fn check(file: &Path, strict: bool) -> anyhow::Result<()> {
    let set = load_rules(file)?;
    print!("{}", summary(&set));
    let warnings = firewall::rules::lint::warnings(&set);
    for warning in &warnings {
        eprintln!("warning: {}", warning.located(&file.display().to_string()));
    }
    if strict && !warnings.is_empty() {
        anyhow::bail!(
            "{}: {} warning(s), and --strict makes them errors",
            file.display(),
            warnings.len()
        );
    }
    Ok(())
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

/// `firewall status`: the daemon's answer (or why there is none) and the pins.
fn status(control: &Path, pin_dir: &Path, json: bool) -> anyhow::Result<()> {
    use firewall::report::status::{gather, text, DaemonStatus};
    let daemon = control::send(control, Request::Status).and_then(|answer| {
        serde_json::from_str::<DaemonStatus>(&answer).map_err(anyhow::Error::from)
    });
    let status = gather(daemon, pin_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", text(&status));
    }
    Ok(())
}

/// Sends `request` to the daemon on `socket` and prints its answer.
fn ask(socket: &Path, request: Request) -> anyhow::Result<()> {
    control::send(socket, request).map(|message| println!("{message}"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check {
            file,
            rules,
            strict,
        } => check(&file.unwrap_or(rules), strict),
        Command::Explain {
            rules,
            control,
            proto,
            from,
            to,
            port,
            icmp_type,
            iface,
            direction,
        } => {
            let question = Question {
                proto,
                from,
                to,
                port,
                icmp_type,
                iface,
                direction,
            };
            match explained_file(rules, &control) {
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
        Command::Status {
            json,
            control,
            pin_dir,
        } => status(&control, &pin_dir, json),
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
            set,
            control,
        } => ban_targets(targets, set.is_none(), force).and_then(|targets| {
            let request = Request::Ban {
                targets,
                timeout_seconds: timeout,
                set,
            };
            ask(&control, request)
        }),
        Command::Unban {
            targets,
            set,
            control,
        } => ban_targets(targets, false, false)
            .and_then(|targets| ask(&control, Request::Unban { targets, set })),
        Command::Bans { json, set, control } => ask(&control, Request::Bans { json, set }),
        Command::Completions { shell } => {
            // Into a buffer first: the generator panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "firewall", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script).map_err(Into::into)
        }
        Command::Manpages { dir } => write_man_pages(&dir).map(|written| {
            for path in written {
                println!("{}", path.display());
            }
        }),
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

#[cfg(test)]
mod tests {
    use clap_complete::Shell;

    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from([&["firewall"], args].concat())
            .unwrap_or_else(|error| panic!("{args:?}: {error}"))
            .command
    }

    #[test]
    fn completions_name_the_subcommands_and_their_options() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "firewall", &mut script);
            let script = String::from_utf8(script).unwrap();
            for word in ["explain", "exposure", "strict", "rules", "pin-dir"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand_and_render() {
        let dir = std::env::temp_dir().join(format!("fw-man-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = write_man_pages(&dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names[0], "firewall.8");
        for sub in ["run", "check", "explain", "exposure", "ban", "stats"] {
            assert!(names.contains(&format!("firewall-{sub}.8")), "{names:?}");
        }
        assert!(!names
            .iter()
            .any(|name| name.contains("manpages") || name.contains("help")));
        let check = std::fs::read_to_string(dir.join("firewall-check.8")).unwrap();
        assert!(
            check.starts_with(".ie") || check.contains(".TH firewall-check 8"),
            "{check}"
        );
        assert!(check.contains("strict"));
        // man(1) renders it, where it is installed.
        if let Ok(output) = std::process::Command::new("man")
            .arg("-l")
            .arg(dir.join("firewall.8"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
        {
            let text = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "{output:?}");
            assert!(text.contains("firewall-check(8)"), "{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_rule_file_defaults_to_etc() {
        let default = Path::new(daemon::DEFAULT_RULES);
        assert_eq!(default, Path::new("/etc/firewall/rules.toml"));
        match parse(&["run", "--iface", "eth0"]) {
            Command::Run(options) => assert_eq!(options.rules, default),
            _ => unreachable!(),
        }
        match parse(&["check"]) {
            Command::Check {
                file,
                rules,
                strict,
            } => {
                assert_eq!(file.unwrap_or(rules), default);
                assert!(!strict);
            }
            _ => unreachable!(),
        }
        match parse(&["exposure"]) {
            Command::Exposure { rules } => assert_eq!(rules, default),
            _ => unreachable!(),
        }
    }

    #[test]
    fn explain_asks_the_daemon_if_there_is_one_else_reads_the_default_file() {
        let socket = std::env::temp_dir().join(format!("fw-control-{}", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let given = Some(PathBuf::from("a.toml"));
        assert_eq!(explained_file(given.clone(), &socket), given);
        assert_eq!(
            explained_file(None, &socket).as_deref(),
            Some(Path::new(daemon::DEFAULT_RULES))
        );
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(explained_file(None, &socket), None);
        assert_eq!(explained_file(given.clone(), &socket), given);
        drop(listener);
        std::fs::remove_file(&socket).unwrap();
    }

    #[test]
    fn check_takes_the_file_as_argument_or_option() {
        for args in [
            &["check", "a.toml"][..],
            &["check", "--rules", "a.toml", "--strict"],
        ] {
            match parse(args) {
                Command::Check { file, rules, .. } => {
                    assert_eq!(file.unwrap_or(rules), Path::new("a.toml"));
                }
                _ => unreachable!(),
            }
        }
        assert!(Cli::try_parse_from(["firewall", "check", "a.toml", "--rules", "b.toml"]).is_err());
    }
}
