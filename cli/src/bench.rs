//! `dmatx bench`: throughput of whole transactions on the simulated machine, per transfer
//! size, printed as a table and drawn as an SVG plot.
//!
//! Each point runs complete transactions in-process — initialize → execute → program-DMA
//! starts the device → `dma_completed_with_length` for each transfer the device reports →
//! release — with a simulated device in immediate mode that really moves the bytes through
//! the adapter's sanitized view. A point is `rounds` rounds of the same number of
//! transactions; its figure is the median round's throughput (MB/s, 10^6 bytes per second of
//! wall time). Unlike the criterion benchmarks (`cargo xtask bench`), which compare dmatx with
//! hand-written baselines, this shows how throughput grows with size and what bouncing costs.
//!
//! The `plx` series runs whole round trips through the PLX9x5x sample driver (`dmatx_plx`)
//! on its simulated PCI9656 instead: an application's write of the size, then the read-back of
//! the same length, each a request through the driver's queue, its transaction in 8 KiB
//! transfers, and for each transfer the chip's interrupt handed to the interrupt thread and
//! the DPC worker. Its throughput counts the bytes moved both ways (2 × size per round trip),
//! and its buffers are allocated per round trip: a request takes its buffer by value and the
//! [`RequestHandle`] only lends it back (`input()` / `output()` are `&SimBuffer`), so a buffer
//! cannot be submitted twice. Requests are at most 128 KiB (the board's SRAM), so larger sizes
//! are not applicable to it: the table shows "—" and the plot leaves the point out.
//!
//! A series is a [`SeriesSpec`]: a name, the largest size it applies to, and a constructor of
//! a [`Workload`] for one size. To add one, add an entry to [`SERIES`].

use crate::output::AtomicOutput;
use crate::plot::{LinePlot, XAxis, format_bytes};
use clap::Args;
use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, PhysAddr, Profile,
    SgElement, Transaction,
};
use dmatx_plx::hw::SRAM_SIZE;
use dmatx_plx::sim::{BoardConfig, SimBoard};
use dmatx_runtime::RequestHandle;
use dmatx_sim::{
    AdapterMode, CompletionMode, DEFAULT_MEMORY_BASE, DeviceCompletion, DeviceConfig, MemoryRegion,
    Placement, SimBuffer, SimConfig, SimDmaDevice, SimPlatform,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest size a point may have.
pub const MAX_SIZE: u64 = 16 << 20;

/// Default sizes: powers of two from 512 B to 1 MiB.
pub const DEFAULT_SIZES: &str = "512,1K,2K,4K,8K,16K,32K,64K,128K,256K,512K,1M";

/// Sizes of `--quick`.
pub const QUICK_SIZES: &str = "4K,64K,1M";

/// Default plot file.
pub const DEFAULT_PLOT: &str = "target/dmatx-bench.svg";

/// `dmatx bench`.
#[derive(Args, Debug, Default)]
pub struct BenchArgs {
    /// Transaction sizes, comma-separated, with optional suffix K/KiB, M/MiB (powers of 1024)
    /// [default: 512 B to 1 MiB in powers of two; with --quick: 4K,64K,1M].
    #[arg(long, value_name = "LIST")]
    pub sizes: Option<String>,
    /// Series to run, comma-separated: sg (scatter/gather, direct mapping), bounce (32-bit
    /// scatter/gather over high memory, bounce buffers), packet (packet DMA, direct), plx (the
    /// PLX9x5x driver, write + read-back round trips, sizes up to 128 KiB) [default: all].
    #[arg(long, value_name = "LIST")]
    pub series: Option<String>,
    /// Measuring time per point in milliseconds, split over the rounds [default: 150; with
    /// --quick: 10].
    #[arg(long, value_name = "MS", conflicts_with = "iterations")]
    pub time_ms: Option<u64>,
    /// Transactions per round, instead of timing (--time-ms).
    #[arg(long, value_name = "N")]
    pub iterations: Option<u64>,
    /// Rounds per point; the figure is the median round [default: 5; with --quick: 3].
    #[arg(long, value_name = "K")]
    pub rounds: Option<u32>,
    /// Smoke test: three sizes, a few milliseconds each (explicit options still apply).
    #[arg(long)]
    pub quick: bool,
    /// Where to write the SVG plot of throughput against size [default: target/dmatx-bench.svg].
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

/// One complete transaction of a fixed size (or one round trip), run again and again.
pub trait Workload {
    /// Runs one complete transaction (initialize to release), or one round trip of requests.
    ///
    /// # Errors
    /// A message if any step fails.
    fn run(&mut self) -> Result<(), String>;

    /// Checks, after at least one run, that the data arrived (for the first run's sake).
    ///
    /// # Errors
    /// A message if it did not.
    fn verify(&mut self) -> Result<(), String>;

    /// Bytes one run of a `size`-byte workload moves, which its throughput counts: by default
    /// `size` (one transaction in one direction).
    fn bytes_per_run(&self, size: u64) -> u64 {
        size
    }

    /// Tears the workload down once measuring is over, checking that what it ran on was left
    /// clean (nothing to do by default).
    ///
    /// # Errors
    /// What was found, as a message.
    fn finish(self: Box<Self>) -> Result<(), String> {
        Ok(())
    }
}

/// A benchmark series.
#[derive(Clone, Copy, Debug)]
pub struct SeriesSpec {
    /// Name on the command line (`--series`).
    pub key: &'static str,
    /// Name in the table and the plot's legend.
    pub label: &'static str,
    /// What one run is and what its throughput counts, printed before the table and under the
    /// plot.
    pub about: &'static str,
    /// Largest size the series applies to; larger sizes are skipped ("—" in the table, no
    /// point in the plot).
    pub max_size: u64,
    /// Builds the workload for transactions of `size` bytes (at most `max_size`).
    pub setup: fn(size: u64) -> Result<Box<dyn Workload>, String>,
}

impl SeriesSpec {
    /// Whether the series has a point at `size`.
    pub fn applies_to(&self, size: u64) -> bool {
        size <= self.max_size
    }
}

/// The series `dmatx bench` knows, in table order.
pub const SERIES: &[SeriesSpec] = &[
    SeriesSpec {
        key: "sg",
        label: "scatter/gather, direct",
        about: "write-to-device transactions, 64-bit scatter/gather over scattered pages, \
                direct mapping",
        max_size: MAX_SIZE,
        setup: |size| SimWorkload::new(size, Kind::ScatterGather).map(boxed),
    },
    SeriesSpec {
        key: "bounce",
        label: "scatter/gather, bounce buffers",
        about: "write-to-device transactions, 32-bit scatter/gather over buffers above 4 GiB, \
                every byte through bounce pages",
        max_size: MAX_SIZE,
        setup: |size| SimWorkload::new(size, Kind::Bounce).map(boxed),
    },
    SeriesSpec {
        key: "packet",
        label: "packet, direct",
        about: "write-to-device transactions, 64-bit packet DMA over a contiguous buffer",
        max_size: MAX_SIZE,
        setup: |size| SimWorkload::new(size, Kind::Packet).map(boxed),
    },
    SeriesSpec {
        key: "plx",
        label: "PLX9x5x driver, write + read-back",
        about: "round trips through the PLX9x5x driver on the simulated PCI9656 (immediate \
                engine, 1 MiB machine): a write request of the size, then a read request of \
                the same length, in 8 KiB transfers, each completed through the interrupt \
                thread and the DPC worker; MB/s counts the bytes moved both ways (2 × size), \
                µs/tx is per round trip; both buffers are allocated, and the write's filled, \
                per round trip (a request keeps its buffer); not applicable above 128 KiB (the \
                board's SRAM)",
        max_size: SRAM_SIZE,
        setup: |size| PlxWorkload::new(size).map(|w| Box::new(w) as Box<dyn Workload>),
    },
];

fn boxed(w: SimWorkload) -> Box<dyn Workload> {
    Box::new(w)
}

// ---------------------------------------------------------------------------------------------
// The simulated workloads.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ScatterGather,
    Bounce,
    Packet,
}

const HIGH_MEMORY: u64 = 0x1_0000_0000;
/// Map registers of the adapter: transfers of up to 32 pages (128 KiB).
const MAP_REGISTERS: u32 = 33;
const MAX_TRANSFER: u64 = 128 * 1024;

/// The execute context: the device program-DMA starts.
struct Driver {
    device: SimDmaDevice,
}

type Tx = Transaction<SimPlatform, Arc<Driver>, SimBuffer>;

/// EvtProgramDma: hand the SG list to the device at the transaction's offset.
fn program_dma(t: &Tx, driver: &Arc<Driver>, direction: Direction, sg: &[SgElement]) -> bool {
    driver.device.start(direction, sg, t.bytes_transferred());
    true
}

struct SimWorkload {
    sim: SimPlatform,
    transaction: Arc<Tx>,
    driver: Arc<Driver>,
    interrupts: Arc<Mutex<VecDeque<DeviceCompletion>>>,
    buffer: Option<SimBuffer>,
    data: Vec<u8>,
    size: u64,
    kind: Kind,
}

impl SimWorkload {
    fn new(size: u64, kind: Kind) -> Result<Self, String> {
        let (profile, placement, mut config) = match kind {
            Kind::ScatterGather => (
                Profile::ScatterGather64,
                Placement::Scatter { seed: 7 },
                SimConfig::new(),
            ),
            Kind::Packet => (Profile::Packet64, Placement::Contiguous, SimConfig::new()),
            // A 32-bit device, buffers above 4 GiB: every byte goes through bounce pages.
            Kind::Bounce => (
                Profile::ScatterGather,
                Placement::Above(PhysAddr::new(HIGH_MEMORY)),
                SimConfig::new()
                    .add_region(HIGH_MEMORY, (size + (1 << 20)).next_multiple_of(1 << 20))
                    .mode(AdapterMode::Bounce),
            ),
        };
        config = config.map_registers(MAP_REGISTERS);
        let sim = config
            .build()
            .map_err(|e| format!("cannot build the simulated machine: {e}"))?;
        let enabler_config = EnablerConfig::new(profile, MAX_TRANSFER)
            .with_version(DmaVersion::V3)
            .with_verifier(false);
        let enabler = Enabler::create(&DmaDevice::new(sim.clone()), enabler_config)
            .map_err(|e| format!("cannot create the DMA enabler: {e}"))?;
        let adapter = enabler
            .adapter(Direction::WriteToDevice)
            .ok_or("the enabler has no adapter")?;
        let device = SimDmaDevice::new(
            adapter,
            DeviceConfig::default()
                .storage_bytes(size.max(4096) as usize)
                .mode(CompletionMode::Immediate),
        );
        let interrupts: Arc<Mutex<VecDeque<DeviceCompletion>>> = Arc::default();
        let isr = Arc::clone(&interrupts);
        device.set_completion_handler(move |c| {
            isr.lock().expect("interrupt queue").push_back(c);
        });
        let transaction =
            Tx::create(&enabler).map_err(|e| format!("cannot create a transaction: {e}"))?;
        let mut buffer = sim
            .allocate_buffer_with(size, 0, placement)
            .map_err(|e| format!("no simulated memory for {size} bytes: {e}"))?;
        let data: Vec<u8> = (0..size)
            .map(|i| (i as u8).wrapping_mul(31) ^ 0x5A)
            .collect();
        buffer
            .write(0, &data)
            .map_err(|e| format!("cannot fill the buffer: {e}"))?;
        Ok(Self {
            sim,
            transaction,
            driver: Arc::new(Driver { device }),
            interrupts,
            buffer: Some(buffer),
            data,
            size,
            kind,
        })
    }
}

impl Workload for SimWorkload {
    fn run(&mut self) -> Result<(), String> {
        let t = &self.transaction;
        let buffer = self.buffer.take().ok_or("the buffer was lost")?;
        if let Err(e) =
            t.initialize_using_offset(program_dma, Direction::WriteToDevice, buffer, 0, self.size)
        {
            self.buffer = Some(e.buffer);
            return Err(format!("initialize: {}", e.error));
        }
        let finish = (|| {
            t.execute(Arc::clone(&self.driver))
                .map_err(|e| format!("execute: {e}"))?;
            loop {
                let completion = self
                    .interrupts
                    .lock()
                    .expect("interrupt queue")
                    .pop_front()
                    .ok_or("the device reported no completion for a running transfer")?;
                completion
                    .result
                    .map_err(|e| format!("device error: {e}"))?;
                match t
                    .dma_completed_with_length(completion.bytes)
                    .map_err(|e| format!("completion: {e}"))?
                {
                    Completion::Finished(status) => {
                        return status.map_err(|e| format!("transaction failed: {e}"));
                    }
                    Completion::MoreProcessingRequired => {}
                }
            }
        })();
        let released = t.release().map_err(|e| format!("release: {e}"))?;
        self.buffer = Some(released.ok_or("release returned no buffer")?);
        finish
    }

    fn verify(&mut self) -> Result<(), String> {
        let mut stored = vec![0u8; self.data.len()];
        self.driver
            .device
            .read_storage(0, &mut stored)
            .map_err(|e| format!("cannot read the device's storage: {e}"))?;
        if stored != self.data {
            return Err("the device's storage does not hold the buffer's bytes".into());
        }
        if self.kind == Kind::Bounce && self.sim.stats().bytes_bounced() < self.size {
            return Err("the adapter bounced nothing".into());
        }
        let violations = self.sim.sanitizer_record().len();
        if violations > 0 {
            return Err(format!(
                "the DMA sanitizer recorded {violations} violations"
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The PLX9x5x driver on its simulated board.

/// How long one PLX request may take before the run is called broken.
const PLX_REQUEST_TIMEOUT: Duration = dmatx_plx::scenarios::REQUEST_TIMEOUT;

/// Memory of the PLX board's machine: room for a round trip's two 128 KiB buffers several times
/// over. The default 64 MiB would put the simulated allocator's cost in every round trip: its
/// scattered placement considers every free frame, about 25 µs per buffer on 16 384 frames
/// against under 1 µs on 256 (measured on the machine of `docs/PERFORMANCE.md`).
const PLX_MEMORY: u64 = 1 << 20;

/// Round trips through the PLX9x5x driver: a write of `data`, then a read of as many bytes.
///
/// The driver maps every request onto SRAM[0, len), so each read-back must equal the write
/// before it. Round trips run one at a time, as the demo's do (the sample's queues are
/// sequential, and a read racing a write would read a changing SRAM).
///
/// Buffers cannot be reused: [`SimPlx::write`](dmatx_plx::driver::Plx::write) takes its buffer
/// by value and the request's handle only lends it back ([`RequestHandle::input`] is a
/// reference), so each round trip allocates a write buffer (filled with `data`) and a read
/// buffer, as an application's `WriteFile` / `ReadFile` pair with fresh buffers would. The
/// machine is small ([`PLX_MEMORY`]) so that allocating costs little next to the round trip.
struct PlxWorkload {
    /// `None` once shut down.
    board: Option<SimBoard>,
    data: Vec<u8>,
    size: u64,
    /// The last round trip's read, kept for `verify` (its buffer holds the read-back); dropped,
    /// and its buffer freed, when the next round trip starts.
    last_read: Option<RequestHandle<SimBuffer>>,
    /// A request never completed: the board cannot be removed (the sample waits for requests
    /// in flight), so it is dropped without shutting down.
    stuck: bool,
}

impl PlxWorkload {
    fn new(size: u64) -> Result<Self, String> {
        if !(1..=SRAM_SIZE).contains(&size) {
            return Err(format!(
                "the PLX board takes requests of 1 to {SRAM_SIZE} bytes, not {size}"
            ));
        }
        let mut config = BoardConfig::default();
        config.sim.regions = vec![MemoryRegion::new(
            PhysAddr::new(DEFAULT_MEMORY_BASE),
            PLX_MEMORY,
        )];
        let board =
            SimBoard::new(config).map_err(|e| format!("cannot build the simulated board: {e}"))?;
        let data: Vec<u8> = (0..size)
            .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8) ^ 0xA5)
            .collect();
        Ok(Self {
            board: Some(board),
            data,
            size,
            last_read: None,
            stuck: false,
        })
    }

    /// Shuts the board down once, if it can be: settled, removed and checked clean.
    fn shut_down(&mut self) -> Result<(), String> {
        self.last_read = None;
        let Some(board) = self.board.take() else {
            return Ok(());
        };
        if self.stuck {
            return Err(
                "the PLX board was not shut down: a request never completed, and the board \
                 cannot be removed with a request in flight"
                    .into(),
            );
        }
        let settled = board.settle(PLX_REQUEST_TIMEOUT);
        let clean = board.shut_down();
        match (settled, clean) {
            (true, Ok(())) => Ok(()),
            (false, Ok(())) => {
                Err("the PLX board's interrupts and DPCs did not settle before shut-down".into())
            }
            (_, Err(e)) => Err(format!(
                "the PLX board did not shut down clean: {}",
                e.replace('\n', "; ")
            )),
        }
    }
}

/// Waits for `handle`, which must move `len` bytes.
fn completed(
    handle: &RequestHandle<SimBuffer>,
    what: &str,
    len: u64,
    stuck: &mut bool,
) -> Result<(), String> {
    let Some(done) = handle.wait_timeout(PLX_REQUEST_TIMEOUT) else {
        *stuck = true;
        return Err(format!(
            "{what}: the request did not complete within {} s",
            PLX_REQUEST_TIMEOUT.as_secs()
        ));
    };
    done.status.map_err(|e| format!("{what}: {e}"))?;
    if done.information != len {
        return Err(format!(
            "{what}: {} bytes transferred of {len}",
            done.information
        ));
    }
    Ok(())
}

impl Workload for PlxWorkload {
    fn run(&mut self) -> Result<(), String> {
        let Self {
            board,
            data,
            size,
            last_read,
            stuck,
        } = self;
        let board = board.as_ref().ok_or("the PLX board was shut down")?;
        *last_read = None;
        let write = board
            .write(data, 0)
            .map_err(|e| format!("write: cannot submit: {e}"))?;
        completed(&write, "write", *size, stuck)?;
        let read = board
            .read(*size, 0)
            .map_err(|e| format!("read: cannot submit: {e}"))?;
        completed(&read, "read", *size, stuck)?;
        *last_read = Some(read);
        Ok(())
    }

    fn verify(&mut self) -> Result<(), String> {
        let board = self.board.as_ref().ok_or("the PLX board was shut down")?;
        let read = self.last_read.as_ref().ok_or("no round trip has run")?;
        let buffer = read.output().ok_or("the read has no buffer")?;
        let mut back = vec![0u8; self.data.len()];
        buffer
            .read(0, &mut back)
            .map_err(|e| format!("cannot read the read's buffer: {e}"))?;
        if let Some(at) = back.iter().zip(&self.data).position(|(a, b)| a != b) {
            return Err(format!(
                "the read-back differs from the write at byte {at} ({:#04x}, {:#04x} was written)",
                back[at], self.data[at]
            ));
        }
        let violations = board.sim().sanitizer_record().len();
        if violations > 0 {
            return Err(format!(
                "the DMA sanitizer recorded {violations} violations"
            ));
        }
        Ok(())
    }

    fn bytes_per_run(&self, size: u64) -> u64 {
        2 * size
    }

    fn finish(mut self: Box<Self>) -> Result<(), String> {
        self.shut_down()
    }
}

impl Drop for PlxWorkload {
    /// Without [`Workload::finish`] (a panic, a caller that forgot), the board is still shut
    /// down, and a failure reported on stderr: there is no caller to return it to.
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            eprintln!("dmatx bench: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring.

/// Parses a size list such as `512,4K,64KiB,1M`.
///
/// # Errors
/// A one-line message naming the bad entry.
pub fn parse_sizes(list: &str) -> Result<Vec<u64>, String> {
    let mut sizes = Vec::new();
    for entry in list.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(format!("--sizes {list:?}: an empty entry"));
        }
        let split = entry
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(entry.len());
        let (digits, suffix) = entry.split_at(split);
        let multiplier = match suffix.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            _ => {
                return Err(format!(
                    "--sizes: {entry:?} is not a size (a number with an optional K, KiB, M or MiB)"
                ));
            }
        };
        let value: u64 = digits.parse().map_err(|_| {
            format!("--sizes: {entry:?} is not a size (a number with an optional K, KiB, M or MiB)")
        })?;
        let size = value
            .checked_mul(multiplier)
            .filter(|&s| (1..=MAX_SIZE).contains(&s))
            .ok_or_else(|| {
                format!(
                    "--sizes: {entry} is out of range (1 B to {})",
                    format_bytes(MAX_SIZE as f64)
                )
            })?;
        if !sizes.contains(&size) {
            sizes.push(size);
        }
    }
    sizes.sort_unstable();
    Ok(sizes)
}

/// Parses `--series`.
///
/// # Errors
/// A one-line message naming an unknown series.
pub fn parse_series(list: &str) -> Result<Vec<&'static SeriesSpec>, String> {
    let mut chosen: Vec<&'static SeriesSpec> = Vec::new();
    for key in list.split(',').map(str::trim) {
        let spec = SERIES.iter().find(|s| s.key == key).ok_or_else(|| {
            let known: Vec<&str> = SERIES.iter().map(|s| s.key).collect();
            format!(
                "--series: unknown series {key:?} (known: {})",
                known.join(", ")
            )
        })?;
        if !chosen.iter().any(|c| c.key == spec.key) {
            chosen.push(spec);
        }
    }
    Ok(chosen)
}

/// How long to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// About this much time per point, over all rounds.
    Time(Duration),
    /// This many transactions per round.
    Iterations(u64),
}

/// One measured point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Bytes per transaction.
    pub size: u64,
    /// Median throughput, MB/s (10^6 bytes per second) of the bytes the runs moved
    /// ([`Workload::bytes_per_run`]).
    pub mb_per_s: f64,
    /// Median time per transaction (per run: a round trip for `plx`), µs.
    pub us_per_transaction: f64,
    /// Transactions (runs) per round.
    pub iterations: u64,
    /// Lowest and highest round throughput, MB/s.
    pub spread: (f64, f64),
}

/// Measures `workload` of `size` bytes: a warm-up that also checks the data, then `rounds`
/// rounds; the median round gives the figure.
///
/// # Errors
/// The workload's error.
pub fn measure(
    workload: &mut dyn Workload,
    size: u64,
    budget: Budget,
    rounds: u32,
) -> Result<Point, String> {
    let rounds = rounds.max(1);
    // Warm-up: at least 3 transactions and about a tenth of the budget; it also sizes rounds.
    let warm_budget = match budget {
        Budget::Time(d) => d / 10,
        Budget::Iterations(_) => Duration::ZERO,
    };
    let started = Instant::now();
    let mut warm = 0u64;
    while warm < 3 || (started.elapsed() < warm_budget && warm < 1_000_000) {
        workload.run()?;
        warm += 1;
    }
    workload.verify()?;
    let per_transaction = started.elapsed().as_secs_f64() / warm as f64;
    let iterations = match budget {
        Budget::Iterations(n) => n.max(1),
        Budget::Time(d) => {
            ((d.as_secs_f64() / f64::from(rounds)) / per_transaction.max(1e-9)).max(1.0) as u64
        }
    };
    let mut results: Vec<f64> = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..iterations {
            workload.run()?;
        }
        results.push(start.elapsed().as_secs_f64().max(1e-9));
    }
    results.sort_by(f64::total_cmp);
    let median = results[results.len() / 2];
    let bytes = (workload.bytes_per_run(size) * iterations) as f64;
    Ok(Point {
        size,
        mb_per_s: bytes / median / 1e6,
        us_per_transaction: median / iterations as f64 * 1e6,
        iterations,
        spread: (
            bytes / results[results.len() - 1] / 1e6,
            bytes / results[0] / 1e6,
        ),
    })
}

/// Measures `spec` at `size` as [`measure`] does, with a workload built for the point and
/// finished after it ([`Workload::finish`]); `None` if the series does not apply to `size`.
///
/// # Errors
/// The workload's error from setup, measuring or finishing (both if measuring and finishing
/// failed).
pub fn measure_series(
    spec: &SeriesSpec,
    size: u64,
    budget: Budget,
    rounds: u32,
) -> Result<Option<Point>, String> {
    if !spec.applies_to(size) {
        return Ok(None);
    }
    let mut workload = (spec.setup)(size)?;
    let measured = measure(workload.as_mut(), size, budget, rounds);
    match (measured, workload.finish()) {
        (Ok(point), Ok(())) => Ok(Some(point)),
        (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
        (Err(e), Err(finish)) => Err(format!("{e}; then {finish}")),
    }
}

/// The resolved settings of a run.
#[derive(Clone, Debug)]
struct Settings {
    sizes: Vec<u64>,
    sizes_text: String,
    series: Vec<&'static SeriesSpec>,
    budget: Budget,
    rounds: u32,
    plot: PathBuf,
}

impl Settings {
    fn from_args(args: &BenchArgs) -> Result<Self, String> {
        let sizes_text = args.sizes.clone().unwrap_or_else(|| {
            if args.quick {
                QUICK_SIZES
            } else {
                DEFAULT_SIZES
            }
            .to_owned()
        });
        let sizes = parse_sizes(&sizes_text)?;
        let series = match &args.series {
            Some(list) => parse_series(list)?,
            None => SERIES.iter().collect(),
        };
        let budget = match (args.iterations, args.time_ms) {
            (Some(0), _) => return Err("--iterations must be at least 1".into()),
            (Some(n), _) => Budget::Iterations(n),
            (None, Some(0)) => return Err("--time-ms must be at least 1".into()),
            (None, Some(ms)) if ms > 600_000 => {
                return Err(format!("--time-ms {ms} is more than ten minutes per point"));
            }
            (None, Some(ms)) => Budget::Time(Duration::from_millis(ms)),
            (None, None) => Budget::Time(Duration::from_millis(if args.quick { 10 } else { 150 })),
        };
        let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 5 });
        if !(1..=1000).contains(&rounds) {
            return Err(format!("--rounds {rounds} is outside 1 to 1000"));
        }
        let plot = args
            .plot
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PLOT));
        Ok(Self {
            sizes_text: sizes
                .iter()
                .map(|&s| short_size(s))
                .collect::<Vec<_>>()
                .join(","),
            sizes,
            series,
            budget,
            rounds,
            plot,
        })
    }

    /// The command line that reproduces this run.
    fn command_line(&self) -> String {
        let series: Vec<&str> = self.series.iter().map(|s| s.key).collect();
        let budget = match self.budget {
            Budget::Time(d) => format!("--time-ms {}", d.as_millis()),
            Budget::Iterations(n) => format!("--iterations {n}"),
        };
        format!(
            "cargo run --release --bin dmatx -- bench --sizes {} --series {} {budget} --rounds {} --plot {}",
            self.sizes_text,
            series.join(","),
            self.rounds,
            shell_word(&self.plot.display().to_string())
        )
    }
}

/// `size` in the shortest form `--sizes` reads back.
fn short_size(size: u64) -> String {
    if size.is_multiple_of(1 << 20) {
        format!("{}M", size >> 20)
    } else if size.is_multiple_of(1024) {
        format!("{}K", size >> 10)
    } else {
        size.to_string()
    }
}

/// `word` quoted for a POSIX shell if it needs it.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=+,@".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs `dmatx bench`.
///
/// # Errors
/// A one-line message: bad options, the plot cannot be written (checked before measuring), or a
/// workload failed.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    let settings = Settings::from_args(args)?;
    // The default's directory is made; a directory the user named must exist.
    if args.plot.is_none()
        && let Some(dir) = settings.plot.parent()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let out = AtomicOutput::prepare(&settings.plot)?;
    let build = if cfg!(debug_assertions) {
        "debug build: figures are far below a release build's"
    } else {
        "release build"
    };
    println!(
        "dmatx bench: whole transactions on the simulated machine, immediate devices (sg, bounce \
         and packet in transfers up to {} with {} map registers); {build}",
        format_bytes(MAX_TRANSFER as f64),
        MAP_REGISTERS
    );
    for spec in &settings.series {
        println!("  {}: {}", spec.key, spec.about);
    }
    let per_point = match settings.budget {
        Budget::Time(d) => format!("about {} ms per point", d.as_millis()),
        Budget::Iterations(n) => format!("{n} transactions per round"),
    };
    println!(
        "{} sizes × {} series, median of {} rounds, {per_point}",
        settings.sizes.len(),
        settings.series.len(),
        settings.rounds
    );

    let total = settings
        .series
        .iter()
        .map(|spec| {
            settings
                .sizes
                .iter()
                .filter(|&&s| spec.applies_to(s))
                .count() as u64
        })
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} {msg} [{elapsed}]")
            .map_err(|e| format!("progress bar: {e}"))?
            .progress_chars("##-"),
    );
    let mut results: Vec<Vec<Option<Point>>> = Vec::new();
    for spec in &settings.series {
        let mut points = Vec::new();
        for &size in &settings.sizes {
            bar.set_message(format!("{} {}", spec.key, format_bytes(size as f64)));
            let point =
                measure_series(spec, size, settings.budget, settings.rounds).map_err(|e| {
                    bar.abandon();
                    format!("{} at {}: {e}", spec.key, format_bytes(size as f64))
                })?;
            if point.is_some() {
                bar.inc(1);
            }
            points.push(point);
        }
        results.push(points);
    }
    bar.finish_and_clear();

    print!(
        "{}",
        format_table(&settings.series, &settings.sizes, &results)
    );
    let command = settings.command_line();
    let mut plot = LinePlot::new(
        "dmatx: throughput of whole transactions against their size",
        XAxis::Log2Bytes,
        "transaction size (log2 scale)",
        "MB/s",
    );
    plot.subtitle = format!(
        "simulated machine, immediate devices (sg, bounce, packet: transfers up to {}); median \
         of {} rounds; {build}",
        format_bytes(MAX_TRANSFER as f64),
        settings.rounds
    );
    for (spec, points) in settings.series.iter().zip(&results) {
        // A skipped size has no point: the line joins the sizes the series applies to.
        let xy = points
            .iter()
            .flatten()
            .map(|p| (p.size as f64, p.mb_per_s))
            .collect();
        plot.add_series(spec.label, xy);
        plot.add_caption(&format!("{}: {}", spec.label, spec.about));
    }
    plot.add_caption(&format!("reproduce: {command}"));
    out.write(plot.to_svg().as_bytes())?;
    println!("reproduce: {command}");
    println!("plot written to {}", settings.plot.display());
    Ok(())
}

/// The table of `results` (one column per series, one row per size; `None` is a size the
/// series does not apply to, shown as "—"), with a note under it for each series that skipped a
/// size.
fn format_table(series: &[&SeriesSpec], sizes: &[u64], results: &[Vec<Option<Point>>]) -> String {
    const CELL: usize = 24;
    // Labels wrap at spaces onto as many header lines as the longest needs.
    let labels: Vec<Vec<String>> = series.iter().map(|s| wrap_label(s.label, CELL)).collect();
    let header_lines = labels.iter().map(Vec::len).max().unwrap_or(1);
    let mut out = String::new();
    let width = 9 + series.len() * (CELL + 2);
    for line in 0..header_lines {
        let mut text = format!("{:>9}", if line + 1 == header_lines { "size" } else { "" });
        for label in &labels {
            // Bottom-aligned, so every label ends on the line of "size".
            let pad = header_lines - label.len();
            let part = line.checked_sub(pad).map_or("", |k| label[k].as_str());
            text.push_str(&format!("  {part:>CELL$}"));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    let mut units = format!("{:>9}", "");
    for _ in series {
        units.push_str(&format!("  {:>CELL$}", "MB/s    µs/tx"));
    }
    out.push_str(&format!("{units}\n{:-<width$}\n", ""));
    for (row, &size) in sizes.iter().enumerate() {
        let mut line = format!("{:>9}", format_bytes(size as f64));
        for points in results {
            let cell = match &points[row] {
                Some(p) => format!("{:.1} {:>9.2}", p.mb_per_s, p.us_per_transaction),
                None => "—".to_owned(),
            };
            line.push_str(&format!("  {cell:>CELL$}"));
        }
        out.push_str(&format!("{line}\n"));
    }
    out.push_str(&format!("{:-<width$}\n", ""));
    for (spec, points) in series.iter().zip(results) {
        if points.iter().any(Option::is_none) {
            out.push_str(&format!(
                "—: not applicable ({} takes at most {})\n",
                spec.key,
                format_bytes(spec.max_size as f64)
            ));
        }
    }
    out
}

/// `label` cut at spaces into lines of at most `columns` characters (a longer word is cut).
fn wrap_label(label: &str, columns: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in label.split(' ') {
        let word: String = word.chars().take(columns).collect();
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= columns => {
                line.push(' ');
                line.push_str(&word);
            }
            _ => lines.push(word),
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_refuse_nonsense() {
        assert_eq!(
            parse_sizes("512,4K,64KiB,1M").unwrap(),
            [512, 4096, 65536, 1 << 20]
        );
        assert_eq!(parse_sizes(" 1m , 2kb,2K ").unwrap(), [2048, 1 << 20]);
        assert_eq!(parse_sizes(DEFAULT_SIZES).unwrap().len(), 12);
        for (bad, says) in [
            ("0", "out of range"),
            ("32M", "out of range"),
            ("4X", "not a size"),
            ("", "empty entry"),
            ("1,,2", "empty entry"),
            ("-1", "not a size"),
            ("99999999999999999999", "not a size"),
        ] {
            let e = parse_sizes(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.starts_with("--sizes"), "{e}");
        }
    }

    #[test]
    fn series_parse_by_key() {
        let s = parse_series("bounce,sg,bounce").unwrap();
        assert_eq!(
            s.iter().map(|s| s.key).collect::<Vec<_>>(),
            ["bounce", "sg"]
        );
        assert!(
            parse_series("pci")
                .unwrap_err()
                .contains("known: sg, bounce, packet, plx")
        );
    }

    #[test]
    fn every_series_runs_moves_the_bytes_and_measures() {
        for spec in SERIES {
            for size in [1, 4096, SRAM_SIZE, 200_000] {
                let p = measure_series(spec, size, Budget::Iterations(3), 3)
                    .unwrap_or_else(|e| panic!("{} {size}: {e}", spec.key));
                let Some(p) = p else {
                    // Only the PLX board has a limit among these sizes: its SRAM.
                    assert_eq!((spec.key, size), ("plx", 200_000));
                    assert!(!spec.applies_to(size));
                    assert!((spec.setup)(size).is_err(), "plx built at {size}");
                    continue;
                };
                assert_eq!((p.size, p.iterations), (size, 3));
                assert!(p.mb_per_s > 0.0 && p.us_per_transaction > 0.0);
                assert!(p.spread.0 <= p.mb_per_s && p.mb_per_s <= p.spread.1);
            }
        }
    }

    #[test]
    fn plx_counts_both_directions_and_shuts_the_board_down() {
        let mut w = PlxWorkload::new(4096).unwrap();
        w.run().unwrap();
        w.verify().unwrap();
        assert_eq!(w.bytes_per_run(4096), 8192);
        let writes = w.board.as_ref().unwrap().plx().stats().program_write_calls;
        assert_eq!(
            writes, 1,
            "a 4 KiB write is one transfer (of at most 8 KiB)"
        );
        Box::new(w).finish().unwrap();
        // Shut down, a workload refuses to run, and its drop has nothing left to do.
        let mut w = PlxWorkload::new(1).unwrap();
        assert!(w.verify().unwrap_err().contains("no round trip"));
        w.shut_down().unwrap();
        assert!(w.run().unwrap_err().contains("shut down"));
        assert!(PlxWorkload::new(SRAM_SIZE + 1).is_err());
        assert!(PlxWorkload::new(0).is_err());
    }

    #[test]
    fn the_table_shows_skipped_sizes_as_a_dash() {
        let series: Vec<&SeriesSpec> = parse_series("sg,plx").unwrap();
        let sizes = [4096, 1 << 20];
        let point = |size| Point {
            size,
            mb_per_s: 1234.5,
            us_per_transaction: 3.25,
            iterations: 10,
            spread: (1200.0, 1300.0),
        };
        let results = vec![
            vec![Some(point(4096)), Some(point(1 << 20))],
            vec![Some(point(4096)), None],
        ];
        let table = format_table(&series, &sizes, &results);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].ends_with("PLX9x5x driver, write +"), "{table}");
        assert!(lines[1].starts_with("     size") && lines[1].ends_with("read-back"));
        let row = |size: &str| {
            *lines
                .iter()
                .find(|l| l.trim_start().starts_with(size))
                .unwrap()
        };
        assert_eq!(row("4 KiB").matches("1234.5      3.25").count(), 2);
        assert!(row("1 MiB").trim_end().ends_with('—'));
        assert_eq!(row("1 MiB").matches("1234.5").count(), 1);
        assert!(table.contains("—: not applicable (plx takes at most 128 KiB)"));
        let widths: Vec<usize> = lines
            .iter()
            .filter(|l| l.starts_with('-'))
            .map(|l| l.chars().count())
            .collect();
        assert_eq!(widths, [9 + 2 * 26, 9 + 2 * 26]);
    }

    #[test]
    fn the_reproducing_command_reads_back_the_same_settings() {
        let args = BenchArgs {
            sizes: Some("1m,512,4096".into()),
            series: Some("bounce".into()),
            time_ms: Some(20),
            plot: Some("out dir/p.svg".into()),
            ..BenchArgs::default()
        };
        let s = Settings::from_args(&args).unwrap();
        assert_eq!(
            s.command_line(),
            "cargo run --release --bin dmatx -- bench --sizes 512,4K,1M --series bounce --time-ms 20 --rounds 5 --plot 'out dir/p.svg'"
        );
        assert_eq!(parse_sizes(&s.sizes_text).unwrap(), s.sizes);
        let quick = Settings::from_args(&BenchArgs {
            quick: true,
            ..BenchArgs::default()
        })
        .unwrap();
        assert_eq!(quick.sizes, [4096, 65536, 1 << 20]);
        assert_eq!(
            (quick.budget, quick.rounds),
            (Budget::Time(Duration::from_millis(10)), 3)
        );
        for bad in [
            BenchArgs {
                iterations: Some(0),
                ..BenchArgs::default()
            },
            BenchArgs {
                time_ms: Some(0),
                ..BenchArgs::default()
            },
            BenchArgs {
                rounds: Some(0),
                ..BenchArgs::default()
            },
        ] {
            assert!(Settings::from_args(&bad).is_err());
        }
    }
}
