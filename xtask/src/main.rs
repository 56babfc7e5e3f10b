//! Project automation for dmatx: `cargo xtask <tier>`.
//!
//! Each tier is a short list of steps, each one a plain `cargo` command run with
//! [`std::process::Command`]. Steps print a banner with their wall time, a tier stops at the
//! first failing step, and it ends with a summary table and the closing line
//! `N passed, M failed[, K skipped]` that CI reads.
//!
//! Tiers:
//!
//! * `test`  — what CI runs (`.ci/run`): fmt, clippy, build, tests, the `tracing` feature's
//!   clippy and tests, loom smoke, then the guest tier (`vm`).
//! * `loom`  — every loom model (`crates/*/tests/loom*.rs`) under `--cfg loom`.
//! * `miri`  — the library unit tests under Miri (nightly toolchain).
//! * `bench` — the criterion benchmarks of `dmatx`.
//! * `stress` — the runtime's cancel/partial-transfer stress test, long, in release.
//! * `vm`    — the guest tier (`vm/`): a QEMU guest with QEMU's edu and nvme devices bound to
//!   vfio-pci behind an emulated IOMMU runs the `dmatx-guest` harness (`vm/guest`) once.
//!
//! A step that cannot run on this machine is recorded as skipped, with its reason printed
//! loudly, never as passed: the guest tier's scripts exit with [`SKIP_EXIT_CODE`] and a
//! `vm: SKIP: <reason>` line when the host is not Linux x86_64, QEMU is missing and cannot be
//! installed (no root, no apt, offline) or the kernel package cannot be downloaded.
//! `DMATX_VM=0` skips the guest tier on purpose. The guest's `dmatx-guest: N passed, M failed`
//! line adds to the tests counted in the summary.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// Usage text printed by `--help`, `help` and when no tier is given.
const USAGE: &str = "\
usage: cargo xtask <tier> [args]

tiers:
  test                 what CI runs: fmt check, clippy -D warnings, build, cargo test
                       (debug, verifier on), the tracing feature (clippy, its event tests
                       and the zero-allocation test with it on), loom smoke
                       (LOOM_MAX_PREEMPTIONS=2), then the guest tier as step `vm`
  loom [-- <filter>]   all loom models in crates/*/tests/loom*.rs, release, --cfg loom,
                       LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:-3}, target dir target/loom
  miri                 Miri over the library unit tests and the core's transaction tests
                       over simulated memory (needs nightly + miri + rust-src;
                       installs them with rustup if missing; MIRIFLAGS defaults to
                       -Zmiri-strict-provenance). Exit 2 if Miri cannot be had, or 0 with
                       DMATX_ALLOW_SKIP=1
  bench [cargo-args] [-- <criterion-args>]
                       cargo bench -p dmatx, then where criterion wrote its results
  stress [requests]    the runtime's stress test (threads issuing and cancelling requests
                       against deferred, partial completions), release build,
                       DMATX_STRESS_REQUESTS=requests (default 200000 per profile; the
                       test tier runs 2000)
  vm                   the guest tier (vm/, see vm/README.md): vm/setup.sh (installs
                       qemu-system-x86 from bookworm-backports, busybox-static, cpio if
                       missing; downloads the Debian cloud kernel), vm/build.sh (static
                       dmatx-guest, initramfs), vm/run.sh (one QEMU boot, q35 + intel-iommu,
                       edu and nvme on vfio-pci, all guest tests); work dir target/vm
                       (DMATX_VM_WORK). Skipped, loudly, where it cannot run (not Linux
                       x86_64, QEMU missing without root or apt, offline); DMATX_VM=0 skips
                       it (also in `test`). Knobs: DMATX_VM_ACCEL=tcg|kvm, DMATX_VM_SMP,
                       DMATX_VM_MEM, DMATX_VM_TIMEOUT (s, default 600), DMATX_VM_FILTER
  help, --help, -h     this text

exit codes: 0 all steps passed (or skipped), 1 a step failed, 2 usage error or miri unavailable";

/// Exit code with which the guest tier's scripts say "cannot run on this machine" (after a
/// `vm: SKIP: <reason>` line on standard output); the step is then recorded as skipped.
const SKIP_EXIT_CODE: i32 = 77;

/// Prefix of the line that gives the reason of a [`SKIP_EXIT_CODE`] exit.
const SKIP_LINE_PREFIX: &str = "vm: SKIP: ";

/// Prefix of the guest harness's closing `dmatx-guest: N passed, M failed` line.
const GUEST_SUMMARY_PREFIX: &str = "dmatx-guest: ";

/// Loom's preemption bound for the smoke run inside the `test` tier.
const LOOM_SMOKE_PREEMPTIONS: &str = "2";

/// Default loom preemption bound for the `loom` tier (overridden by `LOOM_MAX_PREEMPTIONS`).
const LOOM_DEFAULT_PREEMPTIONS: &str = "3";

/// Default `MIRIFLAGS` for the `miri` tier when the environment sets none.
const MIRI_DEFAULT_FLAGS: &str = "-Zmiri-strict-provenance";

/// Entry point: dispatches on the first argument to one tier function.
fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let tier = args.next();
    let rest: Vec<String> = args.collect();
    match tier.as_deref() {
        None | Some("help" | "--help" | "-h") => {
            // Ignore a closed pipe (`cargo xtask --help | head`) rather than panicking.
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            ExitCode::SUCCESS
        }
        Some("test") => tier_test(),
        Some("loom") => tier_loom(&rest),
        Some("miri") => tier_miri(),
        Some("bench") => tier_bench(&rest),
        Some("stress") => tier_stress(&rest),
        Some("vm") => tier_vm(),
        Some(other) => {
            eprintln!(
                "xtask: unknown tier `{other}` (expected one of: test, loom, miri, bench, stress, vm; see `cargo xtask --help`)"
            );
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tiers
// ---------------------------------------------------------------------------------------------

/// `test`: the CI tier. fmt, clippy, build, `cargo test` in debug (so the verifier mode that
/// rides on `debug_assertions` is on), the `tracing` feature of the core and the runtime
/// (clippy; the tests that need it, and the zero-allocation test with it compiled in), a
/// loom smoke run if `crates/dmatx/tests/loom.rs` exists, then the guest tier in one step
/// (`vm/run-all.sh`, skipped where it cannot run).
fn tier_test() -> ExitCode {
    let root = repo_root();
    let mut run = Run::new("test");

    run.step("fmt", cargo(&root, &["fmt", "--all", "--", "--check"]));
    run.step(
        "clippy",
        cargo(
            &root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
    );
    run.step(
        "build",
        cargo(&root, &["build", "--workspace", "--all-targets"]),
    );
    run.step("test", cargo(&root, &["test", "--workspace"]));
    // The `tracing` feature is off by default, so the steps above never compile its code.
    run.step(
        "clippy tracing",
        cargo(
            &root,
            &[
                "clippy",
                "--all-targets",
                "-p",
                "dmatx",
                "-p",
                "dmatx-runtime",
                "--features",
                "tracing",
                "--",
                "-D",
                "warnings",
            ],
        ),
    );
    run.step(
        "test tracing",
        cargo(
            &root,
            &[
                "test",
                "-p",
                "dmatx",
                "-p",
                "dmatx-runtime",
                "--features",
                "tracing",
                "--test",
                "tracing",
                "--test",
                "allocations",
            ],
        ),
    );

    let loom_file = root.join("crates/dmatx/tests/loom.rs");
    if loom_file.is_file() {
        let mut cmd = loom_command(&root, "dmatx", &["loom".to_owned()], &[]);
        cmd.env("LOOM_MAX_PREEMPTIONS", LOOM_SMOKE_PREEMPTIONS);
        run.step("loom smoke", cmd);
    } else {
        run.skip("loom smoke", "crates/dmatx/tests/loom.rs not present");
    }

    if let Some(why) = vm_unavailable() {
        run.skip("vm", &why);
    } else {
        run.step_skippable("vm", vm_script(&root, "run-all.sh"));
    }

    run.finish()
}

/// `vm`: the guest tier as three steps: `vm/setup.sh`, `vm/build.sh`, `vm/run.sh` (see
/// `vm/README.md`). A step that reports it cannot run here ends the tier as skipped.
fn tier_vm() -> ExitCode {
    let root = repo_root();
    let mut run = Run::new("vm");
    if let Some(why) = vm_unavailable() {
        run.skip("vm", &why);
        return run.finish();
    }
    for (name, script) in [
        ("vm setup", "setup.sh"),
        ("vm build", "build.sh"),
        ("vm boot", "run.sh"),
    ] {
        run.step_skippable(name, vm_script(&root, script));
        if run.last_skipped() {
            break;
        }
    }
    run.finish()
}

/// Why the guest tier cannot run at all, before trying: `DMATX_VM=0`, or a host that is not
/// Linux on x86_64. The scripts find the other reasons themselves.
fn vm_unavailable() -> Option<String> {
    if env::var_os("DMATX_VM").is_some_and(|v| v == "0") {
        return Some("disabled by DMATX_VM=0".to_owned());
    }
    let (os, arch) = (env::consts::OS, env::consts::ARCH);
    if os != "linux" || arch != "x86_64" {
        return Some(format!(
            "the guest tier needs a Linux x86_64 host (this is {os} {arch})"
        ));
    }
    None
}

/// `bash vm/<script>`, run from `root`.
fn vm_script(root: &Path, script: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.current_dir(root).arg(Path::new("vm").join(script));
    cmd
}

/// `loom`: every loom model file `crates/*/tests/loom*.rs`, one cargo invocation per package,
/// with `LOOM_MAX_PREEMPTIONS` from the environment or [`LOOM_DEFAULT_PREEMPTIONS`]. Arguments
/// after `--` go to the test harness (e.g. a test name filter).
fn tier_loom(args: &[String]) -> ExitCode {
    let root = repo_root();
    let harness_args = after_double_dash(args);
    let preemptions =
        env::var("LOOM_MAX_PREEMPTIONS").unwrap_or_else(|_| LOOM_DEFAULT_PREEMPTIONS.to_owned());
    println!("xtask: LOOM_MAX_PREEMPTIONS={preemptions}");

    let mut run = Run::new("loom");
    let models = find_loom_models(&root);
    if models.is_empty() {
        run.skip("loom", "no crates/*/tests/loom*.rs files found");
    }
    for (package, tests) in &models {
        let mut cmd = loom_command(&root, package, tests, harness_args);
        cmd.env("LOOM_MAX_PREEMPTIONS", &preemptions);
        run.step(&format!("loom {package} ({})", tests.join(", ")), cmd);
    }
    run.finish()
}

/// `miri`: library unit tests under Miri, after making sure the nightly toolchain has the
/// `miri` and `rust-src` components (installing them with rustup if it can).
fn tier_miri() -> ExitCode {
    let root = repo_root();
    if let Err(why) = ensure_miri(&root) {
        return miri_unavailable(&why);
    }

    let flags = env::var("MIRIFLAGS").unwrap_or_else(|_| MIRI_DEFAULT_FLAGS.to_owned());
    println!("xtask: MIRIFLAGS={flags}");

    let mut run = Run::new("miri");
    let groups: [&[&str]; 2] = [
        &["-p", "dmatx-types", "-p", "dmatx-hal", "-p", "dmatx-sim"],
        &["-p", "dmatx"],
    ];
    for packages in groups {
        let mut argv = vec!["+nightly", "miri", "test"];
        argv.extend_from_slice(packages);
        argv.push("--lib");
        let mut cmd = cargo(&root, &argv);
        cmd.env("MIRIFLAGS", &flags);
        let names: Vec<&str> = packages.iter().copied().filter(|a| *a != "-p").collect();
        run.step(&format!("miri {}", names.join(" ")), cmd);
    }
    // Transactions end to end over the simulated memory: buffer ownership, bounce copies,
    // the device's accesses, and the deliberate leaks of a transaction deleted or forgotten
    // while its transfer runs (hence the leak check is off for this step only).
    let mut argv = vec!["+nightly", "miri", "test", "-p", "dmatx"];
    for test in MIRI_INTEGRATION_TESTS {
        argv.extend_from_slice(&["--test", test]);
    }
    let mut cmd = cargo(&root, &argv);
    cmd.env("MIRIFLAGS", format!("{flags} -Zmiri-ignore-leaks"));
    run.step("miri dmatx transactions over sim memory", cmd);
    run.finish()
}

/// The core's integration tests that also run under Miri (the others are property or timing
/// heavy and add nothing Miri can see that these do not).
const MIRI_INTEGRATION_TESTS: [&str; 6] = [
    "release",
    "cancel",
    "completion",
    "common_buffer",
    "reserve",
    "device",
];

/// Requests per profile in the `stress` tier when no count is given.
const STRESS_DEFAULT_REQUESTS: &str = "200000";

/// `stress`: the runtime's stress test in release with many requests.
fn tier_stress(args: &[String]) -> ExitCode {
    let root = repo_root();
    let requests = args
        .first()
        .cloned()
        .unwrap_or_else(|| STRESS_DEFAULT_REQUESTS.to_owned());
    if requests.parse::<u64>().map_or(true, |n| n == 0) {
        eprintln!("xtask: stress takes a positive request count, not `{requests}`");
        return ExitCode::from(2);
    }
    println!("xtask: DMATX_STRESS_REQUESTS={requests}");
    let mut run = Run::new("stress");
    let mut cmd = cargo(
        &root,
        &[
            "test",
            "--release",
            "-p",
            "dmatx-runtime",
            "--test",
            "stress",
            "--",
            "--nocapture",
        ],
    );
    cmd.env("DMATX_STRESS_REQUESTS", &requests);
    run.step("stress dmatx-runtime", cmd);
    run.finish()
}

/// `bench`: `cargo bench -p dmatx`, arguments before `--` to cargo and after it to criterion;
/// then prints where criterion wrote its results.
fn tier_bench(args: &[String]) -> ExitCode {
    let root = repo_root();
    let (cargo_args, criterion_args) = split_double_dash(args);

    let mut cmd = cargo(&root, &["bench", "-p", "dmatx"]);
    cmd.args(cargo_args);
    if !criterion_args.is_empty() {
        cmd.arg("--").args(criterion_args);
    }

    let mut run = Run::new("bench");
    run.step("bench dmatx", cmd);

    let results = target_dir(&root).join("criterion");
    if results.is_dir() {
        println!("xtask: criterion results are in {}", results.display());
        let html = results.join("report/index.html");
        if html.is_file() {
            println!("xtask: HTML report: {}", html.display());
        }
    } else {
        println!(
            "xtask: no criterion results at {} (no benchmark target ran?)",
            results.display()
        );
    }
    run.finish()
}

// ---------------------------------------------------------------------------------------------
// Step runner and summary
// ---------------------------------------------------------------------------------------------

/// How one step ended.
enum Outcome {
    /// The command exited 0.
    Passed,
    /// The command exited non-zero or could not be started; the text says which.
    Failed(String),
    /// The step did not run; the text says why.
    Skipped(String),
}

/// One row of the summary table.
struct StepResult {
    /// Short step name shown in banners and in the summary.
    name: String,
    /// How it ended.
    outcome: Outcome,
    /// Wall time spent running it (zero if it did not run).
    time: Duration,
}

/// The steps of one tier: runs them in order and stops running after the first failure.
struct Run {
    /// Tier name, for the banners.
    tier: &'static str,
    /// Results so far, in order.
    results: Vec<StepResult>,
    /// Set once a step has failed; later steps are recorded as skipped.
    failed: bool,
    /// When the tier started.
    start: Instant,
    /// Tests the steps' test harnesses reported.
    tests: TestCounts,
    /// The reason in the last `vm: SKIP: <reason>` line the running step printed.
    skip_reason: Option<String>,
}

/// Tests counted from the harness's `test result: … N passed; M failed; K ignored; …` lines
/// and the guest harness's `dmatx-guest: N passed, M failed` line.
#[derive(Default)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestCounts {
    /// Adds the counts of one `test result:` line (the text after that prefix) or of the
    /// guest's summary (the text after `dmatx-guest: `).
    fn add(&mut self, counts: &str) {
        for part in counts.split([';', '.', ',']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

impl Run {
    /// Starts an empty run of `tier`.
    fn new(tier: &'static str) -> Self {
        Run {
            tier,
            results: Vec::new(),
            failed: false,
            start: Instant::now(),
            tests: TestCounts::default(),
            skip_reason: None,
        }
    }

    /// Runs `cmd` as step `name` with banners, unless an earlier step failed.
    fn step(&mut self, name: &str, cmd: Command) {
        self.run_step(name, cmd, false);
    }

    /// Like [`Run::step`], but an exit with [`SKIP_EXIT_CODE`] records the step as skipped,
    /// for the reason its last `vm: SKIP: <reason>` line gave.
    fn step_skippable(&mut self, name: &str, cmd: Command) {
        self.run_step(name, cmd, true);
    }

    /// Whether the last recorded step was skipped.
    fn last_skipped(&self) -> bool {
        self.results
            .last()
            .is_some_and(|r| matches!(r.outcome, Outcome::Skipped(_)))
    }

    /// Runs `cmd` as step `name` (see [`Run::step`] and [`Run::step_skippable`]).
    fn run_step(&mut self, name: &str, mut cmd: Command, skippable: bool) {
        if self.failed {
            self.skip(name, "not run: an earlier step failed");
            return;
        }
        let index = self.results.len() + 1;
        println!();
        println!("{}", "=".repeat(78));
        println!(
            "xtask {} [{index}] {name}: {}",
            self.tier,
            show_command(&cmd)
        );
        println!("{}", "=".repeat(78));

        let started = Instant::now();
        self.skip_reason = None;
        let outcome = match self.run_counting(&mut cmd) {
            Ok(status) if status.success() => Outcome::Passed,
            Ok(status) if skippable && status.code() == Some(SKIP_EXIT_CODE) => {
                Outcome::Skipped(self.skip_reason.take().unwrap_or_else(|| {
                    format!("the step exited {SKIP_EXIT_CODE} (cannot run here) without a reason")
                }))
            }
            Ok(status) => Outcome::Failed(format!("{status}")),
            Err(err) => Outcome::Failed(format!("could not start: {err}")),
        };
        let time = started.elapsed();

        let verdict = match &outcome {
            Outcome::Passed => "PASSED".to_owned(),
            Outcome::Failed(why) => format!("FAILED ({why})"),
            Outcome::Skipped(why) => format!("SKIPPED ({why})"),
        };
        println!(
            "----- xtask {} [{index}] {name}: {verdict} in {} -----",
            self.tier,
            secs(time)
        );
        if let Outcome::Skipped(why) = &outcome {
            println!();
            println!("!!!!! SKIPPED {name}: {why} !!!!!");
        }
        self.failed |= matches!(outcome, Outcome::Failed(_));
        self.results.push(StepResult {
            name: name.to_owned(),
            outcome,
            time,
        });
    }

    /// Runs `cmd`, passing its standard output through while adding up the tests that each
    /// `test result:` line of the Rust test harness and the guest's `dmatx-guest: N passed,
    /// M failed` line report, and keeping the reason of a `vm: SKIP:` line.
    fn run_counting(&mut self, cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
        use std::io::{BufRead, BufReader, Write};
        let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
        if let Some(out) = child.stdout.take() {
            let mut stdout = std::io::stdout().lock();
            for line in BufReader::new(out).lines() {
                let line = line?;
                writeln!(stdout, "{line}")?;
                if let Some(counts) = line.trim_start().strip_prefix("test result: ") {
                    self.tests.add(counts);
                } else if let Some(counts) = guest_summary(&line) {
                    self.tests.add(counts);
                } else if let Some(why) = line.strip_prefix(SKIP_LINE_PREFIX) {
                    self.skip_reason = Some(why.trim().to_owned());
                }
            }
        }
        child.wait()
    }

    /// Records step `name` as skipped, printing the reason loudly.
    fn skip(&mut self, name: &str, why: &str) {
        if !self.failed {
            println!();
            println!("!!!!! SKIPPED {name}: {why} !!!!!");
        }
        self.results.push(StepResult {
            name: name.to_owned(),
            outcome: Outcome::Skipped(why.to_owned()),
            time: Duration::ZERO,
        });
    }

    /// Prints the summary table and the closing `N passed, M failed[, K skipped]` line, and
    /// returns the exit code: 1 if any step failed, else 0.
    fn finish(self) -> ExitCode {
        let width = self
            .results
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let (mut passed, mut failed, mut skipped) = (0, 0, 0);

        println!();
        println!(
            "xtask {} summary ({} total)",
            self.tier,
            secs(self.start.elapsed())
        );
        println!("{:<width$}  {:<8}  {:>8}  note", "step", "result", "time");
        for r in &self.results {
            let (word, note) = match &r.outcome {
                Outcome::Passed => {
                    passed += 1;
                    ("PASSED", String::new())
                }
                Outcome::Failed(why) => {
                    failed += 1;
                    ("FAILED", why.clone())
                }
                Outcome::Skipped(why) => {
                    skipped += 1;
                    ("SKIPPED", why.clone())
                }
            };
            println!("{:<width$}  {word:<8}  {:>8}  {note}", r.name, secs(r.time));
        }

        // The closing line CI parses: exactly `N passed, M failed` (+ `, K skipped`), alone.
        // It counts tests when the steps ran any (a failed step counts as a failure), and
        // steps otherwise.
        let t = &self.tests;
        println!(
            "steps: {passed} passed, {failed} failed, {skipped} skipped; tests: {} passed, {} failed, {} ignored",
            t.passed, t.failed, t.ignored
        );
        let (p, f, k) = if t.passed + t.failed > 0 {
            (t.passed, t.failed + failed, t.ignored + skipped)
        } else {
            (passed, failed, skipped)
        };
        let mut closing = format!("{p} passed, {f} failed");
        if k > 0 {
            closing.push_str(&format!(", {k} skipped"));
        }
        println!("{closing}");

        if failed > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Miri availability
// ---------------------------------------------------------------------------------------------

/// Makes sure `cargo +nightly miri` can run: rustup present, nightly with `miri` and
/// `rust-src`, installing what is missing once; then `cargo +nightly miri setup`. Returns a
/// description of what went wrong and what was tried on failure.
fn ensure_miri(root: &Path) -> Result<(), String> {
    if !Command::new("rustup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Err("rustup is not on PATH; tried: `rustup --version`".to_owned());
    }

    let installed = installed_nightly_components();
    let have = |c: &str| {
        installed.as_ref().is_some_and(|list| {
            list.iter()
                .any(|l| l == c || l.starts_with(&format!("{c}-")))
        })
    };

    if installed.is_none() {
        println!("xtask: nightly toolchain missing; trying `rustup toolchain install nightly`");
        let mut cmd = Command::new("rustup");
        cmd.args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "miri,rust-src",
        ]);
        if !succeeds(&mut cmd) {
            return Err(
                "the nightly toolchain is not installed; tried: `rustup toolchain install \
                 nightly --profile minimal --component miri,rust-src`, which failed"
                    .to_owned(),
            );
        }
    } else if !have("miri") || !have("rust-src") {
        println!(
            "xtask: nightly lacks miri/rust-src; trying `rustup +nightly component add miri rust-src`"
        );
        if !succeeds(Command::new("rustup").args([
            "+nightly",
            "component",
            "add",
            "miri",
            "rust-src",
        ])) {
            return Err(
                "nightly lacks the miri and/or rust-src components; tried: `rustup \
                 +nightly component add miri rust-src`, which failed"
                    .to_owned(),
            );
        }
    }

    println!("xtask: running `cargo +nightly miri setup`");
    if !succeeds(&mut cargo(root, &["+nightly", "miri", "setup"])) {
        return Err(
            "miri is installed but `cargo +nightly miri setup` (building the Miri \
             sysroot from rust-src) failed"
                .to_owned(),
        );
    }
    Ok(())
}

/// The installed components of the nightly toolchain, or `None` if it is not installed.
fn installed_nightly_components() -> Option<Vec<String>> {
    let out = Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .collect(),
    )
}

/// Prints the multi-line "SKIPPED miri" message and returns exit code 0 if
/// `DMATX_ALLOW_SKIP=1`, else 2.
fn miri_unavailable(why: &str) -> ExitCode {
    let allow = env::var("DMATX_ALLOW_SKIP").is_ok_and(|v| v == "1");
    eprintln!();
    eprintln!("!!!!! SKIPPED miri: {why}.");
    eprintln!("!!!!! To run it on a machine with network access to the Rust toolchain server:");
    eprintln!("!!!!!     rustup toolchain install nightly --component miri,rust-src");
    eprintln!("!!!!!     cargo xtask miri");
    eprintln!(
        "!!!!! (exit code {}; set DMATX_ALLOW_SKIP=1 to make this skip exit 0)",
        if allow { 0 } else { 2 }
    );
    println!("0 passed, 0 failed, 1 skipped");
    if allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The workspace root: the parent of this crate's manifest directory.
///
/// Prefers the `CARGO_MANIFEST_DIR` that `cargo run` sets at run time over the one compiled in,
/// so a moved checkout (or a copied `target/`) still points at the right tree.
fn repo_root() -> PathBuf {
    let manifest = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The cargo target directory: `CARGO_TARGET_DIR` if set, else `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// A `cargo` command with `args`, run from `root`.
///
/// Uses `cargo` from `PATH` (the rustup proxy, so `+nightly` works), not the `CARGO` that
/// `cargo run` exports, which is the toolchain's own binary.
fn cargo(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args(args);
    cmd
}

/// A release `cargo test -p <package> --test <t>...` under `--cfg loom`, in its own target
/// directory (`<target>/loom`) so it does not invalidate the normal build; `harness_args` go
/// after `--`, with `--test-threads=1` first.
fn loom_command(root: &Path, package: &str, tests: &[String], harness_args: &[String]) -> Command {
    let mut cmd = cargo(root, &["test", "-p", package, "--release"]);
    for t in tests {
        cmd.args(["--test", t]);
    }
    cmd.args(["--", "--test-threads=1"]).args(harness_args);

    let mut rustflags = OsString::from("--cfg loom");
    if let Some(extra) = env::var_os("RUSTFLAGS").filter(|f| !f.is_empty()) {
        rustflags.push(" ");
        rustflags.push(extra);
    }
    cmd.env("RUSTFLAGS", rustflags)
        .env("CARGO_TARGET_DIR", target_dir(root).join("loom"));
    cmd
}

/// Loom model files `crates/*/tests/loom*.rs`, grouped by package name (read from each
/// crate's `Cargo.toml`): `(package, [test target names])`, sorted.
fn find_loom_models(root: &Path) -> Vec<(String, Vec<String>)> {
    let mut models = Vec::new();
    let Ok(crates) = fs::read_dir(root.join("crates")) else {
        return models;
    };
    let mut crate_dirs: Vec<PathBuf> = crates.flatten().map(|e| e.path()).collect();
    crate_dirs.sort();
    for dir in crate_dirs {
        let Ok(entries) = fs::read_dir(dir.join("tests")) else {
            continue;
        };
        let mut tests: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let stem = name.strip_suffix(".rs")?;
                (stem.starts_with("loom") && e.path().is_file()).then(|| stem.to_owned())
            })
            .collect();
        if tests.is_empty() {
            continue;
        }
        tests.sort();
        let package = package_name(&dir).unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        models.push((package, tests));
    }
    models
}

/// The `name = "..."` of the `[package]` table in `<dir>/Cargo.toml`, if it can be read.
fn package_name(dir: &Path) -> Option<String> {
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).ok()?;
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package && let Some(value) = line.strip_prefix("name") {
            let value = value.trim_start().strip_prefix('=')?.trim();
            return Some(value.trim_matches('"').to_owned());
        }
    }
    None
}

/// Splits `args` at the first `--`: (before, after).
fn split_double_dash(args: &[String]) -> (&[String], &[String]) {
    match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[]),
    }
}

/// The arguments after the first `--`, or all of them if there is none.
fn after_double_dash(args: &[String]) -> &[String] {
    match args.iter().position(|a| a == "--") {
        Some(i) => &args[i + 1..],
        None => args,
    }
}

/// Whether `cmd` runs and exits 0 (its output goes to the terminal).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.status().is_ok_and(|s| s.success())
}

/// The command as a shell-like line, with the environment variables this tool set on it.
fn show_command(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={:?}", k.to_str()?, v?.to_str()?)))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// The `N passed, M failed` of a guest harness summary line `dmatx-guest: N passed, M failed`
/// (exactly that shape; the harness's other `dmatx-guest:` lines are not counts).
fn guest_summary(line: &str) -> Option<&str> {
    let counts = line.trim_end().strip_prefix(GUEST_SUMMARY_PREFIX)?;
    let (passed, failed) = counts.split_once(", ")?;
    let number = |part: &str, word: &str| {
        part.strip_suffix(word)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    (number(passed, " passed") && number(failed, " failed")).then_some(counts)
}

/// A duration as seconds with one decimal, e.g. `12.3s`.
fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::{TestCounts, guest_summary};

    #[test]
    fn counts_the_guest_summary_line() {
        let mut t = TestCounts::default();
        let line = "dmatx-guest: 5 passed, 2 failed\r";
        t.add(guest_summary(line).expect("a summary line"));
        assert_eq!((t.passed, t.failed, t.ignored), (5, 2, 0));
        assert!(guest_summary("dmatx-guest: edu: 0000:00:01.0; nvme: none").is_none());
        assert!(guest_summary("dmatx-guest: 5 passed, 2 failed, 1 odd").is_none());
        assert!(guest_summary("init: dmatx-guest: 5 passed, 0 failed").is_none());
    }

    #[test]
    fn counts_harness_result_lines() {
        let mut t = TestCounts::default();
        t.add("ok. 6 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add("FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 3 filtered out; finished in 1s");
        assert_eq!((t.passed, t.failed, t.ignored), (11, 1, 2));
        t.add("garbage");
        assert_eq!((t.passed, t.failed, t.ignored), (11, 1, 2));
    }
}
