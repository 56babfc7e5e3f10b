//! `dmatx-guest`: the test harness of dmatx's guest tier.
//!
//! It runs as a static binary inside the QEMU guest that `vm/run.sh` boots (started once by
//! `vm/guest-init.sh` after QEMU's `edu` and `nvme` devices are bound to `vfio-pci`), runs every
//! registered test against the devices it finds in `/sys/bus/pci/devices`, prints one line per
//! test and closes with exactly `dmatx-guest: N passed, M failed`, the line the run script reads.
//!
//! ```text
//! dmatx-guest [--list] [filter]
//! ```
//!
//! `--list` prints the test names; `filter` runs only the tests whose name contains it. The
//! tests live in [`tests`]; see there for how to add one. Settings come from the environment
//! (see [`env::Env`]). Run on a host outside the guest, the harness finds no devices and reports
//! failures with their reasons; it never panics on that path.

mod env;
mod runner;
mod tests;

use std::process::ExitCode;

/// Usage text for `--help` and for unknown options.
const USAGE: &str = "usage: dmatx-guest [--list] [filter]

Runs the guest tier's tests (those whose name contains `filter`, or all) and prints
`dmatx-guest: N passed, M failed`. Environment: DMATX_EDU_MAX_TRANSFER (largest edu DMA in
bytes, default 4096), DMATX_GUEST_TEST_TIMEOUT (seconds per test, default 300),
DMATX_INIT_ERRORS (set by the guest's init: its module and bind failures).";

/// Parses the command line, then lists or runs the tests.
fn main() -> ExitCode {
    let mut list = false;
    let mut filter: Option<String> = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--list" => list = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other if other.starts_with('-') => {
                eprintln!("dmatx-guest: unknown option `{other}`\n{USAGE}");
                return ExitCode::from(2);
            }
            other if filter.is_none() => filter = Some(other.to_owned()),
            other => {
                eprintln!("dmatx-guest: more than one filter (`{other}`)\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }

    let selected: Vec<runner::Test> = tests::all()
        .into_iter()
        .filter(|t| filter.as_deref().is_none_or(|f| t.name.contains(f)))
        .collect();

    if list {
        for t in &selected {
            println!("{}", t.name);
        }
        return ExitCode::SUCCESS;
    }

    let summary = match env::Env::from_system() {
        Ok(env) => {
            println!("dmatx-guest: {env}");
            if selected.is_empty() {
                println!(
                    "dmatx-guest: no test name contains `{}`",
                    filter.as_deref().unwrap_or_default()
                );
            }
            runner::run_all(&selected, env)
        }
        Err(why) => {
            // A bad setting fails the run as a whole, with a summary line all the same.
            println!("dmatx-guest: cannot set up the test environment: {why}");
            runner::Summary {
                passed: 0,
                failed: 1,
            }
        }
    };
    println!(
        "dmatx-guest: {} passed, {} failed",
        summary.passed, summary.failed
    );
    if summary.failed == 0 && summary.passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
