//! CPU time per edu transfer on the simulated machine: the framework, the runtime, the driver
//! and the simulated device together, with the device's DMA delay at zero, so the figure is
//! what the software costs (the guest tier's `edu.cost_per_transfer` measures the same on
//! QEMU's edu through VFIO, beside the device's 100 ms per DMA).
//!
//! `cargo run --release -p dmatx-edu --example cost [round-trips]`

use std::time::{Duration, Instant};

use dmatx_edu::sim::{BoardConfig, SimEduBoard};

fn process_cpu() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn main() -> Result<(), String> {
    let rounds: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|e| format!("round trips `{n}`: {e}"))?,
        None => 2000,
    };
    let board = SimEduBoard::new(BoardConfig::default().one_transfer_of_registers())?;
    let data: Vec<u8> = (0..65_536u32).map(|i| (i * 7 + 3) as u8).collect();
    let before = board.edu().stats().transfers();
    let (cpu0, wall0) = (process_cpu(), Instant::now());
    for _ in 0..rounds {
        let h = board
            .loopback(&data, 0x80, 0x100)
            .map_err(|e| format!("submit: {e}"))?;
        let done = h
            .wait_timeout(Duration::from_secs(10))
            .ok_or("a loopback did not complete")?;
        done.status.map_err(|e| format!("loopback: {e}"))?;
    }
    let (cpu, wall) = (process_cpu() - cpu0, wall0.elapsed());
    let transfers = board.edu().stats().transfers() - before;
    board.shut_down()?;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / transfers as f64;
    println!(
        "{rounds} loopbacks of 64 KiB: {transfers} transfers, process CPU {:.2} us/transfer, wall {:.2} us/transfer",
        per(cpu),
        per(wall)
    );
    Ok(())
}
