//! `dmatx demo`: the PLX9x5x sample driver (`dmatx_plx`) on the simulated board, running a
//! stream of write and read-back requests with every read-back verified byte by byte.
//!
//! This is the test application's read/write test (`samples.md` §1.5) grown into scenario
//! P16's workload (§4.3): each round trip writes a buffer of random size (1 to `--max-size`
//! bytes) at a random page offset, then reads the same length back into a fresh buffer at
//! another random page offset, and compares. The driver maps every request onto SRAM[0, len)
//! (§1.3: program-DMA's SRAM offset is the bytes transferred so far), so each read-back must
//! equal the write before it. Round trips run one at a time: the sample's queues are
//! sequential, and a read racing a write would read a changing SRAM (as P7 notes).
//!
//! With `--faults`, the chip misbehaves in ways the driver survives: reads stop short
//! (`StopAfter`; the driver reports what the clear-count descriptors say moved and the framework
//! re-issues the rest) and spurious interrupts arrive (the ISR declines them). With
//! `--hardened` as well, writes stop short too (the hardened port runs the write channel in
//! clear-count mode) and now and then a transfer takes a master abort (`DataAbort`): its
//! request fails with `STATUS_DEVICE_DATA_ERROR`, which the demo counts as an expected error
//! and retries. The faithful port would report an aborted or short write as a success with
//! stale SRAM (§1.4), so those faults are injected only into the hardened one.
//!
//! The run ends with a [`DemoSummary`]; [`run`] prints it and fails if a read-back differed, a
//! request failed unexpectedly, the DMA sanitizer recorded anything, or the board did not shut
//! down clean.

use clap::{Args, ValueEnum};
use dmatx::{Direction, Error};
use dmatx_plx::driver::PlxConfig;
use dmatx_plx::hw::{MAXIMUM_TRANSFER_LENGTH, SRAM_SIZE};
use dmatx_plx::sim::{BoardConfig, SimBoard, VirtualClock};
use dmatx_sim::{Plx9656Config, Plx9656Fault, Plx9656Mode, SimPlx9656};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fmt;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Round trips of a run without `--count`.
pub const DEFAULT_COUNT: u64 = 2000;

/// Round trips of a run with `--trace` but without `--count`: enough to see every path, few
/// enough for the timeline to stay readable.
pub const TRACE_COUNT: u64 = 200;

/// Largest request: the board's SRAM (the driver refuses longer ones).
pub const MAX_SIZE: u64 = SRAM_SIZE;

/// How long one request may take before the run is called broken.
pub const REQUEST_TIMEOUT: Duration = dmatx_plx::scenarios::REQUEST_TIMEOUT;

/// Attempts per request when the failures are the injected, expected ones.
pub const MAX_ATTEMPTS: u32 = 3;

/// How many problem descriptions a summary keeps (the counts are complete).
pub const PROBLEMS_KEPT: usize = 10;

/// The deferred engine's latency from a chain's start to its end, in virtual time.
const DEFERRED_LATENCY_NS: u64 = 20_000;
/// The deferred engine's clock: this much virtual time ...
const CLOCK_STEP_NS: u64 = 1_000_000;
/// ... every this much real time (scenario P8's clock, twice as fast).
const CLOCK_PERIOD: Duration = Duration::from_micros(50);
/// The hardened driver's watchdog: far beyond any transfer here, so it fires only on a hang.
const WATCHDOG: Duration = Duration::from_secs(5);

/// When the chip runs a started chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// Inside the DMACSR write that starts it (the ISR runs once program-DMA releases the
    /// interrupt lock).
    #[default]
    Immediate,
    /// 20 µs of virtual time after the start, with a clock thread advancing virtual time.
    Deferred,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Immediate => "immediate",
            Engine::Deferred => "deferred",
        }
    }
}

/// `dmatx demo`.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct DemoArgs {
    /// Round trips (a write and its verified read-back) [default: 2000; with --trace: 200].
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Largest request in bytes; sizes are uniform in 1..=BYTES, at most 131072 (the board's
    /// SRAM).
    #[arg(long, value_name = "BYTES", default_value_t = MAX_SIZE)]
    pub max_size: u64,
    /// Seed of the workload (sizes, page offsets, data, faults).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Inject chip faults the driver survives: short reads (StopAfter) and spurious
    /// interrupts; with --hardened also short writes and data aborts (expected errors, retried).
    #[arg(long)]
    pub faults: bool,
    /// Run the hardened driver (abort bits, short writes and stalls handled) instead of the
    /// faithful port.
    #[arg(long)]
    pub hardened: bool,
    /// When the chip runs a started transfer: immediate (inside the DMACSR write that starts
    /// it) or deferred (20 µs of virtual time later, on a clock thread).
    #[arg(long, value_enum, default_value_t = Engine::Immediate, hide_possible_values = true)]
    pub engine: Engine,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Recording the timeline is the caller's job: `run` does not look at this, except that
    /// it lowers the default `--count` to [`TRACE_COUNT`].
    #[arg(
        long,
        value_name = "FILE",
        help = "Write a Chrome/Perfetto timeline of the run to FILE (see docs/TRACING.md)"
    )]
    pub trace: Option<PathBuf>,
}

impl Default for DemoArgs {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            count: None,
            max_size: MAX_SIZE,
            seed: 1,
            faults: false,
            hardened: false,
            engine: Engine::Immediate,
            quiet: false,
            trace: None,
        }
    }
}

/// A demo run's settings, resolved from [`DemoArgs`] and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemoSettings {
    /// Round trips.
    pub count: u64,
    /// Largest request in bytes (1..=[`MAX_SIZE`]).
    pub max_size: u64,
    /// Seed of the workload.
    pub seed: u64,
    /// Inject faults.
    pub faults: bool,
    /// The hardened driver.
    pub hardened: bool,
    /// The chip's engine mode.
    pub engine: Engine,
}

impl DemoSettings {
    /// Resolve and check `args` (nothing is built yet).
    ///
    /// # Errors
    /// A one-line message naming the option: a `--max-size` of 0 or above the SRAM size, a
    /// `--count` of 0.
    pub fn from_args(args: &DemoArgs) -> Result<Self, String> {
        if args.max_size == 0 || args.max_size > MAX_SIZE {
            return Err(format!(
                "--max-size {}: requests must be 1 to {MAX_SIZE} bytes (the board's SRAM)",
                args.max_size
            ));
        }
        let count = match (args.count, &args.trace) {
            (Some(n), _) => n,
            (None, Some(_)) => TRACE_COUNT,
            (None, None) => DEFAULT_COUNT,
        };
        if count == 0 {
            return Err("--count 0: run at least one round trip".into());
        }
        Ok(Self {
            count,
            max_size: args.max_size,
            seed: args.seed,
            faults: args.faults,
            hardened: args.hardened,
            engine: args.engine,
        })
    }

    /// One line saying what runs.
    pub fn headline(&self) -> String {
        format!(
            "dmatx demo: {} round trips of 1..={} bytes through the PLX9x5x sample on the \
             simulated board ({} driver, {} engine, faults {}), seed {}",
            self.count,
            self.max_size,
            if self.hardened {
                "hardened"
            } else {
                "faithful"
            },
            self.engine.name(),
            if self.faults { "on" } else { "off" },
            self.seed
        )
    }
}

/// Faults the demo planned on the chip, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// `StopAfter` on a read (faithful and hardened).
    pub short_reads: u64,
    /// `StopAfter` on a write (hardened only).
    pub short_writes: u64,
    /// `SpuriousIrq`.
    pub spurious: u64,
    /// `DataAbort` (hardened only).
    pub data_aborts: u64,
}

impl FaultCounts {
    fn total(&self) -> u64 {
        self.short_reads + self.short_writes + self.spurious + self.data_aborts
    }
}

/// What a demo run did and saw.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoSummary {
    /// The settings it ran with.
    pub settings: DemoSettings,
    /// Round trips run: a write and its read-back (a write that failed has none).
    pub round_trips: u64,
    /// Requests submitted: writes and reads, retries included.
    pub requests: u64,
    /// Bytes of read-backs that equalled what was written (the sum of the verified sizes).
    pub bytes_verified: u64,
    /// Transfers: program-DMA calls (write, read).
    pub transfers: [u64; 2],
    /// Scatter/gather elements programmed, both channels.
    pub sg_elements: u64,
    /// Bytes copied through bounce pages.
    pub bytes_bounced: u64,
    /// ISR calls.
    pub isr_calls: u64,
    /// ISR calls that claimed the interrupt.
    pub isr_claims: u64,
    /// DPCs run.
    pub dpcs: u64,
    /// The chip's Done interrupts per channel (0 writes, 1 reads).
    pub done_irqs: [u64; 2],
    /// The chip's spurious interrupts.
    pub spurious_irqs: u64,
    /// Faults planned.
    pub faults: FaultCounts,
    /// Most map registers in use at once and the adapter's total, per direction (write, read).
    pub peak_map_registers: [(u32, u32); 2],
    /// Violations in the DMA sanitizer's record at the end of the run (must be 0).
    pub sanitizer_violations: usize,
    /// Requests that failed as an injected fault said they would (retried).
    pub expected_errors: u64,
    /// Requests that failed otherwise, or completed with the wrong byte count.
    pub unexpected_errors: u64,
    /// Read-backs that differed from what was written.
    pub mismatches: u64,
    /// The first few problems, described.
    pub problems: Vec<String>,
    /// The result of [`SimBoard::shut_down`].
    pub shut_down: Result<(), String>,
    /// Wall time of the round trips.
    pub wall: Duration,
}

impl DemoSummary {
    /// Transfers on both channels.
    pub fn total_transfers(&self) -> u64 {
        self.transfers[0] + self.transfers[1]
    }

    /// Verified bytes per second of wall time, in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.bytes_verified as f64 / 1e6 / secs
        } else {
            0.0
        }
    }

    /// Whether the run succeeded: every read-back equal, no unexpected error, an empty
    /// sanitizer record, a clean shut-down.
    ///
    /// # Errors
    /// What went wrong, on one line.
    pub fn verdict(&self) -> Result<(), String> {
        let mut wrong = Vec::new();
        if self.mismatches > 0 {
            wrong.push(format!(
                "{} read-backs differed from what was written",
                self.mismatches
            ));
        }
        if self.unexpected_errors > 0 {
            wrong.push(format!(
                "{} requests failed unexpectedly",
                self.unexpected_errors
            ));
        }
        if self.sanitizer_violations > 0 {
            wrong.push(format!(
                "the DMA sanitizer recorded {} violations",
                self.sanitizer_violations
            ));
        }
        if let Err(e) = &self.shut_down {
            wrong.push(format!(
                "the board did not shut down clean ({})",
                e.replace('\n', "; ")
            ));
        }
        match (wrong.is_empty(), self.problems.first()) {
            (true, _) => Ok(()),
            (false, Some(first)) => Err(format!("{} (first: {first})", wrong.join(", "))),
            (false, None) => Err(wrong.join(", ")),
        }
    }

    fn problem(&mut self, description: String) {
        if self.problems.len() < PROBLEMS_KEPT {
            self.problems.push(description);
        }
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = &self.faults;
        let faults = if self.settings.faults {
            let mut parts = vec![
                format!("{} short reads", counts.short_reads),
                format!("{} spurious interrupts", counts.spurious),
            ];
            if self.settings.hardened {
                parts.insert(1, format!("{} short writes", counts.short_writes));
                parts.push(format!("{} data aborts", counts.data_aborts));
            }
            format!("{} planned: {}", counts.total(), parts.join(", "))
        } else {
            "off".into()
        };
        let [(peak_w, total_w), (peak_r, total_r)] = self.peak_map_registers;
        let rows = [
            (
                "round trips (write + read-back)",
                self.round_trips.to_string(),
            ),
            ("requests (with retries)", self.requests.to_string()),
            ("bytes verified", self.bytes_verified.to_string()),
            (
                "transfers (program-DMA calls)",
                format!(
                    "{} (write {}, read {})",
                    self.total_transfers(),
                    self.transfers[0],
                    self.transfers[1]
                ),
            ),
            ("SG elements", self.sg_elements.to_string()),
            ("bytes bounced", self.bytes_bounced.to_string()),
            (
                "interrupts",
                format!(
                    "{} ISR calls, {} claimed, {} DPCs",
                    self.isr_calls, self.isr_claims, self.dpcs
                ),
            ),
            (
                "Done IRQs from the chip",
                format!(
                    "channel 0 (write) {}, channel 1 (read) {}",
                    self.done_irqs[0], self.done_irqs[1]
                ),
            ),
            (
                "spurious IRQs from the chip",
                self.spurious_irqs.to_string(),
            ),
            ("faults", faults),
            (
                "peak map registers in use",
                format!("write {peak_w} of {total_w}, read {peak_r} of {total_r}"),
            ),
            (
                "sanitizer record",
                format!("{} violations", self.sanitizer_violations),
            ),
            (
                "errors",
                format!(
                    "{} expected (data aborts, retried), {} unexpected",
                    self.expected_errors, self.unexpected_errors
                ),
            ),
            ("read-backs that differed", self.mismatches.to_string()),
            (
                "board shut down",
                match &self.shut_down {
                    Ok(()) => "clean".to_string(),
                    Err(e) => format!("NOT clean: {}", e.replace('\n', "; ")),
                },
            ),
            ("wall time", format!("{:.2} s", self.wall.as_secs_f64())),
            (
                "throughput",
                format!("{:.1} MB/s of verified bytes", self.mb_per_s()),
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let rule = "-".repeat(width + 50);
        writeln!(f, "{rule}")?;
        for (k, v) in rows {
            writeln!(f, "{k:<width$}  {v}")?;
        }
        writeln!(f, "{rule}")?;
        if !self.problems.is_empty() {
            writeln!(f, "problems (the first {PROBLEMS_KEPT} at most):")?;
            for p in &self.problems {
                writeln!(f, "  {p}")?;
            }
        }
        Ok(())
    }
}

/// `dmatx demo`: check the arguments, run with a progress bar on stderr, print the summary on
/// stdout.
///
/// # Errors
/// A bad argument (before anything is built); a run that broke down (a board that would not
/// build, a request that never completed); or the summary's [`DemoSummary::verdict`].
pub fn run(args: &DemoArgs) -> Result<(), String> {
    let settings = DemoSettings::from_args(args)?;
    println!("{}", settings.headline());
    let target = if args.quiet || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(Some(settings.count), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40.cyan/blue} {pos}/{len} round trips {msg} [{elapsed}<{eta}]",
        )
        .map_err(|e| format!("progress bar: {e}"))?
        .progress_chars("##-"),
    );
    let summary = execute(&settings, &mut |done, bytes| {
        bar.set_position(done);
        bar.set_message(format!("{:.1} MB verified", bytes as f64 / 1e6));
    });
    bar.finish_and_clear();
    let summary = summary?;
    print!("{summary}");
    summary.verdict()
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that nearby seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Channel numbers of the chip.
const WRITE: usize = 0;
const READ: usize = 1;

/// The fault planned for one request, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Planned {
    None,
    /// A fault that must not make the request fail.
    Benign,
    /// A data abort: the request must fail with `STATUS_DEVICE_DATA_ERROR`.
    Abort,
}

/// Plan at most one fault on one of the next request's transfers on `channel`.
fn plan_fault(
    chip: &SimPlx9656,
    settings: &DemoSettings,
    rng: &mut Rng,
    channel: usize,
    len: u64,
    counts: &mut FaultCounts,
) -> Planned {
    if !settings.faults {
        return Planned::None;
    }
    let transfers = len.div_ceil(MAXIMUM_TRANSFER_LENGTH);
    let k = rng.below(transfers);
    // Every transfer but the last moves MAXIMUM_TRANSFER_LENGTH bytes (the SG limit of 3
    // covers 8 KiB at any page offset); a budget below the transfer's length always bites.
    let transfer_len = (len - k * MAXIMUM_TRANSFER_LENGTH).min(MAXIMUM_TRANSFER_LENGTH);
    // Requests on a channel run one at a time, so its next starts are this request's.
    let start = chip.channel_stats(channel).starts + k;
    let roll = rng.below(16);
    let (fault, planned) = if settings.hardened && roll == 0 {
        counts.data_aborts += 1;
        let at_byte = rng.below(transfer_len);
        (Plx9656Fault::DataAbort { at_byte }, Planned::Abort)
    } else if roll < 5 && (channel == READ || settings.hardened) {
        if channel == READ {
            counts.short_reads += 1;
        } else {
            counts.short_writes += 1;
        }
        let bytes = rng.below(transfer_len);
        (Plx9656Fault::StopAfter { bytes }, Planned::Benign)
    } else if roll < 7 {
        counts.spurious += 1;
        (Plx9656Fault::SpuriousIrq, Planned::Benign)
    } else {
        return Planned::None;
    };
    chip.inject(channel, start, fault, false);
    planned
}

/// Fill `data` with a round trip's bytes, drawn from `salt`: they differ from their
/// neighbours, from the same offset in other round trips, and from page to page.
fn fill(data: &mut [u8], salt: u64) {
    for (i, b) in data.iter_mut().enumerate() {
        let i = i as u64;
        *b = (i.wrapping_mul(31) ^ (i >> 8) ^ salt) as u8;
    }
}

/// One request of a round trip.
enum Op<'a> {
    /// Write these bytes.
    Write(&'a [u8]),
    /// Read as many bytes as this slice has into it.
    Read(&'a mut [u8]),
}

/// How a request ended, once retries are over.
enum Outcome {
    /// Success with the full length (a read's bytes are in its slice).
    Done,
    /// It failed; how (already counted as an unexpected error).
    Failed(String),
}

/// Run the demo with `settings` and return what it saw; `progress` gets the round trips done
/// and the bytes verified so far after each round trip.
///
/// The board is always shut down at the end (the result is in [`DemoSummary::shut_down`]),
/// unless a request never completed: a board with a request in flight cannot be removed (the
/// sample waits for it), so that is an error instead.
///
/// # Errors
/// The board would not build, a buffer could not be allocated or submitted, or a request did
/// not complete within [`REQUEST_TIMEOUT`].
pub fn execute(
    settings: &DemoSettings,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<DemoSummary, String> {
    let mode = match settings.engine {
        Engine::Immediate => Plx9656Mode::Immediate,
        Engine::Deferred => Plx9656Mode::Deferred {
            latency_ns: DEFERRED_LATENCY_NS,
        },
    };
    let driver = if settings.hardened {
        PlxConfig::hardened(WATCHDOG)
    } else {
        PlxConfig::default()
    };
    let board = SimBoard::new(BoardConfig {
        chip: Plx9656Config::new().mode(mode),
        driver,
        ..BoardConfig::default()
    })
    .map_err(|e| format!("cannot build the simulated board: {e}"))?;
    // Dropped after the board's shut-down (or with it, on an early return).
    let clock = match settings.engine {
        Engine::Deferred => Some(VirtualClock::start(
            board.chip().clone(),
            CLOCK_STEP_NS,
            CLOCK_PERIOD,
        )?),
        Engine::Immediate => None,
    };
    let mut summary = DemoSummary {
        settings: *settings,
        round_trips: 0,
        requests: 0,
        bytes_verified: 0,
        transfers: [0; 2],
        sg_elements: 0,
        bytes_bounced: 0,
        isr_calls: 0,
        isr_claims: 0,
        dpcs: 0,
        done_irqs: [0; 2],
        spurious_irqs: 0,
        faults: FaultCounts::default(),
        peak_map_registers: [(0, 0); 2],
        sanitizer_violations: 0,
        expected_errors: 0,
        unexpected_errors: 0,
        mismatches: 0,
        problems: Vec::new(),
        shut_down: Ok(()),
        wall: Duration::ZERO,
    };
    let mut rng = Rng::new(settings.seed);
    // The only memory kept across round trips: what was written and what came back.
    let mut data = vec![0u8; settings.max_size as usize];
    let mut back = vec![0u8; settings.max_size as usize];
    let started = Instant::now();
    for n in 0..settings.count {
        let len = 1 + rng.below(settings.max_size);
        let data = &mut data[..len as usize];
        fill(data, rng.next());
        let what = |op: &str| format!("round trip {n} ({op} of {len} bytes)");
        let written = request(&board, settings, &mut rng, &mut summary, Op::Write(data))
            .map_err(|e| format!("{}: {e}", what("write")))?;
        let outcome = match written {
            Outcome::Done => {
                let back = &mut back[..len as usize];
                let read = request(&board, settings, &mut rng, &mut summary, Op::Read(back))
                    .map_err(|e| format!("{}: {e}", what("read")))?;
                match read {
                    Outcome::Done => match back.iter().zip(data.iter()).position(|(a, b)| a != b) {
                        None => {
                            summary.bytes_verified += len;
                            None
                        }
                        Some(at) => {
                            summary.mismatches += 1;
                            Some(format!(
                                "{}: byte {at} is {:#04x}, {:#04x} was written",
                                what("read-back"),
                                back[at],
                                data[at]
                            ))
                        }
                    },
                    Outcome::Failed(e) => Some(format!("{}: {e}", what("read"))),
                }
            }
            Outcome::Failed(e) => Some(format!("{}: {e}", what("write"))),
        };
        if let Some(problem) = outcome {
            summary.problem(problem);
        }
        summary.round_trips += 1;
        progress(n + 1, summary.bytes_verified);
    }
    summary.wall = started.elapsed();

    if !board.settle(REQUEST_TIMEOUT) {
        summary.unexpected_errors += 1;
        summary.problem("interrupts and DPCs did not settle after the last request".into());
    }
    let plx = board.plx().stats();
    summary.transfers = [plx.program_write_calls, plx.program_read_calls];
    summary.sg_elements = plx.sg_elements;
    let irq = board.plx().interrupt_stats();
    (summary.isr_calls, summary.isr_claims, summary.dpcs) = (irq.isrs, irq.claimed, irq.dpcs_run);
    let chip = board.chip().stats();
    summary.done_irqs = [
        chip.channels[WRITE].done_interrupts,
        chip.channels[READ].done_interrupts,
    ];
    summary.spurious_irqs = chip.spurious_interrupts;
    summary.bytes_bounced = board.sim().stats().bytes_bounced();
    let enabler = board.plx().enabler();
    for (slot, direction) in [Direction::WriteToDevice, Direction::ReadFromDevice]
        .into_iter()
        .enumerate()
    {
        if let Some(a) = enabler.adapter(direction) {
            let s = a.stats();
            summary.peak_map_registers[slot] = (s.peak_in_use, s.total_registers);
        }
    }
    summary.sanitizer_violations = board.sim().sanitizer_record().len();
    summary.shut_down = board.shut_down();
    drop(clock);
    Ok(summary)
}

/// Submit one request at a random page offset (with a fault planned on its first attempt,
/// perhaps), wait for it, and submit it again while it fails as the planned fault says it
/// must, at most [`MAX_ATTEMPTS`] times.
///
/// # Errors
/// A request that could not be submitted or never completed: the run cannot go on.
fn request(
    board: &SimBoard,
    settings: &DemoSettings,
    rng: &mut Rng,
    summary: &mut DemoSummary,
    mut op: Op<'_>,
) -> Result<Outcome, String> {
    let (channel, len) = match &op {
        Op::Write(data) => (WRITE, data.len() as u64),
        Op::Read(out) => (READ, out.len() as u64),
    };
    for attempt in 1..=MAX_ATTEMPTS {
        // Retries run clean, so a planned abort costs one retry.
        let planned = if attempt == 1 {
            plan_fault(
                board.chip(),
                settings,
                rng,
                channel,
                len,
                &mut summary.faults,
            )
        } else {
            Planned::None
        };
        let page_offset = rng.below(4096);
        let handle = match &op {
            Op::Write(data) => board.write(data, page_offset),
            Op::Read(_) => board.read(len, page_offset),
        }
        .map_err(|e| format!("cannot submit: {e}"))?;
        summary.requests += 1;
        let done = handle.wait_timeout(REQUEST_TIMEOUT).ok_or_else(|| {
            format!(
                "the request did not complete within {} s (the board cannot be removed with \
                 a request in flight, so it is left as it is)",
                REQUEST_TIMEOUT.as_secs()
            )
        })?;
        let failed = match done.status {
            Ok(()) if done.information == len => {
                if let Op::Read(out) = &mut op {
                    let buffer = handle.output().ok_or("the read has no buffer")?;
                    buffer
                        .read(0, out)
                        .map_err(|e| format!("cannot read the read's buffer: {e}"))?;
                }
                return Ok(Outcome::Done);
            }
            Ok(()) => format!(
                "success with information {} instead of {len}",
                done.information
            ),
            Err(Error::DeviceDataError) if planned == Planned::Abort => {
                summary.expected_errors += 1;
                continue;
            }
            Err(e) => format!("failed with {e}"),
        };
        summary.unexpected_errors += 1;
        return Ok(Outcome::Failed(format!("attempt {attempt}: {failed}")));
    }
    summary.unexpected_errors += 1;
    Ok(Outcome::Failed(format!(
        "failed {MAX_ATTEMPTS} times with STATUS_DEVICE_DATA_ERROR"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: DemoArgs,
    }

    fn parse(argv: &[&str]) -> DemoArgs {
        Cli::try_parse_from(std::iter::once("demo").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
            .args
    }

    fn settings(argv: &[&str]) -> Result<DemoSettings, String> {
        DemoSettings::from_args(&parse(argv))
    }

    /// Run `argv` and check the numbers that must agree in any run.
    fn run_checked(argv: &[&str]) -> DemoSummary {
        let s = settings(argv).unwrap();
        let mut calls = 0;
        let summary = execute(&s, &mut |done, _| {
            calls += 1;
            assert_eq!(done, calls);
        })
        .unwrap();
        assert_eq!(calls, s.count);
        summary
            .verdict()
            .unwrap_or_else(|e| panic!("{argv:?}: {e}\n{summary}"));
        assert_eq!(summary.round_trips, s.count);
        assert_eq!(summary.mismatches, 0);
        assert_eq!(summary.unexpected_errors, 0);
        assert_eq!(summary.sanitizer_violations, 0);
        assert_eq!(summary.shut_down, Ok(()));
        assert!(summary.problems.is_empty(), "{:?}", summary.problems);
        // Every request succeeded or was an expected failure that was retried.
        assert_eq!(
            summary.requests,
            2 * summary.round_trips + summary.expected_errors
        );
        assert!(summary.total_transfers() >= summary.requests);
        assert!(summary.sg_elements >= summary.total_transfers());
        // One Done interrupt per transfer, each claimed and reported by a DPC.
        assert_eq!(summary.done_irqs, summary.transfers);
        assert_eq!(summary.isr_claims, summary.total_transfers());
        assert!(summary.dpcs >= 1 && summary.dpcs <= summary.isr_claims);
        // A spurious interrupt costs an ISR call that declines, unless a channel's interrupt
        // is pending too and one call serves both.
        assert!(
            summary.isr_claims <= summary.isr_calls
                && summary.isr_calls <= summary.isr_claims + summary.spurious_irqs,
            "{summary}"
        );
        for (peak, total) in summary.peak_map_registers {
            assert!(peak >= 1 && peak <= total, "{peak} of {total}");
        }
        assert_eq!(summary.bytes_bounced, 0);
        summary
    }

    /// The sizes a run with `seed` and `max_size` draws, when no faults are planned.
    fn sizes(seed: u64, max_size: u64, count: u64) -> Vec<u64> {
        let mut rng = Rng::new(seed);
        (0..count)
            .map(|_| {
                let len = 1 + rng.below(max_size);
                rng.next(); // the data's salt
                rng.below(4096); // the write's page offset
                rng.below(4096); // the read's page offset
                len
            })
            .collect()
    }

    #[test]
    fn sizes_outside_the_sram_are_refused_before_any_work() {
        for bad in ["0", "131073", "1000000"] {
            let e = settings(&["--max-size", bad]).unwrap_err();
            assert!(
                e.starts_with(&format!("--max-size {bad}: ")) && e.contains("131072"),
                "{e}"
            );
            assert_eq!(e.lines().count(), 1);
            // `run` refuses it too, before it prints or builds anything.
            let mut args = parse(&["--max-size", bad]);
            args.quiet = true;
            assert_eq!(run(&args).unwrap_err(), e);
        }
        assert!(
            settings(&["--count", "0"])
                .unwrap_err()
                .starts_with("--count 0")
        );
        assert_eq!(settings(&["--max-size", "1"]).unwrap().max_size, 1);
        assert_eq!(
            settings(&["--max-size", "131072"]).unwrap().max_size,
            MAX_SIZE
        );
    }

    #[test]
    fn the_count_defaults_lower_with_a_trace_unless_given() {
        assert_eq!(settings(&[]).unwrap().count, DEFAULT_COUNT);
        assert_eq!(settings(&["--trace", "t.json"]).unwrap().count, TRACE_COUNT);
        assert_eq!(
            settings(&["--trace", "t.json", "--count", "5000"])
                .unwrap()
                .count,
            5000
        );
        assert_eq!(parse(&[]), DemoArgs::default());
        let s = settings(&[
            "--engine",
            "deferred",
            "--hardened",
            "--faults",
            "--seed",
            "7",
        ])
        .unwrap();
        assert_eq!(
            (s.engine, s.hardened, s.faults, s.seed),
            (Engine::Deferred, true, true, 7)
        );
    }

    #[test]
    fn a_small_run_verifies_every_byte_it_wrote() {
        let summary = run_checked(&["--count", "20", "--seed", "3"]);
        let expected: u64 = sizes(3, MAX_SIZE, 20).iter().sum();
        assert_eq!(summary.bytes_verified, expected);
        // Each request is split into 8 KiB transfers.
        let transfers: u64 = sizes(3, MAX_SIZE, 20)
            .iter()
            .map(|l| l.div_ceil(MAXIMUM_TRANSFER_LENGTH))
            .sum();
        assert_eq!(summary.transfers, [transfers, transfers]);
        assert_eq!(summary.faults, FaultCounts::default());
        assert_eq!(summary.expected_errors, 0);
        let text = summary.to_string();
        for row in [
            "round trips (write + read-back)  20",
            &format!("bytes verified                   {expected}"),
            "sanitizer record                 0 violations",
            "board shut down                  clean",
            "MB/s of verified bytes",
        ] {
            assert!(text.contains(row), "{row:?} missing from\n{text}");
        }
    }

    #[test]
    fn small_requests_and_the_deferred_engine() {
        let summary = run_checked(&["--count", "30", "--max-size", "100", "--engine", "deferred"]);
        let expected: u64 = sizes(1, 100, 30).iter().sum();
        assert_eq!(summary.bytes_verified, expected);
        assert_eq!(summary.transfers, [30, 30]);
    }

    #[test]
    fn faults_on_the_faithful_driver_keep_the_data_right() {
        let summary = run_checked(&["--count", "40", "--faults", "--seed", "5"]);
        let f = summary.faults;
        assert!(f.short_reads > 0 && f.spurious > 0, "{f:?}");
        assert_eq!((f.short_writes, f.data_aborts), (0, 0));
        assert_eq!(summary.expected_errors, 0);
        assert_eq!(summary.spurious_irqs, f.spurious);
        // A short read re-issues the rest: more read transfers than the sizes need.
        assert!(summary.transfers[1] > summary.transfers[0], "{summary}");
    }

    #[test]
    fn faults_on_the_hardened_driver_fail_as_expected_and_are_retried() {
        for engine in ["immediate", "deferred"] {
            let summary = run_checked(&[
                "--count",
                "60",
                "--faults",
                "--hardened",
                "--seed",
                "11",
                "--engine",
                engine,
            ]);
            let f = summary.faults;
            assert!(
                f.short_reads > 0 && f.short_writes > 0 && f.spurious > 0 && f.data_aborts > 0,
                "{f:?}"
            );
            assert_eq!(summary.expected_errors, f.data_aborts, "{summary}");
            assert!(summary.to_string().contains(&format!(
                "{} expected (data aborts, retried), 0 unexpected",
                f.data_aborts
            )));
        }
    }

    #[test]
    fn the_verdict_names_what_went_wrong() {
        let mut summary = run_checked(&["--count", "2", "--max-size", "64"]);
        summary.mismatches = 1;
        summary.sanitizer_violations = 2;
        summary.shut_down = Err("plx9656: channel 0 is Running\nline high".into());
        summary.problems = vec!["round trip 1 (read-back of 9 bytes): byte 3".into()];
        let e = summary.verdict().unwrap_err();
        assert_eq!(
            e,
            "1 read-backs differed from what was written, the DMA sanitizer recorded 2 \
             violations, the board did not shut down clean (plx9656: channel 0 is Running; \
             line high) (first: round trip 1 (read-back of 9 bytes): byte 3)"
        );
        assert_eq!(e.lines().count(), 1);
    }
}
