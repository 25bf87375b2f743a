//! `cargo run --release -p sim -- --seeds N [--from S] [--nodes K] [--bug NAME] [--twice]`,
//! `--seed S` to replay one seed with its trace (every fault and membership event),
//! `--list-bugs`.
//!
//! Prints `seed=<S> trace=<hash> ok|FAIL <invariant>` per seed and the run's figures. With
//! `--bug`, succeeds only if some seed caught the planted bug (it stops at the first). With
//! `--twice`, runs every seed twice and fails if a trace hash differs.
#![allow(clippy::disallowed_methods)] // The figures measure wall time; the simulation does not.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use sim::{run_seed, Bug, Fault};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Panics are reported per seed (as failures), not printed as they happen.
    std::panic::set_hook(Box::new(|_| {}));
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let number = |name: &str| value(name).and_then(|v| v.parse::<u64>().ok());
    if flag("--list-bugs") {
        for (_, name, what) in Bug::ALL {
            println!("{name:20} {what}");
        }
        return ExitCode::SUCCESS;
    }
    let bug = match value("--bug") {
        Some(name) => match Bug::parse(&name) {
            Some(bug) => Some(bug),
            None => {
                eprintln!("unknown bug {name:?}; see --list-bugs");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let nodes = number("--nodes").unwrap_or(5) as usize;
    let regressions: Vec<u64> = if number("--seed").is_some() || bug.is_some() {
        Vec::new()
    } else {
        include_str!("../regressions.txt").lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect()
    };
    let seeds: Vec<u64> = match number("--seed") {
        Some(seed) => vec![seed],
        None => {
            let from = number("--from").unwrap_or(0);
            regressions.into_iter().chain(from..from + number("--seeds").unwrap_or(100)).collect()
        }
    };
    let twice = flag("--twice");
    let progress = std::io::stderr().is_terminal() && seeds.len() > 1;
    let started = Instant::now();
    let (mut failed, mut simulated_ms, mut ran) = (0u64, 0u64, 0u64);
    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut convergence: Vec<u64> = Vec::new();
    for (n, seed) in seeds.iter().copied().enumerate() {
        let outcome = run_seed(seed, nodes, bug, seeds.len() == 1);
        ran += 1;
        simulated_ms += outcome.simulated_ms;
        for (fault, count) in &outcome.faults {
            *faults.entry(*fault).or_default() += count;
        }
        convergence.extend(outcome.convergence_ms);
        let mut verdict = match &outcome.result {
            Ok(()) => "ok".to_owned(),
            Err(failure) => format!("FAIL {}", failure.invariant),
        };
        if twice {
            let again = run_seed(seed, nodes, bug, false);
            if again.trace != outcome.trace {
                verdict = format!("FAIL determinism (second run gave trace={:016x})", again.trace);
            }
        }
        if progress {
            eprint!("\r\x1b[2K");
        }
        println!("seed={seed} trace={:016x} {verdict}", outcome.trace);
        if verdict != "ok" {
            failed += 1;
            if let Err(failure) = &outcome.result {
                println!("  {}", failure.detail);
            }
            let bug_arg = bug
                .map(|b| format!(" --bug {}", Bug::ALL.iter().find(|(x, ..)| *x == b).unwrap().1))
                .unwrap_or_default();
            println!("  replay: cargo run --release -p sim -- --seed {seed} --nodes {nodes}{bug_arg}");
            if bug.is_some() {
                break;
            }
        }
        if progress {
            let done = (n + 1) * 40 / seeds.len();
            eprint!("[{}{}] {}/{} seeds, {failed} failed", "=".repeat(done), " ".repeat(40 - done), n + 1, seeds.len());
            let _ = std::io::stderr().flush();
        }
    }
    if progress {
        eprintln!();
    }
    let wall = started.elapsed().as_secs_f64();
    convergence.sort_unstable();
    let at = |q: f64| {
        convergence
            .get(((convergence.len() as f64 * q) as usize).min(convergence.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "figures: {ran} seeds of {nodes} nodes in {wall:.1} s: {:.0} seeds per minute, {:.0} simulated seconds per wall second",
        ran as f64 / wall * 60.0,
        simulated_ms as f64 / 1000.0 / wall
    );
    println!("faults: {}", faults.iter().map(|(f, n)| format!("{f:?} {n}")).collect::<Vec<_>>().join(", "));
    println!("convergence after heal: p50 {} ms, p99 {} ms", at(0.5), at(0.99));
    match bug {
        Some(_) if failed > 0 => {
            println!("the planted bug was caught");
            ExitCode::SUCCESS
        }
        Some(_) => {
            println!("the planted bug was NOT caught in {ran} seeds");
            ExitCode::FAILURE
        }
        None => {
            println!("{} passed, {failed} failed", ran - failed);
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
