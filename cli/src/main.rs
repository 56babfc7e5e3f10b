//! The `dmatx` command.
//!
//! `dmatx demo` runs a stream of write and read-back requests through dmatx on the simulated
//! machine: each request writes a buffer of random size and page offset to a simulated
//! scatter/gather device and reads it back into a fresh buffer, byte-verified, with the
//! transfers completed from a DPC-like loop as the device finishes them. It ends with a summary.
//! (The PLX9x5x sample replaces this workload with a real driver port in a later release.)
//!
//! `dmatx trace render` and `dmatx bench` live in the crate's library (`dmatx_cli::render`,
//! `dmatx_cli::bench`).

use clap::{Parser, Subcommand, ValueEnum};
use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, PhysAddr, Profile,
    SgElement, Transaction,
};
use dmatx_sim::{
    AdapterMode, CompletionMode, DeviceCompletion, DeviceConfig, DeviceFault, Placement, SimBuffer,
    SimConfig, SimDmaDevice, SimPlatform,
};
use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    /// Run write and read-back requests through dmatx on the simulated machine.
    Demo(DemoArgs),
    /// Work with trace-event JSON files (`dmatx trace render FILE OUT.svg`).
    Trace(dmatx_cli::render::TraceArgs),
    /// Measure the throughput of whole transactions against their size and plot it.
    Bench(dmatx_cli::bench::BenchArgs),
}

#[derive(Parser)]
struct DemoArgs {
    /// Number of requests (each one write and one read-back transaction).
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Largest request in bytes (sizes are uniform in 1..=this).
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1..=4 << 20))]
    max_size: u64,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How the adapter maps: bounce pages for a 32-bit device over high memory, an IOMMU, or
    /// directly.
    #[arg(long, value_enum, default_value_t = Mode::Bounce)]
    mode: Mode,
    /// Map registers of the adapter (N; transfers are at most N − 1 pages).
    #[arg(long, default_value_t = 33, value_parser = clap::value_parser!(u32).range(2..=4096))]
    map_registers: u32,
    /// Inject faults: partial transfers and map-register exhaustion.
    #[arg(long)]
    faults: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Direct,
    Iommu,
    Bounce,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo(&args),
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

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The execute context: the device the program-DMA callback starts transfers on.
struct Driver {
    device: SimDmaDevice,
    /// Where on the device this request's data lives.
    device_offset: Mutex<u64>,
}

type Tx = Transaction<SimPlatform, Arc<Driver>, SimBuffer>;

/// EvtProgramDma: hand the SG list to the device at the request's position.
fn program_dma(t: &Tx, driver: &Arc<Driver>, direction: Direction, sg: &[SgElement]) -> bool {
    let base = *driver.device_offset.lock().expect("device offset lock");
    driver
        .device
        .start(direction, sg, base + t.bytes_transferred());
    true
}

const HIGH_MEMORY: u64 = 0x1_0000_0000;
const STORAGE: u64 = 8 << 20;

#[derive(Default)]
struct Totals {
    requests: u64,
    transactions: u64,
    bytes_verified: u64,
    partial_completions: u64,
    queued_starts: u64,
    errors: u64,
}

fn demo(args: &DemoArgs) -> Result<(), String> {
    let mode = match args.mode {
        Mode::Direct => AdapterMode::Direct,
        Mode::Iommu => AdapterMode::Iommu,
        Mode::Bounce => AdapterMode::Bounce,
    };
    // A 32-bit scatter/gather device; buffers live above 4 GiB, so it needs bounce pages or an
    // IOMMU (for direct mapping the machine has no memory above 4 GiB).
    let placement = match args.mode {
        Mode::Direct => Placement::Scatter { seed: args.seed },
        _ => Placement::Above(PhysAddr::new(HIGH_MEMORY)),
    };
    let mut sim_config = SimConfig::new()
        .map_registers(args.map_registers)
        .mode(mode);
    if !matches!(args.mode, Mode::Direct) {
        sim_config = sim_config.add_region(HIGH_MEMORY, 64 << 20);
    }
    let sim = sim_config
        .build()
        .map_err(|e| format!("cannot build the simulated machine: {e}"))?;
    let config = EnablerConfig::new(Profile::ScatterGather, 1 << 20).with_version(DmaVersion::V3);
    let enabler = Enabler::create(&DmaDevice::new(sim.clone()), config)
        .map_err(|e| format!("cannot create the DMA enabler: {e}"))?;
    let adapter = enabler
        .adapter(Direction::WriteToDevice)
        .ok_or("the enabler has no adapter")?
        .clone();
    let device = SimDmaDevice::new(
        &adapter,
        DeviceConfig::default()
            .storage_bytes(STORAGE as usize)
            .mode(CompletionMode::Deferred { latency_ns: 2_000 }),
    );
    let interrupts: Arc<Mutex<VecDeque<DeviceCompletion>>> = Arc::default();
    let isr = Arc::clone(&interrupts);
    device.set_completion_handler(move |c| isr.lock().expect("interrupt queue").push_back(c));
    let driver = Arc::new(Driver {
        device,
        device_offset: Mutex::new(0),
    });

    // Two transactions created once and reused for every request (release, then initialize).
    let writer = Tx::create(&enabler).map_err(|e| format!("cannot create a transaction: {e}"))?;
    let reader = Tx::create(&enabler).map_err(|e| format!("cannot create a transaction: {e}"))?;

    println!(
        "dmatx demo: {} requests up to {} bytes, {} mapping, N = {} map registers (transfers up to {} bytes){}",
        args.count,
        args.max_size,
        mode_name(args.mode),
        args.map_registers,
        enabler.fragment_length(Direction::WriteToDevice),
        if args.faults { ", faults on" } else { "" },
    );
    let mut rng = Rng(args.seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut totals = Totals::default();
    let started = Instant::now();
    let step = (args.count / 20).max(1);
    for request in 0..args.count {
        let size = 1 + rng.below(args.max_size);
        let page_offset = rng.below(4096);
        let device_offset = rng.below(STORAGE - size + 1);
        *driver.device_offset.lock().expect("device offset lock") = device_offset;
        let salt = rng.next() as u8;
        let data: Vec<u8> = (0..size)
            .map(|i| (i as u8).wrapping_mul(31) ^ salt)
            .collect();

        let mut out = sim
            .allocate_buffer_with(size, page_offset, placement)
            .map_err(|e| format!("request {request}: no simulated memory for {size} bytes: {e}"))?;
        out.write(0, &data)
            .map_err(|e| format!("request {request}: {e}"))?;
        let back = sim
            .allocate_buffer_with(size, (page_offset * 7) % 4096, placement)
            .map_err(|e| format!("request {request}: no simulated memory for {size} bytes: {e}"))?;

        let out = run(
            &writer,
            &driver,
            &interrupts,
            &adapter,
            Direction::WriteToDevice,
            out,
            args.faults,
            &mut rng,
            &mut totals,
        )
        .map_err(|e| format!("request {request} (write of {size} bytes): {e}"))?;
        let back = run(
            &reader,
            &driver,
            &interrupts,
            &adapter,
            Direction::ReadFromDevice,
            back,
            args.faults,
            &mut rng,
            &mut totals,
        )
        .map_err(|e| format!("request {request} (read of {size} bytes): {e}"))?;
        let got = back.to_vec();
        if got == data {
            totals.bytes_verified += size;
        } else {
            totals.errors += 1;
            let at = got.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
            eprintln!("\ndmatx: request {request}: data mismatch at byte {at} of {size}");
        }
        totals.requests += 1;
        drop((out, back));
        if (request + 1) % step == 0 || request + 1 == args.count {
            let done = (request + 1) * 40 / args.count;
            eprint!(
                "\r[{}{}] {}/{}",
                "#".repeat(done as usize),
                " ".repeat(40 - done as usize),
                request + 1,
                args.count
            );
        }
    }
    eprintln!();
    let elapsed = started.elapsed();
    drop((writer, reader));

    let device_stats = driver.device.stats();
    let adapter_stats = adapter.stats();
    let violations = sim.sanitizer_record().len();
    let clean = sim.check_clean();
    let rows = [
        ("requests (write + read-back)", totals.requests.to_string()),
        ("transactions", totals.transactions.to_string()),
        ("bytes verified", totals.bytes_verified.to_string()),
        ("transfers", device_stats.transfers_started.to_string()),
        ("SG elements", device_stats.sg_elements_seen.to_string()),
        (
            "partial completions",
            totals.partial_completions.to_string(),
        ),
        (
            "starts queued for map registers",
            totals.queued_starts.to_string(),
        ),
        ("bytes bounced", adapter_stats.bytes_bounced.to_string()),
        (
            "device interrupts",
            device_stats.transfers_completed.to_string(),
        ),
        (
            "peak map registers in use",
            format!(
                "{} of {}",
                adapter_stats.peak_in_use, adapter_stats.total_registers
            ),
        ),
        ("sanitizer record", format!("{violations} violations")),
        (
            "pools back to full",
            if clean.is_ok() {
                "yes".into()
            } else {
                "NO".into()
            },
        ),
        ("errors", totals.errors.to_string()),
        (
            "throughput",
            format!(
                "{:.1} MiB/s verified ({:.0} transactions/s, {:.2} s)",
                totals.bytes_verified as f64 * 2.0 / (1 << 20) as f64 / elapsed.as_secs_f64(),
                totals.transactions as f64 / elapsed.as_secs_f64(),
                elapsed.as_secs_f64()
            ),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{:-<1$}", "", width + 40);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
    println!("{:-<1$}", "", width + 40);
    clean.map_err(|e| format!("the simulated machine did not come back clean: {e}"))?;
    if violations > 0 {
        return Err(format!(
            "the DMA sanitizer recorded {violations} violations"
        ));
    }
    if totals.errors > 0 {
        return Err(format!("{} requests read back wrong data", totals.errors));
    }
    Ok(())
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Direct => "direct",
        Mode::Iommu => "IOMMU",
        Mode::Bounce => "bounce-buffer",
    }
}

/// One transaction: initialize, execute, then the DPC loop that reports each finished transfer,
/// and release; gives the buffer back.
#[allow(clippy::too_many_arguments)]
fn run(
    t: &Tx,
    driver: &Arc<Driver>,
    interrupts: &Mutex<VecDeque<DeviceCompletion>>,
    adapter: &dmatx_sim::SimAdapter,
    direction: Direction,
    buffer: SimBuffer,
    faults: bool,
    rng: &mut Rng,
    totals: &mut Totals,
) -> Result<SimBuffer, String> {
    let length = buffer.len();
    t.initialize_using_offset(program_dma, direction, buffer, 0, length)
        .map_err(|e| format!("initialize: {}", e.error))?;
    let device = &driver.device;
    if faults {
        // Partial transfers on some of this transaction's transfers.
        let next = device.stats().transfers_started;
        for k in 0..4 {
            if rng.below(4) == 0 {
                device.inject(next + k, DeviceFault::Partial(rng.below(8192)));
            }
        }
    }
    // Now and then every map register is taken while the transaction starts: the start queues
    // and the registers' return grants it.
    let starve = faults && rng.below(8) == 0;
    if starve {
        adapter.exhaust(u32::MAX);
    }
    t.execute(Arc::clone(driver))
        .map_err(|e| format!("execute: {e}"))?;
    if starve {
        totals.queued_starts += 1;
        adapter.restore();
    }
    totals.transactions += 1;
    let status = loop {
        // The "DPC": let the device run until it interrupts, then report the transfer.
        let completion = loop {
            if let Some(c) = interrupts.lock().expect("interrupt queue").pop_front() {
                break c;
            }
            if device.run_pending() == 0 {
                return Err(
                    "the device has nothing pending but the transaction is executing".into(),
                );
            }
        };
        completion
            .result
            .map_err(|e| format!("device error: {e}"))?;
        if completion.bytes < t.current_transfer_length() {
            totals.partial_completions += 1;
        }
        match t
            .dma_completed_with_length(completion.bytes)
            .map_err(|e| format!("completion: {e}"))?
        {
            Completion::Finished(status) => break status,
            Completion::MoreProcessingRequired => {}
        }
    };
    status.map_err(|e| format!("transaction failed: {e}"))?;
    if t.bytes_transferred() != length {
        return Err(format!(
            "{} of {length} bytes transferred",
            t.bytes_transferred()
        ));
    }
    t.release()
        .map_err(|e| format!("release: {e}"))?
        .ok_or_else(|| "release returned no buffer".to_string())
}
