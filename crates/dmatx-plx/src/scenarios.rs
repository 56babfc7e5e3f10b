//! The sample scenarios P1–P19 of `samples.md` §4.3, each a run on fresh simulated boards that
//! records what it observed beside what the sample's description expects.
//!
//! A scenario returns a [`Report`]: its checks (what, expected, observed) and notes. The tests
//! (`tests/scenarios.rs`, `plx_pNN_…`) require every check to pass; `dmatx scenario NAME`
//! prints the report. Every scenario ends by shutting its boards down — removal with the soft
//! reset, chip idle, pools full, sanitizer record empty — and that is a check too.

use std::fmt::{self, Debug, Display};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmatx::{Direction, Error, State};
use dmatx_runtime::{Completed, RequestHandle};
use dmatx_sim::{
    Placement, Plx9656ChannelState, Plx9656Config, Plx9656EventKind, Plx9656Fault, Plx9656Mode,
    Plx9656Outcome, SimBuffer, SimConfig,
};

use crate::driver::{CompletionCall, PlxConfig, Variant};
use crate::hw::{self, DMA_DAC, INTCSR, dpr, intcsr};
use crate::sim::{BoardConfig, SimBoard, VirtualClock};

/// How long a scenario waits for one request before it calls the run failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One observation checked against the expectation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was observed.
    pub what: String,
    /// What the scenario's description expects.
    pub expected: String,
    /// What happened.
    pub observed: String,
    /// Whether they agree.
    pub ok: bool,
}

/// What a scenario run observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The scenario's name (`P1` …).
    pub name: &'static str,
    /// One line on what it does.
    pub title: &'static str,
    /// Checks, in the order they were made.
    pub checks: Vec<Check>,
    /// Things worth saying that are not checks.
    pub notes: Vec<String>,
}

impl Report {
    fn new(scenario: &Scenario) -> Self {
        Self {
            name: scenario.name,
            title: scenario.title,
            checks: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Whether every check passed (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// The failed checks.
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    /// Check `observed == expected`.
    fn expect<T: PartialEq + Debug>(&mut self, what: impl Into<String>, expected: T, observed: T) {
        let ok = expected == observed;
        self.checks.push(Check {
            what: what.into(),
            expected: format!("{expected:?}"),
            observed: format!("{observed:?}"),
            ok,
        });
    }

    /// Check a condition described by `expected`.
    fn that(
        &mut self,
        what: impl Into<String>,
        expected: impl Into<String>,
        ok: bool,
        observed: impl Display,
    ) {
        self.checks.push(Check {
            what: what.into(),
            expected: expected.into(),
            observed: observed.to_string(),
            ok,
        });
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Shut `board` down and check the machine is clean.
    fn shut_down(&mut self, label: &str, board: SimBoard) {
        let result = board.shut_down();
        self.that(
            format!("{label}: removal, chip idle, pools full, sanitizer empty"),
            "clean",
            result.is_ok(),
            result.err().unwrap_or_else(|| "clean".into()),
        );
    }
}

impl Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {}", self.name, self.title)?;
        let width = self.checks.iter().map(|c| c.what.len()).max().unwrap_or(0);
        for c in &self.checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            if c.ok {
                writeln!(f, "  {mark} {:width$}  {}", c.what, c.observed)?;
            } else {
                writeln!(
                    f,
                    "  {mark} {:width$}  observed {}, expected {}",
                    c.what, c.observed, c.expected
                )?;
            }
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        let failed = self.failures().len();
        write!(
            f,
            "{}: {} checks, {}",
            self.name,
            self.checks.len(),
            if failed == 0 {
                "all passed".to_string()
            } else {
                format!("{failed} failed")
            }
        )
    }
}

/// A named scenario.
#[derive(Clone, Copy)]
pub struct Scenario {
    /// `P1` … `P19`.
    pub name: &'static str,
    /// One line on what it does.
    pub title: &'static str,
    run: fn(&Scenario) -> Result<Report, String>,
}

impl Debug for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.title)
    }
}

impl Scenario {
    /// Run it.
    ///
    /// # Errors
    /// A message when the run itself broke down (a board that would not build, a request that
    /// never completed); checks that disagree are in the report, not errors.
    pub fn run(&self) -> Result<Report, String> {
        (self.run)(self)
    }
}

/// Every scenario, in order.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "P1",
        title: "write 1024 bytes of 0xAB (the test application's default)",
        run: p01,
    },
    Scenario {
        name: "P2",
        title: "P1, then read the 1024 bytes back",
        run: p02,
    },
    Scenario {
        name: "P3",
        title: "write 20000 bytes: three transfers",
        run: p03,
    },
    Scenario {
        name: "P4",
        title: "write 128 KiB at page offset 0x100 on scattered pages, read it back",
        run: p04,
    },
    Scenario {
        name: "P5",
        title: "write 131073 bytes: larger than the SRAM",
        run: p05,
    },
    Scenario {
        name: "P6",
        title: "the single-transfer toggle IOCTL",
        run: p06,
    },
    Scenario {
        name: "P7",
        title: "concurrent 64 KiB write and read with CoalesceChannels",
        run: p07,
    },
    Scenario {
        name: "P8",
        title: "thread test: 4 threads of 1024-byte reads and writes for 10 s of virtual time",
        run: p08,
    },
    Scenario {
        name: "P9",
        title: "read 8192 bytes, the chip stops after 5000 once",
        run: p09,
    },
    Scenario {
        name: "P10",
        title: "read with StopAfter{0}: once, then persistent",
        run: p10,
    },
    Scenario {
        name: "P11",
        title: "write 8192 bytes, the chip stops after 5000",
        run: p11,
    },
    Scenario {
        name: "P12",
        title: "write with a data abort at byte 0",
        run: p12,
    },
    Scenario {
        name: "P13",
        title: "stalled write, a queued write cancelled, power-down waits",
        run: p13,
    },
    Scenario {
        name: "P14",
        title: "a spurious interrupt (line high, no channel bit)",
        run: p14,
    },
    Scenario {
        name: "P15",
        title: "immediate engine: the ISR waits for program-DMA to release the lock",
        run: p15,
    },
    Scenario {
        name: "P16",
        title: "1000 write/read cycles of random lengths and page offsets",
        run: p16,
    },
    Scenario {
        name: "P17",
        title: "fragmentation variant: an 8 KiB write from a chain of 1 KiB buffers",
        run: p17,
    },
    Scenario {
        name: "P18",
        title: "buffers and descriptor chains above 4 GiB",
        run: p18,
    },
    Scenario {
        name: "P19",
        title: "D0 -> D3 -> D0, then P1; then removal with the soft reset",
        run: p19,
    },
];

/// The scenario called `name` (`P1`, `p01`, `P01` …), if there is one.
pub fn find(name: &str) -> Option<&'static Scenario> {
    let n = name.trim();
    let digits = n.strip_prefix(['P', 'p'])?;
    let number: u32 = digits.parse().ok()?;
    SCENARIOS
        .iter()
        .find(|s| s.name[1..].parse::<u32>().ok() == Some(number))
}

// -------------------------------------------------------------------------------------------
// Helpers

type Handle = RequestHandle<SimBuffer>;

fn board(config: BoardConfig) -> Result<SimBoard, String> {
    SimBoard::new(config)
}

fn default_board() -> Result<SimBoard, String> {
    board(BoardConfig::default())
}

fn wait(h: &Handle) -> Result<Completed, String> {
    h.wait_timeout(REQUEST_TIMEOUT)
        .ok_or_else(|| format!("request {} did not complete", h.id()))
}

fn status_info(c: &Completed) -> (Result<(), Error>, u64) {
    (c.status, c.information)
}

/// Bytes that differ from their neighbours and from other seeds.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let i = i as u32;
            (i.wrapping_mul(131).wrapping_add(seed.wrapping_mul(7)) ^ (i >> 9)) as u8
        })
        .collect()
}

fn sram(board: &SimBoard, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // Scenarios ask only for ranges inside the SRAM.
    let _ = board.chip().sram_read(offset, &mut out);
    out
}

fn output(h: &Handle) -> Vec<u8> {
    h.output().map(SimBuffer::to_vec).unwrap_or_default()
}

fn settle(board: &SimBoard) -> Result<(), String> {
    if board.settle(REQUEST_TIMEOUT) {
        Ok(())
    } else {
        Err("interrupts and DPCs did not settle".into())
    }
}

fn done_irqs(board: &SimBoard, channel: usize) -> u64 {
    board.chip().channel_stats(channel).done_interrupts
}

/// Map registers held and live mappings, over the machine's adapters.
fn outstanding(board: &SimBoard) -> (u32, usize) {
    board.sim().adapters().iter().fold((0, 0), |(r, m), a| {
        let s = a.stats();
        (
            r + s.total_registers - s.free_registers,
            m + s.live_mappings,
        )
    })
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("differs at byte {i}"),
        None if a.len() == b.len() => "equal".into(),
        None => format!("lengths {} and {}", a.len(), b.len()),
    }
}

// -------------------------------------------------------------------------------------------
// P1–P4: the plain paths

fn p01(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let h = b.write(&[0xAB; 1024], 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    check_p1(&mut r, &b, &done, "");
    drop(h);
    r.shut_down("board", b);
    Ok(r)
}

/// P1's observations (also P19's after resume).
fn check_p1(r: &mut Report, b: &SimBoard, done: &Completed, prefix: &str) {
    let plx = b.plx();
    let stats = plx.stats();
    r.expect(
        format!("{prefix}EvtProgramWriteDma calls"),
        1,
        stats.program_write_calls,
    );
    let log = plx.program_log();
    r.expect(
        format!("{prefix}SG elements"),
        Some(1),
        log.last().map(|p| p.elements),
    );
    let dte = plx.descriptors(Direction::WriteToDevice)[0];
    r.expect(
        format!("{prefix}DTE0 {{size, local, dir, last}}"),
        (1024, 0, 0, true),
        (
            dte.transfer_size,
            dte.local_address,
            dte.desc_ptr & dpr::DIR_LOCAL_TO_PCI,
            dte.desc_ptr & dpr::LAST_ELEMENT != 0,
        ),
    );
    r.expect(
        format!("{prefix}SRAM[0,1024) all 0xAB"),
        true,
        sram(b, 0, 1024).iter().all(|&x| x == 0xAB),
    );
    let rest = sram(b, 1024, (hw::SRAM_SIZE - 1024) as usize);
    r.expect(
        format!("{prefix}SRAM[1024,128K) unchanged (zero)"),
        true,
        rest.iter().all(|&x| x == 0),
    );
    let ch0 = b.chip().channel_stats(0);
    r.expect(
        format!("{prefix}ch0 starts, Done IRQs"),
        (1, 1),
        (ch0.starts, ch0.done_interrupts),
    );
    let irq = plx.interrupt_stats();
    r.expect(
        format!("{prefix}ISR claims, DPCs"),
        (1, 1),
        (irq.claimed, irq.dpcs_run),
    );
    r.expect(
        format!("{prefix}status, information"),
        (Ok(()), 1024),
        status_info(done),
    );
    r.expect(
        format!("{prefix}write transaction"),
        State::Released,
        plx.transaction_states()[0],
    );
}

fn p02(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let w = b.write(&[0xAB; 1024], 0).map_err(|e| e.to_string())?;
    let wd = wait(&w)?;
    r.expect(
        "write: status, information",
        (Ok(()), 1024),
        status_info(&wd),
    );
    let h = b.read(1024, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    r.expect("host buffer all 0xAB", vec![0xAB; 1024], output(&h));
    let completions: Vec<_> = b
        .plx()
        .completion_log()
        .into_iter()
        .filter(|c| c.direction == Direction::ReadFromDevice)
        .map(|c| (c.call, c.finished))
        .collect();
    r.expect(
        "read: DmaCompleted* calls",
        vec![(CompletionCall::WithLength(1024), true)],
        completions,
    );
    r.expect(
        "read DTE0 TransferSize afterwards (clear-count)",
        0,
        b.plx().descriptors(Direction::ReadFromDevice)[0].transfer_size,
    );
    r.expect("ch1 Done IRQs", 1, done_irqs(&b, 1));
    r.expect(
        "read: status, information",
        (Ok(()), 1024),
        status_info(&done),
    );
    drop((w, h));
    r.shut_down("board", b);
    Ok(r)
}

fn p03(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let data = pattern(20_000, 3);
    let h = b.write(&data, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    let log = b.plx().program_log();
    r.expect(
        "transfer lengths",
        vec![8192, 8192, 3616],
        log.iter().map(|p| p.length).collect::<Vec<_>>(),
    );
    r.expect(
        "SG elements per transfer",
        vec![2, 2, 1],
        log.iter().map(|p| p.elements).collect::<Vec<_>>(),
    );
    r.expect(
        "first DTE LocalAddress per transfer",
        vec![0, 8192, 16384],
        log.iter().map(|p| p.first_local).collect::<Vec<_>>(),
    );
    r.expect("ch0 Done IRQs", 3, done_irqs(&b, 0));
    r.expect("status, information", (Ok(()), 20_000), status_info(&done));
    let back = sram(&b, 0, data.len());
    r.that(
        "SRAM[0,20000) = the pattern",
        "equal",
        back == data,
        first_difference(&back, &data),
    );
    drop(h);
    r.shut_down("board", b);
    Ok(r)
}

fn p04(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let data = pattern(131_072, 4);
    let h = b.write(&data, 0x100).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    let log = b.plx().program_log();
    r.expect("write transfers", 16, log.len());
    r.expect(
        "SG elements of every transfer",
        true,
        log.iter().all(|p| p.elements == 3),
    );
    r.expect("ch0 Done IRQs", 16, done_irqs(&b, 0));
    r.expect(
        "write: status, information",
        (Ok(()), 131_072),
        status_info(&done),
    );
    let back = b.read(131_072, 0).map_err(|e| e.to_string())?;
    let rd = wait(&back)?;
    r.expect(
        "read: status, information",
        (Ok(()), 131_072),
        status_info(&rd),
    );
    let got = output(&back);
    r.that(
        "read-back = the data",
        "equal",
        got == data,
        first_difference(&got, &data),
    );
    drop((h, back));
    r.shut_down("board", b);
    Ok(r)
}

// -------------------------------------------------------------------------------------------
// P5, P6: limits and the toggle

fn p05(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let h = b
        .write(&pattern(131_073, 5), 0)
        .map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    r.expect("status", Err(Error::InvalidBufferSize), done.status);
    let stats = b.plx().stats();
    r.expect("EvtProgramWriteDma calls", 0, stats.program_write_calls);
    r.expect("ISR calls", 0, b.plx().interrupt_stats().isrs);
    r.expect(
        "write transaction initialized, released (never-initialized release)",
        (0, 1),
        (stats.initialized[0], stats.released[0]),
    );
    let next = b.write(&[0x11; 1024], 0).map_err(|e| e.to_string())?;
    let nd = wait(&next)?;
    r.expect(
        "next write: status, information",
        (Ok(()), 1024),
        status_info(&nd),
    );
    drop((h, next));
    r.shut_down("board", b);
    Ok(r)
}

fn toggle(b: &SimBoard) -> Result<(Completed, u8), String> {
    let out = b.sim().allocate_buffer(1, 0).map_err(|e| e.to_string())?;
    let h = b
        .plx()
        .toggle_single_transfer(out)
        .map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    Ok((done, output(&h).first().copied().unwrap_or(0xFF)))
}

fn p06(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let (t1, v1) = toggle(&b)?;
    r.expect(
        "toggle: status, information, value",
        (Ok(()), 1, 1),
        (t1.status, t1.information, v1),
    );
    let h = b
        .write(&pattern(8192, 6), 0x100)
        .map_err(|e| e.to_string())?;
    let d = wait(&h)?;
    settle(&b)?;
    let log = b.plx().program_log();
    r.expect(
        "8192 at 0x100: transfers, elements",
        (1, vec![3]),
        (
            log.len(),
            log.iter().map(|p| p.elements).collect::<Vec<_>>(),
        ),
    );
    r.expect("8192: status, information", (Ok(()), 8192), status_info(&d));
    b.plx().clear_logs();
    let starts = b.chip().channel_stats(0).starts;
    let h2 = b
        .write(&pattern(8193, 6), 0x100)
        .map_err(|e| e.to_string())?;
    let d2 = wait(&h2)?;
    r.expect("8193: status", Err(Error::WdfTooManyTransfers), d2.status);
    r.expect(
        "8193: program-DMA calls, chip starts",
        (0, starts),
        (
            b.plx().program_log().len(),
            b.chip().channel_stats(0).starts,
        ),
    );
    let (t2, v2) = toggle(&b)?;
    r.expect("second toggle: status, value", (Ok(()), 0), (t2.status, v2));
    let h3 = b
        .write(&pattern(8193, 6), 0x100)
        .map_err(|e| e.to_string())?;
    let d3 = wait(&h3)?;
    settle(&b)?;
    r.expect(
        "8193 after the toggle: transfers",
        2,
        b.plx().program_log().len(),
    );
    r.expect(
        "8193 after the toggle: status, information",
        (Ok(()), 8193),
        status_info(&d3),
    );
    drop((h, h2, h3));
    r.shut_down("board", b);
    Ok(r)
}

// -------------------------------------------------------------------------------------------
// P7, P8: both channels at once

fn p07(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = board(BoardConfig {
        chip: Plx9656Config::new()
            .mode(Plx9656Mode::Manual)
            .coalesce_channels(true),
        ..BoardConfig::default()
    })?;
    b.chip()
        .sram_write(0, &pattern(65_536, 7))
        .map_err(|e| e.to_string())?;
    let w = b.write(&pattern(65_536, 8), 0).map_err(|e| e.to_string())?;
    let rd = b.read(65_536, 0).map_err(|e| e.to_string())?;
    // Run the chips only when both channels run (or one request is over), so the channels
    // finish together each time.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while w.try_completed().is_none() || rd.try_completed().is_none() {
        if Instant::now() > deadline {
            return Err("P7: the requests did not complete".into());
        }
        let ready = |ch: usize, h: &Handle| {
            b.chip().channel_state(ch) == Plx9656ChannelState::Running
                || h.try_completed().is_some()
        };
        if ready(0, &w) && ready(1, &rd) {
            b.chip().run_pending();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    settle(&b)?;
    let (wd, rdd) = (wait(&w)?, wait(&rd)?);
    r.expect(
        "write: status, information",
        (Ok(()), 65_536),
        status_info(&wd),
    );
    r.expect(
        "read: status, information",
        (Ok(()), 65_536),
        status_info(&rdd),
    );
    r.expect(
        "Done IRQs per channel",
        (8, 8),
        (done_irqs(&b, 0), done_irqs(&b, 1)),
    );
    let stats = b.plx().stats();
    r.that(
        "ISR calls that saw both active bits",
        ">= 1",
        stats.isr_both_channels >= 1,
        stats.isr_both_channels,
    );
    r.that(
        "DPC runs that completed both channels",
        ">= 1",
        stats.dpc_both_channels >= 1,
        stats.dpc_both_channels,
    );
    r.note("read data not compared: the write changes the SRAM meanwhile (as in the thread test)");
    drop((w, rd));
    r.shut_down("board", b);
    Ok(r)
}

/// P8's virtual run time.
const P8_VIRTUAL: Duration = Duration::from_secs(10);

fn p08(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = Arc::new(board(BoardConfig {
        chip: Plx9656Config::new().mode(Plx9656Mode::Deferred { latency_ns: 20_000 }),
        ..BoardConfig::default()
    })?);
    let end_ns = P8_VIRTUAL.as_nanos() as u64;
    // The clock: 1 ms of virtual time every 100 µs of real time.
    let clock = VirtualClock::start(b.chip().clone(), 1_000_000, Duration::from_micros(100))?;
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let requests = Arc::new(AtomicU64::new(0));
    let max_transfer_state = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (b, failures, requests, max_tx) = (
                Arc::clone(&b),
                Arc::clone(&failures),
                Arc::clone(&requests),
                Arc::clone(&max_transfer_state),
            );
            std::thread::spawn(move || {
                let data = vec![0x40 + i as u8; 1024];
                while b.chip().now_ns() < end_ns {
                    let h = if i % 2 == 0 {
                        b.write(&data, 0)
                    } else {
                        b.read(1024, 0)
                    };
                    let outcome = h
                        .map_err(|e| e.to_string())
                        .and_then(|h| wait(&h).map(|c| c.status));
                    let states = b.plx().transaction_states();
                    let in_transfer = states.iter().filter(|s| **s == State::Transfer).count();
                    max_tx.fetch_max(in_transfer as u64, Ordering::Relaxed);
                    requests.fetch_add(1, Ordering::Relaxed);
                    match outcome {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => lock(&failures).push(format!("thread {i}: {e}")),
                        Err(e) => {
                            lock(&failures).push(format!("thread {i}: {e}"));
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    drop(clock);
    settle(&b)?;
    let failures = lock(&failures).clone();
    let total = requests.load(Ordering::Relaxed);
    r.that(
        "requests, all successful",
        "> 0, no failure",
        failures.is_empty() && total > 0,
        if failures.is_empty() {
            format!("{total} requests")
        } else {
            failures.join("; ")
        },
    );
    let ignored = (
        b.chip().channel_stats(0).ignored_starts,
        b.chip().channel_stats(1).ignored_starts,
    );
    r.expect(
        "starts the chip ignored (a start while its channel ran: two transfers on one channel)",
        (0, 0),
        ignored,
    );
    r.that(
        "transactions in Transfer seen at once",
        "<= 2 (one per channel)",
        max_transfer_state.load(Ordering::Relaxed) <= 2,
        max_transfer_state.load(Ordering::Relaxed),
    );
    let stats = b.plx().stats();
    r.expect(
        "Done IRQs = transfers (write, read)",
        (stats.program_write_calls, stats.program_read_calls),
        (done_irqs(&b, 0), done_irqs(&b, 1)),
    );
    r.expect(
        "transactions at the end",
        [State::Released, State::Released],
        b.plx().transaction_states(),
    );
    r.expect(
        "map registers held, mappings live (SG lists) at the end",
        (0, 0),
        outstanding(&b),
    );
    r.note(format!(
        "{total} requests in {} ms of virtual time",
        b.chip().now_ns() / 1_000_000
    ));
    let b = Arc::into_inner(b).ok_or("P8: the board is still shared")?;
    r.shut_down("board", b);
    Ok(r)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// -------------------------------------------------------------------------------------------
// P9–P12: short transfers and aborts

fn p09(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let data = pattern(8192, 9);
    b.chip().sram_write(0, &data).map_err(|e| e.to_string())?;
    b.chip()
        .inject(1, 0, Plx9656Fault::StopAfter { bytes: 5000 }, false);
    let h = b.read(8192, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    let dtes = b.plx().descriptors(Direction::ReadFromDevice);
    r.expect(
        "DTE0 (re-issued, cleared), DTE1 (kept from the short transfer) sizes",
        (0, 4096),
        (dtes[0].transfer_size, dtes[1].transfer_size),
    );
    r.expect(
        "DmaCompleted* calls",
        vec![
            (CompletionCall::WithLength(4096), false),
            (CompletionCall::WithLength(4096), true),
        ],
        b.plx()
            .completion_log()
            .iter()
            .map(|c| (c.call, c.finished))
            .collect::<Vec<_>>(),
    );
    r.expect(
        "EvtProgramReadDma (offset, elements, first local)",
        vec![(0, 2, 0), (4096, 1, 4096)],
        b.plx()
            .program_log()
            .iter()
            .map(|p| (p.offset, p.elements, p.first_local))
            .collect::<Vec<_>>(),
    );
    r.expect("ch1 Done IRQs", 2, done_irqs(&b, 1));
    r.expect("status, information", (Ok(()), 8192), status_info(&done));
    let got = output(&h);
    r.that("data", "equal", got == data, first_difference(&got, &data));
    drop(h);
    r.shut_down("board", b);
    Ok(r)
}

/// P10's number of endless reprogramming cycles to see before unstalling.
const P10_CYCLES: u64 = 25;

fn p10(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let data = pattern(4096, 10);
    b.chip().sram_write(0, &data).map_err(|e| e.to_string())?;
    b.chip()
        .inject(1, 0, Plx9656Fault::StopAfter { bytes: 0 }, false);
    let h = b.read(4096, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    r.expect(
        "once: DmaCompleted* calls",
        vec![
            (CompletionCall::WithLength(0), false),
            (CompletionCall::WithLength(4096), true),
        ],
        b.plx()
            .completion_log()
            .iter()
            .map(|c| (c.call, c.finished))
            .collect::<Vec<_>>(),
    );
    r.expect(
        "once: program-DMA offsets (the same range re-issued)",
        vec![0, 0],
        b.plx()
            .program_log()
            .iter()
            .map(|p| p.offset)
            .collect::<Vec<_>>(),
    );
    r.expect("once: ch1 Done IRQs", 2, done_irqs(&b, 1));
    r.expect(
        "once: status, information",
        (Ok(()), 4096),
        status_info(&done),
    );
    r.expect("once: data", data.clone(), output(&h));

    // Persistent: the sample reprograms forever; see K cycles, then take the fault away.
    b.plx().clear_logs();
    let before = b.plx().stats().program_read_calls;
    b.chip()
        .inject(1, 2, Plx9656Fault::StopAfter { bytes: 0 }, true);
    let h2 = b.read(4096, 0).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while b.plx().stats().program_read_calls - before < P10_CYCLES {
        if Instant::now() > deadline || h2.try_completed().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let cycles = b.plx().stats().program_read_calls - before;
    r.that(
        "persistent: reprogramming cycles while the fault lasts",
        format!(">= {P10_CYCLES}, request pending"),
        cycles >= P10_CYCLES && h2.try_completed().is_none(),
        format!(
            "{cycles}, {}",
            if h2.try_completed().is_none() {
                "pending"
            } else {
                "completed"
            }
        ),
    );
    b.chip().clear_faults();
    let done2 = wait(&h2)?;
    settle(&b)?;
    r.expect(
        "persistent, after the fault is gone: status, information",
        (Ok(()), 4096),
        status_info(&done2),
    );
    drop((h, h2));
    r.shut_down("board", b);
    Ok(r)
}

fn hardened_board(chip: Plx9656Config, watchdog: Duration) -> Result<SimBoard, String> {
    board(BoardConfig {
        chip,
        driver: PlxConfig::hardened(watchdog),
        ..BoardConfig::default()
    })
}

fn p11(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let data = pattern(8192, 11);
    // Faithful.
    let b = default_board()?;
    b.chip()
        .inject(0, 0, Plx9656Fault::StopAfter { bytes: 5000 }, false);
    let h = b.write(&data, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    r.expect(
        "faithful: status, information (the sample's claim)",
        (Ok(()), 8192),
        status_info(&done),
    );
    r.expect(
        "faithful: SRAM[0,5000) written",
        data[..5000].to_vec(),
        sram(&b, 0, 5000),
    );
    r.expect(
        "faithful: SRAM[5000,8192) stale (never written)",
        true,
        sram(&b, 5000, 3192).iter().all(|&x| x == 0),
    );
    r.expect(
        "faithful: transfers",
        1,
        b.plx().stats().program_write_calls,
    );
    drop(h);
    r.shut_down("faithful board", b);
    // Hardened: clear-count on the write channel.
    let b = hardened_board(Plx9656Config::new(), Duration::from_secs(5))?;
    b.chip()
        .inject(0, 0, Plx9656Fault::StopAfter { bytes: 5000 }, false);
    let h = b.write(&data, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    r.expect(
        "hardened: DmaCompleted* calls (the cleared descriptor's 4096 bytes, then the rest)",
        vec![
            (CompletionCall::WithLength(4096), false),
            (CompletionCall::WithLength(4096), true),
        ],
        b.plx()
            .completion_log()
            .iter()
            .map(|c| (c.call, c.finished))
            .collect::<Vec<_>>(),
    );
    r.expect(
        "hardened: status, information",
        (Ok(()), 8192),
        status_info(&done),
    );
    let got = sram(&b, 0, 8192);
    r.that(
        "hardened: SRAM[0,8192) = the data (the rest re-issued)",
        "equal",
        got == data,
        first_difference(&got, &data),
    );
    r.note("hardened: the chip's clear-count leaves the interrupted descriptor whole, so 4096 bytes are reported and the framework re-issues the remaining 4096; the request ends with every byte written");
    drop(h);
    r.shut_down("hardened board", b);
    Ok(r)
}

fn p12(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let data = pattern(4096, 12);
    let b = default_board()?;
    b.chip()
        .inject(0, 0, Plx9656Fault::DataAbort { at_byte: 0 }, false);
    let h = b.write(&data, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    r.expect(
        "faithful: status, information",
        (Ok(()), 4096),
        status_info(&done),
    );
    r.expect(
        "faithful: chip outcome",
        Some(Plx9656Outcome::DataAbort),
        b.chip().last_outcome(0),
    );
    r.that(
        "faithful: INTCSR abort bits stay set",
        "non-zero",
        b.chip().peek_register(INTCSR) & intcsr::ABORT_BITS != 0,
        format!("{:#x}", b.chip().peek_register(INTCSR) & intcsr::ABORT_BITS),
    );
    drop(h);
    r.shut_down("faithful board", b);

    let b = hardened_board(Plx9656Config::new(), Duration::from_secs(5))?;
    b.chip()
        .inject(0, 0, Plx9656Fault::DataAbort { at_byte: 0 }, false);
    let h = b.write(&data, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    r.expect(
        "hardened: DmaCompleted* calls",
        vec![(CompletionCall::Final(0), true)],
        b.plx()
            .completion_log()
            .iter()
            .map(|c| (c.call, c.finished))
            .collect::<Vec<_>>(),
    );
    r.expect(
        "hardened: status, information",
        (Err(Error::DeviceDataError), 0),
        status_info(&done),
    );
    r.expect(
        "hardened: INTCSR abort bits cleared by the DPC",
        0,
        b.chip().peek_register(INTCSR) & intcsr::ABORT_BITS,
    );
    let next = b.write(&data, 0).map_err(|e| e.to_string())?;
    let nd = wait(&next)?;
    r.expect("hardened: the next write", (Ok(()), 4096), status_info(&nd));
    drop((h, next));
    r.shut_down("hardened board", b);
    Ok(r)
}

// -------------------------------------------------------------------------------------------
// P13–P15: stalls, spurious interrupts, immediate completion

fn p13(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let data = pattern(4096, 13);
    // Faithful.
    let b = Arc::new(default_board()?);
    b.chip().inject(0, 0, Plx9656Fault::Stall, false);
    let first = b.write(&data, 0).map_err(|e| e.to_string())?;
    let second = b.write(&data, 0).map_err(|e| e.to_string())?;
    let cancelled = second.cancel().map_err(|e| e.to_string())?;
    let sd = wait(&second)?;
    r.expect(
        "second write: cancel, status",
        (true, Err(Error::Cancelled)),
        (cancelled, sd.status),
    );
    r.expect(
        "EvtIoWrite reached (transactions initialized)",
        1,
        b.plx().stats().initialized[0],
    );
    let suspend = {
        let b = Arc::clone(&b);
        std::thread::spawn(move || b.suspend())
    };
    std::thread::sleep(Duration::from_millis(100));
    r.expect(
        "after 100 ms: first write pending, power-down finished, IRQs",
        (true, false, 0),
        (
            first.try_completed().is_none(),
            suspend.is_finished(),
            done_irqs(&b, 0),
        ),
    );
    r.expect(
        "power-down waiting for the request in flight",
        1,
        b.plx().power_down_waits(),
    );
    b.chip().release_stalled();
    let down = suspend.join().map_err(|_| "P13: power-down panicked")?;
    let fd = wait(&first)?;
    r.expect("power-down after the unstall", Ok(()), down);
    r.expect(
        "first write: status, information",
        (Ok(()), 4096),
        status_info(&fd),
    );
    b.start().map_err(|e| e.to_string())?;
    drop((first, second));
    let b = Arc::into_inner(b).ok_or("P13: the board is still shared")?;
    r.shut_down("faithful board", b);

    // Hardened: the watchdog.
    let b = hardened_board(Plx9656Config::new(), Duration::from_millis(100))?;
    b.chip().inject(0, 0, Plx9656Fault::Stall, false);
    let h = b.write(&data, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    r.expect(
        "hardened: status, information",
        (Err(Error::IoTimeout), 0),
        status_info(&done),
    );
    r.expect(
        "hardened: watchdog aborts, chip aborts, Done IRQs",
        (1, 1, 1),
        (
            b.plx().stats().watchdog_aborts,
            b.chip().channel_stats(0).aborts,
            done_irqs(&b, 0),
        ),
    );
    let next = b.write(&data, 0).map_err(|e| e.to_string())?;
    let nd = wait(&next)?;
    r.expect("hardened: the next write", (Ok(()), 4096), status_info(&nd));
    drop((h, next));
    r.shut_down("hardened board", b);
    Ok(r)
}

fn p14(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let before = b.plx().interrupt_stats();
    let states = b.plx().transaction_states();
    b.chip().raise_spurious();
    settle(&b)?;
    let after = b.plx().interrupt_stats();
    r.expect(
        "ISR calls, claims, DPCs queued",
        (before.isrs + 1, before.claimed, before.dpcs_queued),
        (after.isrs, after.claimed, after.dpcs_queued),
    );
    r.expect("transaction states", states, b.plx().transaction_states());
    r.expect("line low again", false, b.chip().line_asserted());
    r.shut_down("board", b);
    Ok(r)
}

fn p15(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let data = pattern(40_000, 15);
    // For each chain end: was program-DMA holding the interrupt lock (is the chip finishing
    // inside the DMACSR write)?
    let ends = Arc::new(Mutex::new(Vec::<bool>::new()));
    {
        let (ends, device) = (Arc::clone(&ends), b.plx().device().clone());
        b.chip().set_event_sink(move |e| {
            if let Plx9656EventKind::Done { .. } = e.kind {
                lock(&ends).push(device.context().in_program_dma());
            }
        });
    }
    let mut bad = 0;
    for _ in 0..5 {
        // One channel at a time, so each claim answers one Done interrupt.
        let w = b.write(&data, 0x80).map_err(|e| e.to_string())?;
        let wd = wait(&w)?;
        let rd = b.read(40_000, 0x40).map_err(|e| e.to_string())?;
        let rdd = wait(&rd)?;
        if (wd.status, rdd.status) != (Ok(()), Ok(())) || output(&rd) != data {
            bad += 1;
        }
    }
    settle(&b)?;
    // The sink holds the device: break that link before the board goes.
    b.chip().clear_event_sink();
    r.expect("round trips that failed or differ", 0, bad);
    let stats = b.plx().stats();
    let transfers = stats.program_write_calls + stats.program_read_calls;
    r.expect("transfers (5 × 2 × 5)", 50, transfers);
    r.expect(
        "DmaCompleted* calls = transfers",
        transfers,
        stats.dma_completed_calls[0] + stats.dma_completed_calls[1],
    );
    r.expect(
        "ISR calls while program-DMA held the interrupt lock (any thread)",
        0,
        stats.isr_inside_program_dma,
    );
    let ends = lock(&ends).clone();
    r.expect(
        "chains that ended while program-DMA held the interrupt lock (inside the DMACSR write)",
        (transfers as usize, transfers as usize),
        (ends.len(), ends.iter().filter(|inside| **inside).count()),
    );
    r.expect("deepest program-DMA nesting", 1, stats.max_program_depth);
    r.expect(
        "Done IRQs = ISR claims",
        done_irqs(&b, 0) + done_irqs(&b, 1),
        b.plx().interrupt_stats().claimed,
    );
    r.shut_down("board", b);
    Ok(r)
}

// -------------------------------------------------------------------------------------------
// P16: the long round trip

/// P16's cycles.
pub const P16_CYCLES: u32 = 1000;

fn p16(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let mut seed = 0x1234_5678_9ABC_DEF0u64;
    let mut next = move || {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut mismatches = Vec::new();
    let mut wrong_transfers = Vec::new();
    let mut bytes = 0u64;
    for cycle in 0..P16_CYCLES {
        let len = 1 + next() % 131_072;
        let offset = next() % 4096;
        let data = pattern(len as usize, cycle);
        let before = b.plx().stats();
        let w = b.write(&data, offset).map_err(|e| e.to_string())?;
        let wd = wait(&w)?;
        let rd = b.read(len, next() % 4096).map_err(|e| e.to_string())?;
        let rdd = wait(&rd)?;
        let after = b.plx().stats();
        let expected = len.div_ceil(hw::MAXIMUM_TRANSFER_LENGTH);
        let writes = after.program_write_calls - before.program_write_calls;
        let reads = after.program_read_calls - before.program_read_calls;
        if (writes, reads) != (expected, expected) {
            wrong_transfers.push(format!("cycle {cycle}: {len} bytes took {writes}/{reads}"));
        }
        if (wd.status, wd.information, rdd.status, rdd.information) != (Ok(()), len, Ok(()), len)
            || output(&rd) != data
        {
            mismatches.push(format!("cycle {cycle} ({len} bytes at {offset:#x})"));
        }
        bytes += len;
    }
    settle(&b)?;
    r.that(
        "cycles whose read-back differs",
        "none",
        mismatches.is_empty(),
        if mismatches.is_empty() {
            format!("none of {P16_CYCLES}")
        } else {
            mismatches.join(", ")
        },
    );
    r.that(
        "transfers per request = ceil(len / 8192)",
        "every cycle",
        wrong_transfers.is_empty(),
        if wrong_transfers.is_empty() {
            "every cycle".to_string()
        } else {
            wrong_transfers.join(", ")
        },
    );
    let stats = b.plx().stats();
    r.expect(
        "initialized = released (write, read)",
        (stats.initialized[0], stats.initialized[1]),
        (stats.released[0], stats.released[1]),
    );
    r.expect(
        "map registers held, mappings live (SG lists) at the end",
        (0, 0),
        outstanding(&b),
    );
    r.note(format!("{bytes} bytes written and read back"));
    r.shut_down("board", b);
    Ok(r)
}

// -------------------------------------------------------------------------------------------
// P17: the fragmentation build

/// The page offsets of the fragmentation build's eight 1 KiB buffers: four of them cross a
/// page boundary.
const P17_CHAIN: [u64; 8] = [0, 3584, 512, 3072, 0, 3900, 100, 3500];

fn p17(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = board(BoardConfig {
        fragmentation: Some(P17_CHAIN.to_vec()),
        ..BoardConfig::default()
    })?;
    r.expect(
        "max SG elements",
        crate::driver::FRAGMENTATION_DTE_COUNT,
        u64::from(b.plx().enabler().max_sg_elements()),
    );
    let data = pattern(8192, 17);
    let h = b.write(&data, 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    let log = b.plx().program_log();
    let elements: Vec<usize> = log.iter().map(|p| p.elements).collect();
    r.that(
        "8192: one transfer with 8-16 SG elements",
        "1 transfer, 8..=16",
        elements.len() == 1 && (8..=16).contains(&elements[0]),
        format!("{elements:?}"),
    );
    r.expect(
        "8192: status, information",
        (Ok(()), 8192),
        status_info(&done),
    );
    r.expect("SRAM = data", data.clone(), sram(&b, 0, 8192));
    let back = b.read(8192, 0).map_err(|e| e.to_string())?;
    let bd = wait(&back)?;
    r.expect(
        "read back through the read chain: status, information, data",
        ((Ok(()), 8192), data.clone()),
        (status_info(&bd), output(&back)),
    );
    let (t, v) = toggle(&b)?;
    r.expect("toggle single transfer on", (Ok(()), 1), (t.status, v));
    b.plx().clear_logs();
    let data2 = pattern(8192, 170);
    let h2 = b.write(&data2, 0).map_err(|e| e.to_string())?;
    let d2 = wait(&h2)?;
    settle(&b)?;
    r.expect(
        "single transfer on: transfers, status, information",
        (1, (Ok(()), 8192)),
        (b.plx().program_log().len(), status_info(&d2)),
    );
    r.expect("SRAM = second data", data2, sram(&b, 0, 8192));
    let h3 = b.write(&pattern(8193, 171), 0).map_err(|e| e.to_string())?;
    let d3 = wait(&h3)?;
    r.expect(
        "8193 bytes: larger than the 8 KiB chain",
        Err(Error::InvalidBufferSize),
        d3.status,
    );
    r.note("the sample's fragmentation chain (8 KiB) is smaller than its 128 KiB request limit; the port refuses longer requests with STATUS_INVALID_BUFFER_SIZE");
    drop((h, back, h2, h3));
    r.shut_down("board", b);
    Ok(r)
}

// -------------------------------------------------------------------------------------------
// P18: above 4 GiB

/// 4 GiB.
const FOUR_GIB: u64 = 1 << 32;

fn p18(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let data = pattern(8192, 18);
    let high = Placement::Above(dmatx::PhysAddr::new(FOUR_GIB));
    let high_memory = || {
        SimConfig::new()
            .memory(0x10_0000, 64 << 20)
            .add_region(FOUR_GIB, 64 << 20)
    };
    // Faithful chip: the upper address bits come from DMADAC (zero).
    let b = board(BoardConfig {
        sim: high_memory(),
        ..BoardConfig::default()
    })?;
    let buffer = b.buffer_placed(&data, 0, high).map_err(|e| e.to_string())?;
    let h = b.plx().write(buffer).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    let record = b.sim().sanitizer_record();
    r.expect(
        "faithful chip: write status, information (the sample cannot tell)",
        (Ok(()), 8192),
        status_info(&done),
    );
    r.that(
        "faithful chip: stray accesses at truncated addresses in the sanitizer record",
        ">= 1",
        !record.is_empty(),
        record.len(),
    );
    r.that(
        "faithful chip: SRAM differs from the data",
        "differs",
        sram(&b, 0, 8192) != data,
        first_difference(&sram(&b, 0, 8192), &data),
    );
    b.sim().clear_sanitizer();
    drop(h);
    r.shut_down("faithful chip", b);

    // honour_desc_high: the descriptor's upper half is used; the data arrives.
    let b = board(BoardConfig {
        sim: high_memory(),
        chip: Plx9656Config::new().honour_desc_high(true),
        ..BoardConfig::default()
    })?;
    let buffer = b.buffer_placed(&data, 0, high).map_err(|e| e.to_string())?;
    let h = b.plx().write(buffer).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    let back = b
        .plx()
        .read(
            b.sim()
                .allocate_buffer_with(8192, 0, high)
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    let bd = wait(&back)?;
    settle(&b)?;
    r.expect(
        "honour_desc_high: write, read",
        ((Ok(()), 8192), (Ok(()), 8192)),
        (status_info(&done), status_info(&bd)),
    );
    r.expect(
        "honour_desc_high: SRAM = data",
        data.clone(),
        sram(&b, 0, 8192),
    );
    r.expect(
        "honour_desc_high: read-back = data",
        data.clone(),
        output(&back),
    );
    r.expect(
        "honour_desc_high: sanitizer record",
        0,
        b.sim().sanitizer_record().len(),
    );
    drop((h, back));
    r.shut_down("honour_desc_high", b);

    // Common buffers above 4 GiB: the 32-bit descriptor pointer is truncated.
    for variant in [Variant::Faithful, Variant::Hardened] {
        let label = format!("{variant:?} driver, chains above 4 GiB");
        let b = board(BoardConfig {
            sim: SimConfig::new().memory(FOUR_GIB, 64 << 20),
            driver: PlxConfig {
                variant,
                ..PlxConfig::hardened(Duration::from_secs(5))
            },
            ..BoardConfig::default()
        })?;
        r.that(
            format!("{label}: descriptor chain address"),
            ">= 4 GiB",
            b.plx().descriptor_address(Direction::WriteToDevice) >= FOUR_GIB,
            format!(
                "{:#x}",
                b.plx().descriptor_address(Direction::WriteToDevice)
            ),
        );
        let h = b.write(&data, 0).map_err(|e| e.to_string())?;
        let done = wait(&h)?;
        settle(&b)?;
        r.expect(
            format!("{label}: chip outcome"),
            Some(Plx9656Outcome::DescFetchAbort),
            b.chip().last_outcome(0),
        );
        let expected = if variant == Variant::Faithful {
            (Ok(()), 8192)
        } else {
            (Err(Error::DeviceDataError), 0)
        };
        r.expect(
            format!("{label}: status, information"),
            expected,
            status_info(&done),
        );
        r.expect(
            format!("{label}: SRAM untouched"),
            true,
            sram(&b, 0, 8192).iter().all(|&x| x == 0),
        );
        b.sim().clear_sanitizer();
        drop(h);
        r.shut_down(&label, b);
    }
    Ok(r)
}

// -------------------------------------------------------------------------------------------
// P19: power

fn p19(s: &Scenario) -> Result<Report, String> {
    let mut r = Report::new(s);
    let b = default_board()?;
    let writes = Arc::new(Mutex::new(Vec::<(u64, u64, u32)>::new()));
    {
        let writes = Arc::clone(&writes);
        b.chip().set_event_sink(move |e| {
            if let Plx9656EventKind::RegisterWrite { offset, value, .. } = e.kind {
                lock(&writes).push((e.time_ns, offset, value));
            }
        });
    }
    // Something non-zero in the DAC registers, to see D0 entry zero them.
    let bar0 = b.chip().bar0();
    use dmatx::hal::RegisterWindow;
    bar0.write32(DMA_DAC[0], 0xDEAD);
    bar0.write32(DMA_DAC[1], 0xBEEF);
    b.suspend().map_err(|e| format!("suspend: {e}"))?;
    b.start().map_err(|e| format!("resume: {e}"))?;
    let dac_zeroed = lock(&writes)
        .iter()
        .filter(|(_, offset, value)| DMA_DAC.contains(offset) && *value == 0)
        .count();
    r.expect(
        "DAC registers written 0 by the D0 entry after resume",
        2,
        dac_zeroed,
    );
    r.expect(
        "DAC registers now",
        (0, 0),
        (
            b.chip().peek_register(DMA_DAC[0]),
            b.chip().peek_register(DMA_DAC[1]),
        ),
    );
    r.expect(
        "no soft reset on D3 (not final)",
        0,
        b.chip().stats().soft_resets,
    );
    let h = b.write(&[0xAB; 1024], 0).map_err(|e| e.to_string())?;
    let done = wait(&h)?;
    settle(&b)?;
    check_p1(&mut r, &b, &done, "P1 after resume: ");
    drop(h);
    let chip = b.chip().clone();
    r.shut_down("board", b);
    let cntrl: Vec<(u64, u32)> = lock(&writes)
        .iter()
        .filter(|(_, offset, _)| *offset == hw::CNTRL)
        .map(|(t, _, v)| (*t, *v & hw::cntrl::SOFTWARE_RESET))
        .collect();
    r.expect(
        "D3Final: CNTRL bit 30 set, then cleared",
        vec![hw::cntrl::SOFTWARE_RESET, 0],
        cntrl.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
    );
    r.expect(
        "D3Final: virtual ns between set and clear",
        Some(100_000_000),
        match cntrl.as_slice() {
            [(a, _), (b, _)] => Some(b - a),
            _ => None,
        },
    );
    r.expect("chip soft resets", 1, chip.stats().soft_resets);
    chip.clear_event_sink();
    Ok(r)
}
