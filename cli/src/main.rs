//! The `dmatx` command.
//!
//! * `dmatx demo` runs the PLX9x5x sample driver on a simulated PCI9656: write and read-back
//!   requests of random sizes and page offsets, every byte verified, ending with a summary.
//! * `dmatx scenario NAME` runs one of the sample scenarios P1–P19 and prints what it observed.
//! * `--trace FILE` on both records a Chrome/Perfetto timeline (`docs/TRACING.md`);
//!   `dmatx trace render FILE OUT.svg` draws one.
//! * `dmatx bench` measures throughput against transfer size and plots it.
//!
//! The subcommands live in the crate's library (`dmatx_cli::{demo, scenario, render, bench}`).

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dmatx_cli::output::AtomicOutput;
use dmatx_cli::trace::Recorder;

#[derive(Parser)]
#[command(
    name = "dmatx",
    version,
    about = "KMDF-style DMA transactions on a simulated machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the PLX9x5x sample driver on a simulated PCI9656: write and read-back requests,
    /// every byte verified, and a summary.
    Demo(dmatx_cli::demo::DemoArgs),
    /// Run a sample scenario (P1 … P19, or all) and print what it observed.
    Scenario(dmatx_cli::scenario::ScenarioArgs),
    /// Work with trace-event JSON files (`dmatx trace render FILE OUT.svg`).
    Trace(dmatx_cli::render::TraceArgs),
    /// Measure the throughput of whole transactions against their size and plot it.
    Bench(dmatx_cli::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => traced(args.trace.as_deref(), || dmatx_cli::demo::run(&args)),
        Command::Scenario(args) => {
            traced(args.trace.as_deref(), || dmatx_cli::scenario::run(&args))
        }
        Command::Trace(args) => dmatx_cli::render::run(&args),
        Command::Bench(args) => dmatx_cli::bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dmatx: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Run `run`, recording its timeline into `trace` if given. The file is checked for
/// writability first (a bad path fails before the run) and written whole at the end, whether
/// the run succeeded or not (never partly).
fn traced(trace: Option<&Path>, run: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let Some(path) = trace else {
        return run();
    };
    let out = AtomicOutput::prepare(path).map_err(|e| e.to_string())?;
    let recorder = Recorder::new();
    recorder.install_global()?;
    let result = run();
    let (recorded, dropped) = (recorder.recorded(), recorder.dropped());
    out.write(recorder.finish().as_bytes())
        .map_err(|e| e.to_string())?;
    eprintln!(
        "dmatx: timeline of {recorded} records{} written to {} (open it in https://ui.perfetto.dev, or `dmatx trace render {} OUT.svg`)",
        if dropped > 0 {
            format!(" ({dropped} dropped over the limit)")
        } else {
            String::new()
        },
        path.display(),
        path.display()
    );
    result
}
