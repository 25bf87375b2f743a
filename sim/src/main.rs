//! `cargo run --release -p sim -- --seeds N [--from S] [--steps K]`, or `--seed S` to replay one.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<u64>().ok())
    };
    let steps = value("--steps").unwrap_or(400) as usize;
    let (from, count) = match value("--seed") {
        Some(seed) => (seed, 1),
        None => (value("--from").unwrap_or(0), value("--seeds").unwrap_or(100)),
    };
    let regressions: Vec<u64> = if value("--seed").is_some() {
        Vec::new()
    } else {
        include_str!("../regressions.txt").lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect()
    };
    let mut failed = 0;
    let (mut acknowledged, mut crashes, mut delivered) = (0, 0, 0);
    let total = count + regressions.len() as u64;
    for seed in regressions.into_iter().chain(from..from + count) {
        match sim::run_seed(seed, steps) {
            Ok(outcome) => {
                acknowledged += outcome.acknowledged;
                crashes += outcome.crashes;
                delivered += outcome.delivered;
                if total == 1 {
                    println!("seed {seed}: trace hash {:016x}", outcome.trace_hash);
                }
            }
            Err(error) => {
                failed += 1;
                println!("seed {seed} FAILED: {error}\n  replay: cargo run --release -p sim -- --seed {seed} --steps {steps}");
            }
        }
    }
    println!("sim: {} seeds (regressions, then from {from}), {steps} steps each: {acknowledged} acknowledged messages, {delivered} deliveries checked, {crashes} crashes", total);
    println!("{} passed, {failed} failed", total - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
