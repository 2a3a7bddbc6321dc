//! `cairn bench …`: benchmarks, one file per bench. Every bench reports against a baseline
//! measured in the same run (the matmul ceiling, peers, the raw model cost of the same
//! work): this machine is noisy, so read ratios, not absolute numbers.

use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;

mod engine;
mod generate;
mod pipeline;
mod quantised;
mod rl;

pub use engine::EngineBench;
pub use generate::GenerateBench;
pub use pipeline::PipelineBench;
pub use quantised::QuantisedBench;
pub use rl::RlBench;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Generation throughput against the matmul ceiling and Python/C++ peers.
    Generate(GenerateBench),
    /// Engine overhead: records/s through sample -> critique -> revise with an instant model.
    Engine(EngineBench),
    /// RL-CAI: judgements/s and PPO update time against the raw model cost of the same work.
    Rl(RlBench),
    /// A GGUF model held as its quantised blocks against packed panels: same results, speed
    /// and weight memory.
    Quantised(QuantisedBench),
    /// A spec's stages call by call (sample, critique, revise, judge, …) beside the greedy
    /// bench, the same prompts decoded greedily, and peers replaying the same calls.
    Pipeline(PipelineBench),
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Generate(args) => generate::run(args),
        BenchCommand::Engine(args) => engine::run(args),
        BenchCommand::Rl(args) => rl::run(args),
        BenchCommand::Quantised(args) => quantised::run(args),
        BenchCommand::Pipeline(args) => pipeline::run(args),
    }
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub(crate) fn time_it(
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}
