//! The `cairn` command line: runs dataflows, inspects and repairs event logs, and talks to
//! models. Each subcommand lives in `src/cli/`; this file parses flags and sets up logging.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(args.verbose, args.quiet);
    match cli::run(args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
