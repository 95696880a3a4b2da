//! The seven checks of the installed service on the host VM, each a line with its result and
//! time: the boot, the verdicts, reload and `apply --confirm`, restart, `kill -9`, stop, and
//! start with a reboot.
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use super::guest::Guest;
use super::probes::{
    denied_answers, denied_probe, http_answers, http_probe, ssh_answers, Ports, Prober,
    ALLOWED_EVERY, DENIED_EVERY,
};
use super::{Report, NIC};
use crate::vm::qemu::GUEST_ADDRESS;

/// The checks' names, in the order they run.
const CHECKS: [&str; 7] = [
    "1 boot: DHCP address, firewall started before the network",
    "2 SSH and HTTP answer, the denied port does not",
    "3 edit + reload, apply --confirm and its roll-back",
    "4 restart under probes",
    "5 kill -9: systemd restarts it",
    "6 stop removes filtering",
    "7 start, reboot: filtering again",
];

/// The checks, each a line with its result and time.
pub(super) fn checks(guest: &mut Guest, ports: &Ports, started: Instant) -> Result<Report> {
    let mut results: Vec<(String, bool)> = Vec::new();
    let mut record = |name: &str, timer: Instant, outcome: Result<String>| {
        let seconds = timer.elapsed().as_secs_f64();
        let passed = outcome.is_ok();
        match outcome {
            Ok(detail) => println!("host-test: {name}: pass ({seconds:.1} s) {detail}"),
            Err(why) => println!("host-test: {name}: FAIL ({seconds:.1} s) {why:#}"),
        }
        results.push((name.to_string(), passed));
        passed
    };

    // The boot: the console's login prompt, then SSH (which needs the DHCP address).
    let timer = guest.boot_started;
    let booted = guest.wait_console("login:", 1, Duration::from_secs(300));
    let boot_seconds = timer.elapsed().as_secs_f64();
    println!(
        "host: boot to the login prompt: {}",
        if booted {
            format!("{boot_seconds:.0} s")
        } else {
            "none within 300 s".into()
        }
    );
    let ssh = guest.wait_for_ssh(None, Duration::from_secs(if booted { 90 } else { 10 }));
    println!(
        "host: boot to SSH: {}",
        match &ssh {
            Ok(_) => format!("{:.0} s", timer.elapsed().as_secs_f64()),
            Err(why) => format!("{why:#}"),
        }
    );
    let boot_id = match ssh {
        Ok(id) => id,
        Err(why) => {
            let diagnosis = guest
                .console_run(&format!(
                    "ip -4 -o addr show dev {NIC}; ip -o link show dev {NIC}; \
                     systemctl is-active firewall; \
                     journalctl -b --no-pager -o short-monotonic -u firewall -u systemd-networkd | tail -n 15"
                ))
                .unwrap_or_else(|| "(the console did not answer either)".into());
            record(
                CHECKS[0],
                timer,
                Err(anyhow!(
                    "{why:#}: the guest cannot be reached. From its console:\n{}",
                    diagnosis.trim()
                )),
            );
            for name in &CHECKS[1..] {
                println!("host-test: {name}: not run (no SSH)");
                results.push((name.to_string(), false));
            }
            return summary(&results, started);
        }
    };

    let guest = &*guest;
    let runs: [&dyn Fn() -> Result<String>; 7] = [
        &|| check_boot(guest),
        &|| check_verdicts(ports, false),
        &|| check_reload(guest, ports),
        &|| check_restart(guest, ports),
        &|| check_kill(guest, ports),
        &|| check_stop(guest, ports),
        &|| check_reboot(guest, ports, &boot_id),
    ];
    for (name, run) in CHECKS.iter().zip(runs) {
        let timer = Instant::now();
        let outcome = run();
        record(name, timer, outcome);
    }

    summary(&results, started)
}

fn summary(results: &[(String, bool)], started: Instant) -> Result<Report> {
    let passed = results.iter().filter(|r| r.1).count();
    let failed = results.len() - passed;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "host-test: {passed} passed, {failed} failed, in {seconds:.0} s ({})",
        if failed == 0 { "pass" } else { "FAIL" }
    );
    Ok(Report {
        passed,
        failed,
        seconds,
    })
}

/// `KEY=VALUE` lines of `systemctl show`.
fn show(guest: &Guest, properties: &str) -> Result<std::collections::BTreeMap<String, String>> {
    let text = guest.ssh(&format!("systemctl show firewall -p {properties}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn xdp_on_nic(guest: &Guest) -> Result<bool> {
    let link = guest.ssh(&format!("ip -o link show dev {NIC}"))?;
    Ok(link.contains("xdp"))
}

/// 1: the address from DHCP, the unit active and filtering the NIC, and ready before
/// systemd-networkd configured the address.
fn check_boot(guest: &Guest) -> Result<String> {
    let mut problems = Vec::new();
    let address = guest.ssh(&format!("ip -4 -o addr show dev {NIC}"))?;
    if !address.contains(GUEST_ADDRESS) {
        problems.push(format!("{NIC} has no {GUEST_ADDRESS}: {}", address.trim()));
    }
    let unit = show(
        guest,
        "ActiveState,ActiveEnterTimestampMonotonic,NRestarts,MainPID",
    )?;
    let active = unit.get("ActiveState").map(String::as_str) == Some("active");
    if !active {
        problems.push(format!("firewall.service is {:?}", unit.get("ActiveState")));
    }
    if !xdp_on_nic(guest)? {
        problems.push(format!("no XDP program on {NIC}"));
    }
    let ready_us: u64 = unit
        .get("ActiveEnterTimestampMonotonic")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // "[   12.345678] fwhost systemd-networkd[201]: ens3: DHCPv4 address 10.0.2.15/24, ..."
    let journal = guest.ssh(
        "journalctl -b --no-pager -o short-monotonic -u systemd-networkd | grep -m1 'DHCPv4 address' || true",
    )?;
    let configured_us = journal
        .trim()
        .strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(|s| (s * 1e6) as u64);
    let restarts = unit.get("NRestarts").cloned().unwrap_or_default();
    match configured_us {
        None => problems.push("systemd-networkd logged no DHCPv4 address".into()),
        Some(_) if ready_us == 0 => problems.push("firewall.service never became active".into()),
        Some(at) if ready_us >= at => problems.push(format!(
            "firewall ready at {:.2} s, after the address at {:.2} s",
            ready_us as f64 / 1e6,
            at as f64 / 1e6
        )),
        Some(_) => {}
    }
    let detail = format!(
        "firewall ready at {:.2} s (restarts {restarts}), DHCP address at {}",
        ready_us as f64 / 1e6,
        configured_us.map_or("-".into(), |at| format!("{:.2} s", at as f64 / 1e6))
    );
    if problems.is_empty() {
        Ok(detail)
    } else {
        let journal = guest
            .ssh("journalctl -b --no-pager -u firewall | tail -n 25")
            .unwrap_or_default();
        bail!(
            "{}; {detail}\nthe firewall's journal:\n{journal}",
            problems.join("; ")
        )
    }
}

/// 2: SSH and HTTP answer; the denied port answers only if `denied_open`.
fn check_verdicts(ports: &Ports, denied_open: bool) -> Result<String> {
    let (ssh, http, denied) = (
        ssh_answers(ports),
        http_answers(ports),
        denied_answers(ports),
    );
    let detail = format!(
        "SSH {}, HTTP {}, port 8080 {}",
        answered(ssh),
        answered(http),
        answered(denied)
    );
    if ssh && http && denied == denied_open {
        Ok(detail)
    } else {
        bail!("{detail}")
    }
}

fn answered(yes: bool) -> &'static str {
    if yes {
        "answers"
    } else {
        "no answer"
    }
}

/// 3: allow port 8080 in /etc/firewall/rules.toml (saved atomically), `systemctl reload`: it
/// answers; the original back, reload: it does not.
fn check_reload(guest: &Guest, ports: &Ports) -> Result<String> {
    guest.ssh(
        "cp -p /etc/firewall/rules.toml /root/rules.toml.orig && \
         cp -p /etc/firewall/rules.toml /etc/firewall/rules.toml.new && \
         printf '\\n[[rules]]\\nname = \"test-8080\"\\naction = \"allow\"\\nproto = \"tcp\"\\nports = [8080]\\n' \
           >> /etc/firewall/rules.toml.new && \
         mv /etc/firewall/rules.toml.new /etc/firewall/rules.toml",
    )?;
    let reload = guest.ssh("systemctl reload firewall");
    let opened = denied_answers(ports);
    guest.ssh(
        "cp -p /root/rules.toml.orig /etc/firewall/rules.toml.new && \
         mv /etc/firewall/rules.toml.new /etc/firewall/rules.toml",
    )?;
    let revert = guest.ssh("systemctl reload firewall");
    let closed = !denied_answers(ports);
    // `firewall apply` under the unit's sandbox: the file lies in /root, which the daemon
    // cannot see (ProtectHome), so only its text can reach it. On trial for 8 s, then rolled
    // back.
    let apply = guest.ssh(
        "cp -p /etc/firewall/rules.toml /root/open.toml && \
         printf '\n[[rules]]\nname = \"test-8080\"\naction = \"allow\"\nproto = \"tcp\"\nports = [8080]\n' \
           >> /root/open.toml && firewall apply /root/open.toml --confirm 8s",
    );
    let applied = denied_answers(ports);
    std::thread::sleep(Duration::from_secs(10));
    let rolled_back = !denied_answers(ports);
    let detail = format!(
        "allowed: port 8080 {}; reverted: port 8080 {}; applied from /root with --confirm: \
         port 8080 {}; rolled back: port 8080 {}",
        answered(opened),
        answered(!closed),
        answered(applied),
        answered(!rolled_back)
    );
    reload.context("systemctl reload (allowing 8080)")?;
    revert.context("systemctl reload (reverting)")?;
    apply.context("firewall apply --confirm")?;
    if opened && closed && applied && rolled_back {
        Ok(detail)
    } else {
        bail!("{detail}")
    }
}

/// Probes of the denied port (every 75 ms) and HTTP (every 250 ms) around `action`; fails if
/// a denied probe got its greeting or an HTTP probe got no answer.
fn under_probes(ports: &Ports, action: impl FnOnce() -> Result<String>) -> Result<String> {
    let denied = Prober::start(DENIED_EVERY, denied_probe, ports.denied);
    let allowed = Prober::start(ALLOWED_EVERY, http_probe, ports.http);
    std::thread::sleep(Duration::from_secs(1));
    let outcome = action();
    std::thread::sleep(Duration::from_secs(2));
    let (denied_total, denied_through) = denied.finish();
    let (allowed_total, allowed_answered) = allowed.finish();
    let detail = format!(
        "{denied_through} of {denied_total} denied probes got through, \
         {allowed_answered} of {allowed_total} HTTP probes answered"
    );
    let what = outcome?;
    if denied_through == 0 && allowed_answered == allowed_total {
        Ok(format!("{what}; {detail}"))
    } else {
        bail!("{what}; {detail}")
    }
}

fn main_pid(guest: &Guest) -> Result<(String, String)> {
    let unit = show(guest, "MainPID,ActiveState")?;
    Ok((
        unit.get("MainPID").cloned().unwrap_or_default(),
        unit.get("ActiveState").cloned().unwrap_or_default(),
    ))
}

/// 4: `systemctl restart` under probes.
fn check_restart(guest: &Guest, ports: &Ports) -> Result<String> {
    let (before, _) = main_pid(guest)?;
    under_probes(ports, || {
        let timer = Instant::now();
        guest.ssh("systemctl restart firewall")?;
        let seconds = timer.elapsed().as_secs_f64();
        let (after, state) = main_pid(guest)?;
        if after == before || state != "active" {
            bail!("after the restart: pid {after} (was {before}), {state}");
        }
        Ok(format!(
            "restart took {seconds:.1} s, pid {before} -> {after}"
        ))
    })
}

/// 5: `kill -9` of the daemon: systemd starts a new one.
fn check_kill(guest: &Guest, ports: &Ports) -> Result<String> {
    let (before, _) = main_pid(guest)?;
    under_probes(ports, || {
        let timer = Instant::now();
        guest.ssh(&format!("kill -9 {before}"))?;
        loop {
            let (after, state) = main_pid(guest)?;
            if after != before && after != "0" && state == "active" {
                return Ok(format!(
                    "active again as pid {after} (was {before}) after {:.1} s",
                    timer.elapsed().as_secs_f64()
                ));
            }
            if timer.elapsed() > Duration::from_secs(30) {
                bail!("30 s after kill -9: pid {after}, {state}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// 6: `systemctl stop` ends filtering: the denied port answers, no XDP on the NIC.
fn check_stop(guest: &Guest, ports: &Ports) -> Result<String> {
    guest.ssh("systemctl stop firewall")?;
    // The kernel frees a link whose last holder let go in deferred work: allow it a moment.
    let mut xdp = xdp_on_nic(guest)?;
    for _ in 0..10 {
        if !xdp {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        xdp = xdp_on_nic(guest)?;
    }
    // The guest may first have to serve a backlog: QEMU's forwarder keeps retrying the
    // connections of earlier probes that the firewall dropped, and they all arrive now, each
    // starting a greeting service (slow under emulation).
    let stopped = Instant::now();
    let mut denied = denied_answers(ports);
    while !denied && stopped.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(500));
        denied = denied_answers(ports);
    }
    let detail = format!(
        "after stop: XDP {} {NIC}, port 8080 {} (after {:.1} s)",
        if xdp { "still on" } else { "gone from" },
        answered(denied),
        stopped.elapsed().as_secs_f64()
    );
    if !xdp && denied {
        Ok(detail)
    } else {
        bail!("{detail}")
    }
}

/// 7: `systemctl start`, then a reboot: filtering again after it.
fn check_reboot(guest: &Guest, ports: &Ports, boot_id: &str) -> Result<String> {
    guest.ssh("systemctl start firewall")?;
    let (_, state) = main_pid(guest)?;
    let started = state == "active" && xdp_on_nic(guest)? && !denied_answers(ports);
    // The connection drops as the guest goes down: ssh's status says nothing.
    let _ = guest.ssh_within("systemctl reboot", Duration::from_secs(30));
    let timer = Instant::now();
    guest.wait_for_ssh(Some(boot_id), Duration::from_secs(300))?;
    let reboot_seconds = timer.elapsed().as_secs_f64();
    let (_, state) = main_pid(guest)?;
    let xdp = xdp_on_nic(guest)?;
    let verdicts = check_verdicts(ports, false);
    let detail = format!(
        "after start: {}; reboot to SSH in {reboot_seconds:.0} s; then firewall {state}, XDP {} {NIC}, {}",
        if started { "filtering" } else { "NOT filtering" },
        if xdp { "on" } else { "not on" },
        match &verdicts {
            Ok(d) => d.clone(),
            Err(e) => e.to_string(),
        }
    );
    if started && state == "active" && xdp && verdicts.is_ok() {
        Ok(detail)
    } else {
        bail!("{detail}")
    }
}
