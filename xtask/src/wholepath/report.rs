//! The bench's table: medians, ratios to the anchors and to xdp-filter, the counters that
//! show each filter did what it should, and the check that fails the bench when one did not.

use anyhow::{bail, Result};

use super::filters::FILLER_RULES;
use super::net::Counters;
use super::{
    Anchor, Row, Verdict, BATCH, DENIED_PORT, FLOOD_SOURCES, FLOOR, FRAMES_PER_CALL, INTERVAL,
    PASS_ANCHOR, ROUNDS, SET_ENTRIES, WARMUP, XDP_FILTER,
};

/// `997956` as `997,956`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(super) fn print(
    rows: &[Row],
    sizes: &[(&str, (u64, u64))],
    daemon_starts: &[f64; 2],
    cpus: usize,
) -> Result<()> {
    let kernel = crate::setup::output("uname", &["-r"])?;
    println!(
        "\nwhole path: kernel {}, {cpus} CPUs (one pinned sender each), {ROUNDS} rounds of {:.0} s \
         per row in turns, medians",
        kernel.trim(),
        INTERVAL.as_secs_f64()
    );
    println!(
        "frames: IPv6 UDP to port {DENIED_PORT}, one frame per test-run call of \
         {FRAMES_PER_CALL} live frames in batches of {BATCH}; set members: from {FLOOD_SOURCES} \
         source addresses of the set, in turn (round-robin); random sources: from \
         {FLOOD_SOURCES} pseudo-random addresses of 2001:db8:e000::/64 (fixed seed), which no \
         rule names, in turn; established: replies from the peer to the host's own UDP flow; \
         to a bound socket: the same frames to a socket bound to the port, no flow"
    );
    println!(
        "1,024 rules (the firewall's maximum): {} fillers, a deny rule for the port from a set \
         of {} IPv6 hosts (with the fillers' networks, 1,000,000 source entries, the most it \
         takes), and last a deny rule for the port from anywhere, which drops the random \
         sources after every address lookup missed\n",
        thousands(FILLER_RULES),
        thousands(SET_ENTRIES)
    );
    let medians: Vec<f64> = rows
        .iter()
        .map(|row| median(&mut row.samples.iter().map(|s| s.mpps).collect::<Vec<_>>()))
        .collect();
    let median_of = |pair: usize| {
        rows.iter()
            .zip(&medians)
            .find(|(row, _)| row.spec.pair == pair)
            .map(|(_, &median)| median)
            .expect("every anchor has a row")
    };
    let (floor, pass, xdp_filter) = (
        median_of(FLOOR),
        median_of(PASS_ANCHOR),
        median_of(XDP_FILTER),
    );
    println!(
        "| row | frames | Mpps | min–max | × anchor | × xdp-filter | ns in program | XDP drops | reached UDP | queue full | rule counted |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut wrong = Vec::new();
    for (row, median) in rows.iter().zip(&medians) {
        let spec = row.spec;
        let min = row
            .samples
            .iter()
            .map(|s| s.mpps)
            .fold(f64::INFINITY, f64::min);
        let max = row.samples.iter().map(|s| s.mpps).fold(0.0, f64::max);
        let total =
            |f: fn(&Counters) -> u64| row.samples.iter().map(|s| f(&s.counters)).sum::<u64>();
        let frames = total(|c| c.napi_frames).max(1) as f64;
        let drops = total(|c| c.xdp_drops);
        let dropped = drops as f64 / frames * 100.0;
        let reached = total(|c| c.reached_udp) as f64 / frames * 100.0;
        let queue_full = total(|c| c.queue_full) as f64 / frames * 100.0;
        let anchor = match spec.anchor {
            Anchor::None => "–".to_string(),
            Anchor::Floor => format!("{:.2} (floor)", median / floor),
            Anchor::Pass => format!("{:.2} (pass)", median / pass),
        };
        // The rule's count spans a little more than the measured interval, so it must come to
        // at least the interval's XDP drops; a rule that dropped none of them shows ~0 %.
        let rule_packets = row.samples.iter().map(|s| s.rule_packets).sum::<u64>();
        let (counted, rule_right) = match spec.rule {
            Some(rule) => {
                let share = rule_packets as f64 / drops.max(1) as f64 * 100.0;
                (format!("{rule}: {share:.0} %"), share >= 95.0)
            }
            None => ("–".to_string(), true),
        };
        let program_ns = match row.program_ns {
            Some(ns) => format!("{ns:.0}"),
            None => "–".to_string(),
        };
        println!(
            "| {} | {} | {median:.2} | {min:.2}–{max:.2} | {anchor} | {:.2} | {program_ns} | {dropped:.0} % | {reached:.0} % | {queue_full:.0} % | {counted} |",
            spec.name,
            spec.traffic.label(),
            median / xdp_filter,
        );
        let verdict_right = match spec.verdict {
            Verdict::Pass => reached >= 95.0,
            Verdict::Drop => reached <= 1.0,
        };
        if !verdict_right || !rule_right {
            wrong.push(format!("{} ({})", spec.name, spec.traffic.label()));
        }
    }
    println!(
        "\nMpps: frames the receiving veth's NAPI took off its queues (ethtool -S \
         rx_queue_N_xdp_packets), whatever their fate; × anchor: over the bare program that \
         gives the row's frames the same verdict for next to nothing, the XDP_DROP floor for \
         rows that drop, the XDP_PASS row for rows that pass frames up to a bound socket \
         (no filter has none: its frames meet no socket); ns in program: nanoseconds per frame \
         inside the receiving end's XDP program (kernel.bpf_stats_enabled, median of three more \
         rounds: the statistics' clock reads, in the figure too, would slow the measured \
         ones; the floor's figure is about their cost); XDP drops: rx_queue_N_xdp_drops; \
         reached UDP: Udp6InDatagrams + Udp6NoPorts + Udp6InErrors of the receiving namespace \
         (read just after the NAPI counters, so a few % either way); \
         queue full: frames the sending end could not queue (its tx_queue_N_xdp_xmit_errors), \
         relative to those handled; rule counted: the packets the firewall's `stats` counted \
         for the rule that should drop the row's frames, relative to the XDP drops (its \
         reads enclose the warm-up too, so about {:.0} %)",
        (WARMUP + INTERVAL).as_secs_f64() / INTERVAL.as_secs_f64() * 100.0
    );
    for (name, (insns, jited)) in sizes {
        println!("{name}: {insns} instructions after the verifier, {jited} bytes JIT-compiled");
    }
    for (label, seconds) in ["1 rule", "1,024 rules + set"].iter().zip(daemon_starts) {
        println!("firewall start to filtering, {label}: {seconds:.1} s");
    }
    if !wrong.is_empty() {
        bail!(
            "these rows' frames did not meet the expected verdict or rule (filter not in \
             force?): {}",
            wrong.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(7), "7");
        assert_eq!(thousands(1022), "1,022");
        assert_eq!(thousands(997_956), "997,956");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
