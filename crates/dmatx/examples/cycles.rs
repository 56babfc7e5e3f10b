//! Runs N steady-state transactions on the simulated machine, as the `cycle/*` benchmarks do,
//! and prints the time per transaction. Its use is counting instructions, which a noisy machine
//! does not blur (`docs/PERFORMANCE.md`, "Tracing cost"):
//!
//! ```sh
//! cargo build --release -p dmatx --example cycles [--features tracing]
//! valgrind --tool=callgrind target/release/examples/cycles packet 200000
//! ```
//!
//! `packet`: one 4 KiB packet transaction (`cycle/packet_4k`); `sg`: one 1 MiB scatter/gather
//! transaction of 16 transfers of 64 KiB (`cycle/sg_1m_64k`).

use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Profile, SgElement,
    Transaction,
};
use dmatx_sim::{SimBuffer, SimConfig};
use std::hint::black_box;
use std::time::Instant;

type Tx = Transaction<dmatx_sim::SimPlatform, (), SimBuffer>;

fn program(_: &Tx, _: &(), _: Direction, sg: &[SgElement]) -> bool {
    black_box(sg);
    true
}

fn main() {
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_else(|| "packet".to_owned());
    let n: u64 = args.next().map_or(100_000, |a| a.parse().expect("a count"));
    let (profile, max, registers, length) = match kind.as_str() {
        "packet" => (Profile::Packet64, 4096, 32, 4096),
        "sg" => (Profile::ScatterGather64, 64 * 1024, 17, 1 << 20),
        other => panic!("unknown kind {other}: packet or sg"),
    };
    let sim = SimConfig::new()
        .memory(0x1000_0000, 256 << 20)
        .map_registers(registers)
        .build()
        .unwrap();
    let config = EnablerConfig::new(profile, max)
        .with_version(DmaVersion::V3)
        .with_verifier(false);
    let enabler = Enabler::create(&DmaDevice::new(sim.clone()), config).unwrap();
    let t = Tx::create(&enabler).unwrap();
    let mut buffer = sim.allocate_buffer(length, 0).unwrap();
    let start = Instant::now();
    for _ in 0..n {
        t.initialize_using_offset(program, Direction::WriteToDevice, buffer, 0, length)
            .map_err(|e| e.error)
            .unwrap();
        t.execute(()).unwrap();
        while t.dma_completed().unwrap() == Completion::MoreProcessingRequired {}
        buffer = t.release().unwrap().unwrap();
    }
    let per = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{kind}: {n} transactions, {per:.1} ns each");
    drop((t, buffer));
    sim.check_clean().unwrap();
}
